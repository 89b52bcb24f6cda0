"""The n samples of one request decode together as the rows of one batch (chunks of --max_batch), each with its own
generator seeded ``seed + i``; a session that refuses the batch gets them one by one.

Oracles: ``generate()`` of the prompt alone per sample with a generator seeded ``seed + i`` (the reference sampler,
not the engine's code); the same engine with ``max_batch=1`` (every sample alone); a forward pre-hook counting the
forwards and their batch dimension; the server's /health counters against the forwards the batch needs.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

from lit_longctx.checkpoint import load_model
from lit_longctx.nn import generate
from lit_longctx.nn.session import DecodingSession
from lit_longctx.serve import engine as engine_module
from lit_longctx.serve.engine import Engine, Job, SampleParams

EOS = 257
SAMPLING = {"temperature": 1.0, "top_k": 40, "top_p": 0.9}


@pytest.fixture(scope="module")
def engine(hf_dir):
    """An engine on its own copy of the weights (the oracle runs on the reference copy), with a spy: the input shape
    of every forward of the engine's model."""
    model, tok, _ = load_model(hf_dir)
    eng = Engine(model, tok, name="tiny-llama")
    eng.shapes = []
    model.register_forward_pre_hook(lambda module, args: eng.shapes.append(tuple(args[0].shape)))
    return eng


def run(engine: Engine, ids: list[int], params: SampleParams) -> tuple[list[list[int]], list[int]]:
    """Run one request through the engine's queue: (tokens of each sample, the sample index of each emitted token)."""
    out: list[list[int]] = [[] for _ in range(params.num_samples)]
    order: list[int] = []

    def emit(sample: int, token: int) -> None:
        out[sample].append(token)
        order.append(sample)

    job = Job(threading.Event(), ids=ids, params=params, emit=emit)
    engine.enqueue(job)
    engine.drain()
    job.future.result()
    return out, order


def alone(model, ids: list[int], max_new: int, seed: int | None, **sampling) -> list[int]:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return generate(model, ids, max_new, stop_tokens=[EOS], generator=generator, **sampling)[0]


def forwards(lengths: list[int], max_new: int) -> int:
    """Forwards of a batch whose rows got ``lengths`` tokens: the prefill, then one step per token of the longest row
    -- none after the ``max_new``-th token (a row that stopped at EOS drew it from the step after its last token)."""
    longest = max(lengths)
    return 1 + (max_new - 1 if longest == max_new else longest)


def step_major(lengths: list[int]) -> list[int]:
    """The order of a batch's tokens: each step, the rows still open in sample order."""
    return [s for k in range(max(lengths)) for s, n in enumerate(lengths) if n > k]


def test_samples_decode_as_one_batch_and_equal_each_sample_alone(engine, reference):
    ids = engine.encode("Once upon a time")
    params = SampleParams(max_new_tokens=20, num_samples=3, seed=11, **SAMPLING)
    before, engine.shapes[:] = engine.stats.to_dict(), []
    out, order = run(engine, ids, params)
    assert out == [alone(reference[0], ids, 20, 11 + i, **SAMPLING) for i in range(3)]
    assert len({tuple(s) for s in out}) == 3  # three different samples, not one repeated
    lengths = [len(s) for s in out]
    assert engine.shapes == [(3, len(ids))] + [(3, 1)] * (forwards(lengths, 20) - 1)  # all rows in every forward
    assert order == step_major(lengths)
    stats = engine.stats.to_dict()
    assert stats["sample_batches"] - before["sample_batches"] == 1 and stats["largest_sample_batch"] == 3
    assert stats["sample_forwards"] - before["sample_forwards"] == len(engine.shapes)
    assert stats["batches"] == before["batches"] and stats["active_sessions"] == 0


