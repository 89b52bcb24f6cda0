"""Remote storage through fsspec: run directories, checkpoints and data on ``s3://`` (or any fsspec URL).

Lightning already writes checkpoints, logs and the run config through fsspec, so ``--trainer.default_root_dir
s3://bucket/run`` works as soon as ``s3fs`` is installed (``pip install 'lit-longctx[s3]'``). This module adds what
Lightning leaves out:

- ``--ckpt_path last`` on a remote run: :func:`newest_last_checkpoint` lists ``last*.ckpt`` objects and picks the
  newest *complete* one (an S3 object exists only once its upload completed; a distributed-checkpoint directory
  counts only once both ``.metadata`` and ``meta.pt`` are there, which are written last);
- readers that need local files (``np.memmap`` token files, HF ``datasets`` text files, ``torch.load`` with mmap) get
  them through :func:`localize`, a cache keyed by URL and checked by size and ETag;
- one clear line for the three ways remote storage fails before anything is written: an unreachable endpoint,
  missing credentials, a bucket that does not exist (:func:`check_remote`).

Credentials and endpoint come from the usual places (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_ENDPOINT_URL`` / ``~/.aws``, or fsspec's config: ``FSSPEC_S3_*`` variables, ``~/.config/fsspec``); nothing is
stored in the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import IO, Any

_CACHE_ENV = "LIT_LONGCTX_REMOTE_CACHE"


class RemoteStorageError(ValueError):
    """Remote storage cannot be used as configured (shown to users as one ``error:`` line)."""


def is_remote(path: str | os.PathLike | None) -> bool:
    """True for URLs with a non-local protocol (``s3://``, ``gs://``, ``memory://``, ...)."""
    if path is None:
        return False
    text = str(path)
    return "://" in text and not text.startswith("file://")


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of ``url``; a missing driver is a clear error."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        protocol = url.split("://", 1)[0]
        extra = " (pip install 'lit-longctx[s3]')" if protocol in ("s3", "s3a") else ""
        raise RemoteStorageError(f"cannot open {url!r}: no fsspec driver for {protocol}://{extra} ({err})") from None
    return fs, path


def _explain(url: str, err: BaseException) -> RemoteStorageError:
    """One line naming what is wrong with remote storage and how to fix it."""
    name = type(err).__name__
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"
    if name == "NoCredentialsError" or "credentials" in str(err).lower():
        return RemoteStorageError(
            f"no credentials for {url!r}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / "
            "~/.aws/credentials)"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or isinstance(
        err, ConnectionError
    ):
        return RemoteStorageError(
            f"cannot reach the storage endpoint {endpoint} for {url!r} ({name}): check AWS_ENDPOINT_URL and that the "
            "server is running"
        )
    if isinstance(err, FileNotFoundError) and "bucket" in str(err).lower():
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        return RemoteStorageError(
            f"bucket {bucket!r} of {url!r} does not exist at {endpoint}: create it (aws s3 mb s3://{bucket}) or fix "
            "the URL"
        )
    return RemoteStorageError(f"cannot use {url!r}: {name}: {str(err).splitlines()[0] if str(err) else name}")


def _probe_fs(url: str) -> tuple[Any, str]:
    """A filesystem for one quick check: no instance cache and (for S3) one attempt with a short connect timeout, so
    a wrong endpoint fails in about a second instead of after botocore's retries."""
    import fsspec

    protocol = url.split("://", 1)[0]
    kwargs: dict[str, Any] = {"skip_instance_cache": True}
    if protocol in ("s3", "s3a"):
        kwargs["config_kwargs"] = {"connect_timeout": 5, "retries": {"max_attempts": 1}}
    filesystem(url)  # a missing driver first, with its own message
    return fsspec.core.url_to_fs(url, **kwargs)


def check_remote(url: str) -> None:
    """Raise :class:`RemoteStorageError` unless the bucket (top level) of ``url`` can be listed.

    Call it before a run writes anything: a run that fails its first checkpoint after an hour of training, or a
    resume that silently starts over because listing failed, are both worse than stopping at once.
    """
    if not is_remote(url):
        return
    fs, path = _probe_fs(url)
    bucket = path.split("/", 1)[0]
    try:
        fs.ls(bucket, detail=False)
    except Exception as err:  # botocore / aiohttp / fsspec errors have no common base; each is explained by name
        raise _explain(url, err) from None


def exists(url: str | os.PathLike) -> bool:
    if not is_remote(url):
        return Path(url).exists()
    fs, path = filesystem(str(url))
    try:
        return fs.exists(path)
    except Exception as err:
        raise _explain(str(url), err) from None


def glob(pattern: str) -> list[str]:
    """Sorted matches of a local or remote glob (remote ones as full URLs)."""
    if not is_remote(pattern):
        import glob as _glob

        return sorted(_glob.glob(pattern, recursive=True))
    fs, path = filesystem(pattern)
    try:
        return sorted(fs.unstrip_protocol(p) for p in fs.glob(path) if fs.isfile(p))
    except Exception as err:
        raise _explain(pattern, err) from None


def open_file(url: str | os.PathLike, mode: str = "rb") -> IO[Any]:
    """``open`` for local paths and fsspec URLs alike (remote writes become visible only when the file is closed)."""
    if not is_remote(url):
        return open(url, mode)  # noqa: SIM115 - the caller closes it
    fs, path = filesystem(str(url))
    try:
        return fs.open(path, mode)
    except Exception as err:
        raise _explain(str(url), err) from None


def join(url: str, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *(p.strip("/") for p in parts)])


def _is_complete(fs: Any, path: str, info: dict[str, Any]) -> bool:
    """A checkpoint object can be loaded: a file (an S3 object exists only after its upload completed), or a
    distributed-checkpoint directory whose ``.metadata`` and ``meta.pt`` (written after all shards) are present."""
    if info.get("type") != "directory":
        return True
    return fs.exists(f"{path}/.metadata") and fs.exists(f"{path}/meta.pt")


def _local_complete(p: Path) -> bool:
    """A local checkpoint can be loaded: a distributed-checkpoint directory with its metadata, or a ``torch.save``
    file whose zip central directory (written last) is there. A file cut short by a kill mid-copy fails the check
    and is skipped with a warning."""
    if p.is_dir():
        return (p / ".metadata").exists() and (p / "meta.pt").exists()
    if zipfile.is_zipfile(p):
        return True
    print(f"lit-longctx: skipping {p}: not a complete checkpoint (a save was interrupted)", file=sys.stderr)
    return False


def _mtime(fs: Any, path: str, info: dict[str, Any]) -> float:
    stamp = info.get("LastModified") or info.get("mtime") or info.get("created")
    if info.get("type") == "directory":  # directories have no time on S3: that of the metadata written last
        meta = fs.info(f"{path}/meta.pt")
        stamp = meta.get("LastModified") or meta.get("mtime") or stamp
    if hasattr(stamp, "timestamp"):
        return stamp.timestamp()
    return float(stamp or 0.0)


def _last_candidates(root: str | os.PathLike) -> list[tuple[float, str]]:
    """(modification time, path) of the complete ``last*.ckpt`` below one root."""
    if not is_remote(root):
        root = Path(root)
        found = [p for p in root.rglob("last*.ckpt") if _local_complete(p)] if root.exists() else []
        return [(p.stat().st_mtime, str(p)) for p in found]
    check_remote(str(root))
    fs, base = filesystem(str(root))
    fs.invalidate_cache(base)  # listings are cached per process; another process may have saved since
    try:
        if not fs.exists(base):
            return []
        candidates = []
        for path, info in fs.find(base, withdirs=True, detail=True).items():
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("last") and name.endswith(".ckpt") and _is_complete(fs, path, info):
                candidates.append((_mtime(fs, path, info), fs.unstrip_protocol(path)))
    except Exception as err:
        raise _explain(str(root), err) from None
    return candidates


def newest_last_checkpoint(*roots: str | os.PathLike) -> str | None:
    """The newest complete ``last*.ckpt`` below any of ``roots`` (local directories or URLs), or None.

    Incomplete ones (a killed save) are skipped, so ``--ckpt_path last`` never resolves to a checkpoint that cannot be
    loaded.
    """
    candidates = [c for root in dict.fromkeys(str(r) for r in roots) for c in _last_candidates(root)]
    return max(candidates)[1] if candidates else None


def cache_dir() -> Path:
    """Where remote files are copied for readers that need local files (``$LIT_LONGCTX_REMOTE_CACHE``)."""
    return Path(os.environ.get(_CACHE_ENV, Path.home() / ".cache" / "lit_longctx" / "remote"))


def _download(fs: Any, path: str, dest: Path, info: dict[str, Any]) -> None:
    """Copy one remote file to ``dest`` unless an identical copy (same size and ETag) is already there."""
    from lit_longctx.io import atomic_write, atomic_write_text

    stamp = {"size": info.get("size"), "etag": info.get("ETag") or info.get("etag") or info.get("mtime")}
    record = dest.with_name(f".{dest.name}.source.json")
    if dest.exists() and record.exists() and json.loads(record.read_text()) == json.loads(json.dumps(stamp)):
        return
    with fs.open(path, "rb") as src, atomic_write(dest) as out:
        while chunk := src.read(16 << 20):
            out.write(chunk)
    atomic_write_text(record, json.dumps(stamp))


def localize(url: str | os.PathLike, *, root: Path | None = None) -> Path:
    """A local copy of a remote file or directory (the path itself when it is local).

    Copies land in :func:`cache_dir` under a name derived from the URL and are reused while the remote size and ETag
    are unchanged; each file is written atomically, so concurrent ranks and interrupted copies never see half a file.
    """
    if not is_remote(url):
        return Path(url).expanduser()
    url = str(url).rstrip("/")
    fs, path = filesystem(url)
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    dest = (root or cache_dir()) / digest / path.rsplit("/", 1)[-1]
    try:
        info = fs.info(path)
        if info.get("type") != "directory":
            _download(fs, path, dest, info)
            return dest
        for sub, sub_info in fs.find(path, detail=True).items():
            if sub_info.get("type") == "directory":
                continue
            _download(fs, sub, dest / sub[len(path):].lstrip("/"), sub_info)
    except FileNotFoundError as err:
        if "bucket" in str(err).lower():
            raise _explain(url, err) from None
        raise FileNotFoundError(f"{url!r} does not exist") from None
    except RemoteStorageError:
        raise
    except Exception as err:
        raise _explain(url, err) from None
    return dest


def upload_directory(local: str | os.PathLike, url: str, last: tuple[str, ...] = ()) -> None:
    """Copy a local directory to ``url``, the files named in ``last`` after all others (readers treat the directory
    as complete only once those exist), after removing them at the destination first."""
    fs, base = filesystem(url)
    local = Path(local)
    try:
        for name in last:
            if fs.exists(f"{base}/{name}"):
                fs.rm(f"{base}/{name}")
        files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.name in last)
        for p in files:
            fs.put_file(str(p), f"{base}/{p.relative_to(local).as_posix()}")
    except Exception as err:
        raise _explain(url, err) from None


def localize_checkpoint(url: str | os.PathLike) -> Path:
    """A local copy of the checkpoint at ``url``: a file, an HF or distributed-checkpoint directory, or a run
    directory (then only its newest complete ``last*.ckpt`` is copied)."""
    if not is_remote(url):
        return Path(url).expanduser()
    url = str(url).rstrip("/")
    check_remote(url)
    fs, path = filesystem(url)
    try:
        is_dir = fs.isdir(path)
        plain_dir = is_dir and not fs.exists(f"{path}/config.json") and not fs.exists(f"{path}/.metadata")
    except Exception as err:
        raise _explain(url, err) from None
    if plain_dir:
        last = newest_last_checkpoint(url)
        if last is None:
            raise FileNotFoundError(
                f"{url!r} holds no config.json (HF), .metadata (distributed checkpoint) or complete last.ckpt"
            )
        url = last
    return localize(url)
