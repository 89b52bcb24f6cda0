"""Shared base of every lit-longctx DataModule: tokenizer, sequence length, batching and a resumable training order.

Batches are dicts of ``(B, T)`` long tensors: ``input_ids``, ``labels`` (aligned targets: ``labels[b, t]`` is the
token that follows ``input_ids[b, t]``; -100 is ignored; the model does not shift) and ``position_ids`` (restarting at
0 where a packed document starts; the model derives its attention mask from them).

Training data is a :class:`SampleStream`: an ``IterableDataset`` whose epoch ``e`` is a fixed, seeded sequence of
samples addressed by a global position ``k``. Rank ``r`` of ``W`` data-parallel ranks takes positions ``r, r+W, r+2W,
...`` (the interleaving of ALLaMo's loader, spec section 3.1), in micro-batches of ``B``; DataLoader worker ``w`` of
``K`` builds that rank's batches ``w, w+K, ...``, and the DataLoader hands them out round-robin, so the batch sequence
does not depend on ``K``. After ``b`` batches per rank the whole job has consumed exactly positions ``k < b·B·W``, so
the position in an epoch is one number. :class:`ResumableLoader` records it; Lightning stores the loader's
``state_dict()`` in checkpoints and calls ``load_state_dict()`` before iterating on restart, and because the training
dataset is iterable it injects no sampler of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, get_worker_info

from lit_longctx.tokenizers import Tokenizer, load_tokenizer


@dataclass(frozen=True)
class StreamPlan:
    """What a :class:`SampleStream` iteration produces: an epoch from a batch on, for one rank."""

    epoch: int = 0
    start_batch: int = 0
    rank: int = 0
    world_size: int = 1
    batch_size: int = 1


class SampleStream(IterableDataset):
    """A deterministic stream of samples: epoch ``e``, position ``k`` always gives the same sample.

    Subclasses implement :attr:`num_samples` (samples per epoch) and :meth:`get_sample` (a dict of 1-D tensors of one
    sample). With ``shuffle`` the positions of an epoch visit the samples in a permutation seeded by ``(seed, epoch)``;
    without, in index order. An epoch is padded to a whole number of global batches by starting over from its first
    positions. Iterating yields collated batches for the plan that :class:`ResumableLoader` sets in :attr:`plan`.

    Args:
        seed: seeds every random choice (with the epoch, and with the sample index where a subclass needs one).
        shuffle: visit the samples of each epoch in a seeded random order instead of index order.
    """

    def __init__(self, seed: int = 1234, shuffle: bool = False) -> None:
        self.seed = seed
        self.shuffle = shuffle
        self.plan = StreamPlan()
        self._orders: dict[int, np.ndarray] = {}

    @property
    def num_samples(self) -> int:
        """Distinct samples in one epoch."""
        raise NotImplementedError

    def get_sample(self, epoch: int, index: int) -> dict[str, Any]:
        """Sample ``index`` (``0 <= index < num_samples``) as a dict of 1-D tensors."""
        raise NotImplementedError

    def rng(self, *key: int) -> np.random.Generator:
        """A generator seeded by ``(seed, *key)``: the same key always gives the same draws."""
        return np.random.default_rng([self.seed, *key])

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of sample indices that epoch ``epoch`` visits when shuffling."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # streams move forward through epochs; keep the current and the previous
                self._orders.pop(next(iter(self._orders)))
            self._orders[epoch] = self.rng(epoch).permutation(self.num_samples)
        return self._orders[epoch]

    def sample_at(self, epoch: int, position: int) -> dict[str, Any]:
        """The sample at ``position`` of epoch ``epoch`` (positions past the end start over)."""
        index = position % self.num_samples
        if self.shuffle:
            index = int(self.order(epoch)[index])
        return self.get_sample(epoch, index)

    def batches_per_epoch(self, world_size: int, batch_size: int) -> int:
        """Batches each rank gets in one epoch (the epoch is padded to whole global batches)."""
        return -(-self.num_samples // (world_size * batch_size))

    def batch_positions(self, batch: int, plan: StreamPlan) -> list[int]:
        """Global positions of the rank's ``batch``-th batch: its samples ``batch·B ..`` of ``rank, rank+W, ..``."""
        local = range(batch * plan.batch_size, (batch + 1) * plan.batch_size)
        return [plan.rank + plan.world_size * i for i in local]

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Stack samples into a batch."""
        return default_collate(samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self.plan
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        end = self.batches_per_epoch(plan.world_size, plan.batch_size)
        for batch in range(plan.start_batch + worker, end, num_workers):
            yield self.collate([self.sample_at(plan.epoch, k) for k in self.batch_positions(batch, plan)])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_orders"] = {}  # workers recompute what they need instead of receiving large arrays
        return state


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of the default torch.distributed group, ``(0, 1)`` when it is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`SampleStream` whose ``state_dict()`` says which batch comes next.

    The position (epoch, batch within the epoch) advances as each batch is handed out, so a state taken after a
    training step resumes with the following batch; an epoch that ends moves to the next epoch. ``len()`` is the number
    of batches per epoch for this rank.

    Args:
        stream: the training samples.
        batch_size: samples per batch on this rank.
        num_workers: DataLoader worker processes; the batch sequence is the same for any number.
        rank: data-parallel rank; default: torch.distributed's, or 0.
        world_size: number of data-parallel ranks; default: torch.distributed's, or 1.
        **kwargs: further ``DataLoader`` arguments (e.g. ``pin_memory``).
    """

    def __init__(
        self,
        stream: SampleStream,
        batch_size: int,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if rank is None or world_size is None:
            rank, world_size = distributed_rank()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size={world_size})")
        super().__init__(stream, batch_size=None, num_workers=num_workers, **kwargs)
        self.stream = stream
        self.micro_batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.batch = 0

    def __len__(self) -> int:
        return self.stream.batches_per_epoch(self.world_size, self.micro_batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        self.stream.plan = StreamPlan(self.epoch, self.batch, self.rank, self.world_size, self.micro_batch_size)
        for batch in super().__iter__():
            # advance before handing the batch out: a state saved while it is being used points past it
            self.batch += 1
            if self.batch >= len(self):
                self.epoch, self.batch = self.epoch + 1, 0
            yield batch

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.world_size

    def state_dict(self) -> dict[str, int]:
        """The next batch: its epoch, the samples the whole job consumed of that epoch, and what they depend on."""
        return {
            "epoch": self.epoch,
            "samples": self.batch * self.global_batch_size,
            "seed": self.stream.seed,
            "num_samples": self.stream.num_samples,
        }

    def load_state_dict(self, state_dict: dict[str, int], strict: bool = True) -> None:
        """Continue from ``state_dict``. The per-rank batch size times the number of ranks may change if it divides
        the samples consumed. With ``strict=False`` a change of data or sequence length keeps the epoch and the
        fraction of it consumed (rounded down to whole batches) instead of raising."""
        if state_dict["seed"] != self.stream.seed:
            raise ValueError(
                f"the checkpoint's data order was seeded with seed={state_dict['seed']} but this datamodule has "
                f"seed={self.stream.seed}: set seed={state_dict['seed']} to resume that run"
            )
        samples, n = state_dict["samples"], self.stream.num_samples
        if state_dict["num_samples"] != n:
            if strict:
                raise ValueError(
                    f"the checkpoint was taken on {state_dict['num_samples']} training samples per epoch but this data "
                    f"has {n} (different data or seq_len): resume with the data and seq_len of that run"
                )
            samples = samples * n // state_dict["num_samples"]
        if samples % self.global_batch_size:
            if strict:
                raise ValueError(
                    f"the checkpoint resumes after {samples} samples of epoch {state_dict['epoch']}, which is not a "
                    f"multiple of the global batch {self.micro_batch_size} x {self.world_size} ranks: resume with a "
                    "batch_size x data-parallel size that divides it"
                )
            samples -= samples % self.global_batch_size
        self.epoch, self.batch = state_dict["epoch"], samples // self.global_batch_size
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0


def global_batch_tokens(
    seq_len: int, world_size: int, batch_size: int, grad_accum: int = 1, tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
) -> int:
    """Tokens per optimizer step: ``T · W · (B·G) / (TP · max(PP, 1))`` = T·B·G·DP (Llemma README, spec 3.4)."""
    model_parallel = tensor_parallel * max(pipeline_parallel, 1)
    if world_size % model_parallel:
        raise ValueError(f"world_size {world_size} is not a multiple of tensor x pipeline parallel {model_parallel}")
    return seq_len * batch_size * grad_accum * (world_size // model_parallel)


class LongCtxDataModule(L.LightningDataModule):
    """Base of the lit-longctx DataModules: a tokenizer, a sequence length, batching and a resumable training order.

    Subclasses implement :meth:`train_stream` (a :class:`SampleStream`) and :meth:`val_dataset` (a map-style dataset
    of rows, each a dict of 1-D tensors, or None when there is no held-out data), and may override
    :meth:`build_tokenizer`, :attr:`vocab_size` and :attr:`max_token_id`. The training
    loader is a :class:`ResumableLoader`; its position is saved in checkpoints (by the loader and by this module's
    ``state_dict``, which also covers loaders built before Lightning restores loader states) and carried over when
    the training loader is rebuilt. The test loader is the validation loader.

    Args:
        tokenizer: a path :func:`lit_longctx.tokenizers.load_tokenizer` accepts (sentencepiece ``.model``,
            ``tokenizer.json``, or a directory holding one), or ``byte``; None lets the subclass choose (here: byte).
        seq_len: tokens per training row (T).
        batch_size: rows per batch on each device (B).
        num_workers: DataLoader worker processes.
        seed: seeds the training order; the same seed gives the same batches.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        seq_len: int = 2048,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        for name, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1),
                                 ("num_workers", num_workers, 0), ("seed", seed, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.tokenizer_spec = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._tokenizer: Tokenizer | None = None
        self._train_loader: ResumableLoader | None = None
        self._pending_train_state: dict[str, int] | None = None
        self._stages: tuple[list[Any], int] | None = None

    # --- tokenizer and vocabulary
    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer, built on first use by :meth:`build_tokenizer`."""
        if self._tokenizer is None:
            self._tokenizer = self.build_tokenizer()
        return self._tokenizer

    def build_tokenizer(self) -> Tokenizer:
        """Load the tokenizer named by the ``tokenizer`` argument."""
        return load_tokenizer(self.tokenizer_spec)

    @property
    def vocab_size(self) -> int:
        """Ids the model must embed (the tokenizer's vocabulary, added tokens included)."""
        return self.tokenizer.vocab_size

    @property
    def max_token_id(self) -> int | None:
        """The largest token id in the data, or None when unknown."""
        return None

    # --- to implement
    def train_stream(self) -> SampleStream:
        """The training samples."""
        raise NotImplementedError(f"{type(self).__name__} does not define train_stream()")

    def val_dataset(self) -> Dataset | None:
        """Held-out rows (dicts of 1-D tensors) in a fixed order, or None."""
        return None

    # --- length-changing schedules (lit_longctx.datamodules.staged)
    def set_stages(self, segments: list[Any] | None, total_batches: int = 0) -> None:
        """Train on a staged plan: a list of :class:`~lit_longctx.datamodules.staged.Segment` (row length and
        micro-batch from a given micro-batch on) for ``total_batches`` micro-batches per rank; None: the plain loader.
        Each segment's rows come from :meth:`stage_stream`."""
        self._stages = (list(segments), total_batches) if segments else None

    def check_stages(self) -> None:
        """Hook: raise ``ValueError`` when this module cannot train the plan given to :meth:`set_stages` (called
        before training). By default every segment's stream must build (:meth:`stage_stream`)."""
        if self._stages is not None:
            self.stage_stream(self._stages[0][-1].seq_len, 0)

    def stage_stream(self, seq_len: int, token_offset: int) -> SampleStream:
        """Hook: training rows of ``seq_len`` whose first row starts ``token_offset`` tokens into the training stream
        (the tokens that earlier stages consumed, as the earlier stages' streams count them with
        ``stream_tokens(rows)``), so a length switch neither skips nor repeats tokens."""
        raise ValueError(
            f"{type(self).__name__} cannot re-cut its training stream at a new sequence length, which a context "
            "schedule needs; use TokenFiles (train_order sequential or random), TextData / PasskeyMixData with "
            "shuffle: false, or DocAwareData"
        )

    # --- loaders
    def data_parallel_rank(self) -> tuple[int, int]:
        """``(rank, world_size)`` of data parallelism: the Trainer strategy's (which knows tensor-parallel meshes),
        else torch.distributed's, else ``(0, 1)``."""
        kwargs = getattr(getattr(self.trainer, "strategy", None), "distributed_sampler_kwargs", None)
        if kwargs:
            return int(kwargs["rank"]), int(kwargs["num_replicas"])
        return distributed_rank()

    def train_dataloader(self) -> ResumableLoader:
        rank, world_size = self.data_parallel_rank()
        if self._stages is not None:
            from lit_longctx.datamodules.staged import StagedLoader

            segments, total = self._stages
            loader = StagedLoader(self, segments, total, rank, world_size, self.num_workers)
            if self._pending_train_state is not None:
                loader.load_state_dict(self._pending_train_state)
                self._pending_train_state = None
            elif self._train_loader is not None:
                loader.load_state_dict(self._train_loader.state_dict())
            self._train_loader = loader
            return loader
        loader = ResumableLoader(self.train_stream(), self.batch_size, self.num_workers, rank, world_size)
        if self._pending_train_state is not None:
            loader.load_state_dict(self._pending_train_state)
            self._pending_train_state = None
        elif self._train_loader is not None:
            loader.load_state_dict(self._train_loader.state_dict(), strict=False)
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> DataLoader | list:
        dataset = self.val_dataset()
        if dataset is None:
            return []
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        dataset = self.val_dataset()
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__} has no held-out split to test on: configure a validation split")
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        """Held-out rows as prompts for ``predict`` (the module generates continuations of their first tokens)."""
        return self.test_dataloader()

    # --- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        if self._train_loader is not None:
            return {"train_loader": self._train_loader.state_dict()}
        if self._pending_train_state is not None:
            return {"train_loader": dict(self._pending_train_state)}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("train_loader")
        if state is None:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state)
        else:
            self._pending_train_state = dict(state)
