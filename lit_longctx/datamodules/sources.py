"""Text sources for :class:`~lit_longctx.datamodules.text.TextData`: local files, the HF hub, built-in text.

Local text / jsonl / parquet files (or globs, or directories of them) and hub datasets are read with HF ``datasets``
(``load_dataset("text" | "json" | "parquet", data_files=...)`` works offline). Built-in sources need no files:
``builtin:pydoc`` is Python's own documentation topics (``pydoc_data.topics``, about 465 KB of English prose on every
CPython; each topic one document), enough for a CPU quickstart.

Pre-tokenized sources (FoT's original data, EasyLM's ``JsonDataset`` with a ``{field}`` text-processor field): with
``tokens_field`` set, each JSON/parquet example holds its token ids in that field, either as a list of ints or as a
base64 string of raw ``tokens_dtype`` ids (EasyLM's ``base64_token_dtype``, default ``i4``: little-endian int32); the
ids are used as they are (no tokenizer call), wrapped in the tokenizer's BOS/EOS like every document.
"""

from __future__ import annotations

import base64
import glob
import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lit_longctx.nn.config import ConfigError
from lit_longctx.storage import glob as remote_glob
from lit_longctx.storage import is_remote, localize

_EXTENSIONS = {".txt": "text", ".text": "text", ".md": "text", ".rst": "text", ".json": "json", ".jsonl": "json",
               ".ndjson": "json", ".parquet": "parquet"}
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".lz4"}
FORMATS = ("auto", "text", "json", "parquet")
HUB_PREFIX = "hf:"
BUILTIN_PREFIX = "builtin:"


@dataclass
class TextSource:
    """One text source of a mixture.

    Args:
        path: a local file, glob (``data/*.jsonl``) or directory, or the same as an fsspec URL (``s3://b/*.jsonl``,
            copied to a local cache on first use); ``builtin:pydoc``; or ``hf:<dataset>`` for a
            dataset on the HF hub.
        weight: relative sampling weight; weights are normalised over the sources (Llemma-style mixture).
        format: ``auto`` (from the file extension: .txt/.text/.md/.rst, .json/.jsonl/.ndjson, .parquet, optionally
            compressed), ``text``, ``json`` or ``parquet``.
        text_field: the column holding the text (json, parquet and hub sources).
        sample_by: for plain text files, what one document is: a whole ``document`` (file), a ``paragraph`` or a
            ``line``.
        name: configuration name of a hub dataset.
        split: split of a hub dataset.
        tokens_field: the field holding pre-tokenized ids (list of ints, or base64 of ``tokens_dtype`` ids) instead
            of text (json, parquet and hub sources); the tokenizer then only supplies BOS/EOS and the vocabulary.
        tokens_dtype: numpy dtype of base64-encoded ids (EasyLM's ``base64_token_dtype``; ``i4`` = int32).
        tag: the source's name in logs (``batch_tokens_per_source/<tag>``); default: the file or dataset name.
    """

    path: str
    weight: float = 1.0
    format: Literal["auto", "text", "json", "parquet"] = "auto"
    text_field: str = "text"
    sample_by: Literal["document", "paragraph", "line"] = "document"
    name: str | None = None
    split: str = "train"
    tokens_field: str | None = None
    tokens_dtype: str = "i4"
    tag: str | None = None

    def __post_init__(self) -> None:
        # ConfigError (a ValueError): the CLI builds sources while trying ``str | TextSource``, see ConfigError
        if self.format not in FORMATS:
            raise ConfigError(f"unknown source format {self.format!r} for {self.path!r}: use one of {FORMATS}")
        if self.sample_by not in ("document", "paragraph", "line"):
            raise ConfigError(f"unknown sample_by {self.sample_by!r}: use document, paragraph or line")
        if not self.weight >= 0:
            raise ConfigError(f"source {self.path!r} has weight {self.weight}: weights must be >= 0")
        if self.tokens_field is not None:
            if self.format == "text" or self.path.startswith(BUILTIN_PREFIX):
                raise ConfigError(f"source {self.path!r}: tokens_field needs json, parquet or hub data (pre-tokenized "
                                  "ids in a field), not plain text")
            try:
                kind = np.dtype(self.tokens_dtype).kind
            except TypeError as err:
                raise ConfigError(f"source {self.path!r}: tokens_dtype={self.tokens_dtype!r} is not a numpy dtype "
                                  "(EasyLM writes i4)") from err
            if kind not in "iu":
                raise ConfigError(f"source {self.path!r}: tokens_dtype={self.tokens_dtype!r} is not an integer dtype")

    @property
    def label(self) -> str:
        return self.path if self.name is None else f"{self.path}[{self.name}]"

    @property
    def log_name(self) -> str:
        """The source's name in per-source metrics."""
        if self.tag is not None:
            return self.tag
        stem = Path(self.path.removeprefix(HUB_PREFIX).removeprefix(BUILTIN_PREFIX)).name.split(".")[0]
        return stem if self.name is None else f"{stem}-{self.name}"


