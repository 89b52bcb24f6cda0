"""Distributed checkpoints (FSDP2 / ``ModelParallelStrategy``) are read as data, never as code.

torch's distributed-checkpoint reader unpickles the directory's ``.metadata`` with plain ``pickle.load`` and every
non-tensor value (optimizer hyperparameters, counters) with ``torch.load(weights_only=False)``, so a crafted
checkpoint directory runs code when it is loaded, unlike the ``weights_only`` file checkpoints. Before any reader of
lit-longctx (resume, export, generation, evaluation) hands a directory to torch, :func:`verify` proves it harmless:

- ``.metadata`` is unpickled with an allow-list: only the metadata classes of ``torch.distributed.checkpoint``,
  ``torch.Size``, dtypes, layouts and paths; anything else (``os.system``, ``builtins.eval``, ...) is refused;
- every non-tensor value is read from its shard at the offset the metadata gives and loaded with
  ``weights_only=True``;
- every shard path stays inside the directory.

Unpickling the same bytes constructs the same objects, so what passes here is what torch then loads.
"""

from __future__ import annotations

import enum
import io
import pickle
from pathlib import Path
from typing import Any

import torch

from lit_longctx.hf import CheckpointError

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout from its name
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata: its dataclasses and enums, and a few value types; nothing callable beyond them."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == _METADATA_MODULE:
            import torch.distributed.checkpoint.metadata as metadata

            obj = getattr(metadata, name, None)
            if isinstance(obj, type) and (hasattr(obj, "__dataclass_fields__") or issubclass(obj, enum.Enum)):
                return obj
        elif (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not distributed-checkpoint metadata")


def read_metadata(directory: Path) -> Any:
    """The directory's ``.metadata`` (a ``torch.distributed.checkpoint.metadata.Metadata``), unpickled safely."""
    path = Path(directory) / ".metadata"
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"refusing {str(path)!r}: it is not plain distributed-checkpoint metadata ({err}); a checkpoint is data, "
            "and this one would run code when loaded"
        ) from err


#: directories verified in this process, with the (name, size, mtime) of every file in them: a resume reaches the
#: directory when the command resolves ``--ckpt_path`` and again when the strategy loads it
_VERIFIED: set[tuple[Path, tuple]] = set()


def verify(directory: str | Path) -> None:
    """Raise :class:`~lit_longctx.hf.CheckpointError` unless the distributed checkpoint at ``directory`` holds only
    data (see the module docstring)."""
    root = Path(directory).resolve()
    files = tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in root.iterdir() if f.is_file()))
    key = (root, files)
    if key not in _VERIFIED:
        _verify(root)
        _VERIFIED.add(key)


def _verify(root: Path) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    metadata = read_metadata(root)
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"refusing {str(root / '.metadata')!r}: it holds a {type(metadata).__name__}, not "
                              "distributed-checkpoint metadata")
    by_fqn = {index.fqn: info for index, info in (metadata.storage_data or {}).items()}
    for fqn, item in metadata.state_dict_metadata.items():
        if not isinstance(item, BytesStorageMetadata):
            continue
        info = by_fqn.get(fqn)
        if info is None:
            raise CheckpointError(f"refusing {str(root)!r}: the metadata lists {fqn!r} without saying where it is")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"refusing {str(root)!r}: {fqn!r} is stored with transforms "
                                  f"{list(info.transform_descriptors)}, which lit-longctx cannot check before loading")
        shard = (root / str(info.relative_path)).resolve()
        if root not in shard.parents:
            raise CheckpointError(f"refusing {str(root)!r}: {fqn!r} points outside the checkpoint ({shard})")
        with open(shard, "rb") as f:
            f.seek(int(info.offset))
            data = f.read(int(info.length))
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # an unpickling error names what the value would have run
            raise CheckpointError(
                f"refusing {str(root)!r}: its value {fqn!r} is not plain data ({type(err).__name__}: "
                f"{str(err).splitlines()[0]}); a checkpoint is data, and this one would run code when loaded"
            ) from err
