"""StagedLoader: segments of another row length and micro-batch re-cut the same token stream (issue 12)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_longctx.datamodules import SampleStream, TokenFiles, write_token_files
from lit_longctx.datamodules.staged import Segment, StagedLoader
from lit_longctx.datamodules.text import MixtureStream
from lit_longctx.datamodules.token_files import TokenStream

VOCAB = 97


class Synthetic(SampleStream):
    """Rows of -1 that read no tokens of the file (like passkey documents)."""

    def __init__(self, seq_len: int, n: int) -> None:
        super().__init__()
        self.seq_len, self.n = seq_len, n

    @property
    def num_samples(self) -> int:
        return self.n

    def get_sample(self, epoch: int, index: int) -> dict:
        row = torch.full((self.seq_len,), -1)
        return {"input_ids": row, "labels": row, "position_ids": torch.arange(self.seq_len)}


class MixedTokens(TokenFiles):
    """Token-file rows blended 3:1 with synthetic rows, as PasskeyMixData blends text and passkey rows."""

    def stage_stream(self, seq_len: int, token_offset: int) -> MixtureStream:
        text = TokenStream(self.open()["train"], seq_len, "sequential", self.seed, offset=token_offset)
        return MixtureStream([text, Synthetic(seq_len, 7)], [0.75, 0.25], self.seed)


SEGMENTS = [Segment(0, 8, 4), Segment(3, 16, 2), Segment(7, 32, 1)]


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("mixed", [False, True])
def test_segments_continue_the_stream_without_gap_or_repeat(tmp_path, world_size, mixed):
    tokens = np.random.default_rng(0).integers(0, VOCAB, 3000)
    write_token_files(tmp_path, {"train": tokens}, vocab_size=VOCAB)
    dm = (MixedTokens if mixed else TokenFiles)(str(tmp_path), tokenizer="byte", seq_len=8, batch_size=4,
                                                train_order="sequential")
    loaders = [StagedLoader(dm, SEGMENTS, 10, rank, world_size) for rank in range(world_size)]
    per_rank = [list(loader) for loader in loaders]
    shapes = [tuple(b["input_ids"].shape) for b in per_rank[0]]
    assert shapes == [(4, 8)] * 3 + [(2, 16)] * 4 + [(1, 32)] * 3
    rows = []  # global row order: batch by batch, rank r holds rows r, r+W, ...
    for b in range(10):
        batch = [per_rank[r][b] for r in range(world_size)]
        for i in range(batch[0]["input_ids"].shape[0]):
            for r in range(world_size):
                row = torch.cat([batch[r]["input_ids"][i], batch[r]["labels"][i, -1:]])
                if not bool((row == -1).all()):
                    rows.append(row)
    stream = torch.cat(rows)
    assert torch.equal(stream, torch.from_numpy(tokens[: stream.numel()]).long())
    if not mixed:  # 3 micro-batches of 4 rows per rank, 9 tokens per row of 8 inputs
        assert loaders[0].token_offset(1) == 3 * 4 * world_size * 9


def test_resume_at_any_micro_batch_and_workers_give_the_same_batches(tmp_path):
    tokens = np.random.default_rng(1).integers(0, VOCAB, 2000)
    write_token_files(tmp_path, {"train": tokens}, vocab_size=VOCAB)
    dm = TokenFiles(str(tmp_path), tokenizer="byte", seq_len=8, batch_size=4, train_order="sequential")
    full = list(StagedLoader(dm, SEGMENTS, 10, 0, 1))
    for k in (2, 3, 5, 8):
        first = StagedLoader(dm, SEGMENTS, 10, 0, 1)
        it = iter(first)
        for _ in range(k):
            next(it)
        resumed = StagedLoader(dm, SEGMENTS, 10, 0, 1)
        resumed.load_state_dict(first.state_dict())
        for a, b in zip(list(resumed), full[k:], strict=True):
            assert torch.equal(a["input_ids"], b["input_ids"])
    with_workers = list(StagedLoader(dm, SEGMENTS, 10, 0, 1, num_workers=2))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(with_workers, full, strict=True))
    edited = StagedLoader(dm, [Segment(0, 8, 4), Segment(3, 32, 1)], 10, 0, 1)
    with pytest.raises(ValueError, match="resume with the same stages"):
        state = StagedLoader(dm, SEGMENTS, 10, 0, 1).state_dict()
        edited.load_state_dict({**state, "next_batch": 5})
