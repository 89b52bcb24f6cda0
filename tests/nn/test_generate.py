"""Generation: KV-cache decoding against recomputing the whole sequence, chunked prefill, sampling filters.

Oracles: a naive loop that re-runs the full sequence every step and takes the argmax; hand-computed nucleus / top-k
sets; empirical frequencies of many draws against the renormalised probabilities.
"""

from __future__ import annotations

import pytest
import torch

from lit_longctx.nn import DecodingSession, ModelConfig, Transformer, generate, sample_next, session_for


def tiny_model(backend: str = "sdpa", **kw) -> Transformer:
    config = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64,
                         attn_backend=backend, init_std=0.3, **kw)
    torch.manual_seed(0)
    return Transformer(config).eval()


@torch.no_grad()
def greedy_by_recomputation(model: Transformer, prompt: torch.Tensor, n: int) -> list[list[int]]:
    seq = prompt.clone()
    for _ in range(n):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, prompt.shape[1] :].tolist()


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_greedy_with_cache_equals_recomputing_every_step(backend):
    model = tiny_model(backend)
    prompt = torch.randint(0, 97, (3, 9))
    expected = greedy_by_recomputation(model, prompt, 40)
    assert len({tuple(r) for r in expected}) == 3 and len(set(expected[0])) > 3  # not a degenerate repetition
    assert generate(model, prompt, 40) == expected


def test_greedy_with_rope_scaling_beyond_max_positions():
    model = tiny_model(rope={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    prompt = torch.randint(0, 97, (1, 50))
    assert generate(model, prompt, 30) == greedy_by_recomputation(model, prompt, 30)  # reaches position 79 > 64


@torch.no_grad()
def test_chunked_prefill_of_a_prompt_longer_than_the_chunk():
    model = tiny_model()
    prompt = torch.randint(0, 97, (2, 37))
    session = DecodingSession(model, batch_size=2, prefill_chunk=8)
    last = session.prefill(prompt)
    assert session.position == 37
    torch.testing.assert_close(last, model(prompt).logits[:, -1], atol=1e-5, rtol=1e-5)
    expected = greedy_by_recomputation(model, prompt, 20)
    assert generate(model, prompt, 20, prefill_chunk=8) == expected
    assert generate(model, prompt, 20, prefill_chunk=5) == expected


def test_list_prompt_and_zero_tokens():
    model = tiny_model()
    prompt = [5, 6, 7, 8]
    assert generate(model, prompt, 6) == greedy_by_recomputation(model, torch.tensor([prompt]), 6)
    assert generate(model, prompt, 0) == [[]]


def test_top_k_one_equals_greedy():
    model = tiny_model()
    prompt = torch.randint(0, 97, (2, 6))
    g = torch.Generator().manual_seed(3)
    sampled = generate(model, prompt, 25, temperature=1.3, top_k=1, generator=g)
    assert sampled == generate(model, prompt, 25)


def test_stop_tokens_end_rows():
    model = tiny_model()
    prompt = torch.randint(0, 97, (3, 5))
    free = greedy_by_recomputation(model, prompt, 30)
    stop = free[0][4]  # row 0 stops before its 5th token; other rows stop at their first occurrence, if any

    def cut(row: list[int]) -> list[int]:
        return row[: row.index(stop)] if stop in row else row

    got = generate(model, prompt, 30, stop_tokens=[stop])
    assert got == [cut(r) for r in free]
    assert len(got[0]) == free[0].index(stop) <= 4
    # when every row has stopped, generation ends early
    assert generate(model, prompt[:1], 30, stop_tokens=[stop]) == [cut(free[0])]


def test_sampling_is_reproducible_with_a_generator():
    model = tiny_model()
    prompt = torch.randint(0, 97, (2, 4))
    a = generate(model, prompt, 15, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = generate(model, prompt, 15, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert a == b


def test_generate_restores_training_mode():
    model = tiny_model().train()
    generate(model, [1, 2, 3], 2)
    assert model.training


# ---------------------------------------------------------------------------------------------------- sampling
def draw(logits: torch.Tensor, n: int = 20000, **kw) -> torch.Tensor:
    """Frequencies (B, V) of n draws per row."""
    g = torch.Generator().manual_seed(0)
    rows = logits.repeat_interleave(n, dim=0)
    picks = sample_next(rows, generator=g, **kw).view(logits.shape[0], n)
    return torch.stack([torch.bincount(p, minlength=logits.shape[1]).float() / n for p in picks])


def test_top_p_keeps_exactly_the_nucleus():
    """p = (0.5, 0.3, 0.15, 0.05): top_p 0.75 keeps {0, 1}, top_p 0.85 keeps {0, 1, 2} (smallest set with mass ≥ p).

    Row 2 holds the same probabilities in another order, so the filter must map sorted positions back to ids."""
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.5, 0.3]])
    logits = probs.log()
    freq = draw(logits, temperature=1.0, top_p=0.75)
    assert torch.equal(freq > 0, torch.tensor([[True, True, False, False], [False, False, True, True]]))
    torch.testing.assert_close(freq[0, :2], torch.tensor([0.5, 0.3]) / 0.8, atol=0.015, rtol=0)
    freq = draw(logits, temperature=1.0, top_p=0.85)
    assert torch.equal(freq > 0, probs > 0.1)
    torch.testing.assert_close(freq[0, :3], torch.tensor([0.5, 0.3, 0.15]) / 0.95, atol=0.015, rtol=0)
    # the single most likely token is always kept, even for a tiny top_p
    assert torch.equal(draw(logits, n=200, temperature=1.0, top_p=0.01).argmax(-1), torch.tensor([0, 2]))


def test_temperature_sampling_follows_softmax_of_scaled_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    for t in (0.5, 1.0, 2.0):
        freq = draw(logits, temperature=t)
        torch.testing.assert_close(freq, torch.softmax(logits / t, -1), atol=0.015, rtol=0)


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5, 0.0]])
    freq = draw(logits, temperature=1.0, top_k=3)
    assert torch.equal(freq[0] > 0, torch.tensor([False, True, True, False, True, False]))
    expected = torch.softmax(logits[0, [1, 2, 4]], -1)
    torch.testing.assert_close(freq[0, [1, 2, 4]], expected, atol=0.015, rtol=0)


def test_greedy_is_argmax():
    logits = torch.randn(5, 11)
    assert torch.equal(sample_next(logits), logits.argmax(-1))


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"temperature": -0.1}, "temperature must be >= 0"), ({"top_k": 0}, "top_k must be >= 1"),
     ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"), ({"top_p": 1.5}, r"top_p must be in \(0, 1\]")],
)


def test_sampling_argument_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        sample_next(torch.randn(1, 4), **kw)


def test_generate_argument_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate(model, [1, 2], -1)
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\)"):
        generate(model, [1, 200], 3)


def test_session_for_plain_model():
    session = session_for(tiny_model(), batch_size=2, prefill_chunk=4)
    assert type(session) is DecodingSession and session.prefill_chunk == 4 and session.batch_size == 2
