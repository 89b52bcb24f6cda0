"""Atomic writes: a failed write leaves the previous file (or directory) exactly as it was."""

import os

import pytest

from lit_longctx.io import NotWritableError, atomic_directory, atomic_write, atomic_write_bytes, check_writable


def test_atomic_write_replaces_on_success(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old")
    atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary left behind


def test_atomic_write_failure_keeps_previous(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old")
    with pytest.raises(OSError), atomic_write(p) as f:
        f.write(b"half")
        raise OSError(28, "No space left on device")
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_directory_success_and_failure(tmp_path):
    d = tmp_path / "out"
    with atomic_directory(d) as t:
        (t / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(d) as t:
        (t / "a").write_text("2")
        raise RuntimeError("boom")
    assert (d / "a").read_text() == "1"
    with atomic_directory(d) as t:
        (t / "b").write_text("3")
    assert sorted(os.listdir(d)) == ["b"]
    assert os.listdir(tmp_path) == ["out"]


def test_check_writable_under_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotWritableError, match="run directory .* is not writable"):
        check_writable(f / "sub", "run directory")
