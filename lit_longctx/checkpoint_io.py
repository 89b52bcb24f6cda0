"""Lightning checkpoint files written atomically and read weights-only.

Lightning's ``TorchCheckpointIO`` writes ``last.ckpt`` in place, so a disk that fills up or a SIGKILL during the save
leaves a truncated file where the previous checkpoint was; and it reads ``http(s)://`` checkpoints with
``weights_only=False``, so a pickle payload in a remote file runs code. :class:`AtomicCheckpointIO` writes through
:func:`lit_longctx.io.atomic_write` (a temporary name in the destination directory, fsync, rename), so a failed save
leaves the previous checkpoint intact, and it reads every checkpoint, local or remote, with ``weights_only=True``.
The ``lit-longctx`` CLI installs it on every strategy that saves through a CheckpointIO (single device, DDP, FSDP
full state dicts).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

from lit_longctx.hf import CheckpointError
from lit_longctx.io import atomic_write


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (disk full, not writable); the previous file at that path is untouched."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic local saves and weights-only loads (local files and URLs alike)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)  # remote stores: their own semantics
            return
        try:
            with atomic_write(path) as f:
                torch.save(checkpoint, f)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            why = "the disk is full" if full else (exc.strerror or str(exc))
            raise CheckpointSaveError(
                f"could not save the checkpoint {os.fspath(path)!r}: {why}; the previous checkpoint at that path (if "
                "any) is intact: free space or choose another directory, then resume with --ckpt_path last"
            ) from exc

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        # a checkpoint is data, never code: weights_only whatever the caller (or Lightning's URL default) asks for
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
