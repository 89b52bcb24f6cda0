"""Landmark attention: grouped softmax (paper §3.1), blockwise path, retrieval cache and session (paper §3.2).

Oracles (spec §7): the App. A hand example, a brute-force per-row loop written from §2.1, plain causal softmax / SDPA,
the gate invariants, one full forward over the landmark-augmented sequence, masking with RoPE disabled, the stingy
table of §3.3, and positions computed from the §3.3 text.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_longctx.nn import ModelConfig, Transformer, generate, session_for
from lit_longctx.nn.attention.base import AttentionContext
from lit_longctx.nn.attention.landmark import (
    LandmarkAttention,
    LandmarkCache,
    LandmarkSession,
    blockwise_landmark_attention,
    grid_offsets,
    grouped_softmax_weights,
    insert_on_grid,
    reference_landmark_attention,
    scoring_slots,
    selection_slots,
)
from lit_longctx.nn.config import ConfigError, RopeConfig
from lit_longctx.nn.rope import RotaryEmbedding, apply_rotary

SELECTIONS = ["per_token_and_head", "max_over_heads", "max_over_tokens"]
V = 64
LM = V - 1


# ------------------------------------------------------------------------------------------------------ oracles
def brute_force_weights(scores: torch.Tensor, is_mem: torch.Tensor, visible: torch.Tensor | None = None):
    """§2.1 literally, one query row at a time (queries are the last Tq keys; ``visible`` on top of causality)."""
    b_, h_, tq, s = scores.shape
    out = torch.zeros_like(scores)
    for b in range(b_):
        mem = [bool(x) for x in is_mem[b]]
        blk = [sum(mem[:j]) for j in range(s)]  # landmarks strictly before j
        for h in range(h_):
            for qi in range(tq):
                i = s - tq + qi
                vis = [j <= i and (visible is None or bool(visible[b, h, qi, j])) for j in range(s)]
                c = blk[i]
                main = [j for j in range(s) if vis[j] and ((mem[j] and blk[j] < c) or (not mem[j] and blk[j] == c))]
                if not main:
                    continue
                sc = scores[b, h, qi]
                top = max(float(sc[j]) for j in main)
                z = sum(math.exp(float(sc[j]) - top) for j in main)
                p = {j: math.exp(float(sc[j]) - top) / z for j in main}
                for j in main:
                    if not mem[j]:
                        out[b, h, qi, j] = p[j]
                for lj in (j for j in main if mem[j]):
                    group = [j for j in range(s) if vis[j] and not mem[j] and blk[j] == blk[lj]]
                    if not group:
                        continue  # a block without regular tokens keeps its gate mass (§2.3)
                    top_g = max(float(sc[j]) for j in group)
                    zg = sum(math.exp(float(sc[j]) - top_g) for j in group)
                    for j in group:
                        out[b, h, qi, j] = p[lj] * math.exp(float(sc[j]) - top_g) / zg
    return out


def main_group_probs(scores: torch.Tensor, is_mem: torch.Tensor) -> torch.Tensor:
    """p_i over M_i by a masked softmax (independent of the kernel); (B, H, T, T), T queries over T keys."""
    t = scores.shape[-1]
    blk = torch.cumsum(is_mem.long(), 1) - is_mem.long()
    mem = is_mem[:, None, None, :]
    own = blk[:, None, :, None]
    kb = blk[:, None, None, :]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    main = causal & ((mem & (kb < own)) | (~mem & (kb == own)))
    return torch.softmax(scores.masked_fill(~main, float("-inf")), -1).nan_to_num(0.0)


def grid_mem(b: int, t: int, block: int, offsets: list[int]) -> torch.Tensor:
    is_mem = torch.zeros(b, t, dtype=torch.bool)
    for r, o in enumerate(offsets):
        is_mem[r, o::block] = True
    return is_mem


def causal_softmax_out(q, k, v):
    t = q.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1) @ v


def tiny_config(**landmark) -> ModelConfig:
    opts = {"landmark_id": LM, "mem_freq": 4, **landmark}
    return ModelConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64,
                       attention="landmark", attention_options={"landmark": opts})


def ordinary(b: int, n: int) -> torch.Tensor:
    return torch.randint(0, LM, (b, n))


class IdentityRope:
    """cos = 1, sin = 0 for any position: RoPE disabled (oracle 8)."""

    def __init__(self, head_dim: int) -> None:
        self.head_dim = head_dim

    def __call__(self, position_ids: torch.Tensor, seq_len: int | None = None):
        shape = (*position_ids.shape, self.head_dim)
        return torch.ones(shape), torch.zeros(shape)


def context(input_ids, positions, rope, config) -> AttentionContext:
    cos, sin = rope(positions)
    ctx = AttentionContext(positions, cos, sin, rope)
    LandmarkAttention.prepare_context(ctx, input_ids, config)
    return ctx


# ------------------------------------------------------------------------------------------- grouped softmax math
def test_hand_example_appendix_a():
    is_mem = torch.zeros(1, 9, dtype=torch.bool)
    is_mem[0, [2, 5, 8]] = True
    w = grouped_softmax_weights(torch.zeros(1, 1, 9, 9, dtype=torch.float64), is_mem)[0, 0]
    f = 1 / 6
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1 / 2, 1 / 2, 0, 0, 0, 0, 0, 0, 0],
        [1 / 2, 1 / 2, 0, 0, 0, 0, 0, 0, 0],
        [1 / 4, 1 / 4, 0, 1 / 2, 0, 0, 0, 0, 0],
        [f, f, 0, 1 / 3, 1 / 3, 0, 0, 0, 0],
        [f, f, 0, 1 / 3, 1 / 3, 0, 0, 0, 0],
        [f, f, 0, f, f, 0, 1 / 3, 0, 0],
        [1 / 8, 1 / 8, 0, 1 / 8, 1 / 8, 0, 1 / 4, 1 / 4, 0],
        [1 / 8, 1 / 8, 0, 1 / 8, 1 / 8, 0, 1 / 4, 1 / 4, 0],
    ], dtype=torch.float64)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("path", ["reference", "blockwise"])
def test_no_landmark_equals_causal_softmax_and_sdpa(path):
    b, h, t, d, block = 2, 3, 12, 8, 17  # T < block: no landmark in the window
    q, k, v = (torch.randn(b, h, t, d) for _ in range(3))
    is_mem = torch.zeros(b, t, dtype=torch.bool)
    if path == "reference":
        y = reference_landmark_attention(q, k, v, is_mem)
    else:
        y = blockwise_landmark_attention(q, k, v, grid_offsets(is_mem, block), block)
    torch.testing.assert_close(y, causal_softmax_out(q, k, v), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-6)


def test_queries_before_first_landmark_get_causal_softmax():
    b, h, t, d, block = 2, 2, 30, 8, 6
    q, k, v = (torch.randn(b, h, t, d) for _ in range(3))
    is_mem = grid_mem(b, t, block, [5, 5])
    y = reference_landmark_attention(q, k, v, is_mem)
    yb = blockwise_landmark_attention(q, k, v, grid_offsets(is_mem, block), block)
    plain = causal_softmax_out(q, k, v)
    torch.testing.assert_close(y[:, :, :5], plain[:, :, :5], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(yb[:, :, :5], plain[:, :, :5], rtol=1e-5, atol=1e-6)
    # the landmark closing block 0 attends to its block's regular tokens only (never its own key)
    own = torch.softmax(q[:, :, 5:6] @ k[:, :, :5].transpose(-1, -2) / math.sqrt(d), -1) @ v[:, :, :5]
    torch.testing.assert_close(y[:, :, 5:6], own, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(yb[:, :, 5:6], own, rtol=1e-5, atol=1e-6)
    assert (y[:, :, 6:] - plain[:, :, 6:]).abs().max() > 1e-3  # later queries really are gated


def test_reference_equals_brute_force_random_placements_fp64():
    b, h, t = 2, 2, 26
    scores = torch.randn(b, h, t, t, dtype=torch.float64) * 3
    is_mem = torch.rand(b, t) < 0.25
    is_mem[0, 0] = True  # window starting on a landmark (zero row, §2.3)
    is_mem[1, 9:11] = True  # consecutive landmarks: a block with no regular tokens
    torch.testing.assert_close(grouped_softmax_weights(scores, is_mem), brute_force_weights(scores, is_mem),
                               rtol=0, atol=1e-12)
    visible = torch.rand(b, h, t, t) < 0.7
    torch.testing.assert_close(grouped_softmax_weights(scores, is_mem, visible),
                               brute_force_weights(scores, is_mem, visible), rtol=0, atol=1e-12)


def test_gradcheck_grouped_softmax():
    t = 9
    scores = torch.randn(1, 2, t, t, dtype=torch.float64, requires_grad=True)
    is_mem = torch.zeros(1, t, dtype=torch.bool)
    is_mem[0, [2, 3, 6]] = True
    assert torch.autograd.gradcheck(lambda s: grouped_softmax_weights(s, is_mem), (scores,))


def test_gradcheck_blockwise():
    b, h, t, d, block = 2, 1, 8, 2, 3
    q, k, v = (torch.randn(b, h, t, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    offsets = torch.tensor([2, 0])
    assert torch.autograd.gradcheck(
        lambda q, k, v: blockwise_landmark_attention(q, k, v, offsets, block, q_tile_blocks=2, k_tile_blocks=1),
        (q, k, v), fast_mode=True)


def test_rows_sum_to_one_and_landmark_columns_are_zero():
    b, h, t = 2, 3, 40
    scores = torch.randn(b, h, t, t) * 4
    is_mem = torch.rand(b, t) < 0.2
    is_mem[:, 0] = False  # not a degenerate window
    for j in range(1, t):  # no empty block
        is_mem[:, j] &= ~is_mem[:, j - 1]
    w = grouped_softmax_weights(scores, is_mem)
    torch.testing.assert_close(w.sum(-1), torch.ones(b, h, t), rtol=0, atol=1e-6)
    assert bool((w.masked_select(is_mem[:, None, None, :].expand_as(w)) == 0).all())


def test_degenerate_rows_reproduced():
    t = 12
    scores = torch.randn(1, 1, t, t, dtype=torch.float64)
    is_mem = torch.zeros(1, t, dtype=torch.bool)
    is_mem[0, [0, 4, 8]] = True  # window starts on a landmark: block 0 has no regular tokens
    w = grouped_softmax_weights(scores, is_mem)[0, 0]
    assert bool((w[0] == 0).all())  # empty main group -> zero row
    p = main_group_probs(scores, is_mem)[0, 0]
    for i in range(1, t):
        expected = 1.0 - (p[i, 0] if i > 0 and int(is_mem[0, : i + 1].sum()) - int(is_mem[0, i]) >= 1 else 0.0)
        torch.testing.assert_close(w[i].sum(), torch.as_tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert float(w[5:].sum(-1).max()) < 1 - 1e-6  # later rows lose the empty block's gate mass


def test_gate_invariants():
    t = 24
    is_mem = torch.zeros(1, t, dtype=torch.bool)
    is_mem[0, [5, 11, 17]] = True
    scores = torch.randn(1, 2, t, t, dtype=torch.float64) * 2
    w = grouped_softmax_weights(scores, is_mem)
    # total weight on earlier block b equals the main-group probability of its landmark
    p = main_group_probs(scores, is_mem)
    for blk_range, land in ((range(0, 5), 5), (range(6, 11), 11)):
        later = slice(land + 1, t)
        torch.testing.assert_close(w[..., later, list(blk_range)].sum(-1), p[..., later, land], rtol=0, atol=1e-12)
    # a constant on the regular scores of block 1 (keys 6..10) changes nothing for queries in later blocks
    shifted = scores.clone()
    shifted[..., 6:11] += 3.7
    torch.testing.assert_close(grouped_softmax_weights(shifted, is_mem)[..., 12:, :], w[..., 12:, :], rtol=0,
                               atol=1e-12)
    # raising landmark 11's score moves mass between block 1 and the rest of the main group, proportionally
    raised = scores.clone()
    raised[..., 11] += 1.3
    w2 = grouped_softmax_weights(raised, is_mem)[..., 18:, :]
    w1 = w[..., 18:, :]
    in_block = torch.zeros(t, dtype=torch.bool)
    in_block[6:11] = True
    live = w1 > 0  # visible regular keys
    assert bool(live[..., in_block].all())
    r_in = w2[..., in_block] / w1[..., in_block]
    r_out = torch.where(live & ~in_block, w2 / w1.clamp_min(1e-300), torch.nan)  # (B, H, 6, T), nan elsewhere
    r_out_ref = r_out[..., :5].mean(-1, keepdim=True)  # block 0's keys are live for every row here
    torch.testing.assert_close(r_in, r_in[..., :1].expand_as(r_in), rtol=1e-10, atol=0)
    torch.testing.assert_close(r_out[live & ~in_block], r_out_ref.expand_as(r_out)[live & ~in_block], rtol=1e-10,
                               atol=0)
    assert bool((r_in[..., 0] > 1).all()) and bool((r_out_ref < 1).all())
    torch.testing.assert_close(w2.sum(-1), torch.ones_like(w2.sum(-1)), rtol=0, atol=1e-12)


def test_more_landmarks_than_any_fixed_group_count():
    b, h, t, block = 1, 1, 200, 3  # 66 landmarks: more than the repo's fixed G (16 / 64)
    scores = torch.randn(b, h, t, t, dtype=torch.float64)
    is_mem = grid_mem(b, t, block, [2])
    w = grouped_softmax_weights(scores, is_mem)
    assert int(is_mem.sum()) > 64
    torch.testing.assert_close(w, brute_force_weights(scores, is_mem), rtol=0, atol=1e-12)
    torch.testing.assert_close(w.sum(-1), torch.ones(b, h, t, dtype=torch.float64), rtol=0, atol=1e-12)
    q, k, v = (torch.randn(b, 2, t, 4, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(blockwise_landmark_attention(q, k, v, grid_offsets(is_mem, block), block),
                               reference_landmark_attention(q, k, v, is_mem), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------ blockwise path
@pytest.mark.parametrize(
    ("t", "block", "offsets", "hkv"),
    [
        (26, 5, [4, 4], 2),  # per-row rule: landmark after every 4 tokens, partial trailing block
        (29, 5, [0, 3], 2),  # PG19 windows: other offsets per row; row 0 starts on a landmark (§2.3)
        (31, 4, [1, 2], 1),  # GQA (2 query heads per KV head), mid-block start and end
        (3, 5, [4, 4], 2),  # shorter than a block, no landmark
    ],
)
def test_blockwise_matches_reference_values_and_grads(t, block, offsets, hkv):
    b, h, d = 2, 2, 6
    q = torch.randn(b, h, t, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, t, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, t, d, dtype=torch.float64, requires_grad=True)
    is_mem = grid_mem(b, t, block, offsets)
    off = grid_offsets(is_mem, block)
    assert off is not None
    yr = reference_landmark_attention(q, k, v, is_mem)
    yb = blockwise_landmark_attention(q, k, v, off, block, q_tile_blocks=2, k_tile_blocks=2)
    torch.testing.assert_close(yb, yr, rtol=0, atol=1e-12)
    g = torch.randn_like(yr)
    for a, c in zip(torch.autograd.grad(yr, (q, k, v), g), torch.autograd.grad(yb, (q, k, v), g)):
        torch.testing.assert_close(c, a, rtol=0, atol=1e-11)


def test_model_reference_and_blockwise_paths_agree():
    torch.manual_seed(1)
    ref = Transformer(tiny_config(path="reference"))
    blk = Transformer(tiny_config(path="blockwise"))
    blk.load_state_dict(ref.state_dict())
    ids = insert_on_grid(ordinary(2, 45), 4, LM)[:, 3:]  # windows starting mid-block
    labels = torch.randint(0, LM, ids.shape)
    lr, lb = ref(ids, labels=labels).loss, blk(ids, labels=labels).loss
    lr.backward()
    lb.backward()
    torch.testing.assert_close(lb, lr, rtol=1e-5, atol=1e-6)
    for (name, pr), pb in zip(ref.named_parameters(), blk.parameters()):
        torch.testing.assert_close(pb.grad, pr.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_blockwise_rejects_irregular_landmarks():
    model = Transformer(tiny_config(path="blockwise"))
    ids = ordinary(1, 20)
    ids[0, [4, 7, 15]] = LM  # not every mem_freq + 1 tokens
    with pytest.raises(ValueError, match="path'\\]='reference'"):
        model(ids)
    assert bool(Transformer(tiny_config(path="reference"))(ids).logits.isfinite().all())  # any placement


# -------------------------------------------------------------------------------------------------- validation
def test_landmark_id_outside_vocabulary_is_refused():
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        Transformer(tiny_config(landmark_id=V))
    with pytest.raises(ConfigError, match="needs attention_options\\['landmark'\\]\\['landmark_id'\\]"):
        Transformer(ModelConfig(vocab_size=V, dim=32, n_layers=1, n_heads=4, ffn_dim=64, attention="landmark"))


def test_top_k_below_one_is_refused():
    with pytest.raises(ConfigError, match="top_k must be an integer >= 1"):
        Transformer(tiny_config(top_k=0))
    model = Transformer(tiny_config())
    with pytest.raises(ConfigError, match="top_k must be an integer >= 1"):
        LandmarkSession(model, top_k=0)


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="selection"):
        Transformer(tiny_config(selection="max_over_everything"))
    with pytest.raises(ConfigError, match="path"):
        Transformer(tiny_config(path="triton"))
    with pytest.raises(ConfigError, match="bad attention_options"):
        Transformer(tiny_config(cache_topk=3))


def test_packed_documents_are_refused():
    model = Transformer(tiny_config())
    ids = insert_on_grid(ordinary(1, 12), 4, LM)
    pos = torch.cat([torch.arange(7), torch.arange(ids.shape[1] - 7)]).unsqueeze(0)
    with pytest.raises(ValueError, match="contiguous position_ids"):
        model(ids, position_ids=pos)


# -------------------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("offload", [False, True])
def test_cached_chunks_equal_full_forward(selection, offload):
    """Oracle 7: k >= cached blocks (everything retrieved at true positions) reproduces one full forward."""
    model = Transformer(tiny_config(top_k=50, selection=selection, offload_to_cpu=offload)).eval()
    aug = insert_on_grid(ordinary(2, 41), 4, LM)
    with torch.no_grad():
        full = model(aug).logits
        state = model.new_state(2)
        parts, pos = [], 0
        for n in (10, 5, 3, 1, 1, 100):  # multiples of the block (5) and not
            parts.append(model(aug[:, pos : pos + n], state=state).logits)
            pos += n
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    cache = state.caches[0]
    assert cache.n_blocks == aug.shape[1] // 5 and cache.k_blocks.device.type == "cpu"
    assert cache.mem_keys.device == model.lm_head.weight.device


def _retrieval_setup(selection, rope, dtype=torch.float64):
    config = tiny_config(mem_freq=3, top_k=2, selection=selection)
    layer = LandmarkAttention(config, 0, **config.attention_options["landmark"]).to(dtype)
    b, t1, t2 = 2, 22, 6  # 5 complete blocks of 4 + 2 tail tokens, then a chunk closing two blocks
    ids = ordinary(b, t1 + t2)
    ids[:, 3::4] = LM
    x = torch.randn(b, t1 + t2, config.dim, dtype=dtype)
    cache = layer.new_cache(b, torch.device("cpu"), dtype)
    pos = torch.arange(t1 + t2).expand(b, -1)
    with torch.no_grad():
        layer(x[:, :t1], context(ids[:, :t1], pos[:, :t1], rope, config), cache)
        y2 = layer(x[:, t1:], context(ids[:, t1:], pos[:, t1:], rope, config), cache)
    return layer, ids, x, y2, t1


@pytest.mark.parametrize("selection", SELECTIONS)
def test_retrieval_equals_masking_without_positions(selection):
    """Oracle 8: RoPE off and k < n: the chunk's output = full grouped attention with unselected blocks masked."""
    layer, ids, x, y2, t1 = _retrieval_setup(selection, IdentityRope(8))
    is_mem = ids == LM
    with torch.no_grad():
        q, k, v = (z.transpose(1, 2) for z in layer.project(x))
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        qc = q[:, :, t1:]
        scores = qc @ k.transpose(-1, -2) * layer.scale  # (B, H, 6, 28)
        land = [3, 7, 11, 15, 19]
        ls = scores[..., land]  # (B, H, 6, 5) landmark scores of the cached blocks
        if selection == "per_token_and_head":
            rank = ls
        elif selection == "max_over_heads":
            rank = torch.softmax(ls, -1).amax(1, keepdim=True).expand_as(ls)
        else:
            rank = torch.softmax(ls, -1).amax(2, keepdim=True).expand_as(ls)
        chosen = rank.argsort(-1, descending=True)[..., :2]
        visible = torch.ones_like(scores, dtype=torch.bool)
        for blk in range(5):
            picked = (chosen == blk).any(-1, keepdim=True)  # (B, H, 6, 1)
            visible[..., blk * 4 : blk * 4 + 4] = picked
        w = brute_force_weights(scores, is_mem, visible)
        expected = layer.output(w @ v)
    # the layer rotates (here by the identity) in float32, as RoPE always runs in float32
    torch.testing.assert_close(y2, expected, rtol=1e-5, atol=1e-6)


