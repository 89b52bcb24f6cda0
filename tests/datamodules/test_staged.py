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


@pytest.mark.parametrize("passkey", [False, True])
def test_a_mixture_of_sources_continues_each_source_where_it_stopped(tmp_path, passkey):
    """Two sources blended 2:1 (letters, digits: a row's source is visible in its bytes), with passkey rows mixed in
    or not: across the switches each source's rows, in order, are a prefix of that source's own token stream."""
    import json

    from lit_longctx.datamodules import TextData
    from lit_longctx.datamodules.passkey import PasskeyMixData

    letters, digits = tmp_path / "letters.jsonl", tmp_path / "digits.jsonl"
    letters.write_text("".join(json.dumps({"text": "abcdefghij"[i % 10] * (150 + i)}) + "\n" for i in range(100)))
    digits.write_text("".join(json.dumps({"text": "0123456789"[i % 10] * (130 + i)}) + "\n" for i in range(100)))
    common = dict(sources=[{"path": str(letters), "weight": 2.0}, {"path": str(digits), "weight": 1.0}],
                  tokenizer="byte", seq_len=300, batch_size=4, shuffle=False, val_fraction=0.0,
                  cache_dir=str(tmp_path / "cache"))  # passkey prompts need ~260 byte tokens
    dm = PasskeyMixData(**common, passkey_fraction=0.25, passkey_lengths=(280, 301)) if passkey else TextData(**common)
    dm.setup("fit")
    segments = [Segment(0, 300, 4), Segment(3, 600, 2), Segment(7, 1200, 1)]
    loader = StagedLoader(dm, segments, 10, 0, 1)
    by_source: dict[str, list[torch.Tensor]] = {"letters": [], "digits": []}
    shapes = []
    for batch in loader:
        shapes.append(tuple(batch["input_ids"].shape))
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            row = torch.cat([ids, labels[-1:]])
            text = bytes(t for t in row.tolist() if 32 <= t < 127).decode()
            if text and text.strip("abcdefghij") == "":
                by_source["letters"].append(row)
            elif text and text.strip("0123456789") == "":
                by_source["digits"].append(row)
    assert shapes == [(4, 300)] * 3 + [(2, 600)] * 4 + [(1, 1200)] * 3
    for i, name in enumerate(("letters", "digits")):
        stream = torch.cat(by_source[name])
        source = dm.open()[i]["train"]
        assert stream.numel() < source.num_tokens  # no wrap-around: a prefix is the right oracle
        expected = torch.from_numpy(np.asarray(source.tokens[: stream.numel()], dtype=np.int64))
        assert torch.equal(stream, expected), name
    assert len(by_source["letters"]) > len(by_source["digits"]) > 3
    positions = loader.token_offset(2)
    assert isinstance(positions, tuple) and len(positions) == 2  # one stream position per source
