"""Evaluation DataModules for long context: retrieval grids (passkey / multi-key) and long-document perplexity.

Both yield one prompt or window per batch (lengths differ across the grid) as a dict with a ``task`` key, which
``CausalLM.test_step`` hands to :mod:`lit_longctx.eval.tasks`. The datasets are iterable and shard themselves across
ranks in *lockstep*: items are grouped by target length and each group is padded (repeating its own items, marked by
their ``index`` so the gathered results count each prompt once) to a multiple of the world size, so at every step all
ranks run a prompt of the same target length. Sharded models (FSDP) need that: every rank must run the same number
of forward calls.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lit_longctx.datamodules.base import LongCtxDataModule
from lit_longctx.eval.passkey import TASKS, build_task, retrieval_grid, sample_batch
from lit_longctx.eval.perplexity import TASK as PPL_TASK
from lit_longctx.eval.perplexity import document_tokens, position_edges
from lit_longctx.tokenizers import ByteTokenizer, Tokenizer


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
