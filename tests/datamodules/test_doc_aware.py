"""FoT document-aware pipelines (spec fot.md §2, oracles 8-10): row streams, the tiny worked example, k-packing,
resumable state. The oracles are an independent length-only simulation of the refill rule and hand-written batches."""

from __future__ import annotations

import random

import pytest
import torch

from lit_longctx.datamodules.doc_aware import (
    DocAware,
    DocumentStream,
    KPacking,
    Linear,
    build_pipeline,
    parse_pipeline,
)

BOS, EOS = 1, 2


def random_documents(n: int, seed: int = 0, max_len: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 100) for _ in range(rng.randrange(0, max_len))] for _ in range(n)]


def assigned_documents(lengths: list[int], batch: int, seq_len: int, steps: int) -> list[list[int]]:
    """Which documents each row takes: every step, rows 0..B-1 in order, a row with fewer than T+1 buffered tokens
    takes the next document until it has T+1; then T tokens leave the row. Counts lengths only."""
    held = [0] * batch
    rows: list[list[int]] = [[] for _ in range(batch)]
    nxt = 0
    for _ in range(steps):
        for r in range(batch):
            while held[r] < seq_len + 1:
                rows[r].append(nxt)
                held[r] += lengths[nxt] + 2
                nxt += 1
            held[r] -= seq_len
    return rows


@pytest.mark.parametrize("batch, seq_len", [(1, 5), (3, 7), (4, 16)])
def test_rows_reproduce_their_documents(batch, seq_len):
    """Oracle 8."""
    docs = random_documents(200, seed=batch)
    steps = 12
    pipe = DocAware(docs, batch, seq_len, bos_id=BOS, eos_id=EOS, loop=False)
    batches = [next(pipe) for _ in range(steps)]
    rows = assigned_documents([len(d) for d in docs], batch, seq_len, steps)
    used = [i for row in rows for i in row]
    assert sorted(used) == list(range(len(used)))  # every document exactly once, in source order across rows
    assert pipe.metrics() == {"dataset_example_index": len(used), "dataset_total_tokens": steps * batch * seq_len}
    for r in range(batch):
        last = batches[-1]["labels"][r, -1].item()
        stream = torch.cat([b["input_ids"][r] for b in batches]).tolist() + [BOS if last == -100 else last]
        expected = [t for i in rows[r] for t in [BOS, *docs[i], EOS]]
        assert stream == expected[: len(stream)]
    for s, b in enumerate(batches):
        targets = torch.where(b["labels"] == -100, BOS, b["labels"])  # the only masked target is a bos
        assert torch.equal(targets[:, :-1], b["input_ids"][:, 1:])
        if s + 1 < steps:
            assert torch.equal(targets[:, -1], batches[s + 1]["input_ids"][:, 0])
        assert torch.equal(b["loss_mask"] == 0, targets == BOS)
        assert torch.equal(b["labels"] == -100, b["loss_mask"] == 0)


def test_tiny_worked_example():
    """Oracle 9: T=3, B=1, documents A=[a1..a4], B'=[b1], then C."""
    a1, a2, a3, a4, b1, c1 = 11, 12, 13, 14, 21, 31
    pipe = DocAware([[a1, a2, a3, a4], [b1], [c1]], 1, 3, bos_id=BOS, eos_id=EOS)
    steps = [next(pipe) for _ in range(3)]
    assert steps[0]["input_ids"].tolist() == [[BOS, a1, a2]] and steps[0]["labels"].tolist() == [[a1, a2, a3]]
    assert steps[1]["input_ids"].tolist() == [[a3, a4, EOS]] and steps[1]["labels"].tolist() == [[a4, EOS, -100]]
    assert steps[1]["loss_mask"].tolist() == [[1, 1, 0]]
    assert steps[2]["input_ids"].tolist() == [[BOS, b1, EOS]] and steps[2]["labels"].tolist() == [[b1, EOS, -100]]
    assert next(pipe)["input_ids"].tolist() == [[BOS, c1, EOS]]  # C's bos was step 2's last target


