"""Document-aware batch layouts for FoT training (Tworkowski et al. 2023, App. A.2; LongLLaMA's
``FoT/data_pipeline.py``; the project spec ``specs/fot.md`` §2).

Documents arrive as token-id sequences and become ``[bos] + doc + [eos]`` with loss mask ``[0] + [1]·len + [1]``.

- ``doc_aware`` (:class:`DocAware`, B rows, window T): every row owns a buffer. Each step, rows 0..B-1 in order, a row
  appends the next document while it holds fewer than T+1 tokens, then emits ``inputs = buf[0:T]``,
  ``targets = buf[1:T+1]``, ``loss_mask = mask[1:T+1]`` and keeps ``buf[T:]``. A row's windows are contiguous across
  steps (the last target of step s is the first input of step s+1): nothing is dropped or duplicated, a document stays
  in its row until it ends, and short documents join as ``…<eos><bos>…`` with no masking at the boundary.
- ``doc_aware_k<k>`` (:class:`KPacking`): an inner ``DocAware(B/k, k·T)`` reshaped ``[B/k, k·T] -> [B, T]``, so rows
  p·k..p·k+k-1 are k consecutive windows of one stream (FoT's ``dataset_packing`` = k; positives inside a pack,
  negatives across packs). ``doc_aware_k1`` is ``doc_aware``.
- ``linear`` (:class:`Linear`): one concatenated stream cut into B·T(+1) chunks, the baseline with arbitrary mixing.

Batches follow the project's convention: ``labels[b, t]`` is the token after ``input_ids[b, t]`` (the pipeline's
target), -100 where the loss mask is 0; ``loss_mask`` is returned as well. Every pipeline's position (documents read,
row buffers, counters) is a ``state_dict()`` that ``load_state_dict()`` restores, so a resumed run yields exactly the
batches an uninterrupted one would.

:class:`DocAwareData` is the DataModule: TextData's cached documents (and optionally passkey documents) through a
pipeline per data-parallel rank, with a :class:`DocAwareLoader` whose checkpointed state is every rank's pipeline.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lit_longctx.datamodules.base import SampleStream
from lit_longctx.datamodules.doc_pipelines import (
    PIPELINES,
    DocAware,
    Document,
    DocumentShard,
    DocumentSource,
    DocumentStream,
    KPacking,
    Linear,
    build_pipeline,
    parse_pipeline,
)
from lit_longctx.datamodules.passkey import LABELS as PASSKEY_LABELS
from lit_longctx.datamodules.passkey import PasskeyDocuments, init_passkey_options, module_passkey_documents
from lit_longctx.datamodules.sources import TextSource
from lit_longctx.datamodules.staged import Segment, read_segments_differ, segment_of, signature
from lit_longctx.datamodules.text import MixtureStream, TextData, normalize_weights
from lit_longctx.datamodules.token_files import TokenSplit
from lit_longctx.eval.passkey import ANSWER_TEMPLATE

__all__ = ["PASSKEY_LABELS", "PIPELINES", "DocAware", "DocAwareData", "DocAwareLoader", "Document", "DocumentShard",
           "DocumentSource", "DocumentStream", "KPacking", "Linear", "SplitDocuments", "build_pipeline",
           "parse_pipeline"]


# ---------------------------------------------------------------------------------------------- document sources
class SplitDocuments(SampleStream):
    """The documents of one cached token file (TextData's cache) as samples ``{"input_ids"}``.

    The BOS/EOS that the cache stores around each document are removed: the pipelines add their own (with loss mask 0
    on BOS).

    Args:
        split: a token file with document starts (TextData always writes them).
        bos_id, eos_id: the tokenizer's BOS/EOS, stripped from the ends of every document.
        min_example_length: documents with fewer tokens (BOS/EOS counted, as EasyLM's ``min_example_length``) are
            left out.
        seed: seeds the per-epoch order.
        shuffle: visit the documents of each epoch in a seeded random order instead of file order.
        label: the source's name, for messages.
    """

    def __init__(
        self,
        split: TokenSplit,
        bos_id: int | None,
        eos_id: int | None,
        min_example_length: int = 0,
        seed: int = 1234,
        shuffle: bool = True,
        label: str = "",
    ) -> None:
        super().__init__(seed=seed, shuffle=shuffle)
        if split.doc_starts is None:
            raise ValueError(f"{split.path} has no document starts ({split.path.stem}.docs.npy): document-aware "
                             "pipelines need document boundaries; re-tokenize the source with TextData")
        bounds = np.append(np.asarray(split.doc_starts, dtype=np.int64), split.num_tokens)
        self.split, self.bos_id, self.eos_id = split, bos_id, eos_id
        self.starts, self.ends = bounds[:-1], bounds[1:]
        lengths = self.ends - self.starts
        self.keep = np.flatnonzero(lengths >= max(min_example_length, 1))
        if len(self.keep) == 0:
            raise ValueError(f"source {label!r} has no document of at least min_example_length={min_example_length} "
                             f"tokens (its longest has {int(lengths.max())}): lower min_example_length for it")
        self.mean_length = float(lengths[self.keep].mean())

    @property
    def num_samples(self) -> int:
        return len(self.keep)

    def get_sample(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        i = int(self.keep[index])
        ids = np.asarray(self.split.tokens[self.starts[i] : self.ends[i]]).astype(np.int64)
        if len(ids) and ids[0] == self.bos_id:
            ids = ids[1:]
        if len(ids) and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return {"input_ids": torch.from_numpy(ids)}


class PasskeyDocumentStream(SampleStream):
    """Passkey documents as samples: sample i of epoch e is document e·n + i, so every epoch brings new documents.

    Args:
        documents: the generator (:class:`~lit_longctx.datamodules.passkey.PasskeyDocuments`, built without BOS/EOS:
            the pipelines add them).
        num_samples: n, documents per epoch.
        labels: ``all`` (every token is a target) or ``answer`` (only the answer tokens and the EOS after them).
    """

    def __init__(self, documents: PasskeyDocuments, num_samples: int, labels: str = "all") -> None:
        super().__init__(seed=documents.seed, shuffle=False)
        if labels not in PASSKEY_LABELS:
            raise ValueError(f"unknown passkey_labels {labels!r}: use 'all' (every token) or 'answer' (answer only)")
        self.documents, self._num_samples, self.labels = documents, max(1, num_samples), labels
        self.mean_length = sum(documents.lengths) / 2
        self.base_lengths = documents.lengths

    def scale_lengths(self, factor: float) -> None:
        """Documents from now on are ``factor`` times the configured lengths (a context schedule's stage of
        ``factor`` times the first stage's T: the needle stays as many windows back); shorter stages keep them."""
        low, high = self.base_lengths
        f = max(1.0, factor)
        self.documents.lengths = (round(low * f), round(high * f))

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def get_sample(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        doc = self.documents.record((epoch * self._num_samples + index) % self.documents.num_documents)
        sample = {"input_ids": torch.tensor(doc.input_ids, dtype=torch.long)}
        if self.labels == "answer":
            mask = torch.zeros(len(doc.input_ids), dtype=torch.long)
            mask[doc.answer_start :] = 1
            sample["loss_mask"] = mask
        return sample


# ------------------------------------------------------------------------------------------------------- loaders
class _PipelineBatches(IterableDataset):
    """``count`` batches of a pipeline from batch ``start`` on; in a worker process each comes with the pipeline's
    state after it. With ``segments`` (a context schedule's plan) the pipeline is restaged to the segment of each
    batch before making it."""

    def __init__(self, pipeline: DocAware | KPacking | Linear, segments: list[Segment] | None = None) -> None:
        self.pipeline = pipeline
        self.segments = segments
        self.start = self.count = 0

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any] | None]]:
        in_worker = get_worker_info() is not None
        for index in range(self.start, self.start + self.count):
            if self.segments is not None:
                shape_pipeline(self.pipeline, self.segments, index)
            batch = next(self.pipeline)
            yield batch, (self.pipeline.state_dict() if in_worker else None)


def shape_pipeline(pipeline: DocAware | KPacking | Linear, segments: list[Segment], batch: int) -> None:
    """Restage ``pipeline`` to the rows and window of micro-batch ``batch``'s segment (no-op when they match), and
    scale its passkey documents to that window (a fresh pipeline has the configured lengths, the first stage's)."""
    seg = segments[segment_of(segments, batch)]
    if (pipeline.batch_size, pipeline.seq_len) == (seg.batch_size, seg.seq_len):
        return
    pipeline.restage(seg.batch_size, seg.seq_len)
    mixture = getattr(pipeline.stream.source, "stream", None)  # a DocumentShard of DocAwareData's documents
    for component in getattr(mixture, "components", []):
        if isinstance(component, PasskeyDocumentStream):
            component.scale_lengths(seg.seq_len / segments[0].seq_len)


def _gather_states(rank: int, state: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """{data-parallel rank: pipeline state} of every process (only this one's without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return {rank: state}
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (rank, state))
    return dict(gathered)


class DocAwareLoader(DataLoader):
    """The training loader of a document pipeline; its state is the pipeline's (documents read, row buffers).

    An epoch is ``batches_per_epoch`` batches (about one pass over the documents). The pipeline never restarts: the
    next epoch continues every row where it stopped. ``state_dict()`` holds the pipeline state of every data-parallel
    rank (gathered over torch.distributed when it is initialised, so checkpoints written by rank 0 carry all of them;
    each rank restores its own) and the position in the epoch, so a resumed run yields exactly the batches of an
    uninterrupted one. Batches are made in the main process (``num_workers=0``) or in one worker process
    (``num_workers=1``) that sends the pipeline state along with each batch: a pipeline is sequential (each row
    continues its documents), so more workers cannot share it.

    Args:
        pipeline: the rank's pipeline (:func:`build_pipeline`).
        batches_per_epoch: batches per epoch (the same on every rank).
        num_workers: 0 or 1.
        rank: data-parallel rank.
        world_size: number of data-parallel ranks.
        identity: the settings a saved state depends on (pipeline, sequence length, batch size, seed, data); restoring
            a state written under other settings is an error.
        segments: a context schedule's plan (:class:`~lit_longctx.datamodules.staged.Segment` list): from each
            segment's first micro-batch on, the pipeline continues with its rows and window
            (:meth:`~lit_longctx.datamodules.doc_pipelines.DocAware.restage`); ``batches_per_epoch`` is then the whole
            run. Segments already read when a state was saved must be the same on restore; later ones may change.
        **kwargs: further ``DataLoader`` arguments (e.g. ``pin_memory``).
    """

    def __init__(
        self,
        pipeline: DocAware | KPacking | Linear,
        batches_per_epoch: int,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        identity: dict[str, Any] | None = None,
        segments: list[Segment] | None = None,
        **kwargs: Any,
    ) -> None:
        if num_workers not in (0, 1):
            raise ValueError(f"num_workers={num_workers}: a document-aware pipeline is sequential (every row continues "
                             "its documents from step to step), so it runs in the main process or in one worker; "
                             "set num_workers to 0 or 1")
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        segments = list(segments) if segments else None
        super().__init__(_PipelineBatches(pipeline, segments), batch_size=None, num_workers=num_workers, **kwargs)
        self.pipeline = pipeline
        self.batches_per_epoch = batches_per_epoch
        self.rank, self.world_size = rank, world_size
        self.identity = dict(identity or {})
        self.segments = segments
        self.epoch = 0
        self.batch = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:  # type: ignore[override]
        self.dataset.start, self.dataset.count = self.batch, len(self) - self.batch
        for batch, state in super().__iter__():
            if state is not None:  # made in a worker: mirror its pipeline here
                if self.segments is not None:
                    shape_pipeline(self.pipeline, self.segments, self.batch)
                self.pipeline.load_state_dict(state)
            # advance before handing the batch out: a state saved while it is being used points past it
            self.batch += 1
            if self.batch >= len(self):
                self.epoch, self.batch = self.epoch + 1, 0
            yield batch

    def local_state(self) -> dict[str, Any]:
        """The state of this rank only (no communication)."""
        state = {"identity": self.identity, "world_size": self.world_size, "epoch": self.epoch, "batch": self.batch,
                 "ranks": {self.rank: self.pipeline.state_dict()}}
        if self.segments is not None:
            state["segments"] = signature(self.segments)
        return state

    def state_dict(self) -> dict[str, Any]:
        """The state of every rank (a collective call under torch.distributed: all ranks call it together)."""
        state = self.local_state()
        state["ranks"] = _gather_states(self.rank, state["ranks"][self.rank])
        return state

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Continue from ``state_dict``. With ``strict=False`` a state of other settings is ignored (a fresh start)."""
        problems = []
        if state_dict.get("identity") != self.identity:
            saved = state_dict.get("identity") or {}
            problems += [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in self.identity.items() if saved.get(k) != v]
        if self.segments is not None or "segments" in state_dict:
            problems += self._segment_problems(state_dict)
        if state_dict.get("world_size") != self.world_size:
            problems.append(f"{state_dict.get('world_size')} data-parallel ranks (now {self.world_size})")
        elif self.rank not in state_dict["ranks"]:
            problems.append(f"no pipeline state for rank {self.rank}")
        if problems:
            if not strict:
                return
            raise ValueError(
                "the checkpoint's document pipeline state was written with " + ", ".join(problems or ["other settings"])
                + ": each rank's rows continue their documents, so resume with the data settings, batch size and "
                "number of data-parallel ranks of that run"
            )
        if self.segments is not None:  # the saved rows have the shape of the last batch made before the save
            shape_pipeline(self.pipeline, self.segments, max(state_dict["batch"] - 1, 0))
        self.pipeline.load_state_dict(state_dict["ranks"][self.rank])
        self.epoch, self.batch = state_dict["epoch"], state_dict["batch"]

    def _segment_problems(self, state_dict: dict[str, Any]) -> list[str]:
        """Segments read before the save must be the same now (the rows continue them); later ones may differ."""
        saved = state_dict.get("segments")
        if saved is None or self.segments is None:
            return [f"context schedule {saved is not None} (now {self.segments is not None})"]
        problem = read_segments_differ(saved, self.segments, state_dict["batch"])
        return [] if problem is None else [problem]


class _EvalBatches(IterableDataset):
    """The first ``count`` batches of the evaluation pipeline, built afresh each time it is iterated.

    Rank r of W keeps batches r, r+W, ... of every complete round of W batches, so all ranks run the same number of
    whole batches (packs intact; sharded models need equal step counts). ``rank`` and ``world`` are set in the main
    process when a loader is made.
    """

    def __init__(self, build: Callable[[], DocAware | KPacking | Linear], count: int) -> None:
        self.build, self.count = build, count
        self.rank, self.world = 0, 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batches = itertools.islice(self.build(), max(self.count // self.world, 1) * self.world)
        for i, batch in enumerate(batches):
            if i % self.world == self.rank:
                yield batch


# ---------------------------------------------------------------------------------------------------- DataModule
class DocAwareData(TextData):
    """FoT's document-aware training data over :class:`~lit_longctx.datamodules.text.TextData`'s cached documents,
    optionally mixed with passkey documents.

    Documents: every text source is tokenized once into TextData's cache (with document boundaries); a training pass
    visits their documents, blended by source weight (:class:`~lit_longctx.datamodules.text.MixtureStream`, each
    source in a seeded order per pass with ``shuffle``), with a ``passkey_fraction`` of the documents being passkey
    documents (:class:`~lit_longctx.datamodules.passkey.PasskeyDocuments`: the passkey evaluation prompt followed by its
    answer, ``passkey_lengths`` tokens, needle at a uniform random depth). Passkey documents several times longer than
    ``seq_len`` put, inside a ``doc_aware_k<k>`` pack, the needle in an earlier window than the question, so the answer
    can only be learnt through the cross-batch memory (FoT App. A.2).

    Pipelines (``data_pipeline``): ``linear``, ``doc_aware`` or ``doc_aware_k<k>`` (see the module docstring); every
    document is ``[bos] + doc + [eos]``, and batches have ``input_ids``, ``labels`` (-100 where the loss mask is 0, i.e.
    at BOS targets) and ``loss_mask``, with no ``position_ids``: rows are numbered 0..T-1 and documents joined by
    ``<eos><bos>`` are not masked from each other, as in the original code. Training batches of a mixture also carry
    ``tokens_per_source`` (input tokens per component, :attr:`source_names`), which
    :class:`~lit_longctx.callbacks.SourceTokens` logs as ``batch_tokens_per_source/<name>``. FoT's original data
    (EasyLM JSONL with pre-tokenized ids) is a source with ``tokens_field`` (:class:`TextSource`).

    Distribution and accumulation: rank r of W reads documents r, r+W, ... of every pass with its own pipeline of
    ``batch_size`` rows, so a device's batch holds ``batch_size / k`` whole packs and a pack never straddles ranks.
    ``batch_size`` is the per-device micro-batch; with gradient accumulation each micro-batch is a separate forward
    pass and the next pipeline step, so packs never straddle micro-batches either (the next micro-batch continues the
    same streams with their next k windows; JAX cuts one large batch into contiguous micro-batches instead, which keeps
    packs whole in the same way). ``batch_size`` must therefore be a multiple of k.

    Resuming: the training loader (:class:`DocAwareLoader`) saves the pipeline state of every rank (documents read,
    row buffers) in checkpoints, so a resumed run sees exactly the batches of an uninterrupted one (with the same
    data settings, batch size and number of ranks).

    Evaluation (validation and test): ``eval_pipeline`` (default ``doc_aware_k1``, the JAX setup's evaluation
    pipeline, with cross-batch range 0 in the model) over the held-out documents of the text sources in source order
    (no passkey documents), read in a loop as the JAX reader does (a doc-aware row takes a new document whenever its
    own runs out, so one pass would end with the first row that finds none), for as many batches as hold the held-out
    tokens once, the same batches at every evaluation. For retrieval use
    ``configs/eval/passkey.yaml``, which keeps ``task``, ``key_range``, ``template``, ``needle_template``, ``n_keys``
    and ``seed`` of this module.

    Args:
        sources: text sources: path strings or :class:`TextSource` entries (path, weight, format, text_field,
            sample_by, name, split); ``builtin:pydoc`` is Python's documentation, ``hf:<dataset>`` a hub dataset.
        data_pipeline: ``linear``, ``doc_aware`` or ``doc_aware_k<k>`` (k = FoT's ``dataset_packing``).
        eval_pipeline: the pipeline of validation and test batches.
        min_example_length: documents shorter than this (tokens, BOS/EOS counted) are skipped; one value, or one per
            source (the LongLLaMA mixture's 4096/1024/2048 minimums).
        passkey_fraction: share of the training documents that are passkey documents (0: none, 1: only passkey).
        passkey_lengths: (min, max) tokens of a passkey document (BOS/EOS excluded); default (seq_len/2, k·seq_len).
        passkey_depths: (min, max) needle depth in [0, 1].
        passkey_labels: ``all`` (every token of a passkey document is a target) or ``answer`` (only its answer).
        task: ``passkey`` or ``multikey`` documents.
        key_range: inclusive range of the keys.
        template: prompt template (default: the task's standard evaluation prompt).
        needle_template: multikey only: one needle with ``{name}`` and ``{value}``.
        n_keys: multikey only: needles per document.
        answer_template: the answer after the prompt, with ``{key}``.
        tokenizer: tokenizer path or ``byte``; leave None with ``train_tokenizer`` (None without it means byte).
        seq_len: T, tokens per window.
        batch_size: windows per device per micro-batch (a multiple of k).
        num_workers: 0 (training batches made in the main process) or 1 (in one worker process).
        seed: seeds the document order and the passkey documents.
        train_tokenizer: train a sentencepiece BPE with this many pieces on the training documents (cached).
        tokenizer_sample_chars: at most this many characters of training text train the tokenizer.
        cache_dir: where tokenizers and token files are cached.
        val_fraction: fraction of each source's documents held out for validation.
        val_docs: number of documents per source held out instead.
        shuffle: visit each source's documents in a seeded random order per pass (else in file order).
    """

    def __init__(
        self,
        sources: list[str | TextSource],
        data_pipeline: str = "doc_aware",
        eval_pipeline: str = "doc_aware_k1",
        min_example_length: int | list[int] = 0,
        passkey_fraction: float = 0.0,
        passkey_lengths: tuple[int, int] | None = None,
        passkey_depths: tuple[float, float] = (0.0, 1.0),
        passkey_labels: Literal["all", "answer"] = "all",
        task: Literal["passkey", "multikey"] = "passkey",
        key_range: tuple[int, int] = (1, 50000),
        template: str | None = None,
        needle_template: str | None = None,
        n_keys: int = 4,
        answer_template: str = ANSWER_TEMPLATE,
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
        super().__init__(sources, tokenizer, seq_len, batch_size, num_workers, seed, train_tokenizer,
                         tokenizer_sample_chars, cache_dir, val_fraction, val_docs, shuffle)
        self.data_pipeline, self.eval_pipeline = data_pipeline, eval_pipeline
        for name, pipeline in (("data_pipeline", data_pipeline), ("eval_pipeline", eval_pipeline)):
            k = parse_pipeline(pipeline)[1]
            if batch_size % k:
                raise ValueError(
                    f"batch_size={batch_size} is not divisible by k={k} of {name}={pipeline!r}: a batch holds whole "
                    f"packs of k consecutive windows of a document stream (they must not straddle devices or "
                    f"micro-batches); use a per-device batch size that is a multiple of {k}"
                )
        if num_workers > 1:
            raise ValueError(f"num_workers={num_workers}: document-aware pipelines are sequential (every row continues "
                             "its documents), so batches are made in the main process or in one worker; use 0 or 1")
        lengths = [min_example_length] if isinstance(min_example_length, int) else list(min_example_length)
        if len(lengths) not in (1, len(self.sources)) or min(lengths) < 0:
            raise ValueError(f"min_example_length must be one value >= 0 or one per source ({len(self.sources)}), "
                             f"got {min_example_length}")
        self.min_example_length = lengths * len(self.sources) if len(lengths) == 1 else lengths
        k = self.dataset_packing
        lengths = (seq_len // 2, k * seq_len) if passkey_lengths is None else tuple(passkey_lengths)
        init_passkey_options(self, passkey_fraction, lengths, None, passkey_depths, passkey_labels, task, key_range,
                             template, needle_template, n_keys, answer_template)
        self._eval_batches: _EvalBatches | None = None
        self._eval_shape: tuple[int, int] | None = None

    # --- what the model needs to know
    @property
    def dataset_packing(self) -> int:
        """k of the training pipeline: consecutive rows holding consecutive windows of one stream (FoT)."""
        return parse_pipeline(self.data_pipeline)[1]

    @property
    def eval_dataset_packing(self) -> int:
        """k of the evaluation pipeline."""
        return parse_pipeline(self.eval_pipeline)[1]

    # --- documents
    def passkey_documents(self) -> PasskeyDocuments:
        """The passkey document generator (this module's tokenizer, lengths, depths, task and seed; no BOS/EOS)."""
        return module_passkey_documents(self, bos=False, eos=False)

    def _split_documents(self, split: str, shuffle: bool) -> list[SplitDocuments]:
        tok = self.tokenizer
        return [SplitDocuments(splits[split], tok.bos_id, tok.eos_id, self.min_example_length[i], self.seed, shuffle,
                               source.label)
                for i, (source, splits) in enumerate(zip(self.sources, self.open()))
                if split in splits and (split != "train" or source.weight > 0)]

    def documents(self) -> MixtureStream:
        """The training documents of all ranks: an epoch is one pass (text by weight, passkey documents mixed in)."""
        text = self._split_documents("train", self.shuffle)
        weights = normalize_weights([s.weight for s in self.sources if s.weight > 0])
        f = self.passkey_fraction
        if f == 0:
            return MixtureStream(text, weights, self.seed)
        n_text = sum(c.num_samples for c in text)
        n_passkey = n_text if f == 1 else round(n_text * f / (1 - f))
        passkey = PasskeyDocumentStream(self.passkey_documents(), n_passkey, self.passkey_labels)
        return MixtureStream([*text, passkey], [w * (1 - f) for w in weights] + [f], self.seed)

    @property
    def source_names(self) -> list[str]:
        """Names of the training mixture's components, in the order of a batch's ``tokens_per_source`` counts
        (FoT's ``batch_tokens_per_source/<name>``, logged by :class:`~lit_longctx.callbacks.SourceTokens`)."""
        names = [s.log_name for s in self.sources if s.weight > 0]
        return names + ["passkey"] if self.passkey_fraction > 0 else names

    def batches_per_epoch(self, documents: MixtureStream, world_size: int) -> int:
        """Batches per rank in one pass of ``documents`` (the epoch length Lightning sees)."""
        counts = np.bincount(documents.component, minlength=len(documents.components))
        tokens = sum(n * (c.mean_length + 2) for n, c in zip(counts, documents.components))
        return max(1, math.ceil(tokens / (self.batch_size * self.seq_len * world_size)))

    def _pipeline(self, name: str, documents: DocumentSource, loop: bool,
                  shape: Segment | None = None) -> DocAware | KPacking | Linear:
        """The pipeline ``name`` at this module's batch size and length, or at those of segment ``shape``."""
        tok = self.tokenizer
        batch_size, seq_len = (self.batch_size, self.seq_len) if shape is None else (shape.batch_size, shape.seq_len)
        return build_pipeline(name, documents, batch_size, seq_len, bos_id=tok.bos_id, eos_id=tok.eos_id,
                              add_bos=tok.bos_id is not None, add_eos=tok.eos_id is not None, loop=loop)

    def state_identity(self) -> dict[str, Any]:
        """What a saved training state depends on (under a context schedule the segments replace the shape)."""
        shape = {} if self._stages is not None else {"seq_len": self.seq_len, "batch_size": self.batch_size}
        return {"data_pipeline": self.data_pipeline, **shape, "seed": self.seed,
                "passkey_fraction": self.passkey_fraction, "sources": [s.label for s in self.sources]}

    # --- context schedules
    def check_stages(self) -> None:
        """A schedule's stages keep FoT's layout: each micro-batch holds whole packs of k consecutive windows, and
        every row continues its documents at the new window length (:meth:`DocAware.restage`), so ``shuffle`` and
        several sources are fine here (the document order does not depend on the length)."""
        k = self.dataset_packing
        for seg in self._stages[0] if self._stages is not None else []:
            if seg.batch_size % k:
                raise ValueError(
                    f"a stage's micro_batch={seg.batch_size} is not divisible by k={k} of "
                    f"data_pipeline={self.data_pipeline!r}: a micro-batch holds whole packs of k windows; use a "
                    f"multiple of {k}"
                )

    # --- loaders
    def train_dataloader(self) -> DocAwareLoader:
        rank, world_size = self.data_parallel_rank()
        documents = self.documents()
        shard = DocumentShard(documents, rank, world_size)
        if len(shard) == 0:
            raise ValueError(f"the training data has {documents.num_samples} documents per pass, fewer than the "
                             f"{world_size} data-parallel ranks: add data or use fewer devices")
        if self._stages is not None:  # one "epoch" is the whole run; the loader restages the pipeline per segment
            segments, total = self._stages  # built at the first stage's shape, which its passkey lengths are for
            pipeline = self._pipeline(self.data_pipeline, shard, loop=True, shape=segments[0])
            loader = DocAwareLoader(pipeline, total, self.num_workers, rank, world_size, self.state_identity(),
                                    segments)
        else:
            loader = DocAwareLoader(self._pipeline(self.data_pipeline, shard, loop=True),
                                    self.batches_per_epoch(documents, world_size), self.num_workers, rank,
                                    world_size, self.state_identity())
        if self._pending_train_state is not None:
            loader.load_state_dict(self._pending_train_state)
            self._pending_train_state = None
        elif self._train_loader is not None:  # a rebuilt loader continues the stream
            loader.load_state_dict(self._train_loader.local_state(), strict=False)
        self._train_loader = loader
        return loader

    def _eval_loader(self) -> DataLoader | None:
        if self._eval_batches is not None and self._eval_shape != (self.batch_size, self.seq_len):
            self._eval_batches = None  # a context schedule changed the length: evaluate at the new one
        if self._eval_batches is None:
            self._eval_shape = (self.batch_size, self.seq_len)
            held_out = self._split_documents("val", shuffle=False)
            if not held_out:
                return None

            def documents(start: int) -> Iterator[torch.Tensor]:
                every = (c.sample_at(0, i)["input_ids"] for c in held_out for i in range(c.num_samples))
                return itertools.islice(every, start, None)

            tokens = sum(c.num_samples * c.mean_length for c in held_out)
            count = math.ceil(tokens / (self.batch_size * self.seq_len))
            self._eval_batches = _EvalBatches(lambda: self._pipeline(self.eval_pipeline, documents, loop=True), count)
        self._eval_batches.rank, self._eval_batches.world = self.data_parallel_rank()
        return DataLoader(self._eval_batches, batch_size=None)  # slicing cached tokens: no worker needed

    def val_dataloader(self) -> DataLoader | list:
        loader = self._eval_loader()
        return [] if loader is None else loader

    def test_dataloader(self) -> DataLoader:
        loader = self._eval_loader()
        if loader is None:
            raise RuntimeError("DocAwareData has no held-out documents to test on: set val_fraction or val_docs")
        return loader
