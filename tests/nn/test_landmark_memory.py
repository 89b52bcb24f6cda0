"""Bounded landmark memory (``mem_cache_size``, a FIFO ring as ``lm_benchmark``'s) and the retrieval record.

Oracles: a slow replay that attends, per chunk, over the newest ``mem_cache_size`` complete blocks + the incomplete
block + the chunk at their true positions with the §2.1 per-row loop (everything retrieved, k ≥ size); with RoPE off
and k < size, full grouped attention where evicted and unselected blocks are masked (spec §7 oracle 8).
"""

from __future__ import annotations

import pytest
import torch

from lit_longctx.nn import Transformer
from lit_longctx.nn.attention.landmark import LandmarkAttention, LandmarkCache, LandmarkSession
from lit_longctx.nn.config import ConfigError, RopeConfig
from lit_longctx.nn.rope import RotaryEmbedding, apply_rotary
from tests.nn.test_landmark import LM, IdentityRope, brute_force_weights, context, ordinary, tiny_config

BK = 4  # mem_freq 3 + the landmark


def _layer(**opts) -> tuple[LandmarkAttention, object]:
    config = tiny_config(mem_freq=3, **opts)
    return LandmarkAttention(config, 0, **config.attention_options["landmark"]).double(), config


def _stream(b: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = ordinary(b, t)
    ids[:, BK - 1 :: BK] = LM  # the session's grid: a landmark closes every block from position 0
    return ids, torch.randn(b, t, 32, dtype=torch.float64)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_bounded_cache_equals_replay_that_drops_oldest_blocks(size):
    torch.manual_seed(0)
    rope = RotaryEmbedding(RopeConfig(), 8, 128)
    layer, config = _layer(top_k=5, mem_cache_size=size)
    chunks = [9, 4, 1, 13, 2, 7, 5]  # one chunk completes 3 blocks > size: only its newest ones are kept
    b, t = 2, sum(chunks)
    ids, x = _stream(b, t)
    pos = torch.arange(t).expand(b, -1)
    cache = layer.new_cache(b, torch.device("cpu"), torch.float64)
    with torch.no_grad():
        q, k, v = (z.transpose(1, 2) for z in layer.project(x))
        cos, sin = rope(pos)
        q, k = apply_rotary(q, cos.unsqueeze(1), sin.unsqueeze(1)), apply_rotary(k, cos.unsqueeze(1), sin.unsqueeze(1))
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        c0 = 0
        for n in chunks:
            c1 = c0 + n
            got = layer(x[:, c0:c1], context(ids[:, c0:c1], pos[:, c0:c1], rope, config), cache)
            big_p = c0 // BK * BK  # first position of the incomplete block
            lo = big_p - min(size, c0 // BK) * BK  # the newest `size` complete blocks survive
            scores = q[:, :, c0:c1] @ k[:, :, lo:c1].transpose(-1, -2) * layer.scale
            w = brute_force_weights(scores, ids[:, lo:c1] == LM)
            torch.testing.assert_close(got, layer.output(w @ v[:, :, lo:c1]), rtol=1e-9, atol=1e-9)
            c0 = c1
            assert cache.n_blocks == min(size, c0 // BK) and cache.evicted == c0 // BK - cache.n_blocks


@pytest.mark.parametrize("selection", ["per_token_and_head", "max_over_tokens"])
def test_bounded_retrieval_equals_masking_and_is_recorded(selection):
    """k = 2 < size = 3: blocks 0, 1 are evicted; each (token, head) picks 2 of blocks 2, 3, 4 by landmark score."""
    torch.manual_seed(1)
    layer, config = _layer(top_k=2, selection=selection, mem_cache_size=3)
    rope = IdentityRope(8)
    b, t1, t2 = 2, 22, 6
    ids, x = _stream(b, t1 + t2)
    pos = torch.arange(t1 + t2).expand(b, -1)
    cache = layer.new_cache(b, torch.device("cpu"), torch.float64)
    cache.record_retrieval = True
    with torch.no_grad():
        layer(x[:, :t1], context(ids[:, :t1], pos[:, :t1], rope, config), cache)
        got = layer(x[:, t1:], context(ids[:, t1:], pos[:, t1:], rope, config), cache)
        q, k, v = (z.transpose(1, 2) for z in layer.project(x))
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        scores = q[:, :, t1:] @ k.transpose(-1, -2) * layer.scale
        kept = [2, 3, 4]
        ls = scores[..., [r * BK + BK - 1 for r in kept]]
        rank = ls if selection == "per_token_and_head" else torch.softmax(ls, -1).amax(2, keepdim=True).expand_as(ls)
        chosen = torch.tensor(kept)[rank.argsort(-1, descending=True)[..., :2]].sort(-1).values  # (B, H, 6, 2)
        visible = torch.ones_like(scores, dtype=torch.bool)
        for blk in range(5):
            visible[..., blk * BK : (blk + 1) * BK] = (chosen == blk).any(-1, keepdim=True)
        expected = layer.output(brute_force_weights(scores, ids == LM, visible) @ v)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert len(cache.retrieved) == 1  # the first chunk found an empty cache and retrieved nothing
    record = cache.retrieved[0]
    if selection == "max_over_tokens":
        assert record.shape == (b, 4, 1, 2)
        chosen = chosen[:, :, :1]
    assert torch.equal(record, chosen)


def test_session_bound_and_record():
    """A bound at least as large as the stream changes nothing; a small bound changes the logits (blocks are gone);
    the session reports per layer what each chunk retrieved, as stream block indices."""
    torch.manual_seed(2)
    model = Transformer(tiny_config(top_k=2)).eval()
    ids = ordinary(1, 60)  # 15 blocks of 4 regular tokens
    with torch.no_grad():
        free = LandmarkSession(model, prefill_chunk=8).forward_logits(ids)
        roomy = LandmarkSession(model, prefill_chunk=8, mem_cache_size=100).forward_logits(ids)
        small = LandmarkSession(model, prefill_chunk=8, mem_cache_size=3, record_retrieval=True)
        tight = small.forward_logits(ids)
    assert torch.equal(free, roomy)
    assert not torch.allclose(free[:, 40:], tight[:, 40:])
    torch.testing.assert_close(free[:, :16], tight[:, :16])  # chunks 1-2 see at most 2 blocks: nothing evicted
    record = small.retrieved_blocks()
    assert sorted(record) == [0, 1] and len(record[0]) == 7  # 8 chunks; every one after the first retrieves
    for c, sel in enumerate(record[0]):
        done = (c + 1) * 8 // 4  # complete blocks before chunk c + 1
        assert int(sel.min()) >= max(0, done - 3) and int(sel.max()) < done  # only cached (non-evicted) blocks


def test_bad_mem_cache_size_is_refused():
    with pytest.raises(ConfigError, match="mem_cache_size must be None .* or an integer >= 1"):
        Transformer(tiny_config(mem_cache_size=0))
    cache = LandmarkCache(1, 1, 8, BK, torch.device("cpu"), torch.float32, mem_cache_size=2)
    cache.store(torch.randn(1, 1, 9, 8), torch.randn(1, 1, 9, 8))
    with pytest.raises(ValueError, match="only be changed while the landmark cache is empty"):
        cache.mem_cache_size = 5
