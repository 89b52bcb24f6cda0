"""Training data whose row length and micro-batch change at given micro-batches (context-extension schedules).

A schedule (``lit_longctx.callbacks.context_schedule``) is known before training starts, so the data plan is too:
segment s begins at micro-batch M_s (counted per rank over the whole run) with rows of T_s tokens in micro-batches of
B_s. Each segment re-cuts the same token stream: a segment's first row starts where the previous segment's last row
ended, P_s = P_{s−1} + (M_s − M_{s−1})·B_{s−1}·W·(T_{s−1} + 1) tokens in (W data-parallel ranks; a row of T inputs
takes T+1 tokens with its targets), so no token is skipped or read twice because of a switch. Inside a segment rank r
of W takes rows r, r+W, ... exactly as :class:`~lit_longctx.datamodules.base.SampleStream` does, and DataLoader
workers split batches, so the batch sequence does not depend on ``num_workers``.

The loader's position is one number (the next micro-batch); Lightning stores it in checkpoints and restores it, so a
run resumed inside any segment continues with the same rows. Its length is the micro-batches the run needs for
``max_steps`` optimizer steps: a sized loader is not prefetched by Lightning, so the saved position is exact.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lit_longctx.datamodules.base import SampleStream


def advance(position: int | tuple, read: int | tuple) -> int | tuple:
    """A stream position moved on by what a segment read: token counts, or tuples of them (one per source of a
    mixture, elementwise)."""
    if isinstance(read, tuple):
        start = position if isinstance(position, tuple) else (position,) * len(read)
        if len(start) != len(read):
            raise ValueError(f"a stage reads {len(read)} sources but the stream position has {len(start)}")
        return tuple(advance(a, b) for a, b in zip(start, read))
    if isinstance(position, tuple):
        raise ValueError("a stage reads one source but the stream position has several")
    return position + read


@dataclass(frozen=True)
class Segment:
    """Rows of ``seq_len`` tokens in micro-batches of ``batch_size`` from micro-batch ``first_batch`` on."""

    first_batch: int
    seq_len: int
    batch_size: int


def segment_of(segments: Sequence[Segment], batch: int) -> int:
    """Index of the segment that micro-batch ``batch`` belongs to."""
    return bisect.bisect_right([s.first_batch for s in segments], batch) - 1


def signature(segments: Sequence[Segment]) -> list[list[int]]:
    """The plan as a checkpoint records it: [first micro-batch, seq_len, micro_batch] per segment."""
    return [[s.first_batch, s.seq_len, s.batch_size] for s in segments]


def read_segments_differ(saved: Sequence[Sequence[int]], segments: Sequence[Segment], done: int) -> str | None:
    """Why a state saved after ``done`` micro-batches of the plan ``saved`` cannot continue under ``segments``: the
    segments already (partly) read must be the same (later ones may be edited before resuming); None when it can."""
    used = [tuple(s) for s in saved if s[0] < done]
    mine = [tuple(s) for s in signature(segments)][: len(used)]
    if mine == used:
        return None
    return f"stages (first micro-batch, seq_len, micro_batch) {used} up to micro-batch {done} (now {mine})"


@dataclass
class _Built:
    segment: Segment
    stream: SampleStream
    token_offset: int | tuple


class StagedStream(IterableDataset):
    """Batches of every segment in order, for one rank; ``start`` and ``end`` are micro-batch indices."""

    def __init__(self, built: list[_Built], rank: int, world_size: int, start: int = 0, end: int = 0) -> None:
        self.built, self.rank, self.world_size = built, rank, world_size
        self.segments = [b.segment for b in built]
        self.start, self.end = start, end

    def batch(self, index: int) -> dict[str, Any]:
        s = segment_of(self.segments, index)
        seg, stream = self.built[s].segment, self.built[s].stream
        local = index - seg.first_batch
        rows = [self.rank + self.world_size * (local * seg.batch_size + i) for i in range(seg.batch_size)]
        # the segment index keys random windows, so two segments of a random-order source draw different windows
        return stream.collate([stream.sample_at(s, row) for row in rows])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in range(self.start + worker, self.end, num_workers):
            yield self.batch(index)


class StagedLoader(DataLoader):
    """A resumable loader over :class:`StagedStream`; ``state_dict()`` says which micro-batch comes next.

    Args:
        datamodule: a ``LongCtxDataModule`` whose ``stage_stream(seq_len, token_offset)`` gives each segment's rows
            (a stream with ``stream_tokens(rows)``: the tokens its first ``rows`` positions read).
        segments: the plan, first segment at micro-batch 0, increasing ``first_batch``.
        total_batches: micro-batches per rank the run consumes (its length).
        rank: data-parallel rank.
        world_size: data-parallel ranks.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        datamodule: Any,
        segments: Sequence[Segment],
        total_batches: int,
        rank: int,
        world_size: int,
        num_workers: int = 0,
    ) -> None:
        built, offset = [], 0
        for i, seg in enumerate(segments):
            if i:
                prev = segments[i - 1]
                rows = (seg.first_batch - prev.first_batch) * prev.batch_size * world_size
                offset = advance(offset, built[-1].stream.stream_tokens(rows))
            built.append(_Built(seg, datamodule.stage_stream(seg.seq_len, offset), offset))
        self.staged = StagedStream(built, rank, world_size, 0, total_batches)
        super().__init__(self.staged, batch_size=None, num_workers=num_workers)
        self.segments = list(segments)
        self.total_batches = total_batches
        self.seed = getattr(datamodule, "seed", 0)
        self.next_batch = 0

    def token_offset(self, segment: int) -> int | tuple:
        """Tokens of the stream before segment ``segment`` starts (summed over ranks; one count per source of a
        mixture)."""
        return self.staged.built[segment].token_offset

    def __len__(self) -> int:
        return self.total_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        self.staged.start = self.next_batch
        for batch in super().__iter__():
            self.next_batch += 1  # before handing out: a state saved while the batch is used points past it
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"next_batch": self.next_batch, "seed": self.seed, "segments": signature(self.segments)}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        if "next_batch" not in state_dict:
            raise ValueError(
                "the checkpoint's data position was saved without a context schedule; resume it with the schedule "
                "it was trained with, or start the schedule from its weights with --model.init_from"
            )
        if state_dict["seed"] != self.seed:
            raise ValueError(f"the checkpoint's data was seeded with seed={state_dict['seed']} but this datamodule "
                             f"has seed={self.seed}: set seed={state_dict['seed']} to resume that run")
        done = state_dict["next_batch"]
        problem = read_segments_differ(state_dict["segments"], self.segments, done)
        if problem is not None:
            raise ValueError(f"the checkpoint was trained with {problem}: resume with the same stages")
        self.next_batch = done