def test_max_batch_chunks_and_one_by_one_give_the_same_samples(engine, reference):
    ids = engine.encode("The for statement")
    params = SampleParams(max_new_tokens=12, num_samples=5, seed=3, **SAMPLING)
    expected = [alone(reference[0], ids, 12, 3 + i, **SAMPLING) for i in range(5)]
    try:
        engine.max_batch, engine.shapes[:] = 1, []
        one_by_one, _ = run(engine, ids, params)
        assert {s[0] for s in engine.shapes} == {1}
        engine.max_batch, engine.shapes[:] = 2, []
        chunked, _ = run(engine, ids, params)
    finally:
        engine.max_batch = 8
    assert one_by_one == chunked == expected
    prefills = [s[0] for s in engine.shapes if s[1] > 1]  # samples 0-1, 2-3, then 4 alone
    assert prefills == [2, 2, 1]
    steps = [forwards([len(s) for s in expected[a:b]], 12) for a, b in ((0, 2), (2, 4), (4, 5))]
    assert len(engine.shapes) == sum(steps)


def test_greedy_samples_are_identical_and_equal_a_single_request(engine, reference):
    ids = engine.encode("déjà vu")
    expected = alone(reference[0], ids, 16, None)
    assert len(set(expected)) > 3  # not a degenerate repetition
    engine.shapes[:] = []
    out, _ = run(engine, ids, SampleParams(max_new_tokens=16, num_samples=4))
    assert out == [expected] * 4 and engine.shapes[0] == (4, len(ids))
    assert run(engine, ids, SampleParams(max_new_tokens=16))[0] == [expected]


class OneRowSession(DecodingSession):
    """A session that refuses batches of several rows at prefill, as a session that cannot batch would."""

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if ids.shape[0] > 1:
            raise ValueError("this session decodes one row at a time")
        return super().prefill(ids, attention_mask)


def test_a_session_that_refuses_the_batch_gets_the_samples_one_by_one(engine, reference, monkeypatch):
    monkeypatch.setattr(engine_module, "session_for", lambda model, batch_size=1, **kw: OneRowSession(model,
                                                                                                     batch_size))
    ids = engine.encode("fallback")
    before, engine.shapes[:] = engine.stats.to_dict(), []
    out, order = run(engine, ids, SampleParams(max_new_tokens=10, num_samples=3, seed=7, **SAMPLING))
    assert out == [alone(reference[0], ids, 10, 7 + i, **SAMPLING) for i in range(3)]
    assert order == sorted(order)  # sample after sample
    stats = engine.stats.to_dict()
    assert {s[0] for s in engine.shapes} == {1} and stats["sample_batches"] == before["sample_batches"]
    assert stats["completed"] - before["completed"] == 1 and stats["active_sessions"] == 0


def test_n_samples_through_the_server(server, reference):
    model, tok = reference
    ids = tok.encode("Once upon", bos=True)
    before = server.health()["stats"]
    body = {"prompt": "Once upon", "max_new_tokens": 24, "num_samples": 3, "seed": 5, **SAMPLING}
    got = [c["token_ids"] for c in server.post("/completions", body).json()["completions"]]
    assert got == [alone(model, ids, 24, 5 + i, **SAMPLING) for i in range(3)]
    stats = server.health()["stats"]
    assert stats["sample_batches"] - before["sample_batches"] == 1 and stats["largest_sample_batch"] >= 3
    assert stats["sample_forwards"] - before["sample_forwards"] == forwards([len(s) for s in got], 24)

    stream = {"prompt": "Once upon", "max_tokens": 24, "n": 3, "seed": 5, "stream": True, **SAMPLING}
    text = server.post("/v1/completions", stream).text
    events = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
    choices = [e["choices"][0] for e in events]
    tokens, finals = choices[:-3], choices[-3:]  # one chunk per token, then each choice's finishing chunk
    assert [c["index"] for c in tokens] == step_major([len(s) for s in got])
    assert all(c["finish_reason"] is None for c in tokens) and [c["index"] for c in finals] == [0, 1, 2]
    for i, sample in enumerate(got):
        streamed = "".join(c["text"] for c in choices if c["index"] == i)
        assert streamed == tok.decode(sample)
        assert finals[i]["finish_reason"] == ("length" if len(sample) == 24 else "stop")
    assert events[-1]["usage"]["completion_tokens"] == sum(map(len, got))

    greedy = server.post("/v1/completions", {"prompt": "Once upon", "max_tokens": 24, "n": 3, "temperature": 0})
    texts = [c["text"] for c in greedy.json()["choices"]]
    assert texts == [tok.decode(alone(model, ids, 24, None))] * 3
