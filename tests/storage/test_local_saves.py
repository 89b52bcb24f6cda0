"""Local checkpoints: a save killed half-way never becomes what ``--ckpt_path last`` resolves to."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lit_longctx.storage import newest_last_checkpoint
from tests.cli_helpers import REPO

#: a real process saving a ~100 MB checkpoint through Lightning's TorchCheckpointIO (ModelCheckpoint's code path)
SAVER = """
import sys, torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
io = TorchCheckpointIO()
io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, sys.argv[1])
print("first", flush=True)
io.save_checkpoint({"global_step": 2, "w": torch.ones(25_000_000)}, sys.argv[1])
print("second", flush=True)
"""


@pytest.mark.slow
def test_a_local_save_killed_mid_write_leaves_the_previous_last(tmp_path):
    staging = tmp_path / "tmp"  # where fsspec's transaction writes before it renames
    staging.mkdir()
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(staging), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(last)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "first"
    deadline = time.monotonic() + 120
    while not any(p.is_file() and p.stat().st_size > 0 for p in staging.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "the second save finished before the kill"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert newest_last_checkpoint(tmp_path / "run") == str(last)
    assert torch.load(last, weights_only=True)["global_step"] == 1  # the complete first save


def test_a_truncated_last_ckpt_is_skipped_for_an_older_complete_one(tmp_path, capsys):
    good, cut = tmp_path / "a" / "last.ckpt", tmp_path / "b" / "last.ckpt"
    for p in (good, cut):
        p.parent.mkdir()
        torch.save({"global_step": 3, "w": torch.ones(4096)}, p)
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # e.g. a copy across filesystems killed half-way
    os.utime(good, (1, 1))  # the complete one is older
    assert newest_last_checkpoint(tmp_path / "a", tmp_path / "b") == str(good)
    assert f"skipping {cut}" in capsys.readouterr().err


def test_a_sharded_checkpoint_counts_only_with_its_metadata(tmp_path):
    shards = tmp_path / "b" / "last.ckpt"  # a distributed-checkpoint directory whose save stopped before meta.pt
    shards.mkdir(parents=True)
    (shards / "__0_0.distcp").write_bytes(b"shard")
    (shards / ".metadata").write_bytes(b"metadata")
    good = tmp_path / "a" / "last.ckpt"
    good.parent.mkdir()
    torch.save({"global_step": 1}, good)
    os.utime(good, (1, 1))
    assert newest_last_checkpoint(tmp_path) == str(good)
    (shards / "meta.pt").write_bytes(b"meta")
    assert newest_last_checkpoint(tmp_path) == str(shards)