def decode_tokens(value: Any, dtype: str = "i4", where: str = "") -> list[int]:
    """Token ids of one pre-tokenized example: a list of ints, or a base64 string of raw ``dtype`` ids."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError as err:
            raise ValueError(f"{where}: the tokens field is neither a list of ids nor valid base64 ({err})") from err
        width = np.dtype(dtype).itemsize
        if len(raw) % width:
            raise ValueError(f"{where}: {len(raw)} base64-decoded bytes are not a whole number of {dtype} ids; set "
                             "tokens_dtype to the dtype the ids were written with")
        return np.frombuffer(raw, dtype=dtype).astype(np.int64).tolist()
    if isinstance(value, (list, tuple)) and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                                                for t in value):
        return [int(t) for t in value]
    raise ValueError(f"{where}: the tokens field holds {type(value).__name__}, not a list of ids or a base64 string")


def as_source(spec: str | TextSource | Mapping[str, Any]) -> TextSource:
    """A :class:`TextSource` from itself, a path string (weight 1), or a dict of its fields."""
    if isinstance(spec, TextSource):
        return spec
    if isinstance(spec, str):
        return TextSource(path=spec)
    if isinstance(spec, Mapping):
        return TextSource(**spec)
    raise TypeError(f"a text source is a path string, a dict or a TextSource, not {type(spec).__name__}")


def pydoc_documents() -> list[str]:
    """Python's documentation topics (``pydoc_data.topics``), one document per topic, sorted by topic name."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


BUILTIN_SOURCES: dict[str, Callable[[], list[str]]] = {"pydoc": pydoc_documents}


def _listing(directory: Path) -> str:
    if not directory.is_dir():
        return f"{str(directory)!r} does not exist"
    names = sorted(p.name for p in directory.iterdir())
    more = f" and {len(names) - 20} more" if len(names) > 20 else ""
    return f"{str(directory)!r} holds {names[:20]}{more}"


def _extension_format(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    return _EXTENSIONS.get(suffixes[-1]) if suffixes else None


def resolve_files(source: TextSource) -> list[Path]:
    """The files of a local source, sorted: the file, the glob's matches, or a directory's files of known formats."""
    if is_remote(source.path):  # s3://... : copied to a local cache, since datasets and the token cache read files
        if glob.has_magic(source.path):
            files = [localize(url) for url in remote_glob(source.path)]
            if not files:
                raise FileNotFoundError(f"no files match {source.path!r}")
            return files
        pattern = str(localize(source.path))
    else:
        pattern = str(Path(source.path).expanduser())
    path = Path(pattern)
    if glob.has_magic(pattern):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not files:
            base = Path(pattern.split("*")[0].split("?")[0].split("[")[0])
            base = base if base.is_dir() else base.parent
            raise FileNotFoundError(f"no files match {source.path!r} (scanned: {_listing(base)})")
        return files
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                       and (source.format != "auto" or _extension_format(p) is not None))
        if not files:
            raise FileNotFoundError(
                f"no text, json or parquet files in directory {source.path!r} (scanned: {_listing(path)}): give "
                "files with extensions .txt/.md/.jsonl/.json/.parquet, or set format="
            )
        return files
    if not path.is_file():
        raise FileNotFoundError(
            f"text source {source.path!r} not found (scanned: {_listing(path.parent)}): give an existing file, glob "
            f"or directory, '{BUILTIN_PREFIX}pydoc', or '{HUB_PREFIX}<dataset>' for the HF hub"
        )
    return [path]


def source_format(source: TextSource, files: Sequence[Path]) -> str:
    """The ``datasets`` builder (text, json, parquet) for a local source."""
    if source.format != "auto":
        return source.format
    found = {p: _extension_format(p) for p in files}
    unknown = [p.name for p, fmt in found.items() if fmt is None]
    if unknown:
        raise ValueError(
            f"unknown source format for {unknown[:5]} in source {source.path!r}: use files ending in "
            f"{sorted(_EXTENSIONS)} (optionally compressed), or set format= to text, json or parquet"
        )
    formats = set(found.values())
    if len(formats) > 1:
        raise ValueError(
            f"source {source.path!r} mixes formats {sorted(formats)}: make one source per format"
        )
    return formats.pop()