@pytest.mark.parametrize("k", [1, 2, 4])
def test_k_packing_is_a_reshaped_inner_pipeline(k):
    """Oracle 10."""
    docs = random_documents(300, seed=k, max_len=50)
    packed = KPacking(docs, 8, 6, k, bos_id=BOS, eos_id=EOS)
    inner = DocAware(docs, 8 // k, 6 * k, bos_id=BOS, eos_id=EOS)
    for _ in range(5):
        got, want = next(packed), next(inner)
        assert got["input_ids"].shape == (8, 6)  # B·T tokens per step
        for name in ("input_ids", "labels", "loss_mask"):
            for p in range(8 // k):
                assert torch.equal(got[name][p * k : (p + 1) * k].reshape(-1), want[name][p])
    assert packed.metrics()["dataset_total_tokens"] == 5 * 8 * 6


def test_parse_and_build_pipeline():
    assert parse_pipeline("doc_aware_k4") == ("doc_aware", 4)
    assert parse_pipeline("doc_aware_k1") == ("doc_aware", 1)
    assert parse_pipeline("doc_aware") == ("doc_aware", 1)
    assert parse_pipeline("linear") == ("linear", 1)
    for bad in ("doc_aware_k", "doc_aware_k0", "doc_aware_kx", "docaware", "linear_k2"):
        with pytest.raises(ValueError, match="unknown data_pipeline"):
            parse_pipeline(bad)
    docs = random_documents(50)
    assert isinstance(build_pipeline("doc_aware_k2", docs, 4, 5, bos_id=BOS, eos_id=EOS), KPacking)
    assert isinstance(build_pipeline("doc_aware_k1", docs, 4, 5, bos_id=BOS, eos_id=EOS), DocAware)
    assert isinstance(build_pipeline("linear", docs, 4, 5, bos_id=BOS, eos_id=EOS), Linear)
    with pytest.raises(ValueError, match="divisible by k=4"):
        build_pipeline("doc_aware_k4", docs, 6, 5, bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match="needs a bos_id"):
        DocAware(docs, 2, 5, eos_id=EOS)


def test_linear_is_one_stream():
    docs = random_documents(100, seed=3)
    pipe = Linear(docs, 3, 5, bos_id=BOS, eos_id=EOS, loop=False)
    batches = [next(pipe) for _ in range(4)]
    flat = torch.cat([b["input_ids"].reshape(-1) for b in batches]).tolist()
    assert flat == [t for d in docs for t in [BOS, *d, EOS]][: len(flat)]


@pytest.mark.parametrize("name", ["doc_aware", "doc_aware_k2", "linear"])
def test_resume_from_state(name):
    docs = random_documents(12, seed=5)  # few documents: the source loops during the run
    kwargs = dict(bos_id=BOS, eos_id=EOS, min_example_length=4)
    pipe = build_pipeline(name, docs, 4, 9, **kwargs)
    for _ in range(7):
        next(pipe)
    state = pipe.state_dict()
    expected = [next(pipe) for _ in range(8)]
    resumed = build_pipeline(name, docs, 4, 9, **kwargs)
    resumed.load_state_dict(state)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
               for a, b in zip(expected, (next(resumed) for _ in range(8))))
    assert resumed.metrics() == pipe.metrics()
    assert pipe.stream.epoch >= 1
    # a callable source restarts at the saved offset without re-reading
    starts = []
    by_offset = lambda start: (starts.append(start), iter(docs[start:]))[1]
    resumed = build_pipeline(name, by_offset, 4, 9, **kwargs)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)["input_ids"], expected[0]["input_ids"]) and starts[0] == state_offset(state)


def state_offset(state: dict) -> int:
    inner = state.get("inner", state)
    return inner["stream"]["offset"]


def test_document_stream_options():
    stream = DocumentStream([[5, 6], [7], [], [8, 9, 10]], BOS, EOS, min_example_length=4, loop=False)
    assert stream.next() == ([BOS, 5, 6, EOS], [0, 1, 1, 1])
    assert stream.next() == ([BOS, 8, 9, 10, EOS], [0, 1, 1, 1, 1])  # [7] and [] are shorter than 4 with bos/eos
    with pytest.raises(StopIteration):
        stream.next()
    bare = DocumentStream([[5, 6]], None, None, add_bos=False, add_eos=False)
    assert bare.next() == ([5, 6], [1, 1]) and bare.next() == ([5, 6], [1, 1]) and bare.epoch == 1
    with pytest.raises(ValueError, match="no document of at least"):
        DocumentStream([[1]], BOS, EOS, min_example_length=10).next()
    pad = DocAware([[5, 6, 7]], 1, 4, bos_id=BOS, eos_id=EOS, pad=True)
    b = next(pad)
    assert b["input_ids"].tolist() == [[BOS, 5, 6, 7]] and b["labels"].tolist() == [[5, 6, 7, EOS]]
    b = next(pad)  # the document was padded to 8 tokens: eos, 3 pads (loss 0), then the next copy's bos
    assert b["input_ids"].tolist() == [[EOS, 0, 0, 0]] and b["loss_mask"].tolist() == [[0, 0, 0, 0]]
    with pytest.raises(ValueError, match="batch_size=3"):
        DocAware([[1]], 3, 2, bos_id=BOS, eos_id=EOS).load_state_dict(DocAware([[1]], 2, 2, bos_id=BOS,
                                                                                 eos_id=EOS).state_dict())
