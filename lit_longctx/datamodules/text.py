"""Raw text to training rows: sources read with HF ``datasets``, tokenized once into cached token files, mixed.

Each source (:class:`~lit_longctx.datamodules.sources.TextSource`) is tokenized once into a
:class:`~lit_longctx.datamodules.token_files.TokenFiles`-format directory ``<cache_dir>/tokens/<key>/`` (key: a hash
of the source's files, the tokenizer and the validation split), with document starts; each document is
``[bos] + tokens + [eos]`` (where the tokenizer has them). A deterministic set of documents, evenly spaced through the
source, is held out for validation. Training rows are consecutive T+1-token chunks of a source's stream (documents
packed back to back), with position ids restarting at 0 at each document start (and at each row start), from which
the model derives document masking.

Mixture (Llemma, spec section 3.3, after GPT-NeoX's blendable dataset): weights are normalised; sample ``k`` of an
epoch goes to the source with the largest deficit ``w·(k+1) - count`` (ties to the first source); a source's ``j``-th
sample is its row ``perm_c[j mod M_c]``, with a new seeded permutation each time the source's ``M_c`` rows are used up.
An epoch has as many samples as the weighted sources have rows.

Tokenizer: a path (or ``byte``), or ``train_tokenizer=V`` to train a V-piece sentencepiece BPE on the training
documents, cached under ``<cache_dir>/tokenizers/``, so a quickstart needs no downloaded tokenizer. ``vocab_size`` of
a tokenizer still to be trained is V, so the CLI can link it into the model before anything is trained.

Preparation (training the tokenizer, tokenizing) runs in ``prepare_data`` (once per node under DDP) and again,
as a no-op when the cache is complete, in ``setup``; it holds a file lock and moves finished directories into place
atomically, so concurrent processes never see half-written caches.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from torch.utils.data import ConcatDataset, Dataset

from lit_longctx.datamodules.base import LongCtxDataModule, SampleStream, distributed_rank
from lit_longctx.datamodules.sources import TextSource, as_source, decode_tokens, load_documents, source_identity
from lit_longctx.datamodules.token_files import (
    TokenFileWriter,
    TokenSplit,
    TokenStream,
    TokenWindows,
    open_token_dir,
    write_meta,
)
from lit_longctx.io import atomic_directory, check_writable
from lit_longctx.tokenizers import Tokenizer, load_tokenizer, train_sentencepiece

CACHE_VERSION = 1


def normalize_weights(weights: Sequence[float]) -> list[float]:
    """Weights scaled to sum to 1 (Llemma's 2:4:1:0.147368:0.221053 becomes 27.14/54.29/13.57/2.00/3.00 %)."""
    if not weights:
        raise ValueError("a mixture needs at least one weight")
    if any(not w >= 0 for w in weights):
        raise ValueError(f"mixture weights must be >= 0, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"mixture weights sum to {total}: give at least one source a positive weight")
    return [w / total for w in weights]


def greedy_blend(weights: Sequence[float], num_samples: int) -> np.ndarray:
    """Source of each of ``num_samples`` samples: sample k goes to the largest deficit ``w·(k+1) - count``."""
    w = normalize_weights(weights)
    counts = [0] * len(w)
    out = np.empty(num_samples, dtype=np.int32)
    sources = range(len(w))
    for k in range(num_samples):
        best, best_deficit = 0, -1.0
        for c in sources:
            deficit = w[c] * (k + 1) - counts[c]
            if deficit > best_deficit:
                best, best_deficit = c, deficit
        counts[best] += 1
        out[k] = best
    return out


class MixtureStream(SampleStream):
    """A weighted blend of sample streams (see the module docstring).

    Args:
        components: the sources' streams (their own ``shuffle`` orders the rows each source serves).
        weights: relative weights, one per component; zero-weight components are never sampled.
        seed: the mixture seed (components keep their own).
    """

    def __init__(self, components: Sequence[SampleStream], weights: Sequence[float], seed: int = 1234) -> None:
        if len(components) != len(weights):
            raise ValueError(f"{len(components)} components but {len(weights)} weights")
        super().__init__(seed=seed, shuffle=False)
        self.components = list(components)
        self.weights = normalize_weights(weights)
        self._num_samples = sum(c.num_samples for c, w in zip(self.components, self.weights) if w > 0)
        self.component = greedy_blend(self.weights, self._num_samples)
        self.within = np.empty(self._num_samples, dtype=np.int64)
        self.cycles = []
        for c, comp in enumerate(self.components):
            where = np.flatnonzero(self.component == c)
            self.within[where] = np.arange(len(where))
            self.cycles.append(max(1, -(-len(where) // comp.num_samples)))

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def stream_tokens(self, rows: int) -> int | tuple:
        """Where the first ``rows`` positions leave the components' token streams (synthetic components, which have
        no ``stream_tokens``, read none): one token stream's count as it is, several as a tuple in component order
        (context schedules continue each source where it stopped, :func:`~lit_longctx.datamodules.staged.advance`)."""
        full, rest = divmod(rows, self._num_samples)
        read = []
        for c, comp in enumerate(self.components):
            if hasattr(comp, "stream_tokens"):
                n = full * int((self.component == c).sum()) + int((self.component[:rest] == c).sum())
                read.append(comp.stream_tokens(n))
        if not read:
            return 0
        return read[0] if len(read) == 1 else tuple(read)

    def get_sample(self, epoch: int, index: int) -> dict[str, Any]:
        c, j = int(self.component[index]), int(self.within[index])
        comp = self.components[c]
        # each pass over a component's rows is a "virtual epoch" of that component: a fresh permutation
        return comp.sample_at(epoch * self.cycles[c] + j // comp.num_samples, j % comp.num_samples)


def held_out(num_docs: int, val_fraction: float, val_docs: int | None, label: str = "") -> np.ndarray:
    """Boolean mask of validation documents: ``val_docs`` (or ``val_fraction`` of them, at least one when the
    fraction is positive and there are two or more), evenly spaced through the source."""
    if val_docs is not None:
        k = val_docs
        if k and k >= num_docs:
            raise ValueError(
                f"val_docs={val_docs} leaves no training documents in source {label!r} ({num_docs} documents): "
                "lower val_docs or use val_fraction"
            )
    else:
        k = int(round(val_fraction * num_docs))
        if val_fraction > 0 and num_docs >= 2:
            k = min(max(k, 1), num_docs - 1)
    mask = np.zeros(num_docs, dtype=bool)
    if k:
        mask[((np.arange(k) + 0.5) * num_docs / k).astype(np.int64)] = True
    return mask


def pretokenized_ids(value: Any, source: TextSource, index: int, vocab_size: int) -> list[int]:
    """The ids of example ``index`` of a pre-tokenized source, checked against the vocabulary."""
    where = f"source {source.label!r}, example {index}, field {source.tokens_field!r}"
    ids = [] if isinstance(value, str) and not value else decode_tokens(value, source.tokens_dtype, where)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{where}: token id {bad[0]} is outside the tokenizer's vocabulary [0, {vocab_size}): give "
                         "the tokenizer the ids were made with (or the right tokens_dtype)")
    return ids


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_identity(tokenizer: Tokenizer) -> dict[str, Any]:
    """What token ids depend on: the tokenizer's description and the bytes of its model file."""
    identity: dict[str, Any] = tokenizer.describe()
    location = getattr(tokenizer, "path", None) or getattr(tokenizer, "file", None)
    if location is not None:
        identity["sha256"] = hashlib.sha256(Path(location).read_bytes()).hexdigest()
    return identity


class TextData(LongCtxDataModule):
    """Text files, built-in text or hub datasets, tokenized once and cached, mixed by weight, packed into rows.

    Args:
        sources: text sources: path strings (weight 1) or :class:`TextSource` entries (path, weight, format,
            text_field, sample_by, name, split). ``builtin:pydoc`` is Python's documentation (no download).
        tokenizer: tokenizer path or ``byte``; leave None with ``train_tokenizer`` (None without it means byte).
        seq_len: tokens per training row (T).
        batch_size: rows per batch on each device (B).
        num_workers: DataLoader worker processes.
        seed: seeds the training order.
        train_tokenizer: train a sentencepiece BPE with this many pieces on the training documents (cached).
        tokenizer_sample_chars: at most this many characters of training text (shared equally among the sources)
            train the tokenizer.
        cache_dir: where tokenizers and token files are cached (also the ``datasets`` cache of local files).
        val_fraction: fraction of each source's documents held out for validation.
        val_docs: number of documents per source held out instead (overrides ``val_fraction``).
        shuffle: visit each source's rows in a seeded random order per epoch (else in stream order).
    """

    def __init__(
        self,
        sources: list[str | TextSource],
        tokenizer: str | None = None,
        seq_len: int = 2048,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 1234,
        train_tokenizer: int | None = None,
        tokenizer_sample_chars: int = 20_000_000,
        cache_dir: str = "~/.cache/lit-longctx/text",
        val_fraction: float = 0.05,
        val_docs: int | None = None,
        shuffle: bool = True,
    ) -> None:
        super().__init__(tokenizer, seq_len, batch_size, num_workers, seed)
        if isinstance(sources, (str, TextSource)):
            sources = [sources]
        if not sources:
            raise ValueError("TextData needs at least one source (a path, a TextSource, or 'builtin:pydoc')")
        self.sources = [as_source(s) for s in sources]
        normalize_weights([s.weight for s in self.sources])
        if tokenizer is not None and train_tokenizer is not None:
            raise ValueError("give either tokenizer= (an existing tokenizer) or train_tokenizer= (a vocab size), "
                             "not both")
        if train_tokenizer is not None and train_tokenizer < 2:
            raise ValueError(f"train_tokenizer must be a vocabulary size, got {train_tokenizer}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if val_docs is not None and val_docs < 0:
            raise ValueError(f"val_docs must be >= 0, got {val_docs}")
        self.train_tokenizer = train_tokenizer
        self.tokenizer_sample_chars = tokenizer_sample_chars
        self.cache_dir = Path(cache_dir).expanduser()
        self.val_fraction = val_fraction
        self.val_docs = val_docs
        self.shuffle = shuffle
        self._identities: list[dict[str, Any]] | None = None
        self._token_dirs: list[Path] | None = None
        self._splits: list[dict[str, TokenSplit]] | None = None
        self._metas: list[dict[str, Any]] | None = None

    # --- identities and cache paths
    @property
    def source_identities(self) -> list[dict[str, Any]]:
        if self._identities is None:
            self._identities = [source_identity(s) for s in self.sources]
        return self._identities

    def _split_config(self) -> dict[str, Any]:
        return {"val_fraction": self.val_fraction, "val_docs": self.val_docs}

    @property
    def tokenizer_path(self) -> str:
        """What :func:`load_tokenizer` loads this tokenizer from (a trained one's cache directory, which exists once
        :meth:`prepare_data` ran)."""
        if self.train_tokenizer is None:
            return self.tokenizer_spec or "byte"
        key = _digest({"version": CACHE_VERSION, "sources": self.source_identities, "split": self._split_config(),
                       "vocab_size": self.train_tokenizer, "chars": self.tokenizer_sample_chars})
        return str(self.cache_dir / "tokenizers" / f"spm{self.train_tokenizer}-{key}")

    # --- tokenizer
    def build_tokenizer(self) -> Tokenizer:
        if self.train_tokenizer is not None:
            self._prepare_tokenizer()
        return load_tokenizer(self.tokenizer_path)

    @property
    def vocab_size(self) -> int:
        if self._tokenizer is None and self.train_tokenizer is not None:
            return self.train_tokenizer  # sentencepiece makes exactly this many pieces; no need to train yet
        return self.tokenizer.vocab_size

    @property
    def max_token_id(self) -> int | None:
        if self._metas is None:
            return None
        ids = [s["max_token_id"] for meta in self._metas for s in meta["splits"].values()]
        return max(i for i in ids if i is not None)

    def _training_documents(self, index: int, docs: Any) -> Any:
        if self.sources[index].tokens_field is not None:  # pre-tokenized: nothing to train a tokenizer on
            return iter(())
        mask = held_out(len(docs), self.val_fraction, self.val_docs, self.sources[index].label)
        return (text for i, text in enumerate(docs) if not mask[i] and text.strip())

    def _check_cache_dir(self) -> None:
        check_writable(self.cache_dir, "data.init_args.cache_dir (where tokenizers and token files are cached)")

    def _prepare_tokenizer(self) -> None:
        self._check_cache_dir()
        target = Path(self.tokenizer_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if (target / "tokenizer.model").exists():
                return
            with atomic_directory(target) as tmp:
                self._train_tokenizer_into(tmp)

    def _train_tokenizer_into(self, tmp: Path) -> None:
        budget = self.tokenizer_sample_chars // len(self.sources)
        with open(tmp / "corpus.txt", "w", encoding="utf-8") as corpus:
            for i, source in enumerate(self.sources):
                used = 0
                for text in self._training_documents(i, load_documents(source, self.cache_dir / "hf")):
                    if used >= budget:
                        break
                    text = text[: budget - used]
                    corpus.write(text if text.endswith("\n") else text + "\n")
                    used += len(text)
        try:
            tok = train_sentencepiece([tmp / "corpus.txt"], tmp / "tokenizer", self.train_tokenizer)
        except RuntimeError as err:
            message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"training a {self.train_tokenizer}-piece sentencepiece tokenizer failed ({message}): choose "
                "another train_tokenizer size or add text"
            ) from err
        tok.save(tmp)
        for name in ("corpus.txt", "tokenizer.vocab"):
            (tmp / name).unlink(missing_ok=True)

    # --- tokenized cache
    def token_dir(self, index: int) -> Path:
        """The cache directory of source ``index`` (TokenFiles layout)."""
        key = _digest({"version": CACHE_VERSION, "source": self.source_identities[index],
                       "tokenizer": tokenizer_identity(self.tokenizer), "split": self._split_config()})
        return self.cache_dir / "tokens" / key

    def prepare_data(self) -> None:
        """Train the tokenizer and tokenize every source, unless cached."""
        if self._token_dirs is None:
            dirs = [self.token_dir(i) for i in range(len(self.sources))]  # checks the sources first
            self._check_cache_dir()
            for i, directory in enumerate(dirs):
                self._tokenize_source(i, directory)
            self._token_dirs = dirs

    def _tokenize_source(self, index: int, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if (target / "meta.json").exists():
                return
            with atomic_directory(target) as tmp:
                self._write_tokens(index, tmp)

    def _write_tokens(self, index: int, tmp: Path) -> None:
        source, tok = self.sources[index], self.tokenizer
        docs = load_documents(source, self.cache_dir / "hf")
        mask = held_out(len(docs), self.val_fraction, self.val_docs, source.label)
        bos, eos = tok.bos_id is not None, tok.eos_id is not None
        writers = {"train": TokenFileWriter(tmp / "train.bin", tok.vocab_size),
                   "val": TokenFileWriter(tmp / "val.bin", tok.vocab_size)}
        for i, value in enumerate(docs):
            if source.tokens_field is not None:  # pre-tokenized (EasyLM {field}): ids as given, BOS/EOS added
                ids = pretokenized_ids(value, source, i, tok.vocab_size)
                if ids:
                    writers["val" if mask[i] else "train"].add([tok.bos_id] * bos + ids + [tok.eos_id] * eos)
            elif value.strip():
                writers["val" if mask[i] else "train"].add(tok.encode(value, bos=bos, eos=eos))
        entries = {name: writer.close() for name, writer in writers.items()}
        if entries["train"]["num_tokens"] == 0:
            raise ValueError(f"source {source.label!r} has no training text ({len(docs)} documents, all empty "
                             "or held out): check the source, its text_field, or the validation split")
        if entries["val"]["num_tokens"] == 0:
            (tmp / "val.bin").unlink()
            del entries["val"]
        write_meta(tmp, tok.vocab_size, writers["train"].dtype, tok, entries,
                   source=self.source_identities[index], split=self._split_config())

    def setup(self, stage: str | None = None) -> None:
        self.open()

    def open(self) -> list[dict[str, TokenSplit]]:
        """Prepare (if needed) and open every source's token files, checking lengths and ids."""
        if self._splits is None:
            self.prepare_data()
            splits, metas = [], []
            for source, directory in zip(self.sources, self._token_dirs):
                opened, meta = open_token_dir(directory)
                if source.weight > 0 and opened["train"].num_tokens < self.seq_len + 1:
                    raise ValueError(
                        f"source {source.label!r} has {opened['train'].num_tokens} training tokens, fewer than one "
                        f"row of seq_len+1 = {self.seq_len + 1}: lower seq_len (data.init_args.seq_len), add text, "
                        "or give it weight 0"
                    )
                splits.append(opened)
                metas.append(meta)
            self._splits, self._metas = splits, metas
            self._say_if_no_validation()
            top, vocab = self.max_token_id, self.vocab_size
            if top is not None and top >= vocab:
                raise ValueError(f"the tokenized cache holds id {top} but the vocabulary has {vocab} ids: delete "
                                 f"{self.cache_dir / 'tokens'} and prepare again")
        return self._splits

    def _say_if_no_validation(self) -> None:
        """Say at start-up when validation was asked for but no source holds any out: a single text file read with
        ``sample_by: document`` is one document, and one document is never split (Lightning would only warn later
        that there is no validation loop)."""
        wants = self.val_docs > 0 if self.val_docs is not None else self.val_fraction > 0
        if not wants or any("val" in s for s in self._splits) or distributed_rank()[0] != 0:
            return
        single = [s for s, m in zip(self.sources, self._metas) if m["splits"]["train"].get("num_docs") == 1]
        if single:
            s = single[0]
            why = (f"source {s.label!r} is a single document (sample_by: {s.sample_by}), and a document is never "
                   "split; set sample_by: paragraph or line on it (--data.init_args.sources="
                   f"'[{{path: {s.path}, sample_by: paragraph}}]') to hold out part of it")
        else:
            why = "no source has a held-out document with text; add documents or raise val_fraction / val_docs"
        print(f"lit-longctx: warning: no validation set: {why}, or set data.init_args.val_fraction=0 to train "
              "without validation", file=sys.stderr)

    def _mixture(self, seq_len: int, order: str, offsets: Sequence[int] | None = None) -> MixtureStream:
        """Every source's training rows of ``seq_len`` (``sequential`` ones from ``offsets`` tokens in, one per
        source), blended by source weight."""
        splits = self.open()
        offsets = list(offsets) if offsets is not None else [0] * len(splits)
        streams = [TokenStream(split["train"], seq_len, order, self.seed, offset=o)
                   for split, o in zip(splits, offsets)]
        return MixtureStream(streams, [source.weight for source in self.sources], self.seed)

    def train_stream(self) -> MixtureStream:
        return self._mixture(self.seq_len, "shuffled" if self.shuffle else "sequential")

    def stage_stream(self, seq_len: int, token_offset: int | tuple) -> MixtureStream:
        """Rows of ``seq_len`` continuing every source's stream where the previous stages left it (``token_offset``:
        0 at the start, else what :meth:`MixtureStream.stream_tokens` gives: one count, or one per source), in the
        same blend (context schedules)."""
        if self.shuffle:
            raise ValueError(
                "a context schedule re-cuts each source's token stream at the new length from where the last stage "
                "stopped, which needs the sources read in order: set data.init_args.shuffle: false (or pre-tokenize "
                "into TokenFiles with train_order random)"
            )
        n = len(self.sources)
        if isinstance(token_offset, tuple):
            offsets = list(token_offset)
        else:  # the start (0 for every source) or the one source's count
            offsets = [token_offset] * (n if token_offset == 0 else 1)
        if len(offsets) != n:
            raise ValueError(f"{len(offsets)} stream positions for {n} sources: resume with the sources of that run")
        return self._mixture(seq_len, "sequential", offsets)

    def val_dataset(self) -> Dataset | None:
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        parts = [TokenWindows(s["val"], self.seq_len, pad) for s in self.open() if "val" in s]
        return ConcatDataset(parts) if parts else None
