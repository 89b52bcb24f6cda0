"""Pre-tokenized data as ALLaMo-style raw token files (spec section 3.1), with a metadata sidecar.

Layout of a ``data_dir``::

    train.bin          headerless little-endian token stream (uint16 when the vocabulary fits, else uint32)
    val.bin            optional held-out stream, same format
    train.docs.npy     optional int64 offsets where documents start (first 0), for document-aware positions
    val.docs.npy
    meta.json          {"format", "version", "dtype", "vocab_size", "tokenizer": {...},
                        "splits": {"train": {"num_tokens", "max_token_id", "num_docs"}, ...}}

Files written by ALLaMo itself (no sidecar) are read as ``dtype=uint16`` or ``uint32`` when asked; with
``dtype=auto`` the dtype is inferred from the file and the vocabulary (:func:`infer_dtype`) and said on stderr.
ALLaMo's README wrote uint32 files that its loaders read as uint16, and its loaders cast to int16; the sidecar, the
inference and the vocabulary check here make both mistakes an error (or a stated choice) instead of silent garbage.

Training rows are windows of T+1 tokens ``s[i : i+T+1]``: inputs ``s[i : i+T]``, aligned labels ``s[i+1 : i+T+1]``.
``train_order`` picks the windows: ``random`` starts ``i ~ U[0, n-T-1]`` drawn from ``(seed, epoch, index)`` (ALLaMo's
first loader); ``sequential`` and ``shuffled`` use non-overlapping windows ``i = j·(T+1)``, the last one completed
from the start of the stream (ALLaMo's later loader), in order or in a seeded per-epoch permutation. An epoch has
``ceil(n / (T+1))`` samples in every order; padding it to whole global batches continues the cyclic stream in
``sequential`` order (exactly ALLaMo's padding of the stream from its start) and repeats the epoch's first samples
otherwise. Validation rows are consecutive windows with stride T, so every token
after the first is a target exactly once; the last row is padded (labels -100).

Positions: ``0..T-1`` per row, or, with document starts, the offset within the document, restarting at 0 where a
document starts and at the start of a row (a document continued from the previous row starts again at 0, so
positions stay below T).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from lit_longctx.datamodules.base import LongCtxDataModule, SampleStream
from lit_longctx.inputs import not_found
from lit_longctx.io import atomic_write, atomic_write_text
from lit_longctx.nn.loss import IGNORE_INDEX
from lit_longctx.storage import localize
from lit_longctx.tokenizers import Tokenizer, load_tokenizer

META_FORMAT = "lit-longctx/token-files"
META_VERSION = 1
_FLUSH_TOKENS = 1 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id of a ``vocab_size`` vocabulary fits (ids <= 65535), else uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token files")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenizer_record(tokenizer: Tokenizer | str | None) -> dict[str, Any] | None:
    """What meta.json records about a tokenizer: its description plus a ``spec`` that load_tokenizer accepts."""
    if tokenizer is None:
        return None
    tok = load_tokenizer(tokenizer)
    if tok.kind == "byte":
        spec: str | None = "byte"
    else:
        location = getattr(tok, "path", None) or getattr(tok, "dir", None)
        spec = str(Path(location).resolve()) if location is not None else None
    return {"spec": spec, **tok.describe()}


class TokenFileWriter:
    """Stream documents into one split file ``<split>.bin`` and record where each document starts.

    Args:
        path: the ``.bin`` file to write.
        vocab_size: ids must lie in ``0..vocab_size-1``; it also picks the dtype unless ``dtype`` is given.
        dtype: ``uint16`` or ``uint32``; default: the smallest that fits the vocabulary.
        documents: record document starts in ``<split>.docs.npy`` beside the file.
    """

    def __init__(self, path: str | Path, vocab_size: int, dtype: str | None = None, documents: bool = True) -> None:
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.dtype = np.dtype(dtype) if dtype is not None else token_dtype(vocab_size)
        if self.dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise ValueError(f"token files hold uint16 or uint32, not {self.dtype}")
        if vocab_size > np.iinfo(self.dtype).max + 1:
            raise ValueError(f"vocab_size {vocab_size} does not fit {self.dtype}: use uint32")
        self.documents = documents
        self.num_tokens = 0
        self.max_token_id = -1
        self.doc_starts: list[int] = []
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        # written under a temporary name and renamed by close(): a failed write leaves the previous file intact
        self._writing = atomic_write(self.path, "wb")
        self._file = self._writing.__enter__()

    @property
    def docs_path(self) -> Path:
        return self.path.with_suffix(".docs.npy")

    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append one document (empty ones are skipped)."""
        arr = np.asarray(ids, dtype=np.int64).ravel()
        if arr.size == 0:
            return
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"token id {bad} is outside the vocabulary 0..{self.vocab_size - 1} while writing {self.path.name}: "
                "pass the vocab_size of the tokenizer that produced the ids"
            )
        self.doc_starts.append(self.num_tokens)
        self.num_tokens += arr.size
        self.max_token_id = max(self.max_token_id, high)
        self._buffer.append(arr.astype(self.dtype.newbyteorder("<")))
        self._buffered += arr.size
        if self._buffered >= _FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        for chunk in self._buffer:
            self._file.write(chunk.tobytes())
        self._buffer, self._buffered = [], 0

    def close(self) -> dict[str, Any]:
        """Finish the file (and its document starts); returns this split's meta.json entry."""
        self._flush()
        self._writing.__exit__(None, None, None)
        docs_file = None
        if self.documents and self.doc_starts:
            with atomic_write(self.docs_path) as f:
                np.save(f, np.asarray(self.doc_starts, dtype=np.int64))
            docs_file = self.docs_path.name
        return {
            "file": self.path.name,
            "num_tokens": self.num_tokens,
            "max_token_id": self.max_token_id if self.num_tokens else None,
            "num_docs": len(self.doc_starts) if self.documents else None,
            "docs_file": docs_file,
        }

    def __enter__(self) -> TokenFileWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self._file.closed:
            return
        if exc is None:
            self.close()
        else:  # drop the temporary file; the previous one (if any) stays
            self._writing.__exit__(exc_type, exc, tb)


