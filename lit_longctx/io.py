"""Atomic file and directory writes: the one place lit-longctx writes files that a failed write must not corrupt.

A write goes to a temporary name *in the destination directory* (so the final rename never crosses a filesystem),
is flushed and fsynced, then renamed over the destination with ``os.replace``. A write that fails (disk full, a
kill, an exception) leaves the previous file intact and removes its temporary file where it still can.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path`` atomically.

    >>> with atomic_write("out.bin") as f:
    ...     f.write(b"...")
    """
    if "r" in mode or "a" in mode:
        raise ValueError(f"atomic_write is for writing whole files, not mode {mode!r}")
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(dest.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success it takes the place of ``path``.

    An existing ``path`` is moved aside first and removed only after the new directory is in place, so a failure at
    any point leaves either the old or the new directory under ``path``, never a half-written one.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.rmdir(old)
        os.replace(dest, old)
    os.replace(tmp, dest)
    _fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_writable(directory: str | os.PathLike, what: str = "output directory") -> Path:
    """``directory`` (created if missing) is writable, else a clear ``PermissionError``-free ``ValueError``.

    Raises:
        NotWritableError: the directory cannot be created or written, naming it and what it is for.
    """
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as exc:
        raise NotWritableError(
            f"{what} {str(d)!r} is not writable ({exc.strerror or exc}); choose a directory you can write to"
        ) from None
    return d


class NotWritableError(ValueError):
    """A directory lit-longctx must write to cannot be written (shown to users as one ``error:`` line)."""
