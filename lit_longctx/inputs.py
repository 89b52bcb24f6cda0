"""Reading what users point lit-longctx at: paths that may be misspelled, JSON and YAML files that may be corrupt.

Every function here turns a bad input into one exception whose message names the file (and line) and the fix, so
the CLI shows it as one ``error:`` line: a missing path says "not found" with the nearest existing match, a path that
only a hub could resolve is told apart from a local path that is missing, and a corrupt JSON file names its line.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

# a Hugging Face repo id: namespace/name of letters, digits, "-", "_", "." (no "--" or "..", no leading "." or "-")
_HUB_ID = re.compile(r"^(?![.-])[\w.-]{1,96}/(?![.-])[\w.-]{1,96}$")
# suffixes of files, not hub repositories: "runs/model.ckpt" is a missing file, not a repo called model.ckpt
_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors", ".json", ".jsonl", ".yaml", ".yml", ".model",
                  ".txt", ".parquet", ".npy")
_OFFLINE_VALUES = ("1", "true", "yes", "on")


def hub_allowed() -> bool:
    """Whether lit-longctx may download from the Hugging Face hub (``HF_HUB_OFFLINE`` unset or false)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in _OFFLINE_VALUES


def _deepest_existing(path: Path) -> Path | None:
    """The longest leading part of ``path`` that exists (None when not even its first component does)."""
    for parent in [path, *path.parents]:
        if str(parent) not in ("", ".") and parent.exists():
            return parent
    return None


def looks_local(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names a local path rather than a hub id: it starts with ``.``, ``~`` or ``/``, has more than
    one ``/``, ends in a file suffix, does not have the shape of a repo id, or a leading part of it exists here."""
    text = str(spec)
    if text.startswith((".", "~", os.sep)) or not _HUB_ID.match(text) or "--" in text or ".." in text:
        return True
    if text.lower().endswith(_FILE_SUFFIXES):
        return True
    return _deepest_existing(Path(text)) is not None


def is_hub_id(spec: str | os.PathLike) -> bool:
    """A clear hub id (``org/name``) that is not a local path."""
    return not looks_local(spec)


def nearest_match(path: str | os.PathLike) -> str:
    """Where ``path`` goes wrong: the nearest existing path (difflib over the siblings of the first missing part), or
    what the deepest existing directory holds."""
    p = Path(path).expanduser()
    base = _deepest_existing(p)
    root = base if base is not None else Path(".")
    rel = p.relative_to(base) if base is not None else p
    if not rel.parts or not root.is_dir():
        return f"{str(root)!r} exists but is not a directory" if base is not None else "nothing of it exists"
    missing = rel.parts[0]
    names = sorted(x.name for x in root.iterdir() if not x.name.startswith("."))
    close = difflib.get_close_matches(missing, names, n=1, cutoff=0.6)
    if close:
        return f"did you mean {str(root / close[0]) if base is not None else close[0]!r}?"
    where = repr(str(root)) if base is not None else "the current directory"
    shown = f"{names[:12]}{' and more' if len(names) > 12 else ''}" if names else "nothing"
    return f"{missing!r} is not in {where}, which holds {shown}"


def not_found(path: str | os.PathLike, what: str, fix: str = "") -> FileNotFoundError:
    """``FileNotFoundError`` for a missing ``path``: "WHAT 'PATH' not found (nearest match); FIX"."""
    tail = f"; {fix}" if fix else ""
    return FileNotFoundError(f"{what} {str(path)!r} not found ({nearest_match(path)}){tail}")


def read_json(path: str | os.PathLike, what: str = "") -> Any:
    """The parsed JSON file ``path``; a corrupt one raises a ``ValueError`` naming the file and line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what or 'file'} {str(p)!r} is not UTF-8 text ({err.reason} at byte {err.start}): the "
                         "file is corrupt; replace it") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what or 'file'} {str(p)!r} is not valid JSON (line {err.lineno}, column {err.colno}: "
                         f"{err.msg}): the file is corrupt or truncated; replace it") from None