def write_meta(
    data_dir: str | Path, vocab_size: int, dtype: np.dtype | str, tokenizer: Tokenizer | str | None,
    splits: Mapping[str, dict[str, Any]], **extra: Any,
) -> Path:
    """Write ``meta.json`` for split entries returned by :meth:`TokenFileWriter.close`."""
    meta = {"format": META_FORMAT, "version": META_VERSION, "dtype": str(np.dtype(dtype)), "vocab_size": vocab_size,
            "tokenizer": tokenizer_record(tokenizer), "splits": dict(splits), **extra}
    return atomic_write_text(Path(data_dir) / "meta.json", json.dumps(meta, indent=2))


def write_token_files(
    data_dir: str | Path,
    splits: Mapping[str, np.ndarray | torch.Tensor | Iterable[Sequence[int]]],
    vocab_size: int | None = None,
    tokenizer: Tokenizer | str | None = None,
    dtype: str | None = None,
) -> Path:
    """Write ``<split>.bin`` files and ``meta.json`` into ``data_dir``; returns ``data_dir``.

    Each split is either a 1-D array/tensor (one stream, no document starts) or an iterable of documents (lists of
    ids; their starts go to ``<split>.docs.npy``). ``vocab_size`` defaults to the tokenizer's.
    """
    if vocab_size is None:
        if tokenizer is None:
            raise ValueError("write_token_files needs vocab_size= or tokenizer= to check ids and pick the dtype")
        vocab_size = load_tokenizer(tokenizer).vocab_size
    data_dir = Path(data_dir)
    file_dtype = np.dtype(dtype) if dtype is not None else token_dtype(vocab_size)
    entries = {}
    for split, data in splits.items():
        flat = isinstance(data, (np.ndarray, torch.Tensor))
        with TokenFileWriter(data_dir / f"{split}.bin", vocab_size, file_dtype.name, documents=not flat) as writer:
            if flat:
                writer.add(np.asarray(data).ravel())
            else:
                for doc in data:
                    writer.add(doc)
            entries[split] = writer.close()
    write_meta(data_dir, vocab_size, file_dtype, tokenizer, entries)
    return data_dir


