"""FoT's batch layouts over a stream of documents (LongLLaMA's ``FoT/data_pipeline.py``; spec ``specs/fot.md`` §2):
``doc_aware``, ``doc_aware_k<k>`` and ``linear``. See :mod:`lit_longctx.datamodules.doc_aware` for the layouts and
:class:`~lit_longctx.datamodules.doc_aware.DocAwareData` for the DataModule.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from lit_longctx.datamodules.base import SampleStream
from lit_longctx.nn.loss import IGNORE_INDEX

#: one document: its token ids, or ``{"input_ids": ids, "loss_mask": 0/1 per id}`` to choose which tokens are targets
Document = Sequence[int] | Mapping[str, Sequence[int]]
#: a re-iterable collection of documents, a callable ``start -> iterator`` over one pass beginning at document
#: ``start``, or a :class:`DocumentShard` (passes that differ by epoch, one rank's share)
DocumentSource = Iterable[Document] | Callable[[int], Iterator[Document]]
PIPELINES = ("linear", "doc_aware", "doc_aware_k<k>")
_K_PATTERN = re.compile(r"doc_aware_k(\d+)")


def parse_pipeline(name: str) -> tuple[str, int]:
    """``"doc_aware_k4" -> ("doc_aware", 4)``, ``"doc_aware" -> ("doc_aware", 1)``, ``"linear" -> ("linear", 1)``.

    The second value is FoT's ``dataset_packing``: k for ``doc_aware_k<k>``, 1 for every other pipeline.
    """
    if name in ("linear", "doc_aware"):
        return name, 1
    match = _K_PATTERN.fullmatch(name)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"unknown data_pipeline {name!r}; use linear, doc_aware or doc_aware_k<k> with k >= 1 "
                         "(e.g. doc_aware_k4)")
    return "doc_aware", int(match.group(1))


class DocumentStream:
    """Documents from a source as ``([bos] + doc + [eos], loss mask)``, counting what was read, looping if asked.

    Args:
        source: a re-iterable collection of documents, a callable ``start -> iterator`` over one pass of the
            documents from index ``start`` (so a restore needs no re-reading), or a :class:`DocumentShard`. A document
            is a sequence of token ids, or a dict with ``input_ids``, optionally its own ``loss_mask`` (e.g. the answer
            of a passkey document only) and the index of the ``source`` it came from (a mixture component).
        bos_id, eos_id: ids added around every document (``add_bos``/``add_eos``); bos has loss mask 0, eos 1.
        min_example_length: documents shorter than this (counted with bos/eos, as EasyLM's ``TokenFilter``) are
            skipped.
        loop: start over at the end of the source (EasyLM's JSON reader loops forever); else iteration stops there.
    """

    def __init__(
        self,
        source: DocumentSource,
        bos_id: int | None,
        eos_id: int | None,
        *,
        add_bos: bool = True,
        add_eos: bool = True,
        min_example_length: int = 0,
        loop: bool = True,
    ) -> None:
        if add_bos and bos_id is None:
            raise ValueError("add_bos=True needs a bos_id (the tokenizer's BOS), or pass add_bos=False")
        if add_eos and eos_id is None:
            raise ValueError("add_eos=True needs an eos_id (the tokenizer's EOS), or pass add_eos=False")
        self.source = source
        self.prefix = [bos_id] if add_bos else []
        self.suffix = [eos_id] if add_eos else []
        self.min_example_length = min_example_length
        self.loop = loop
        self.epoch = 0
        self.offset = 0  # documents read from the source in this epoch (skipped ones included)
        self.documents = 0  # documents handed out in total
        self.last_source = 0  # mixture component of the document handed out last
        #: mixture components the documents come from (per-source token counts have this length)
        self.n_sources = source.n_sources if isinstance(source, DocumentShard) else 1
        self._iterator: Iterator[Document] | None = None

    def _open(self) -> Iterator[Document]:
        if isinstance(self.source, DocumentShard):
            return self.source(self.offset, self.epoch)
        if callable(self.source):
            return iter(self.source(self.offset))
        return itertools.islice(iter(self.source), self.offset, None)

    def next(self) -> tuple[list[int], list[int]]:
        """The next document with bos/eos and its loss mask; StopIteration at the end of a source that does not loop."""
        ends = 0  # ends of the source met in this call: two mean a whole pass gave nothing usable
        while True:
            if self._iterator is None:
                self._iterator = self._open()
            doc = next(self._iterator, None)
            if doc is None:
                ends += 1
                if not self.loop:
                    raise StopIteration
                if ends == 2:
                    raise ValueError(
                        "a whole pass over the document source gave no document of at least "
                        f"min_example_length={self.min_example_length} tokens; the pipeline could never fill a row"
                    )
                self.epoch, self.offset, self._iterator = self.epoch + 1, 0, None
                continue
            self.offset += 1
            ids, doc_mask = (doc["input_ids"], doc.get("loss_mask")) if isinstance(doc, Mapping) else (doc, None)
            tokens = self.prefix + _ints(ids) + self.suffix
            if len(tokens) < max(self.min_example_length, 1):
                continue
            self.documents += 1
            self.last_source = int(doc.get("source", 0)) if isinstance(doc, Mapping) else 0
            body = [1] * (len(tokens) - len(self.prefix) - len(self.suffix)) if doc_mask is None else _ints(doc_mask)
            return tokens, [0] * len(self.prefix) + body + [1] * len(self.suffix)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "documents": self.documents}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset, self.documents = state["epoch"], state["offset"], state["documents"]
        self._iterator = None


def _ints(x: Sequence[int] | torch.Tensor) -> list[int]:
    return x.tolist() if hasattr(x, "tolist") else [int(t) for t in x]


def _batch(inputs: list[list[int]], targets: list[list[int]], masks: list[list[int]],
           sources: list[list[int]] | None = None, n_sources: int = 1) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor(inputs, dtype=torch.long)
    loss_mask = torch.tensor(masks, dtype=torch.float32)
    labels = torch.tensor(targets, dtype=torch.long).masked_fill(loss_mask == 0, IGNORE_INDEX)
    batch = {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask}
    if n_sources > 1 and sources is not None:  # FoT's batch_tokens_per_source: input tokens by source document
        flat = torch.tensor([s for row in sources for s in row], dtype=torch.long)
        batch["tokens_per_source"] = torch.bincount(flat, minlength=n_sources)
    return batch


class _Pipeline:
    """Shared iteration protocol and counters."""

    def __init__(self, stream: DocumentStream, batch_size: int, seq_len: int) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        self.stream = stream
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.steps = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def metrics(self) -> dict[str, int]:
        """EasyLM's per-step counters: documents read and tokens emitted so far."""
        return {"dataset_example_index": self.stream.documents,
                "dataset_total_tokens": self.steps * self.batch_size * self.seq_len}


class DocAware(_Pipeline):
    """The ``doc_aware`` pipeline: each batch row continues its own documents from step to step.

    Args:
        documents: see :class:`DocumentStream` (or an already built :class:`DocumentStream`).
        batch_size: rows B.
        seq_len: window T.
        bos_id, eos_id, add_bos, add_eos, min_example_length, loop: see :class:`DocumentStream`.
        pad: EasyLM's ``pad`` option: a document's first loss-mask entry is 0 and it is padded with ``pad_id`` (loss 0)
            to a multiple of T; not for cross-batch training, where padding is not masked.
        pad_id: the padding token.
    """

    def __init__(
        self,
        documents: DocumentSource | DocumentStream,
        batch_size: int,
        seq_len: int,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        add_bos: bool = True,
        add_eos: bool = True,
        min_example_length: int = 0,
        loop: bool = True,
        pad: bool = False,
        pad_id: int = 0,
    ) -> None:
        stream = documents if isinstance(documents, DocumentStream) else DocumentStream(
            documents, bos_id, eos_id, add_bos=add_bos, add_eos=add_eos, min_example_length=min_example_length,
            loop=loop)
        super().__init__(stream, batch_size, seq_len)
        self.pad, self.pad_id = pad, pad_id
        self.rows: list[tuple[list[int], list[int]]] = [([], []) for _ in range(batch_size)]
        self.row_sources: list[list[int]] = [[] for _ in range(batch_size)]  # source of every buffered token
        #: the unread rest of rows a restage removed, (tokens, mask, sources), read before new documents
        self.carried: list[tuple[list[int], list[int], list[int]]] = []

    def _next_document(self) -> tuple[list[int], list[int], list[int]]:
        """The next carried rest as it is, else the next document (padded to a multiple of T with ``pad``)."""
        if self.carried:
            return self.carried.pop(0)
        doc, doc_mask = self.stream.next()
        if self.pad:
            doc_mask[0] = 0
            short = -len(doc) % self.seq_len
            doc, doc_mask = doc + [self.pad_id] * short, doc_mask + [0] * short
        return doc, doc_mask, [self.stream.last_source] * len(doc)

    def restage(self, batch_size: int, seq_len: int) -> None:
        """Continue with ``batch_size`` rows of window ``seq_len`` (a context schedule's stage switch).

        Every row keeps its buffer, so its stream continues at the new window length. Rows beyond the new
        ``batch_size`` hand the unread rest of their buffer (in row order) to the rows that stay, before any new
        document: no token is dropped or read twice. A rest's first token was already the last target of its old row,
        so its loss mask is 0 there (it is predicted once); new rows start empty.
        """
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        for (tokens, mask), sources in zip(self.rows[batch_size:], self.row_sources[batch_size:]):
            if tokens:
                self.carried.append((list(tokens), [0, *mask[1:]], list(sources)))
        self.rows = self.rows[:batch_size] + [([], []) for _ in range(batch_size - len(self.rows))]
        self.row_sources = self.row_sources[:batch_size] + [[] for _ in range(batch_size - len(self.row_sources))]
        self.batch_size, self.seq_len = batch_size, seq_len

    def _fill(self, tokens: list[int], mask: list[int], sources: list[int]) -> None:
        while len(tokens) < self.seq_len + 1:
            doc, doc_mask, doc_sources = self._next_document()
            tokens.extend(doc)
            mask.extend(doc_mask)
            sources.extend(doc_sources)

    def __next__(self) -> dict[str, torch.Tensor]:
        t = self.seq_len
        for (tokens, mask), sources in zip(self.rows, self.row_sources):
            self._fill(tokens, mask, sources)
        inputs = [tokens[:t] for tokens, _ in self.rows]
        targets = [tokens[1 : t + 1] for tokens, _ in self.rows]
        masks = [mask[1 : t + 1] for _, mask in self.rows]
        used = [sources[:t] for sources in self.row_sources]
        self.rows = [(tokens[t:], mask[t:]) for tokens, mask in self.rows]
        self.row_sources = [sources[t:] for sources in self.row_sources]
        self.steps += 1
        return _batch(inputs, targets, masks, used, self.stream.n_sources)

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "steps": self.steps, "seq_len": self.seq_len,
                "rows": [(list(tokens), list(mask)) for tokens, mask in self.rows],
                "row_sources": [list(sources) for sources in self.row_sources],
                "carried": [[list(part) for part in rest] for rest in self.carried]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["rows"]) != self.batch_size:
            raise ValueError(f"the saved doc_aware state has {len(state['rows'])} rows but this pipeline has "
                             f"batch_size={self.batch_size}; resume with the batch size of that run")
        self.stream.load_state_dict(state["stream"])
        self.steps = state["steps"]
        self.rows = [(list(tokens), list(mask)) for tokens, mask in state["rows"]]
        self.row_sources = [list(x) for x in state.get("row_sources", [[0] * len(t) for t, _ in self.rows])]
        self.carried = [(list(a), list(b), list(c)) for a, b, c in state.get("carried", [])]


class KPacking(_Pipeline):
    """The ``doc_aware_k<k>`` pipeline: ``DocAware(B/k, k·T)`` reshaped to (B, T); rows p·k..p·k+k-1 are k consecutive
    windows of one stream. B must be divisible by k (FoT's cross-batch needs whole packs in every microbatch)."""

    def __init__(self, documents: DocumentSource | DocumentStream, batch_size: int, seq_len: int, k: int,
                 **kwargs: Any) -> None:
        if k < 1 or batch_size % k:
            raise ValueError(f"doc_aware_k{k} needs a batch size divisible by k={k} (whole packs of k windows per "
                             f"batch), got batch_size={batch_size}")
        self.k = k
        self.inner = DocAware(documents, batch_size // k, k * seq_len, **kwargs)
        super().__init__(self.inner.stream, batch_size, seq_len)

    def restage(self, batch_size: int, seq_len: int) -> None:
        """Continue with ``batch_size`` rows of window ``seq_len``: the inner pipeline's packs continue at k·T
        (:meth:`DocAware.restage`); k stays, so ``batch_size`` must stay a multiple of it."""
        if batch_size % self.k:
            raise ValueError(f"doc_aware_k{self.k} needs a batch size divisible by k={self.k}, got {batch_size}")
        self.inner.restage(batch_size // self.k, self.k * seq_len)
        self.batch_size, self.seq_len = batch_size, seq_len

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self.inner)
        self.steps += 1
        return {name: x.reshape(self.batch_size, self.seq_len) if x.dim() == 2 else x for name, x in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.steps = state["steps"]
        self.batch_size, self.seq_len = self.inner.batch_size * self.k, self.inner.seq_len // self.k


class Linear(_Pipeline):
    """The ``linear`` baseline: one stream of documents cut into consecutive (B, T) blocks (+1 target)."""

    def __init__(self, documents: DocumentSource | DocumentStream, batch_size: int, seq_len: int, *,
                 bos_id: int | None = None, eos_id: int | None = None, add_bos: bool = True, add_eos: bool = True,
                 min_example_length: int = 0, loop: bool = True) -> None:
        stream = documents if isinstance(documents, DocumentStream) else DocumentStream(
            documents, bos_id, eos_id, add_bos=add_bos, add_eos=add_eos, min_example_length=min_example_length,
            loop=loop)
        super().__init__(stream, batch_size, seq_len)
        self.tokens: list[int] = []
        self.mask: list[int] = []
        self.sources: list[int] = []

    def restage(self, batch_size: int, seq_len: int) -> None:
        """Continue the one stream in (``batch_size``, ``seq_len``) blocks from where the last block ended."""
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        self.batch_size, self.seq_len = batch_size, seq_len

    def __next__(self) -> dict[str, torch.Tensor]:
        n, b, t = self.batch_size * self.seq_len, self.batch_size, self.seq_len
        while len(self.tokens) < n + 1:
            doc, doc_mask = self.stream.next()
            self.tokens.extend(doc)
            self.mask.extend(doc_mask)
            self.sources.extend([self.stream.last_source] * len(doc))
        inputs = [self.tokens[i * t : (i + 1) * t] for i in range(b)]
        targets = [self.tokens[i * t + 1 : (i + 1) * t + 1] for i in range(b)]
        masks = [self.mask[i * t + 1 : (i + 1) * t + 1] for i in range(b)]
        used = [self.sources[i * t : (i + 1) * t] for i in range(b)]
        self.tokens, self.mask, self.sources = self.tokens[n:], self.mask[n:], self.sources[n:]
        self.steps += 1
        return _batch(inputs, targets, masks, used, self.stream.n_sources)

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "steps": self.steps, "tokens": list(self.tokens),
                "mask": list(self.mask), "sources": list(self.sources)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])
        self.steps, self.tokens, self.mask = state["steps"], list(state["tokens"]), list(state["mask"])
        self.sources = list(state.get("sources", [0] * len(self.tokens)))


def build_pipeline(
    name: str, documents: DocumentSource | DocumentStream, batch_size: int, seq_len: int, **kwargs: Any
) -> DocAware | KPacking | Linear:
    """The pipeline named ``name`` (``linear``, ``doc_aware``, ``doc_aware_k<k>``) over ``documents``."""
    kind, k = parse_pipeline(name)
    if kind == "linear":
        return Linear(documents, batch_size, seq_len, **kwargs)
    if k == 1:
        return DocAware(documents, batch_size, seq_len, **kwargs)
    return KPacking(documents, batch_size, seq_len, k, **kwargs)


class DocumentShard:
    """Rank ``rank`` of ``world_size``'s share of a document stream: documents r, r+W, r+2W, ... of every pass.

    A pass is one epoch of ``stream`` (a :class:`~lit_longctx.datamodules.base.SampleStream` whose samples hold
    ``input_ids`` and optionally ``loss_mask``), so pass e visits the stream's epoch-e order (a new seeded shuffle).
    Offsets count this rank's documents: a :class:`DocumentStream` restarts a pass anywhere without reading what came
    before it.

    Args:
        stream: the documents of every rank.
        rank: this data-parallel rank.
        world_size: number of data-parallel ranks.
    """

    def __init__(self, stream: SampleStream, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size={world_size})")
        self.stream, self.rank, self.world_size = stream, rank, world_size

    @property
    def n_sources(self) -> int:
        """Components of a mixture stream (``MixtureStream.components``), else 1."""
        return len(getattr(self.stream, "components", [None]))

    def __len__(self) -> int:
        """Documents of this rank in one pass."""
        return max(0, -(-(self.stream.num_samples - self.rank) // self.world_size))

    def __call__(self, start: int, epoch: int = 0) -> Iterator[Document]:
        """Pass ``epoch`` from this rank's document ``start`` on."""
        for local in range(start, len(self)):
            index = self.rank + local * self.world_size
            sample = self.stream.sample_at(epoch, index)
            if self.n_sources > 1:  # which component the document came from, for per-source token counts
                yield {**sample, "source": int(self.stream.component[index % self.stream.num_samples])}
            else:
                yield sample if "loss_mask" in sample else sample["input_ids"]
