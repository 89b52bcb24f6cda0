"""Passkey data for long context: evaluation grids, long-document perplexity, and retrieval training data.

Evaluation (:class:`PasskeyData`, :class:`LongDocData`): one prompt or window per batch (lengths differ across the grid)
as a dict with a ``task`` key, which ``CausalLM.test_step`` hands to :mod:`lit_longctx.eval.tasks`. The datasets are
iterable and shard themselves across ranks in *lockstep*: items are grouped by target length and each group is padded
(repeating its own items, marked by their ``index`` so the gathered results count each prompt once) to a multiple of
the world size, so at every step all ranks run a prompt of the same target length. Sharded models (FSDP) need that:
every rank must run the same number of forward calls.

Training (:class:`PasskeyDocuments`, :class:`PasskeyStream`, :class:`PasskeyMixData`): passkey *documents* (the
evaluation prompt followed by its answer, e.g. ``... What is the pass key? The pass key is 12345.``) of random token
length and needle depth, as an iterable of token-id documents (a ``DocumentSource`` for the doc-aware pipelines of
:mod:`lit_longctx.datamodules.doc_aware`), as training rows, and as a DataModule mixing those rows with ordinary text
(resumable and rank-sharded like every training stream, :class:`~lit_longctx.datamodules.base.SampleStream`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lit_longctx.datamodules.base import LongCtxDataModule, SampleStream
from lit_longctx.datamodules.sources import TextSource
from lit_longctx.datamodules.text import MixtureStream, TextData
from lit_longctx.eval.passkey import (
    ANSWER_TEMPLATE,
    TASKS,
    RetrievalDocument,
    build_task,
    check_template,
    retrieval_grid,
    sample_batch,
)
from lit_longctx.eval.perplexity import TASK as PPL_TASK
from lit_longctx.eval.perplexity import document_tokens, position_edges
from lit_longctx.nn.loss import IGNORE_INDEX
from lit_longctx.tokenizers import ByteTokenizer, Tokenizer

LABELS = ("all", "answer")


def lockstep_shard(groups: Sequence[Sequence[int]], rank: int, world: int) -> list[int]:
    """Indices for ``rank``: each group padded by cycling to a multiple of ``world``, then every world-th item.

    The i-th item of every rank comes from the same group, and together the ranks cover every index.
    """
    out: list[int] = []
    for group in groups:
        padded = [group[i % len(group)] for i in range(-(-len(group) // world) * world)]
        out.extend(padded[rank::world])
    return out


class LockstepItems(IterableDataset):
    """Items built lazily by ``build(index)``, sharded in lockstep across ranks (see module doc), then workers.

    ``rank`` and ``world`` are set in the main process when a loader is made (worker processes may not see the
    process group).
    """

    def __init__(self, groups: Sequence[Sequence[int]], build: Callable[[int], dict[str, Any]]) -> None:
        super().__init__()
        self.groups = [list(g) for g in groups if g]
        self.build = build
        self.rank, self.world = 0, 1

    def indices(self) -> list[int]:
        return lockstep_shard(self.groups, self.rank, self.world)

    def __len__(self) -> int:
        return len(self.indices())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        indices = self.indices()
        info = get_worker_info()
        if info is not None:  # DataLoader interleaves workers round-robin, so this keeps the order
            indices = indices[info.id :: info.num_workers]
        for i in indices:
            yield self.build(i)


class _EvalData(LongCtxDataModule):
    """Shared behaviour of the evaluation DataModules: one item per batch, the model's tokenizer, lockstep loaders.

    Evaluation sets take the model's tokenizer instead of defining the vocabulary: :attr:`vocab_size` is None, so the
    CLI links nothing into the model, and without a ``tokenizer`` argument :meth:`setup` adopts the attached
    LightningModule's tokenizer (e.g. the one saved with the checkpoint) when the first loader is made. They have no
    training split.
    """

    def __init__(
        self,
        tokenizer: str | Tokenizer | None,
        seq_len: int | None,
        batch_size: int,
        num_workers: int,
        seed: int,
        session_kwargs: dict[str, Any] | None,
        longest: int,
    ) -> None:
        if batch_size != 1:
            raise ValueError(
                f"{type(self).__name__} yields one prompt per batch (prompts differ in length), got batch_size="
                f"{batch_size}; set data.init_args.batch_size: 1"
            )
        super().__init__(tokenizer, longest if seq_len is None else seq_len, batch_size, num_workers, seed)
        self.session_kwargs = dict(session_kwargs or {})
        self._dataset: LockstepItems | None = None

    @property
    def vocab_size(self) -> None:
        """None: evaluation data follows the model's vocabulary instead of setting it."""
        return None

    def adopt_model_tokenizer(self) -> None:
        """Without a ``tokenizer`` argument, take the attached LightningModule's tokenizer (e.g. the checkpoint's).

        Called when the first loader is made: Lightning restores ``ckpt_path`` (and with it a module's tokenizer) after
        ``setup`` but before requesting loaders.
        """
        if self._tokenizer is not None or self.tokenizer_spec is not None or self.trainer is None:
            return
        tokenizer = getattr(self.trainer.lightning_module, "tokenizer", None)
        if isinstance(tokenizer, Tokenizer):
            self._tokenizer = tokenizer

    def build_dataset(self) -> LockstepItems:
        raise NotImplementedError

    def _loader(self) -> DataLoader:
        if self._dataset is None:  # built here, not in setup(): a checkpoint's tokenizer is restored after setup()
            self.adopt_model_tokenizer()
            self._dataset = self.build_dataset()
        self._dataset.rank, self._dataset.world = self.data_parallel_rank()
        return DataLoader(self._dataset, batch_size=None, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()


class PasskeyData(_EvalData):
    """Passkey / multi-key retrieval prompts on a grid of lengths x depths (see :mod:`lit_longctx.eval.passkey`).

    Each batch is one prompt: ``{"task", "index", "input_ids" (1, N) long, "answer", "length" (target tokens),
    "depth", "trial", "n_tokens" (actual tokens), "needle_token", "max_new_tokens"}``, plus ``"name"`` (multikey) and
    ``"session_kwargs"`` (when given).

    Args:
        tokenizer: the model's tokenizer (``byte``, a sentencepiece ``.model``, a ``tokenizer.json`` or a directory);
            prompt lengths are counted in its tokens. Null: the LightningModule's tokenizer (e.g. the checkpoint's),
            or bytes when it has none.
        lengths: prompt lengths in tokens (each prompt is the longest not exceeding its length, within a token or
            two of it).
        depths: needle depths in [0, 1]: the fraction of the filler placed before the needle.
        trials: prompts per (length, depth) cell.
        task: ``passkey`` (Landmark Attention's prompt) or ``multikey`` (several key/value needles, ask for one).
        seed: seed of keys, names and distractor positions (per cell, independent of the rest of the grid).
        template: ``str.format`` prompt template; default the task's standard one. passkey: fields ``{prefix}``,
            ``{key}``, ``{suffix}``; multikey: ``{context}``, ``{name}``.
        needle_template: multikey only: one needle with ``{name}`` and ``{value}``.
        n_keys: multikey only: needles per prompt (the asked one included).
        key_range: inclusive range of keys / values.
        max_new_tokens: greedy tokens generated per prompt (the seeds: 10).
        bos: start prompts with the tokenizer's BOS (as HF pipelines do).
        session_kwargs: keyword arguments for the module's ``inference_session`` (e.g. ``prefill_chunk``, or a
            method's options such as landmark retrieval's top-k), sent with every batch.
        seq_len: not used to build prompts (their lengths come from ``lengths``; null = the longest); kept so the
            CLI's seq_len link and configs of training data modules compose.
        batch_size: must be 1 (one prompt per batch).
        num_workers: DataLoader workers building prompts.
    """

    def __init__(
        self,
        tokenizer: str | Tokenizer | None = None,
        lengths: Sequence[int] = (256, 512, 1024, 2048),
        depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
        trials: int = 5,
        task: Literal["passkey", "multikey"] = "passkey",
        seed: int = 1234,
        template: str | None = None,
        needle_template: str | None = None,
        n_keys: int = 4,
        key_range: tuple[int, int] = (1, 50000),
        max_new_tokens: int = 10,
        bos: bool = True,
        session_kwargs: dict[str, Any] | None = None,
        seq_len: int | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        specs = retrieval_grid(lengths, depths, trials)
        super().__init__(tokenizer, seq_len, batch_size, num_workers, seed, session_kwargs,
                         longest=max(n for n, _, _ in specs))
        if task not in TASKS:
            raise ValueError(f"unknown retrieval task {task!r}; choose one of {', '.join(TASKS)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        # fail at init on bad templates or keys, before the model's tokenizer is known
        build_task(task, ByteTokenizer(), template=template, n_keys=n_keys, key_range=tuple(key_range),
                   needle_template=needle_template)
        self.specs = specs
        self.lengths = list(dict.fromkeys(n for n, _, _ in specs))
        self.task = task
        self.template = template
        self.needle_template = needle_template
        self.n_keys = n_keys
        self.key_range = tuple(key_range)
        self.max_new_tokens = max_new_tokens
        self.bos = bos

    def build_dataset(self) -> LockstepItems:
        task = build_task(self.task, self.tokenizer, template=self.template, seed=self.seed, key_range=self.key_range,
                          bos=self.bos, n_keys=self.n_keys, needle_template=self.needle_template)
        specs = self.specs

        def build(index: int) -> dict[str, Any]:
            return sample_batch(task.sample(*specs[index]), index, self.max_new_tokens, self.session_kwargs)

        groups = [[i for i, s in enumerate(specs) if s[0] == n] for n in self.lengths]
        return LockstepItems(groups, build)


class LongDocData(_EvalData):
    """Windows of a long document for perplexity by position (:mod:`lit_longctx.eval.perplexity`).

    The document is cut into non-overlapping windows of ``max(lengths)`` tokens; ``max_windows`` of them are chosen
    with ``seed``. Each batch: ``{"task": "ppl_by_position", "index", "input_ids" (1, L) long, "edges", "length",
    "offset"}``; the evaluator reports perplexity of the tokens whose position falls in each bucket
    ``[edges[i], edges[i+1])``, with ``edges = [0, *lengths]``.

    Args:
        tokenizer: the model's tokenizer (used to tokenize a text document). Null: the LightningModule's tokenizer
            (e.g. the checkpoint's), or bytes when it has none.
        document: a token file (``.bin`` with a JSON sidecar holding its ``dtype``), a text file, or null for Python's
            own documentation topics (``pydoc_data``, on every machine).
        lengths: bucket ends in tokens (e.g. [1024, 2048, 4096, 8192]); the window is the largest.
        max_windows: windows to evaluate (null = every window that fits).
        dtype: numpy dtype of a ``.bin`` document when no sidecar gives it.
        seed: which windows are chosen when more fit than ``max_windows``.
        session_kwargs: keyword arguments for the module's ``inference_session`` (e.g. ``prefill_chunk``, the
            forward chunk of the window), sent with every batch.
        seq_len: not used (the window comes from ``lengths``; null = the window); kept so the CLI's seq_len link and
            configs of training data modules compose.
        batch_size: must be 1 (one window per batch).
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        tokenizer: str | Tokenizer | None = None,
        document: str | None = None,
        lengths: Sequence[int] = (256, 512, 1024, 2048),
        max_windows: int | None = 8,
        dtype: str | None = None,
        seed: int = 1234,
        session_kwargs: dict[str, Any] | None = None,
        seq_len: int | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        edges = position_edges(lengths)
        super().__init__(tokenizer, seq_len, batch_size, num_workers, seed, session_kwargs, longest=edges[-1])
        self.edges = edges
        if max_windows is not None and max_windows < 1:
            raise ValueError(f"max_windows must be >= 1 or null (all windows), got {max_windows}")
        self.document = document
        self.max_windows = max_windows
        self.dtype = dtype

    @property
    def window(self) -> int:
        return self.edges[-1]

    def build_dataset(self) -> LockstepItems:
        tokens = torch.from_numpy(document_tokens(self.document, self.tokenizer, self.dtype))
        n_fit = tokens.numel() // self.window
        if n_fit == 0:
            where = "pydoc_data topics" if self.document is None else str(Path(self.document))
            raise ValueError(
                f"document {where} has {tokens.numel()} tokens, fewer than one window of {self.window} (the largest "
                "of lengths); give a longer document or smaller lengths"
            )
        chosen = list(range(n_fit))
        if self.max_windows is not None and self.max_windows < n_fit:
            chosen = sorted(random.Random(self.seed).sample(chosen, self.max_windows))
        edges, window = self.edges, self.window

        def build(index: int) -> dict[str, Any]:
            start = chosen[index] * window
            batch = {"task": PPL_TASK, "index": index, "input_ids": tokens[start : start + window].unsqueeze(0),
                     "edges": list(edges), "length": window, "offset": start}
            if self.session_kwargs:
                batch["session_kwargs"] = dict(self.session_kwargs)
            return batch

        return LockstepItems([list(range(len(chosen)))], build)


# ------------------------------------------------------------------------------------------------------------ training
def _range(values: Sequence[float], name: str, low: float, high: float | None = None) -> tuple[float, float]:
    values = tuple(values)
    if len(values) != 2 or not low <= values[0] <= values[1] or (high is not None and values[1] > high):
        bound = f"{low} <= min <= max" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"{name} must be (min, max) with {bound}, got {list(values)}")
    return values[0], values[1]


def init_passkey_options(
    module: Any, fraction: float, lengths: Sequence[int], max_length: int | None, depths: Sequence[float],
    labels: str, task: str, key_range: Sequence[int], template: str | None, needle_template: str | None,
    n_keys: int, answer_template: str,
) -> None:
    """Check the passkey training options shared by :class:`PasskeyMixData` and
    :class:`~lit_longctx.datamodules.doc_aware.DocAwareData` and store them on ``module`` (as ``passkey_fraction``,
    ``passkey_lengths``, ``passkey_depths``, ``passkey_labels``, ``task``, ``key_range``, ``template``,
    ``needle_template``, ``n_keys`` and ``answer_template``). Bad templates and keys fail here, before any tokenizer
    is trained or any text tokenized.

    Args:
        lengths: the resolved (min, max) passkey document length; ``max_length`` bounds its max (None: no bound).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"passkey_fraction must lie in [0, 1] (the share of passkey samples), got {fraction}")
    if labels not in LABELS:
        raise ValueError(f"unknown passkey_labels {labels!r}: use 'all' (every token) or 'answer' (answer only)")
    low, high = _range(lengths, "passkey_lengths", 1, max_length)
    depth_low, depth_high = _range(depths, "passkey_depths", 0.0, 1.0)
    check_template(answer_template, ("key",), "answer")
    build_task(task, ByteTokenizer(), template=template, key_range=tuple(key_range), n_keys=n_keys,
               needle_template=needle_template)
    module.passkey_fraction = fraction
    module.passkey_lengths = (int(low), int(high))
    module.passkey_depths = (float(depth_low), float(depth_high))
    module.passkey_labels = labels
    module.task = task
    module.key_range = (int(key_range[0]), int(key_range[1]))
    module.template = template
    module.needle_template = needle_template
    module.n_keys = n_keys
    module.answer_template = answer_template


def module_passkey_documents(module: Any, bos: bool, eos: bool) -> PasskeyDocuments:
    """The :class:`PasskeyDocuments` of a module whose options :func:`init_passkey_options` stored."""
    return PasskeyDocuments(
        module.tokenizer, module.passkey_lengths, module.passkey_depths, module.task, module.seed, module.key_range,
        module.template, module.needle_template, module.n_keys, module.answer_template, bos=bos, eos=eos,
    )


class PasskeyDocuments:
    """Retrieval training documents (prompt + answer) as token ids, of random token length and needle depth.

    Document ``i`` is a pure function of ``(seed, i)``: a generator seeded with them draws its length uniformly from
    ``lengths`` and its depth uniformly from ``depths``; the task draws the key from ``(seed, length, depth, i)``
    (:meth:`lit_longctx.eval.passkey.PasskeyTask.document`). So any document is built alone, in any process and order,
    and, the depths being continuous draws, training prompts never coincide with an evaluation grid's prompts.

    It is a ``DocumentSource`` of :mod:`lit_longctx.datamodules.doc_aware` in both forms: a re-iterable, indexable
    collection of ``num_documents`` documents (lists of ids) and a callable ``start -> iterator``. :meth:`record`
    gives a document with its answer span (for answer-only labels).

    Args:
        tokenizer: the model's tokenizer; lengths count its tokens.
        lengths: inclusive (min, max) document length in tokens (BOS, prompt, answer and EOS together).
        depths: inclusive (min, max) needle depth, within [0, 1].
        task: ``passkey`` (Landmark Attention's prompt) or ``multikey``.
        seed: seeds every document.
        key_range: inclusive range of the keys.
        template: prompt template (default: the task's standard one, as in evaluation).
        needle_template: multikey only: one needle with ``{name}`` and ``{value}``.
        n_keys: multikey only: needles per prompt.
        answer_template: the text after the prompt, with ``{key}`` (default ``" {key}."``).
        bos: start every document with the tokenizer's BOS. False suits the doc-aware pipelines, which add BOS and EOS
            themselves.
        eos: end every document with the tokenizer's EOS (counted in its length).
        num_documents: documents in one pass of the iterable (:meth:`record` builds any index).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        lengths: Sequence[int] = (128, 256),
        depths: Sequence[float] = (0.0, 1.0),
        task: Literal["passkey", "multikey"] = "passkey",
        seed: int = 1234,
        key_range: tuple[int, int] = (1, 50000),
        template: str | None = None,
        needle_template: str | None = None,
        n_keys: int = 4,
        answer_template: str = ANSWER_TEMPLATE,
        bos: bool = True,
        eos: bool = True,
        num_documents: int = 1_000_000,
    ) -> None:
        low, high = _range(lengths, "lengths", 1)
        self.lengths = (int(low), int(high))
        self.depths = _range(depths, "depths", 0.0, 1.0)
        if num_documents < 1:
            raise ValueError(f"num_documents must be >= 1, got {num_documents}")
        check_template(answer_template, ("key",), "answer")
        self.task = build_task(task, tokenizer, template=template, seed=seed, key_range=tuple(key_range), bos=bos,
                               n_keys=n_keys, needle_template=needle_template)
        self.seed = seed
        self.answer_template = answer_template
        self.eos = eos
        self.num_documents = num_documents
        try:  # the shortest document must hold the prompt without filler
            self.task.document(self.lengths[0], self.depths[0], 0, answer_template, eos)
        except ValueError as err:
            raise ValueError(f"{task} documents of lengths[0]={self.lengths[0]} tokens: {err} (raise the minimum "
                             "length)") from err

    def record(self, index: int) -> RetrievalDocument:
        """Document ``index`` with its answer span."""
        rng = random.Random(f"passkey-document|{self.seed}|{index}")
        length = rng.randint(*self.lengths)
        depth = rng.uniform(*self.depths)
        return self.task.document(length, depth, index, self.answer_template, self.eos)

    def __getitem__(self, index: int) -> list[int]:
        if not 0 <= index < self.num_documents:
            raise IndexError(f"document {index} is outside 0..{self.num_documents - 1}")
        return self.record(index).input_ids

    def __len__(self) -> int:
        return self.num_documents

    def __call__(self, start: int = 0) -> Iterator[list[int]]:
        """One pass over the documents from index ``start``."""
        return (self[i] for i in range(start, self.num_documents))

    def __iter__(self) -> Iterator[list[int]]:
        return self(0)


class PasskeyStream(SampleStream):
    """Training rows of one passkey document each, a component of :class:`~lit_longctx.datamodules.text.MixtureStream`.

    Row ``index`` of epoch ``e`` is document ``e·num_samples + index``, so every epoch brings new documents. Its ids
    fill the row's T+1-token window: ``input_ids = ids[:-1]``, ``labels = ids[1:]`` (aligned targets); a shorter
    document is padded (pad id in, -100 out) and ``position_ids`` run 0..T-1. With ``labels="answer"`` only the targets
    that are answer tokens (and EOS) are kept, so the loss is the retrieval itself; with ``"all"`` every target of the
    document counts (filler and the needle's key included).

    Args:
        documents: the documents; their longest must fit a row (at most ``seq_len + 1`` tokens).
        seq_len: T.
        num_samples: rows per epoch.
        labels: ``all`` or ``answer``.
        pad_id: input id of the padding.
    """

    def __init__(
        self, documents: PasskeyDocuments, seq_len: int, num_samples: int, labels: str = "all", pad_id: int = 0
    ) -> None:
        super().__init__(seed=documents.seed, shuffle=False)
        if labels not in LABELS:
            raise ValueError(f"unknown labels {labels!r}: use 'answer' (answer tokens only) or 'all' (every token)")
        if documents.lengths[1] > seq_len + 1:
            raise ValueError(f"passkey documents of up to {documents.lengths[1]} tokens do not fit rows of seq_len="
                             f"{seq_len} (at most seq_len + 1 = {seq_len + 1} tokens); lower the maximum length")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.documents = documents
        self.seq_len = seq_len
        self._num_samples = num_samples
        self.labels = labels
        self.pad_id = pad_id

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def get_sample(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        doc = self.documents.record(epoch * self._num_samples + index)
        ids = torch.tensor(doc.input_ids, dtype=torch.long)
        n, t = ids.numel() - 1, self.seq_len
        input_ids = torch.full((t,), self.pad_id, dtype=torch.long)
        labels = torch.full((t,), IGNORE_INDEX, dtype=torch.long)
        input_ids[:n], labels[:n] = ids[:-1], ids[1:]
        if self.labels == "answer":
            labels[: doc.answer_start - 1] = IGNORE_INDEX  # target j is token j + 1: keep j + 1 >= answer_start
        return {"input_ids": input_ids, "labels": labels, "position_ids": torch.arange(t)}


class PasskeyMixData(TextData):
    """:class:`~lit_longctx.datamodules.text.TextData` rows mixed with passkey rows, for training retrieval.

    A ``passkey_fraction`` of the training rows are :class:`PasskeyStream` rows (one passkey document each, random
    length in ``passkey_lengths`` and depth in ``passkey_depths``), the rest the text rows of ``sources``, blended
    deterministically by :class:`~lit_longctx.datamodules.text.MixtureStream`; an epoch holds every text row once
    and passkey rows in proportion (with ``passkey_fraction=1``, as many passkey rows as there are text rows).
    Resuming and rank sharding are those of every training stream. Validation is the text's held-out split; watch
    retrieval during training with :class:`~lit_longctx.callbacks.LongEvalCallback`, or afterwards with
    ``configs/eval/passkey.yaml``, which keeps ``task``, ``key_range``, ``template``, ``needle_template``, ``n_keys``
    and ``seed`` when composed after a config of this module (the same names as :class:`PasskeyData`'s).

    Labels (``passkey_labels``): ``all`` (default) trains on every token of a passkey row; ``answer`` puts its loss
    on the answer tokens (and EOS) only. ``answer`` looks cleaner (the key's first occurrence is random, the filler
    fixed text), but the batch loss is the mean over all targets of the batch, so the answer targets are a small share
    of it, and ``all`` also trains the needle's own repetition of the key (``K. Remember it. K is``), a second
    copy-from-context target: in the baseline experiment (docs/results.md) ``all`` learned retrieval clearly sooner.

    Args:
        sources: text sources (see :class:`TextData`), e.g. ``builtin:pydoc``.
        passkey_fraction: share of training rows that are passkey rows, in [0, 1].
        passkey_lengths: inclusive (min, max) passkey document length in tokens (BOS, prompt, answer, EOS), at most
            ``seq_len + 1``; default ``(seq_len // 2, seq_len + 1)``.
        passkey_depths: inclusive (min, max) needle depth within [0, 1].
        passkey_labels: ``all`` or ``answer`` (see above).
        task: ``passkey`` or ``multikey`` (several key/value needles, one asked for).
        key_range: inclusive range of the keys (smaller keys are fewer tokens to copy).
        template: prompt template (default: the task's standard one, as in evaluation).
        needle_template: multikey only: one needle with ``{name}`` and ``{value}``.
        n_keys: multikey only: needles per prompt.
        answer_template: what follows the prompt, with ``{key}`` (default ``" {key}."``).
        tokenizer: tokenizer path or ``byte``; leave None with ``train_tokenizer``.
        seq_len: tokens per training row (T).
        batch_size: rows per batch on each device (B).
        num_workers: DataLoader worker processes.
        seed: seeds the training order and the passkey documents.
        train_tokenizer: train a sentencepiece BPE with this many pieces on the text's training documents (cached).
        tokenizer_sample_chars: at most this many characters of training text train the tokenizer.
        cache_dir: where tokenizers and token files are cached.
        val_fraction: fraction of each text source's documents held out for validation.
        val_docs: number of documents per text source held out instead.
        shuffle: visit each text source's rows in a seeded random order per epoch.
    """

    def __init__(
        self,
        sources: list[str | TextSource],
        passkey_fraction: float = 0.5,
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
        lengths = (seq_len // 2, seq_len + 1) if passkey_lengths is None else tuple(passkey_lengths)
        init_passkey_options(self, passkey_fraction, lengths, seq_len + 1, passkey_depths, passkey_labels, task,
                             key_range, template, needle_template, n_keys, answer_template)

    def passkey_documents(self, bos: bool = True, eos: bool = True) -> PasskeyDocuments:
        """The passkey documents of this module (its tokenizer, lengths, depths, task and seed).

        Args:
            bos: start documents with BOS (False for the doc-aware pipelines, which add BOS and EOS).
            eos: end documents with EOS.
        """
        return module_passkey_documents(self, bos, eos)

    def stage_stream(self, seq_len: int, token_offset: int) -> SampleStream:
        """Context schedules: the text continues at ``token_offset`` (one source, in order) re-cut at ``seq_len``,
        and the passkey documents scale with the row length (retrieval is trained at the stage's length): lengths
        ``(lo, hi)`` become ``(lo·s, seq_len + 1)`` with s = seq_len / (hi − 1)."""
        text = super().stage_stream(seq_len, token_offset)
        f = self.passkey_fraction
        if f == 0:
            return text
        low, high = self.passkey_lengths
        lengths = (max(1, min(seq_len + 1, round(low * seq_len / max(1, high - 1)))), seq_len + 1)
        documents = PasskeyDocuments(
            self.tokenizer, lengths, self.passkey_depths, self.task, self.seed, self.key_range, self.template,
            self.needle_template, self.n_keys, self.answer_template, bos=True, eos=True,
        )
        rows = text.num_samples if f == 1 else max(1, round(text.num_samples * f / (1 - f)))
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        passkey = PasskeyStream(documents, seq_len, rows, self.passkey_labels, pad)
        return MixtureStream([text, passkey], [1 - f, f], self.seed)

    def train_stream(self) -> SampleStream:
        text = super().train_stream()
        f = self.passkey_fraction
        if f == 0:
            return text
        rows = text.num_samples if f == 1 else max(1, round(text.num_samples * f / (1 - f)))
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        passkey = PasskeyStream(self.passkey_documents(), self.seq_len, rows, self.passkey_labels, pad)
        return MixtureStream([text, passkey], [1 - f, f], self.seed)