def test_stingy_mapping_table():
    """Oracle 9: spec §3.3, k = 2, n = 5."""
    assert scoring_slots(5, 2).tolist() == [0, 0, 0, 1, 2]
    picks = torch.tensor([[1, 4], [0, 2], [3, 4], [2, 3]])
    assert selection_slots(picks, 5).tolist() == [[0, 2], [0, 1], [1, 2], [0, 2]]
    assert scoring_slots(2, 5).tolist() == [1, 2]  # n <= k: everything at its true slot
    assert selection_slots(torch.tensor([[0, 1]]), 2).tolist() == [[1, 2]]


def test_retrieved_blocks_sit_at_stingy_positions():
    """With RoPE on and k < n, one decoding token attends exactly as spec §3.3 places the blocks."""
    rope = RotaryEmbedding(RopeConfig(), 8, 64)
    config = tiny_config(mem_freq=3, top_k=2)
    layer = LandmarkAttention(config, 0, **config.attention_options["landmark"]).double()
    b, t1, bk, n, kk = 2, 22, 4, 5, 2
    ids = ordinary(b, t1 + 1)
    ids[:, 3:20:4] = LM
    x = torch.randn(b, t1 + 1, config.dim, dtype=torch.float64)
    cache = layer.new_cache(b, torch.device("cpu"), torch.float64)
    pos = torch.arange(t1 + 1).expand(b, -1)
    with torch.no_grad():
        layer(x[:, :t1], context(ids[:, :t1], pos[:, :t1], rope, config), cache)
        y = layer(x[:, t1:], context(ids[:, t1:], pos[:, t1:], rope, config), cache)

        def rot(z, p):  # z (B, H, S, D) at positions p (S,)
            cos, sin = rope(torch.as_tensor(p))
            return apply_rotary(z, cos, sin)

        q, k, v = (z.transpose(1, 2) for z in layer.project(x))
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        q = rot(q[:, :, t1:], [t1])
        big_p = 20  # first position of the incomplete block
        slot_of = [0, 0, 0, 1, 2]  # scoring slots (oracle 9)
        land_pos = [big_p - (kk + 1 - s) * bk + bk - 1 for s in slot_of]
        land_k = torch.stack([rot(k[:, :, r * bk + 3 : r * bk + 4], [land_pos[r]])[:, :, 0] for r in range(n)], 2)
        ls = (q @ land_k.transpose(-1, -2))[:, :, 0]  # (B, H, n)
        y_exp = torch.zeros(b, layer.n_heads, 1, 8, dtype=torch.float64)
        for bi in range(b):
            for h in range(layer.n_heads):
                picks = sorted(ls[bi, h].argsort(descending=True, stable=True)[:kk].tolist())  # ties: the older
                keys, vals = [], []
                for j, r in enumerate(picks):
                    slot = j + 1 if r >= n - kk else j
                    start = big_p - (kk + 1 - slot) * bk
                    keys.append(rot(k[bi : bi + 1, h : h + 1, r * bk : r * bk + bk], list(range(start, start + bk))))
                    vals.append(v[bi : bi + 1, h : h + 1, r * bk : r * bk + bk])
                keys.append(rot(k[bi : bi + 1, h : h + 1, 20:23], [20, 21, 22]))
                vals.append(v[bi : bi + 1, h : h + 1, 20:23])
                kc, vc = torch.cat(keys, 2), torch.cat(vals, 2)
                mem = torch.tensor([[0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)
                w = brute_force_weights(q[bi : bi + 1, h : h + 1] @ kc.transpose(-1, -2) * layer.scale, mem)
                y_exp[bi, h] = (w @ vc)[0, 0]
        expected = layer.output(y_exp)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-10)


def test_cache_refuses_landmarks_off_the_grid():
    model = Transformer(tiny_config()).eval()
    state = model.new_state(1)
    ids = ordinary(1, 7)
    ids[0, 2] = LM
    with pytest.raises(ValueError, match="LandmarkSession"):
        model(ids, state=state)


# ---------------------------------------------------------------------------------------------------- session
def replay_logits(model, ids: torch.Tensor, include_landmark_in_loss: bool) -> torch.Tensor:
    """Slow replay: one full forward over the landmark-augmented prefix, logits predicting the next ordinary token."""
    aug = insert_on_grid(ids, 4, LM)
    logits = model(aug).logits
    n = ids.shape[1]
    last = (n - 1) + (n - 1) // 4
    if include_landmark_in_loss and n % 4 == 0:
        last += 1
    return logits[:, last]


@pytest.mark.parametrize("include", [False, True])
def test_cached_generation_equals_slow_replay(include):
    torch.manual_seed(3)
    model = Transformer(tiny_config(top_k=50)).eval()
    prompt = ordinary(2, 10)
    session = LandmarkSession(model, batch_size=2, prefill_chunk=6, include_landmark_in_loss=include,
                              suppress_landmark=False)
    new = generate(model, prompt, 8, session=session)
    seq = torch.cat([prompt, torch.tensor(new)], 1)
    with torch.no_grad():
        fresh = LandmarkSession(model, batch_size=2, prefill_chunk=6, include_landmark_in_loss=include,
                                suppress_landmark=False)
        got = [fresh.prefill(prompt)] + [fresh.step(seq[:, i : i + 1]) for i in range(10, seq.shape[1] - 1)]
        for i, logits in enumerate(got):
            expected = replay_logits(model, seq[:, : 10 + i], include)
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(logits.argmax(-1), seq[:, 10 + i])  # greedy picks are what generate produced


@pytest.mark.parametrize("include", [False, True])
def test_forward_logits_equal_full_forward(include):
    model = Transformer(tiny_config(top_k=50)).eval()
    ids = ordinary(2, 33)
    with torch.no_grad():
        session = LandmarkSession(model, 2, prefill_chunk=8, include_landmark_in_loss=include, suppress_landmark=False)
        got = session.forward_logits(ids)
        full = model(insert_on_grid(ids, 4, LM)).logits
    t = torch.arange(33)
    index = t + t // 4 + (((t + 1) % 4 == 0).long() if include else 0)
    torch.testing.assert_close(got, full[:, index], rtol=1e-5, atol=1e-5)


def test_session_basics():
    model = Transformer(tiny_config(top_k=1)).eval()
    session = session_for(model, batch_size=1, top_k=2, selection="max_over_tokens")
    assert isinstance(session, LandmarkSession)
    caches = [c for c in session.state.caches if isinstance(c, LandmarkCache)]
    assert caches and all(c.top_k == 2 and c.selection == "max_over_tokens" for c in caches)
    with torch.no_grad():
        logits = session.prefill(ordinary(1, 30))
    assert logits.shape == (1, V) and logits[0, LM] == float("-inf")  # the landmark is never sampled
    assert session.position == 30 + 7 and session.filled == 2
    with pytest.raises(ValueError, match="ordinary tokens only"):
        session.step(torch.tensor([[LM]]))
    out = generate(model, ordinary(1, 9), 7, top_k=2)
    assert len(out[0]) == 7 and LM not in out[0]


def test_cache_select_keeps_rows():
    """Dropping batch rows (finished sequences) leaves the kept row's continuation unchanged."""
    model = Transformer(tiny_config(top_k=2)).eval()
    ids = ordinary(2, 23)
    with torch.no_grad():
        pair = LandmarkSession(model, 2, prefill_chunk=7)
        pair.prefill(ids)
        for cache in pair.state.caches:
            cache.select(torch.tensor([1]))
        got = pair.step(torch.tensor([[5]]))
        single = LandmarkSession(model, 1, prefill_chunk=7)
        single.prefill(ids[1:])
        expected = single.step(torch.tensor([[5]]))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)



def test_session_defaults_come_from_the_training_options():
    """The chunk follows the trained context (L − (L mod Bk) − (k+1)·Bk in whole blocks, spec §3.1) and the label
    convention picks the output read after a landmark."""
    model = Transformer(tiny_config(top_k=1, train_context_length=32, include_landmark_in_loss=True)).eval()
    session = LandmarkSession(model)
    assert session.prefill_chunk == (32 - 32 % 5 - 2 * 5) // 5 * 4  # 16 regular tokens, not max_seq_len's 44
    assert session.include_landmark_in_loss
    assert not LandmarkSession(model, include_landmark_in_loss=False).include_landmark_in_loss
    assert LandmarkSession(Transformer(tiny_config(top_k=1))).prefill_chunk == (64 - 64 % 5 - 10) // 5 * 4
    with pytest.raises(ConfigError, match="'train_context_length'\\] must be None or an integer >= 1"):
        Transformer(tiny_config(train_context_length=0))
