"""Run directories and the checkpoint a run restores, checked before Lightning touches them.

- :func:`resolve_ckpt_path`: ``--ckpt_path`` as a user gives it (a ``.ckpt``, a run directory, ``last``, a URL) becomes
  one local checkpoint that has been read weights-only and checked: a truncated file, a file that is no checkpoint,
  a converted weights file, or a checkpoint of another method is one clear error before training starts.
- :func:`claim_run_directories`: a logger's ``version_N`` directory is claimed with ``mkdir`` (atomic), so two runs
  started together never share one.
- :func:`check_run_writable`: the run, checkpoint and log directories are writable, else one error naming them.
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from lit_longctx.checkpoint import FORMAT, METHODS, checkpoint_config
from lit_longctx.hf import CheckpointError
from lit_longctx.io import check_writable

#: an environment variable through which rank 0 hands its claimed versions to the ranks it launches
_VERSIONS_ENV = "LIT_LONGCTX_RUN_VERSIONS"


def find_last_checkpoint(*roots: str | os.PathLike) -> str | None:
    """The newest complete ``last*.ckpt`` below any of ``roots``, local or remote (``s3://``): temporary files of
    unfinished saves start with a dot and are not matched, and a truncated file is skipped (lit_longctx.storage)."""
    from lit_longctx.storage import newest_last_checkpoint

    return newest_last_checkpoint(*roots)


def _download(url: str) -> Path:
    """A URL checkpoint fetched into a private temporary directory (removed at exit), to be read like a local one."""
    d = Path(tempfile.mkdtemp(prefix="lit_longctx_ckpt_"))
    atexit.register(shutil.rmtree, d, True)
    target = d / (Path(url.split("?")[0]).name or "checkpoint.ckpt")
    try:
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except Exception as exc:  # network errors of every kind
        raise CheckpointError(f"--ckpt_path {url}: cannot download it ({type(exc).__name__}: {exc})") from None
    return target


def _read(path: Path) -> dict[str, Any]:
    first = None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"--ckpt_path {str(path)!r} holds Python objects other than tensors and plain data (unpickling it could "
            "run code), so it is not loaded; use a checkpoint written by `lit-longctx fit`"
        ) from None
    except Exception as exc:  # truncated zip, foreign formats, ...
        first = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    raise CheckpointError(
        f"--ckpt_path {str(path)!r} is not a readable checkpoint ({first}); it may be truncated by an interrupted "
        "copy or save: pass an earlier checkpoint (or the run directory, to take its newest last.ckpt)"
    )


def check_checkpoint_file(path: Path, method: str) -> None:
    """``path`` is a Lightning checkpoint written by ``lit-longctx fit`` for ``method``, else a CheckpointError."""
    if path.is_dir():  # a distributed checkpoint (FSDP2 / ModelParallel): its meta.pt carries the method
        from lit_longctx.dcp import verify

        verify(path)  # torch unpickles its metadata and values unchecked: prove them plain data first
        found = checkpoint_config(path)
        if found is not None and found[1] != method:
            raise _method_error(path, found[1], method)
        return
    ckpt = _read(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"--ckpt_path {str(path)!r} is not a checkpoint (it holds a {type(ckpt).__name__})")
    if ckpt.get("format") == FORMAT:
        raise CheckpointError(
            f"--ckpt_path {str(path)!r} is a lit-longctx weights file (written by `lit-longctx convert`), not a "
            f"training checkpoint to resume: start from its weights with --model.init_args.init_from {path}"
        )
    meta = ckpt.get("lit_longctx")
    if not isinstance(meta, dict) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"--ckpt_path {str(path)!r} is not a checkpoint written by `lit-longctx fit` (top-level keys "
            f"{sorted(map(str, ckpt))[:6]}); for other weights use --model.init_args.init_from"
        )
    if meta.get("method", "causal") != method:
        raise _method_error(path, meta.get("method", "causal"), method)


def _method_error(path: Path, found: str, expected: str) -> CheckpointError:
    return CheckpointError(
        f"--ckpt_path {str(path)!r} is a checkpoint of method {found!r} but the config's model is {expected!r}; use "
        f"--model.class_path {METHODS.get(found, found)} (the model class comes from the config, never from a "
        "checkpoint)"
    )


def resolve_ckpt_path(ckpt_path: str | None, roots: list[str], subcommand: str, method: str) -> str | None:
    """The local checkpoint ``--ckpt_path`` names, checked (see module docstring); None to start a new run.

    Args:
        ckpt_path: as given: a file, a run directory, ``last``, an ``http(s)://`` or fsspec (``s3://``) URL, or None.
        roots: where ``last`` looks (the run directory and the checkpoint directories; local or ``s3://``).
        subcommand: ``fit`` starts a new run when ``last`` finds nothing; other subcommands need a checkpoint.
        method: the configured module's method tag; a checkpoint of another method is refused.
    """
    if ckpt_path is None or ckpt_path in ("best", "hpc", "registry"):
        return ckpt_path  # Lightning's own keywords, resolved by the trainer
    from lit_longctx.storage import is_remote, localize_checkpoint

    if ckpt_path == "last":
        found = find_last_checkpoint(*roots)
        if not found:
            broken = [p for r in roots if not is_remote(r) and Path(r).is_dir() for p in Path(r).rglob("last*.ckpt")
                      if p.is_file()]
            if broken:  # only incomplete ones: say so rather than start over beside them
                check_checkpoint_file(max(broken, key=lambda p: p.stat().st_mtime), method)
            if subcommand == "fit":
                print("lit-longctx: no last.ckpt found, starting a new run", file=sys.stderr)
                return None
            raise CheckpointError(
                f"--ckpt_path last: no last.ckpt under {', '.join(str(r) for r in roots)}; train first "
                "(lit-longctx fit --config ...) or pass the checkpoint path"
            )
        path = localize_checkpoint(found)  # a remote one is copied (and read by Lightning from the copy)
    elif ckpt_path.startswith(("http://", "https://")):
        path = _download(ckpt_path)
    elif is_remote(ckpt_path):
        path = localize_checkpoint(ckpt_path)  # a run directory there resolves to its newest complete last.ckpt
    else:
        path = Path(ckpt_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path!r} does not exist")
        if path.is_dir() and not (path / ".metadata").exists():
            last = find_last_checkpoint(path)
            if last is None:
                raise CheckpointError(
                    f"--ckpt_path {ckpt_path!r} is a directory without a last.ckpt below it (nor a distributed "
                    "checkpoint); pass a .ckpt file or the run directory of a `lit-longctx fit`"
                )
            print(f"lit-longctx: --ckpt_path {ckpt_path}: using {last}", file=sys.stderr)
            path = Path(last)
    check_checkpoint_file(path, method)
    return str(path)


def check_run_writable(trainer: Any) -> None:
    """The directories a run writes (run, checkpoint and log directories) are writable, else NotWritableError."""
    from lit_longctx.storage import is_remote  # remote stores are checked by storage.check_remote

    if not is_remote(trainer.default_root_dir):
        check_writable(trainer.default_root_dir, "run directory (trainer.default_root_dir)")
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "dirpath", None) and not is_remote(cb.dirpath):
            check_writable(cb.dirpath, "checkpoint directory (ModelCheckpoint dirpath)")
    for logger in trainer.loggers:
        save_dir = getattr(logger, "save_dir", None)
        if save_dir and "://" not in str(save_dir):
            check_writable(save_dir, f"log directory ({type(logger).__name__} save_dir)")


def _is_launched_rank() -> bool:
    """A process started by rank 0 (DDP's script launcher) or another node's process."""
    return int(os.environ.get("LOCAL_RANK", 0)) > 0 or int(os.environ.get("NODE_RANK", 0)) > 0


def claim_run_directories(trainer: Any) -> None:
    """Give each file logger (CSV, TensorBoard) a ``version_N`` directory claimed by ``mkdir``.

    Lightning picks max(existing) + 1 by listing the directory, so two runs started together pick the same one; here
    the first ``mkdir`` wins and the other run takes the next number. Processes launched by rank 0 reuse its
    choice (they inherit it through the environment).
    """
    from lit_longctx.storage import is_remote  # object stores have no atomic mkdir; Lightning's own numbering there

    loggers = [lg for lg in trainer.loggers
               if getattr(lg, "_version", 0) is None and hasattr(lg, "root_dir") and not is_remote(lg.root_dir)]
    if not loggers:
        return
    if _is_launched_rank():
        inherited = json.loads(os.environ.get(_VERSIONS_ENV, "[]"))
        for logger, version in zip(loggers, inherited):
            logger._version = version
        return
    versions = []
    for logger in loggers:
        root = Path(logger.root_dir)
        root.mkdir(parents=True, exist_ok=True)
        taken = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()]
        version = max(taken, default=-1) + 1
        while True:
            try:
                (root / f"version_{version}").mkdir()
                break
            except FileExistsError:
                version += 1
        logger._version = version
        versions.append(version)
    os.environ[_VERSIONS_ENV] = json.dumps(versions)
