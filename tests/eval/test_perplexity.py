"""Perplexity by position against a slow token-by-token loop; documents, windows and buckets."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lit_longctx.datamodules.passkey import LongDocData
from lit_longctx.eval import tasks
from lit_longctx.eval.perplexity import bucket_sums, document_tokens, per_token_nll, position_edges
from lit_longctx.nn import session_for
from lit_longctx.tokenizers import ByteTokenizer
from tests.eval import EvalLM


@torch.no_grad()
def slow_nll(model, ids):
    """NLL of each token t >= 1 from a full forward over ids[:, :t] (no cache, no chunking)."""
    out = []
    for t in range(1, ids.shape[1]):
        logits = model(ids[:, :t]).logits[0, -1].float()
        out.append(-F.log_softmax(logits, dim=-1)[ids[0, t]].item())
    return out


def test_per_token_nll_with_chunked_prefill_matches_slow_loop():
    module = EvalLM(max_seq_len=256)
    module.model.eval()
    ids = torch.randint(0, 256, (1, 100))
    expected = torch.tensor(slow_nll(module.model, ids))
    for chunk in (100, 37, 1):  # one forward, uneven chunks, token by token
        got = per_token_nll(session_for(module.model, prefill_chunk=chunk), ids, slice_size=16)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


class ForwardLogitsSession:
    """A session with its own ``forward_logits`` and no ``model``: the logits of token t are row ``ids[t]`` of a fixed
    table plus ``0.1 * position`` on the entry of token ``position % V`` (so the position it tracks matters)."""

    def __init__(self, table, prefill_chunk):
        self.table, self.prefill_chunk, self.position, self.fed = table, prefill_chunk, 0, []

    def forward_logits(self, ids):
        self.fed.append(ids.shape[1])
        logits = self.table[ids].clone()  # (1, n, V)
        for i in range(ids.shape[1]):
            logits[0, i, (self.position + i) % self.table.shape[1]] += 0.1 * (self.position + i)
        self.position += ids.shape[1]
        return logits


def test_per_token_nll_goes_through_the_sessions_forward_logits():
    torch.manual_seed(0)
    table = torch.randn(50, 50)
    ids = torch.randint(0, 50, (1, 23))
    expected = []
    for t in range(1, 23):  # token t is predicted by position t - 1
        logits = table[ids[0, t - 1]].clone()
        logits[(t - 1) % 50] += 0.1 * (t - 1)
        expected.append(-F.log_softmax(logits, dim=-1)[ids[0, t]].item())
    session = ForwardLogitsSession(table, prefill_chunk=10)
    torch.testing.assert_close(per_token_nll(session, ids, slice_size=4), torch.tensor(expected))
    assert session.fed == [10, 10, 3]

    class Last(ForwardLogitsSession):
        def forward_logits(self, ids):
            return super().forward_logits(ids)[:, -1]

    with pytest.raises(ValueError, match=r"Last.forward_logits must return the logits of every fed token, shape "
                                         r"\(1, 10, vocab\), got \(1, 50\)"):
        per_token_nll(Last(table, prefill_chunk=10), ids)


def test_ppl_by_position_equals_plain_average_of_slow_loop(tmp_path):
    text = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog. " for i in range(40))
    (tmp_path / "doc.txt").write_text(text)
    dm = LongDocData(tokenizer="byte", document=str(tmp_path / "doc.txt"), lengths=[16, 48, 96], max_windows=3, seed=2,
                     session_kwargs={"prefill_chunk": 40})
    module = EvalLM(max_seq_len=64)  # windows longer than the model's context: chunked through the KV cache
    module.model.eval()
    records = [tasks.evaluate_batch(module, b) for b in dm.test_dataloader()]
    summary = tasks.summarize(records)["ppl_by_position"]
    assert module.session_kwargs_seen == [{"prefill_chunk": 40}] * 3

    tokens = list(text.encode())
    per_bucket = {(0, 16): [], (16, 48): [], (48, 96): []}
    for r in records:
        window = torch.tensor([tokens[r["offset"] : r["offset"] + 96]])
        for t, nll in enumerate(slow_nll(module.model, window), start=1):
            next(v for (a, b), v in per_bucket.items() if a <= t < b).append(nll)
    assert len(records) == 3 and len({r["offset"] for r in records}) == 3
    for bucket, (a, b) in zip(summary["buckets"], per_bucket):
        values = per_bucket[a, b]
        assert (bucket["start"], bucket["end"], bucket["tokens"]) == (a, b, len(values))
        assert bucket["ppl"] == pytest.approx(math.exp(sum(values) / len(values)), rel=1e-4)
    everything = [v for vs in per_bucket.values() for v in vs]
    assert summary["ppl"] == pytest.approx(math.exp(sum(everything) / len(everything)), rel=1e-4)
    assert summary["buckets"][-1]["cum_ppl"] == pytest.approx(summary["ppl"], rel=1e-9)


def test_bucket_sums_assign_token_t_to_its_bucket():
    nll = torch.arange(1.0, 10.0)  # nll[t - 1] = t for tokens t = 1..9
    sums, counts = bucket_sums(nll, [0, 2, 4, 10])
    assert counts == [1, 2, 6] and sums == [1.0, 2.0 + 3.0, 4.0 + 5 + 6 + 7 + 8 + 9]


def test_position_edges():
    assert position_edges([1024, 256, 512, 512]) == [0, 256, 512, 1024]
    with pytest.raises(ValueError, match="must be >= 2"):
        position_edges([1, 8])


def test_document_tokens_from_token_files_and_text(tmp_path):
    data = np.array([5, 70000, 3, 65535], dtype=np.uint32)
    data.tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint32", "vocab_size": 70001}))
    assert document_tokens(tmp_path / "val.bin", ByteTokenizer()).tolist() == [5, 70000, 3, 65535]
    np.array([1, 2, 65535], dtype=np.uint16).tofile(tmp_path / "other.bin")
    (tmp_path / "other.json").write_text(json.dumps({"dtype": "uint16"}))
    assert document_tokens(tmp_path / "other.bin", ByteTokenizer()).tolist() == [1, 2, 65535]
    assert document_tokens(tmp_path / "val.bin", ByteTokenizer(), dtype="uint16").tolist()[:2] == [5, 0]
    (tmp_path / "doc.txt").write_text("héllo")
    assert document_tokens(tmp_path / "doc.txt", ByteTokenizer()).tolist() == list("héllo".encode())
    assert len(document_tokens(None, ByteTokenizer())) > 400_000  # pydoc_data topics

    (tmp_path / "sub").mkdir()
    data.tofile(tmp_path / "sub" / "x.bin")
    with pytest.raises(ValueError, match="pass dtype='uint16'"):
        document_tokens(tmp_path / "sub" / "x.bin", ByteTokenizer())
    with pytest.raises(ValueError, match="integer type"):
        document_tokens(tmp_path / "sub" / "x.bin", ByteTokenizer(), dtype="float32")
    with pytest.raises(FileNotFoundError, match="not found"):
        document_tokens(tmp_path / "missing.bin", ByteTokenizer())


def test_long_doc_data_windows(tmp_path):
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "t.bin")
    (tmp_path / "t.json").write_text(json.dumps({"dtype": "uint16"}))
    dm = LongDocData(tokenizer="byte", document=str(tmp_path / "t.bin"), lengths=[50, 100], max_windows=4, seed=1)
    batches = list(dm.test_dataloader())
    assert len(batches) == 4
    offsets = [b["offset"] for b in batches]
    assert offsets == sorted(offsets) and all(o % 100 == 0 for o in offsets) and len(set(offsets)) == 4
    for b in batches:
        assert b["task"] == "ppl_by_position" and b["edges"] == [0, 50, 100]
        assert b["input_ids"].tolist() == [list(range(b["offset"], b["offset"] + 100))]
    again = LongDocData(tokenizer="byte", document=str(tmp_path / "t.bin"), lengths=[50, 100], max_windows=4, seed=1)
    assert [b["offset"] for b in again.test_dataloader()] == offsets
    every = LongDocData(tokenizer="byte", document=str(tmp_path / "t.bin"), lengths=[100], max_windows=None)
    assert len(every.test_dataloader()) == 10
    with pytest.raises(ValueError, match="fewer than one window of 2000"):
        LongDocData(tokenizer="byte", document=str(tmp_path / "t.bin"), lengths=[2000]).test_dataloader()
    with pytest.raises(ValueError, match="batch_size: 1"):
        LongDocData(batch_size=4)