class TokenSplit:
    """One token file opened read-only (memory-mapped in each process on first use, never pickled).

    Args:
        path: the ``.bin`` file.
        dtype: its token dtype.
        docs_path: ``.docs.npy`` with document start offsets, or None for plain ``0..T-1`` positions.
    """

    def __init__(self, path: Path, dtype: np.dtype, docs_path: Path | None = None) -> None:
        self.path, self.dtype, self.docs_path = path, np.dtype(dtype).newbyteorder("<"), docs_path
        size = path.stat().st_size
        if size % self.dtype.itemsize:
            raise ValueError(
                f"{path} has {size} bytes, not a multiple of {self.dtype.itemsize} ({self.dtype.name} tokens): the "
                "file is truncated or was written with another dtype; set dtype= to the one it was written with"
            )
        self.num_tokens = size // self.dtype.itemsize
        if self.num_tokens == 0:
            raise ValueError(f"{path} holds no tokens: remove it or write data into it")
        self._tokens: np.ndarray | None = None
        self._starts: np.ndarray | None = None
        if docs_path is not None:
            self._check_starts()

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._tokens

    @property
    def doc_starts(self) -> np.ndarray | None:
        if self.docs_path is not None and self._starts is None:
            self._starts = np.load(self.docs_path, mmap_mode="r")
        return self._starts

    def _check_starts(self) -> None:
        starts = self.doc_starts
        ok = starts.ndim == 1 and len(starts) > 0 and starts[0] == 0 and starts[-1] < self.num_tokens
        if ok and len(starts) > 1:
            ok = bool(np.all(np.diff(starts) > 0))
        if not ok:
            raise ValueError(
                f"{self.docs_path} must hold increasing document start offsets beginning at 0 and below the "
                f"{self.num_tokens} tokens of {self.path.name}: rewrite it with TokenFileWriter or delete it"
            )

    def max_token_id(self) -> int:
        """Largest id in the file (a full scan, in chunks)."""
        step = 1 << 24
        return max(int(self.tokens[i:i + step].max()) for i in range(0, self.num_tokens, step))

    def window(self, start: int, length: int) -> torch.Tensor:
        """``length`` tokens from ``start`` as int64, continuing from the start of the stream past its end."""
        end = start + length
        if end <= self.num_tokens:
            chunk = np.asarray(self.tokens[start:end])
        else:
            chunk = self.tokens[np.arange(start, end) % self.num_tokens]
        return torch.from_numpy(chunk.astype(np.int64))

    def positions(self, start: int, length: int) -> torch.Tensor:
        """Position ids of the window: offsets within documents, restarting at the window start too."""
        t = np.arange(length, dtype=np.int64)
        starts = self.doc_starts
        if starts is None:
            return torch.from_numpy(t)
        idx = (start + t) % self.num_tokens
        first = np.asarray(starts)[np.searchsorted(starts, idx, side="right") - 1]
        return torch.from_numpy(np.minimum(idx - first, t))

    def row(self, start: int, seq_len: int) -> dict[str, torch.Tensor]:
        """A training row from the window of ``seq_len + 1`` tokens at ``start``."""
        tokens = self.window(start, seq_len + 1)
        return {"input_ids": tokens[:-1], "labels": tokens[1:], "position_ids": self.positions(start, seq_len + 1)[:-1]}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None, "_starts": None}