def source_identity(source: TextSource) -> dict[str, Any]:
    """Everything the tokenized cache of a source depends on (files are identified by path, size and mtime)."""
    if source.path.startswith(BUILTIN_PREFIX):
        name = source.path[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_SOURCES:
            raise ValueError(f"unknown built-in source {source.path!r}: available {sorted(BUILTIN_SOURCES)}")
        return {"kind": "builtin", "name": name, "python": sys.version}
    tokens = {"tokens_field": source.tokens_field, "tokens_dtype": source.tokens_dtype} if source.tokens_field else {}
    if source.path.startswith(HUB_PREFIX):
        return {"kind": "hub", "dataset": source.path[len(HUB_PREFIX):], "config": source.name, "split": source.split,
                "text_field": source.text_field, **tokens}
    files = resolve_files(source)
    fmt = source_format(source, files)
    identity: dict[str, Any] = {"kind": "files", "format": fmt,
                                "files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
    if fmt == "text":
        identity["sample_by"] = source.sample_by
    else:
        identity["text_field"] = source.text_field
    identity.update(tokens)
    return identity


class _Column:
    """The text column of a ``datasets.Dataset``, iterated in batches."""

    def __init__(self, dataset: Any, field: str) -> None:
        self.dataset, self.field = dataset, field

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[str]:
        for batch in self.dataset.iter(batch_size=1024):
            for value in batch[self.field]:
                yield "" if value is None else value


def _is_blank(path: Path) -> bool:
    """Whether a file holds no text at all (empty, or only whitespace in its first and only 64 KiB)."""
    size = path.stat().st_size
    if size > 65536:
        return False
    return not path.read_bytes().strip()


def _bad_json_line(path: Path) -> str | None:
    """"FILE line N: PROBLEM" for the first line of a JSON-lines file that is not a JSON object (None if all are, or the
    whole file is one JSON document)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()[:1]
    if path.suffix.lower() == ".json" and head == b"[":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            where = f"line {err.lineno}: {err.msg}" if isinstance(err, json.JSONDecodeError) else str(err)
            return f"{str(path)!r} {where}"
        return None
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    return f"{str(path)!r} line {number}, column {err.colno}: {err.msg}"
                if not isinstance(record, dict):
                    return f"{str(path)!r} line {number}: a JSON {type(record).__name__}, not an object"
        except UnicodeDecodeError as err:
            return f"{str(path)!r}: not UTF-8 text ({err.reason} at byte {err.start})"
    return None


def _unreadable(source: TextSource, fmt: str, files: Sequence[Path], err: Exception) -> ValueError:
    """A one-line error for a local source that ``datasets`` cannot read, naming the file (and line) at fault."""
    if fmt == "json":
        for path in files:
            bad = _bad_json_line(path)
            if bad is not None:
                return ValueError(f"text source {source.label!r} is not valid JSON lines: {bad}; fix or remove that "
                                  "line (each line must be one JSON object)")
    cause = err.__cause__ or err
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return ValueError(f"cannot read text source {source.label!r} as {fmt} ({type(cause).__name__}: {first}): check "
                      "the files, or set format= on the source")


def load_documents(source: TextSource, cache_dir: str | Path | None = None) -> Sequence[str] | _Column:
    """The documents of a source, in a fixed order, as a sized iterable of strings."""
    if source.path.startswith(BUILTIN_PREFIX):
        source_identity(source)  # validates the name
        return BUILTIN_SOURCES[source.path[len(BUILTIN_PREFIX):]]()
    import datasets

    cache = str(cache_dir) if cache_dir is not None else None
    field = source.tokens_field or source.text_field
    if source.path.startswith(HUB_PREFIX):
        name = source.path[len(HUB_PREFIX):]
        try:
            dataset = datasets.load_dataset(name, name=source.name, split=source.split, cache_dir=cache)
        except Exception as err:  # datasets raises many types (connection, not found, offline); report one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConnectionError(
                f"cannot load hub dataset {name!r} (config {source.name!r}, split {source.split!r}): {first}; "
                "check the name, or download it beforehand / use local files when offline"
            ) from err
    else:
        files = resolve_files(source)
        fmt = source_format(source, files)
        if all(_is_blank(p) for p in files):
            which = "the file holds" if len(files) == 1 else f"all {len(files)} files hold"
            raise ValueError(f"text source {source.label!r} is empty ({which} no text): add documents, or remove it "
                             "from data.init_args.sources")
        kwargs = {"sample_by": source.sample_by} if fmt == "text" else {}
        try:
            dataset = datasets.load_dataset(fmt, data_files=[str(p) for p in files], split="train", cache_dir=cache,
                                            **kwargs)
        except Exception as err:  # datasets wraps parse errors of every format in DatasetGenerationError
            raise _unreadable(source, fmt, files, err) from err
        if fmt == "text" and source.tokens_field is None:
            field = "text"  # the text builder's only column
    if field not in dataset.column_names:
        raise ValueError(
            f"source {source.label!r} has no field {field!r}; its fields are {dataset.column_names}: set "
            f"{'tokens_field' if source.tokens_field else 'text_field'}="
        )
    return _Column(dataset, field)