class TokenStream(SampleStream):
    """Training rows of T+1-token windows from one :class:`TokenSplit` (see the module docstring for the orders).

    Args:
        split: the token file.
        seq_len: T.
        order: ``random`` windows, or non-overlapping windows in ``sequential`` or ``shuffled`` order.
        seed: seeds random starts and shuffling.
        offset: ``sequential`` only: the first window starts this many tokens into the (cyclic) stream (the tokens
            earlier stages of a context schedule consumed).
    """

    def __init__(
        self, split: TokenSplit, seq_len: int, order: str = "random", seed: int = 1234, offset: int = 0
    ) -> None:
        if order not in ("random", "shuffled", "sequential"):
            raise ValueError(f"unknown order {order!r}: use random, shuffled or sequential")
        super().__init__(seed=seed, shuffle=order == "shuffled")
        self.split, self.seq_len, self.order_kind, self.offset = split, seq_len, order, offset
        self._num_samples = -(-split.num_tokens // (seq_len + 1))

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def get_sample(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        if self.order_kind == "random":
            start = int(self.rng(epoch, index).integers(0, self.split.num_tokens - self.seq_len))
        else:
            start = (self.offset + index * (self.seq_len + 1)) % self.split.num_tokens
        return self.split.row(start, self.seq_len)

    def stream_tokens(self, rows: int) -> int:
        """Tokens of the file that the first ``rows`` positions read (a row is a T+1-token window)."""
        return rows * (self.seq_len + 1)

    def sample_at(self, epoch: int, position: int) -> dict[str, torch.Tensor]:
        if self.order_kind == "sequential":
            # ALLaMo pads the stream from its start: positions past the end keep cutting the cyclic stream
            return self.get_sample(epoch, position)
        return super().sample_at(epoch, position)


class TokenWindows(Dataset):
    """Consecutive validation rows with stride T: every token after the first is a target exactly once.

    Args:
        split: the token file.
        seq_len: T.
        pad_id: input id in the padding of the last row (its labels are -100).
    """

    def __init__(self, split: TokenSplit, seq_len: int, pad_id: int = 0) -> None:
        if split.num_tokens < 2:
            raise ValueError(f"{split.path} holds {split.num_tokens} token: validation needs at least 2")
        self.split, self.seq_len, self.pad_id = split, seq_len, pad_id

    def __len__(self) -> int:
        return -(-(self.split.num_tokens - 1) // self.seq_len)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start, t = i * self.seq_len, self.seq_len
        length = min(t + 1, self.split.num_tokens - start)
        tokens = self.split.window(start, length)
        real = length - 1
        input_ids = torch.full((t,), self.pad_id, dtype=torch.long)
        labels = torch.full((t,), IGNORE_INDEX, dtype=torch.long)
        input_ids[:real], labels[:real] = tokens[:-1], tokens[1:]
        positions = self.split.positions(start, real)
        if real < t:  # continue the last document through the padding so no spurious document starts there
            tail = positions[-1] + 1 + torch.arange(t - real)
            positions = torch.cat([positions, tail])
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


def read_meta(data_dir: str | Path) -> dict[str, Any] | None:
    """The parsed ``meta.json`` of ``data_dir``, or None when there is none."""
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): rewrite it with write_token_files()") from err
    if meta.get("format") != META_FORMAT:
        raise ValueError(f"{path} is not a lit-longctx token-files sidecar (format {meta.get('format')!r})")
    return meta


def infer_dtype(path: Path, vocab_size: int) -> tuple[str, str]:
    """The token dtype of a file without ``meta.json``, and why: ``uint32`` when the file read as uint32 holds only ids
    of the vocabulary, else ``uint16``.

    Why this is safe: a uint32 file of ids below 65536 read as uint16 has a 0 at every odd position, so read as
    uint32 a real uint16 file keeps all its ids below ``vocab_size`` only if every other token is 0 (or, for a
    vocabulary above 65536, which uint16 files cannot hold, at most 1). Files too short to tell are refused.
    """
    size = path.stat().st_size
    if size % 4:
        return "uint16", f"its {size} bytes are not a multiple of 4"
    wide = np.memmap(path, dtype="<u4", mode="r") if size else np.zeros(0, dtype="<u4")
    if len(wide) < 16:
        raise ValueError(
            f"{path} has no meta.json and only {size} bytes, too few to tell uint16 from uint32 tokens: set "
            "data.init_args.dtype to uint16 or uint32"
        )
    step = 1 << 24
    top = max(int(wide[i:i + step].max()) for i in range(0, len(wide), step))
    if top < vocab_size:
        return "uint32", f"read as uint32 all its ids are below the vocabulary size {vocab_size}"
    return "uint16", f"read as uint32 it would hold id {top}, beyond the vocabulary size {vocab_size}"


def open_token_dir(
    data_dir: str | Path, dtype: str = "auto", doc_positions: bool = True, vocab_size: int | None = None
) -> tuple[dict[str, TokenSplit], dict[str, Any] | None]:
    """Open ``train.bin`` (required) and ``val.bin`` of ``data_dir`` and check them against ``meta.json``.

    Without ``meta.json`` and with ``dtype="auto"``, the dtype is inferred from ``train.bin`` and ``vocab_size``
    (:func:`infer_dtype`, and said on stderr); without ``vocab_size`` too, it is refused.
    """
    data_dir = localize(data_dir)  # s3://...: memmap needs local files, so remote ones are copied to a cache once
    if not data_dir.is_dir():
        raise not_found(data_dir, "data_dir", "point data.init_args.data_dir at a directory holding train.bin")
    meta = read_meta(data_dir)
    if meta is not None and dtype != "auto" and dtype != meta["dtype"]:
        raise ValueError(
            f"dtype={dtype} but {data_dir / 'meta.json'} says the files hold {meta['dtype']}: use dtype=auto"
        )
    if not (data_dir / "train.bin").exists():
        seen = sorted(p.name for p in data_dir.iterdir())[:20]
        raise FileNotFoundError(
            f"no train.bin in {str(data_dir)!r} (scanned it: {seen}); expected train.bin, optionally val.bin, "
            "<split>.docs.npy and meta.json: write them with write_token_files() or use TextData for raw text"
        )
    if meta is not None:
        file_dtype = np.dtype(meta["dtype"])
    elif dtype != "auto":
        file_dtype = np.dtype(dtype)
    elif vocab_size is None:
        raise ValueError(
            f"{data_dir / 'train.bin'} has no meta.json saying its token dtype: set data.init_args.dtype to uint16 "
            "or uint32"
        )
    else:
        inferred, why = infer_dtype(data_dir / "train.bin", vocab_size)
        print(f"lit-longctx: {data_dir / 'train.bin'} has no meta.json; reading it as {inferred} tokens ({why}); set "
              f"data.init_args.dtype={inferred} to say so", file=sys.stderr)
        file_dtype = np.dtype(inferred)
    splits = {}
    for name in ("train", "val"):
        path = data_dir / f"{name}.bin"
        if not path.exists():
            continue
        docs = path.with_suffix(".docs.npy")
        splits[name] = TokenSplit(path, file_dtype, docs if doc_positions and docs.exists() else None)
        recorded = (meta or {}).get("splits", {}).get(name)
        if recorded is not None and recorded["num_tokens"] != splits[name].num_tokens:
            raise ValueError(
                f"{path} holds {splits[name].num_tokens} {file_dtype.name} tokens but meta.json records "
                f"{recorded['num_tokens']}: the sidecar does not match the file; rewrite both"
            )
    return splits, meta


class TokenFiles(LongCtxDataModule):
    """Pre-tokenized ``train.bin`` / ``val.bin`` token streams (see the module docstring for the layout and rows).

    Args:
        data_dir: directory (or ``s3://`` URL, copied to a local cache) holding ``train.bin`` and optionally
            ``val.bin``, ``<split>.docs.npy``, ``meta.json``.
        tokenizer: tokenizer path or ``byte``; default: the one meta.json records.
        seq_len: tokens per training row (T).
        batch_size: rows per batch on each device (B).
        num_workers: DataLoader worker processes.
        seed: seeds the training order.
        train_order: ``random`` windows, or non-overlapping windows in ``shuffled`` or ``sequential`` order.
        doc_positions: restart position ids at document starts when ``<split>.docs.npy`` exists.
        dtype: token dtype of the files; ``auto`` reads meta.json, or without one infers it from the file and the
            vocabulary (uint32 only when every id read so fits it) and says which.
    """

    def __init__(
        self,
        data_dir: str,
        tokenizer: str | None = None,
        seq_len: int = 2048,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 1234,
        train_order: Literal["random", "shuffled", "sequential"] = "random",
        doc_positions: bool = True,
        dtype: Literal["auto", "uint16", "uint32"] = "auto",
    ) -> None:
        super().__init__(tokenizer, seq_len, batch_size, num_workers, seed)
        if train_order not in ("random", "shuffled", "sequential"):
            raise ValueError(f"unknown train_order {train_order!r}: use random, shuffled or sequential")
        if dtype not in ("auto", "uint16", "uint32"):
            raise ValueError(f"unknown dtype {dtype!r}: use auto, uint16 or uint32")
        self.data_dir = localize(data_dir)
        self.train_order = train_order
        self.doc_positions = doc_positions
        self.dtype = dtype
        self._splits: dict[str, TokenSplit] | None = None
        self._meta: dict[str, Any] | None = None
        self._max_token_id: int | None = None

    @property
    def meta(self) -> dict[str, Any] | None:
        """The data's meta.json (None for raw ALLaMo files)."""
        if self._meta is None:
            self._meta = read_meta(self.data_dir) if self.data_dir.is_dir() else None
        return self._meta

    def build_tokenizer(self) -> Tokenizer:
        if self.tokenizer_spec is not None:
            return load_tokenizer(self.tokenizer_spec)
        record = (self.meta or {}).get("tokenizer") or {}
        spec = record.get("spec")
        if spec is None or (spec != "byte" and not Path(spec).exists()):
            where = "records no loadable tokenizer" if self.meta is not None else "is missing"
            raise ValueError(
                f"{self.data_dir / 'meta.json'} {where} (spec {spec!r}): pass tokenizer= (a tokenizer path or 'byte')"
            )
        return load_tokenizer(spec)

    @property
    def vocab_size(self) -> int:
        if self._tokenizer is None and self.tokenizer_spec is None and self.meta is not None:
            return int(self.meta["vocab_size"])
        return self.tokenizer.vocab_size

    @property
    def max_token_id(self) -> int | None:
        if self._max_token_id is None:
            if self.meta is not None:
                ids = [s.get("max_token_id") for s in self.meta["splits"].values()]
                ids = [i for i in ids if i is not None]
                self._max_token_id = max(ids) if ids else None
            elif self._splits is not None:
                self._max_token_id = max(split.max_token_id() for split in self._splits.values())
        return self._max_token_id

    def setup(self, stage: str | None = None) -> None:
        self.open()

    def open(self) -> dict[str, TokenSplit]:
        """Open and check the token files (idempotent)."""
        if self._splits is None:
            raw = self.data_dir.is_dir() and self.meta is None and self.dtype == "auto"
            vocab = self.vocab_size if raw else None
            splits, _ = open_token_dir(self.data_dir, self.dtype, self.doc_positions, vocab)
            train = splits["train"]
            if train.num_tokens < self.seq_len + 1:
                raise ValueError(
                    f"{train.path} holds {train.num_tokens} tokens, fewer than one training row of seq_len+1 = "
                    f"{self.seq_len + 1}: lower seq_len (data.init_args.seq_len) or add data"
                )
            self._splits = splits
            vocab, top = self.vocab_size, self.max_token_id
            if top is not None and top >= vocab:
                self._splits = None
                raise ValueError(
                    f"the token files in {str(self.data_dir)!r} hold id {top} but the vocabulary has {vocab} ids "
                    "(0.." f"{vocab - 1}): use the tokenizer the data was written with, or a larger vocabulary"
                )
        return self._splits

    def train_stream(self) -> TokenStream:
        return TokenStream(self.open()["train"], self.seq_len, self.train_order, self.seed)

    def stage_stream(self, seq_len: int, token_offset: int) -> TokenStream:
        """Rows of ``seq_len`` continuing the sequential stream at ``token_offset`` (random windows stay random)."""
        if self.train_order == "shuffled":
            raise ValueError(
                "train_order=shuffled permutes windows of one fixed length, so a context schedule cannot re-cut it at "
                "a new length from the same position; use train_order sequential (or random)"
            )
        return TokenStream(self.open()["train"], seq_len, self.train_order, self.seed, offset=token_offset)

    def val_dataset(self) -> TokenWindows | None:
        split = self.open().get("val")
        return TokenWindows(split, self.seq_len) if split is not None else None
