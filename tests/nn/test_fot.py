"""FoT memory layers (spec fot.md §5): cross-batch training oracles 1-7 and memory-cache inference oracles 11-15.

Oracles: the spec's tables and hand-computed values, an explicit per-row construction of the cross-batch keys, autograd
locality, symmetry invariants, transformers' LlamaForCausalLM, and a slow reference that recomputes every token from its
window start (each token t sees its local window [ws(t), t] at window-relative positions and, in memory layers, every
earlier token as a key at position 0) with the window starts derived here from LongLLaMA's rules.
"""

from __future__ import annotations

import math

import pytest
import torch

from lit_longctx.nn import ModelConfig, Transformer, generate, session_for
from lit_longctx.nn.attention.causal import KVCache
from lit_longctx.nn.attention.fot import (
    FoTAttention,
    FoTCache,
    FoTSession,
    cross_batch_attention,
    cross_batch_layout,
    cross_batch_row_ranges,
    cross_batch_scores,
    longllama_config,
    longllama_layout,
    memory_attention,
)
from lit_longctx.nn.config import ConfigError
from lit_longctx.nn.rope import apply_rotary

W = 16  # local window (max_seq_len) of the inference tests


def tiny_config(mem_layers=(1,), fot: dict | None = None, **overrides) -> ModelConfig:
    base = dict(vocab_size=61, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=W,
                layer_attention={i: "fot" for i in mem_layers},
                attention_options={"fot": {"mem_dtype": "float32", "last_context_length": 6, **(fot or {})}})
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(mem_layers=(1,), fot: dict | None = None, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(mem_layers, fot, **overrides)).eval()
    for p in model.parameters():  # larger weights than the 0.02 init, so attention patterns are far from uniform
        p.data.normal_(0, 0.3)
    return model


def attention_context(model: Transformer, batch: int, seq_len: int, **extras):
    ids = torch.zeros(batch, seq_len, dtype=torch.long)
    positions = torch.arange(seq_len).expand(batch, seq_len)
    return model.context(ids, positions, None, extras)


def rope_at(model: Transformer, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, heads, D) at integer positions (T,)."""
    cos, sin = model.rope(positions)
    return apply_rotary(x, cos.unsqueeze(1), sin.unsqueeze(1))


# ---------------------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize(
    "batch, r, k, stepping, expected",
    [
        (8, 6, 4, True, [0, 1, 2, 3, 0, 3, 6, 6]),  # repo README example
        (8, 3, 4, True, [0, 1, 2, 3, 0, 2, 3, 3]),  # LongLLaMA-3B
        (4, 2, 2, True, [0, 1, 0, 2]),  # setup_test.json
        (4, 2, 1, True, [0, 1, 2, 2]),  # k = 1
        (4, 2, 2, False, [0, 1, 2, 2]),  # stepping off
    ],
)
def test_slot_count_tables(batch, r, k, stepping, expected):
    assert cross_batch_row_ranges(batch, r, k, stepping) == expected
    layout = cross_batch_layout(batch, r, k, stepping)
    assert list(layout.ranges) == expected
    assert layout.visible.sum(1).tolist() == expected


def test_positive_negative_split():
    layout = cross_batch_layout(8, 3, 4)
    pairs = list(zip(layout.positives, layout.negatives))
    assert pairs[:4] == [(0, 0), (1, 0), (2, 0), (3, 0)]  # first pack of a microbatch: no negatives
    assert pairs[4:] == [(0, 0), (1, 1), (2, 1), (3, 0)]  # steady state: the paper's ¼(0,0), ¼(1,1), ¼(2,1), ¼(3,0)
    # spec §8: with r = 7 the formula gives (1,2), (2,4), (3,4), not the paper's 7B (1,2), (2,5), (3,4)
    layout = cross_batch_layout(8, 7, 4)
    assert list(zip(layout.positives, layout.negatives))[5:] == [(1, 2), (2, 4), (3, 4)]
    # k = 1: every additional context is another stream
    layout = cross_batch_layout(4, 2, 1)
    assert layout.positives == (0, 0, 0, 0) and layout.negatives == (0, 1, 2, 2)


def test_explicit_ranges_and_sources():
    layout = cross_batch_layout(8, ranges=[0, 3, 7, 7])
    assert layout.ranges == (0, 1, 2, 3, 0, 3, 6, 7)
    assert layout.num_slots == 7
    assert layout.sources[6, :3].tolist() == [5, 4, 3]  # nearest first: rows b-1, b-2, ...
    for b, d in enumerate(layout.ranges):  # visible sources never wrap around the batch
        assert all(0 <= int(s) < b for s in layout.sources[b, :d])


def test_paper_layout():
    layout = cross_batch_layout(6, 2, 2, mode="paper")  # packs (0,1), (2,3), (4,5); rows 1, 3, 5 are C_curr
    assert layout.sources[1].tolist() == [0, 2] and layout.sources[5].tolist() == [4, 0]  # own C_prev, then mod B/k
    assert layout.visible.tolist() == [[False, False], [True, True]] * 3
    assert layout.positives == (0, 1) * 3 and layout.negatives == (0, 1) * 3
    with pytest.raises(ValueError, match="needs d-1 other packs"):
        cross_batch_layout(4, 3, 2, mode="paper")
    with pytest.raises(ConfigError, match="dataset_packing >= 2"):
        cross_batch_layout(4, 1, 1, mode="paper")


def test_layout_errors():
    with pytest.raises(ValueError, match="not divisible by dataset_packing=4"):
        cross_batch_layout(6, 3, 4)
    with pytest.raises(ValueError, match="larger than a microbatch of 4 rows allows.*at least 8 rows"):
        cross_batch_layout(4, 4, 4)
    assert max(cross_batch_layout(4, 3, 4).ranges) == 3  # r = B - 1 is the largest allowed
    with pytest.raises(ValueError, match="at least 2 rows"):
        cross_batch_layout(1, 1)
    with pytest.raises(ValueError, match=r"cross_batch_ranges=\[0, 3, 7, 7\] is larger"):
        cross_batch_layout(4, ranges=[0, 3, 7, 7])
    with pytest.raises(ConfigError, match="len\\(cross_batch_ranges\\) == dataset_packing"):
        cross_batch_layout(8, dataset_packing=2, ranges=[0, 1, 2, 3])
    with pytest.raises(ConfigError, match="ranges >= 0"):
        cross_batch_layout(8, ranges=[0, -1])
    with pytest.raises(ConfigError, match="cross_batch_mode"):
        cross_batch_layout(8, 1, mode="wrap")
    assert cross_batch_layout(8, 0, 4) is None


def test_range_zero_needs_no_packs():
    """r = 0 is plain attention: any batch size goes (a single prompt at inference with k = 4 in the options)."""
    assert cross_batch_layout(3, 0, 4) is None and cross_batch_layout(1, ranges=[0, 0]) is None
    model = tiny_model(fot={"cross_batch_range": 2, "dataset_packing": 4})
    plain = Transformer(tiny_config(mem_layers=())).eval()
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 61, (1, 9))
    torch.testing.assert_close(model(ids, cross_batch_range=0).logits, plain(ids).logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="1 rows is not divisible by dataset_packing=4"):
        model(ids)  # the options' training range applies when the batch sets none


def test_longllama_config_keys_round_trip():
    """HF config.json keys (LongLLaMA's names and the JAX ones, spec §8) from a config and back."""
    config = tiny_config(mem_layers=(0, 2), fot={"mem_dtype": "bfloat16", "mem_attention_grouping": [4, 2048],
                                                 "cross_batch_range": 3, "dataset_packing": 4})
    keys = longllama_config(config)
    assert keys == {"mem_layers": [0, 2], "last_context_length": 6, "mem_dtype": "bfloat16", "mem_positionals": True,
                    "mem_attention_grouping": [4, 2048], "torch_attention": False, "cross_batch_range": 3,
                    "cross_batch_stepping": True, "dataset_packing": 4, "scan_cross_batch": False}
    layout = longllama_layout({"model_type": "longllama", "hidden_size": 32, **keys})
    assert layout["layer_attention"] == {0: "fot", 2: "fot"}
    assert longllama_config(tiny_config(mem_layers=(), **layout)) == keys
    assert longllama_layout({"model_type": "llama", "mem_layers": []}) is None
    assert longllama_config(tiny_config(fot={"mem_dtype": torch.float16}))["mem_dtype"] == "float16"
    assert longllama_config(tiny_config(fot={"mem_dtype": None}))["mem_dtype"] is None  # the compute dtype


# ------------------------------------------------------------------------------------------------ training attention
def explicit_cross_batch(model, attn, x, d, positionals=True):
    """Oracle 2: row b's keys are [R_pos K_b; R_0 K_{b-1}; ...; R_0 K_{b-d_b}], values likewise, causal on its own
    window only, one softmax (torch.softmax, float64)."""
    b_size, t, _ = x.shape
    q, k, v = attn.project(x)
    pos = torch.arange(t)
    zero = torch.zeros(t, dtype=torch.long)
    rep = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    rows = []
    for b in range(b_size):
        if positionals:
            qb, keys = rope_at(model, q[b], pos), [rope_at(model, k[b], pos)]
            keys += [rope_at(model, k[b - c], zero) for c in range(1, d[b] + 1)]
        else:
            qb, keys = q[b], [k[b - c] for c in range(d[b] + 1)]
        keys = torch.cat(keys).double()  # ((d+1)·T, H, D)
        values = torch.cat([v[b - c] for c in range(d[b] + 1)]).double()
        scores = torch.einsum("ihd,jhd->hij", qb.double(), keys) / math.sqrt(attn.head_dim)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        allowed = torch.cat([causal, torch.ones(t, d[b] * t, dtype=torch.bool)], dim=1)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        rows.append(torch.einsum("hij,jhd->ihd", probs, values).reshape(t, -1))
    return attn.o_proj(torch.stack(rows).float())


@pytest.mark.parametrize("impl", ["sdpa", "eager", "chunked"])
@pytest.mark.parametrize("case", range(4))
def test_matches_explicit_construction(impl, case):
    g = torch.Generator().manual_seed(case)
    k = [1, 2, 4, 4][case]
    batch = k * int(torch.randint(2, 4, (1,), generator=g))
    r = int(torch.randint(1, batch, (1,), generator=g))
    stepping = bool(case % 2)
    extras = dict(cross_batch_range=r, dataset_packing=k, cross_batch_stepping=stepping)
    if case == 3:
        extras = dict(cross_batch_ranges=[0, 3, 1, 2])
    fot = {"scan_cross_batch": impl == "chunked", "scan_query_chunk_size": 3, "scan_key_chunk_size": 5,
           "mem_positionals": case != 2}
    model = tiny_model(fot=fot, attn_backend="eager" if impl == "eager" else "sdpa")
    attn = model.layers[1].self_attn
    x = torch.randn(batch, 7, 32, generator=g)
    ctx = attention_context(model, batch, 7, **extras)
    d = list(ctx.extras["fot_layout"].ranges)
    if case < 3:
        assert d == cross_batch_row_ranges(batch, r, k, stepping)
    expected = explicit_cross_batch(model, attn, x, d, positionals=case != 2)
    torch.testing.assert_close(attn(x, ctx), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "chunked"])
def test_paper_mode_matches_explicit_construction(impl):
    """cross_batch_mode='paper', k=2, d=2: C_curr row 2p+1 sees its own C_prev (row 2p) and the C_prev of pack p+1
    (mod 3) at position 0; C_prev rows are plain causal."""
    model = tiny_model(fot={"cross_batch_mode": "paper", "scan_cross_batch": impl == "chunked",
                            "scan_key_chunk_size": 4})
    attn = model.layers[1].self_attn
    x = torch.randn(6, 5, 32)
    out = attn(x, attention_context(model, 6, 5, cross_batch_range=2, dataset_packing=2))
    q, k, v = attn.project(x)
    pos, zero = torch.arange(5), torch.zeros(5, dtype=torch.long)
    k, v = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    for b in range(6):
        sources = [b - 1, (b + 1) % 6] if b % 2 else []
        keys = torch.cat([rope_at(model, k[b], pos)] + [rope_at(model, k[s], zero) for s in sources])
        values = torch.cat([v[b]] + [v[s] for s in sources])
        scores = torch.einsum("ihd,jhd->hij", rope_at(model, q[b], pos), keys) * attn.scale
        allowed = torch.cat([causal, torch.ones(5, 5 * len(sources), dtype=torch.bool)], dim=1)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        expected = attn.o_proj(torch.einsum("hij,jhd->ihd", probs, values).reshape(5, -1))
        torch.testing.assert_close(out[b], expected, atol=2e-5, rtol=1e-5)


def test_range_zero_and_unextended_rows_equal_causal():
    """Oracle 1: r = 0 is the plain causal layer; with r > 0 rows whose n_b = 1 are too."""
    fot_model = tiny_model(mem_layers=(0, 1, 2))
    plain = Transformer(tiny_config(mem_layers=())).eval()
    plain.load_state_dict(fot_model.state_dict())
    ids = torch.randint(0, 61, (8, 12))
    expected = plain(ids).logits
    torch.testing.assert_close(fot_model(ids).logits, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(fot_model(ids, cross_batch_range=0).logits, expected, atol=1e-6, rtol=0)
    out = fot_model(ids, cross_batch_range=3, dataset_packing=4).logits
    for row in (0, 4):  # d = [0, 1, 2, 3, 0, 2, 3, 3]
        torch.testing.assert_close(out[row], expected[row], atol=1e-6, rtol=0)
    assert not torch.allclose(out[5], expected[5], atol=1e-3)


def test_hand_checked_rope_logits():
    """Oracle 5: D = 2, q = k = (1, 0), query at position 1. As a local key at position 1 the logit is 1/√2; as a memory
    key (position 0) it is cos(1)/√2."""
    config = ModelConfig(vocab_size=8, dim=2, n_layers=1, n_heads=1, head_dim=2, ffn_dim=4, layer_attention={0: "fot"},
                         rope={"rope_theta": 500.0})
    model = Transformer(config)
    attn = model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        proj.weight.data = torch.eye(2)
    x = torch.tensor([1.0, 0.0]).expand(2, 2, 2)  # 2 rows × 2 tokens, all (1, 0)
    ctx = attention_context(model, 2, 2, cross_batch_range=1)
    q, k_local, k_first, _ = attn.attention_inputs(x, ctx)
    scores = cross_batch_scores(q, k_local, k_first, ctx.extras["fot_layout"], attn.scale)  # (B, H, T, 2T)
    assert scores[1, 0, 1, 1].item() == pytest.approx(1 / math.sqrt(2), abs=1e-6)  # 0.70711
    assert scores[1, 0, 1, 3].item() == pytest.approx(math.cos(1) / math.sqrt(2), abs=1e-6)  # 0.38205
    assert scores[0, 0, 1, 3].item() == pytest.approx(-1e6, rel=1e-6)  # row 0 has no row before it


@pytest.mark.parametrize("impl", ["sdpa", "chunked"])
def test_gradient_locality(impl):
    """Oracle 3: row b depends on rows b-d_b..b only, and its loss reaches their keys and values (no stop-grad)."""
    model = tiny_model(fot={"scan_cross_batch": impl == "chunked", "scan_query_chunk_size": 4,
                            "scan_key_chunk_size": 3})
    attn = model.layers[1].self_attn
    ctx = attention_context(model, 8, 6, cross_batch_range=3, dataset_packing=4)
    d = ctx.extras["fot_layout"].ranges  # (0, 1, 2, 3, 0, 2, 3, 3)
    for b in (2, 5, 7):
        x = torch.randn(8, 6, 32, requires_grad=True)
        attn(x, ctx)[b].square().sum().backward()
        per_row = x.grad.abs().sum(dim=(1, 2))
        for row in range(8):
            if b - d[b] <= row <= b:
                assert per_row[row] > 0, (b, row)
            else:
                assert per_row[row] == 0, (b, row)
    # into keys and values specifically, through the functional API
    q, kl, kf, v = (torch.randn(8, h, 6, 8, requires_grad=True) for h in (4, 2, 2, 2))
    layout = ctx.extras["fot_layout"]
    cross_batch_attention(q, kl, kf, v, layout, impl=impl, q_chunk=4, k_chunk=3)[7].sum().backward()
    seen = list(range(7 - d[7], 7))
    assert all(kf.grad[r].abs().sum() > 0 and v.grad[r].abs().sum() > 0 for r in seen)
    assert kf.grad[[r for r in range(8) if r not in seen]].abs().sum() == 0
    assert kl.grad[:7].abs().sum() == 0 and q.grad[:7].abs().sum() == 0


@pytest.mark.parametrize("impl", ["sdpa", "chunked"])
def test_memory_keys_carry_no_order(impl):
    """Oracle 4: permuting the tokens of a source row, or swapping which rows fill slots 1 and 2, leaves row b alone."""
    model = tiny_model(fot={"scan_cross_batch": impl == "chunked", "scan_key_chunk_size": 4})
    attn = model.layers[1].self_attn
    ctx = attention_context(model, 4, 6, cross_batch_range=3)  # d = [0, 1, 2, 3]
    x = torch.randn(4, 6, 32)
    base = attn(x, ctx)[3]
    permuted = x.clone()
    permuted[1] = x[1, torch.randperm(6)]
    torch.testing.assert_close(attn(permuted, ctx)[3], base, atol=1e-6, rtol=1e-5)
    swapped = x[[0, 2, 1, 3]]
    torch.testing.assert_close(attn(swapped, ctx)[3], base, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(attn(permuted, ctx)[1], attn(x, ctx)[1], atol=1e-4)  # the row itself does change


def test_dense_and_chunked_paths_agree():
    """Values and gradients, ragged chunks, GQA, stepping, through the whole model with a loss."""
    ids = torch.randint(0, 61, (8, 10))
    labels = torch.randint(0, 61, (8, 10))
    results = []
    chunked = {"scan_cross_batch": True}
    for fot, checkpointing in (({}, False),
                               ({**chunked, "scan_query_chunk_size": 3, "scan_key_chunk_size": 7}, False),
                               ({**chunked, "scan_query_chunk_size": 64, "scan_key_chunk_size": 4}, True)):
        model = tiny_model(mem_layers=(0, 2), fot=fot).train()
        model.activation_checkpointing = checkpointing
        loss = model(ids, labels=labels, cross_batch_range=3, dataset_packing=4).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=1e-6, rtol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, results[0][1][name], atol=2e-6, rtol=1e-4, msg=name)


def test_half_precision_computes_in_float32():
    """bf16 activations: both paths compute logits and softmax in float32 and agree to bf16 precision with fp32."""
    layout = cross_batch_layout(8, 3, 4)
    inputs = [torch.randn(8, h, 9, 16) for h in (4, 2, 2, 2)]
    exact = cross_batch_attention(*inputs, layout, impl="eager")
    for impl in ("sdpa", "chunked"):
        out = cross_batch_attention(*(x.bfloat16() for x in inputs), layout, impl=impl, q_chunk=4, k_chunk=5)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), exact, atol=3e-2, rtol=3e-2)


def test_chunked_gradcheck():
    layout = cross_batch_layout(2, 1)
    inputs = [torch.randn(2, h, 3, 2, dtype=torch.float64, requires_grad=True) for h in (2, 1, 1, 1)]
    fn = lambda q, kl, kf, v: cross_batch_attention(q, kl, kf, v, layout, impl="chunked", q_chunk=2, k_chunk=4)
    assert torch.autograd.gradcheck(fn, inputs)


def test_layout_reported_in_output_extras():
    model = tiny_model()
    out = model(torch.randint(0, 61, (8, 5)), cross_batch_ranges=[0, 3, 7, 7])
    layout = out.extras["fot_layout"]
    assert layout.ranges == (0, 1, 2, 3, 0, 3, 6, 7)
    # options hold defaults; a batch's cross_batch_range replaces explicit ranges given as options (evaluation)
    model = tiny_model(fot={"cross_batch_ranges": [0, 1]})
    assert model(torch.randint(0, 61, (4, 5))).extras["fot_layout"].ranges == (0, 1, 0, 1)
    assert model(torch.randint(0, 61, (4, 5)), cross_batch_range=0).extras["fot_layout"] is None


def test_training_errors():
    with pytest.raises(ConfigError, match="dropout"):
        tiny_model(fot={"dropout": 0.1})
    with pytest.raises(ConfigError, match="mem_attention_grouping"):
        tiny_model(fot={"mem_attention_grouping": [0, 4]})
    with pytest.raises(ConfigError, match="mem_dtype"):
        tiny_model(fot={"mem_dtype": "int8"})
    model = tiny_model()
    ids = torch.randint(0, 61, (6, 5))
    with pytest.raises(ValueError, match="not divisible by dataset_packing=4"):
        model(ids, cross_batch_range=1, dataset_packing=4)
    with pytest.raises(ValueError, match="larger than a microbatch of 6 rows"):
        model(ids, cross_batch_range=6)
    with pytest.raises(ValueError, match="does not mask packed documents"):
        model(ids, position_ids=torch.tensor([0, 1, 0, 1, 2]).expand(6, 5), cross_batch_range=1)
    with pytest.raises(ValueError, match="start at 0"):
        model(ids, position_ids=torch.arange(3, 8).expand(6, 5), cross_batch_range=1)


# ----------------------------------------------------------------------------------------------------- inference
def window_starts(calls: list[int], window: int, lc: int) -> list[int]:
    """LongLLaMA's schedule (spec §3), written out independently of FoTSession: the start of the local window each token
    is processed in. First call: W-chunks of the first N-Lc tokens each form their own window, the last Lc tokens start
    a new one. Later calls (and generated tokens) extend the window, which restarts at the new tokens when it would
    exceed W."""
    ws: list[int] = []
    start, local = 0, 0
    for i, n in enumerate(calls):
        base, prefix = len(ws), max(n - lc, 0)
        pieces = [(base + c, min(c + window, prefix) - c) for c in range(0, prefix, window)]
        pieces.append((base + prefix, n - prefix))
        for j, (first, m) in enumerate(pieces):
            if (i == 0 and j > 0) or local + m > window:
                start, local = first, 0
            ws += [start] * m
            local += m
            if i == 0 and j < len(pieces) - 1:
                local = 0
    return ws


def test_window_starts_rule():
    assert window_starts([10], 16, 6) == [0] * 4 + [4] * 6
    assert window_starts([40], 16, 6) == [0] * 16 + [16] * 16 + [32] * 2 + [34] * 6
    assert window_starts([20, 1, 1], 8, 4) == [0] * 8 + [8] * 8 + [16] * 4 + [16, 16]
    assert window_starts([4, 3, 3], 8, 4) == [0] * 4 + [0] * 3 + [7] * 3


def reference_logits(model: Transformer, ids: torch.Tensor, ws: list[int], top_k: int | None = None) -> torch.Tensor:
    """Slow recomputation: token t attends to [ws(t), t] at positions t' - ws(t) and, in FoT layers, to every token
    before ws(t) at position 0 (optionally only the top_k memory keys per head), one float64 softmax."""
    h = model.model.embed_tokens(ids)
    groups = [(s, [t for t, w in enumerate(ws) if w == s]) for s in sorted(set(ws))]
    for layer in model.layers:
        attn = layer.self_attn
        memory_layer = isinstance(attn, FoTAttention)
        positional = not memory_layer or attn.mem_positionals
        q, k, v = attn.project(layer.input_layernorm(h))  # (B, N, heads, D)
        rep = attn.n_heads // attn.n_kv_heads
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        out = torch.empty_like(q)
        for s, tokens in groups:  # the tokens processed in the window that starts at s
            t0, t1 = tokens[0], tokens[-1] + 1
            assert tokens == list(range(t0, t1))
            qs, kl = q[:, t0:t1], k[:, s:t1]
            if positional:
                qs, kl = rope_at(model, qs, torch.arange(t0 - s, t1 - s)), rope_at(model, kl, torch.arange(t1 - s))
            scores = torch.einsum("bqhd,bkhd->bhqk", qs.double(), kl.double()) * attn.scale
            causal = torch.arange(s, t1)[None, :] <= torch.arange(t0, t1)[:, None]
            scores = scores.masked_fill(~causal, float("-inf"))
            values = v[:, s:t1]
            if memory_layer and s > 0:
                km = rope_at(model, k[:, :s], torch.zeros(s, dtype=torch.long)) if positional else k[:, :s]
                mem = torch.einsum("bqhd,bkhd->bhqk", qs.double(), km.double()) * attn.scale
                if top_k is not None and top_k < s:
                    kth = mem.topk(top_k, dim=-1).values[..., -1:]
                    mem = mem.masked_fill(mem < kth, float("-inf"))
                scores = torch.cat([scores, mem], dim=-1)
                values = torch.cat([values, v[:, :s]], dim=1)
            probs = torch.softmax(scores, dim=-1)  # (B, H, queries, keys)
            out[:, t0:t1] = torch.einsum("bhqk,bkhd->bqhd", probs, values.double()).float()
        h = h + attn.o_proj(out.flatten(2))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(model.model.norm(h)).float()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=W, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(path)
    return path, model


def test_short_inputs_equal_transformers(hf_dir):
    """Oracle 11: N ≤ last_context_length with empty state, and models without memory layers, are vanilla LLaMA."""
    from lit_longctx.hf import from_hf

    path, hf = hf_dir
    ids = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        expected = hf(ids).logits
    fot = from_hf(path, layer_attention={0: "fot", 2: "fot"},
                  attention_options={"fot": {"last_context_length": 12, "mem_dtype": "float32"}}).eval()
    with torch.no_grad():
        session = session_for(fot, batch_size=2)
        assert isinstance(session, FoTSession) and session.last_context_length == 12
        torch.testing.assert_close(session.forward_logits(ids), expected, atol=1e-5, rtol=1e-5)
        assert session.memory_lengths == [0, 0, 0]
        torch.testing.assert_close(fot(ids).logits, expected, atol=1e-5, rtol=1e-5)  # training path, r = 0
        plain = from_hf(path).eval()
        assert type(session_for(plain)) is not FoTSession
        torch.testing.assert_close(FoTSession(plain, 2, last_context_length=12).forward_logits(ids), expected,
                                   atol=1e-5, rtol=1e-5)
        new = generate(fot, ids[:1], max_new_tokens=5)[0]
        expected_new = hf.generate(ids[:1], max_new_tokens=5, do_sample=False)[0, 10:].tolist()
    assert new == expected_new  # 15 tokens in all: within W, so no eviction and plain LLaMA decoding


@pytest.mark.parametrize("fot", [{}, {"mem_positionals": False}, {"mem_attention_grouping": [1, 3]}])
def test_long_input_equals_slow_reference(fot):
    """Oracle 12: memory of N - Lc tokens in memory layers, none elsewhere, every logit as the slow reference."""
    model = tiny_model(mem_layers=(0, 2), fot=fot)
    ids = torch.randint(0, 61, (2, 45))
    with torch.no_grad():
        session = FoTSession(model, batch_size=2)
        logits = session.forward_logits(ids)
        expected = reference_logits(model, ids, window_starts([45], W, 6))
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-5)
    assert session.memory_lengths == [39, 0, 39]
    assert session.state.caches[1].length == 6 and session.state.caches[0].local_length == 6


def test_long_input_equals_manual_chunked_feeding():
    """Oracle 12: one call equals feeding W-chunks then the last Lc tokens by hand with explicit state."""
    model = tiny_model(mem_layers=(1,), fot={"last_context_length": 8})
    ids = torch.randint(0, 61, (1, 41))  # prefix 33 = 16 + 16 + 1
    with torch.no_grad():
        one_call = FoTSession(model).forward_logits(ids)
        state = model.new_state(1)
        pieces = []
        for start, end in ((0, 16), (16, 32), (32, 33), (33, 41)):
            out = model(ids[:, start:end], position_ids=torch.arange(end - start)[None], state=state)
            pieces.append(out.logits)
            if end <= 33:  # prefix chunk: memory layers keep it as memory, the others forget it
                state.caches[1].evict()
                state.caches[0] = KVCache(1, 2, 8, torch.device("cpu"), torch.float32)
                state.caches[2] = KVCache(1, 2, 8, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(one_call, torch.cat(pieces, dim=1), atol=1e-6, rtol=1e-6)
    assert state.caches[1].memory_length == 33


@pytest.mark.parametrize("mem_layers", [(1,), (0, 2)])
def test_cross_batch_training_equals_session(mem_layers):
    """Training and inference see the same thing: the windows of one document as consecutive rows with cross-batch
    range r (every row seeing all earlier windows of its document, no negatives) give the logits that FoTSession gives
    when it feeds the document with the earlier windows going to memory W at a time and the last W tokens local."""
    model = tiny_model(mem_layers=mem_layers)
    ids = torch.randint(0, 61, (2, 4 * W))
    with torch.no_grad():
        session = FoTSession(model, batch_size=2, last_context_length=W).forward_logits(ids)
        for row in range(2):
            windows = ids[row].reshape(4, W)  # rows b = windows b of one document: row b sees rows b-1..0
            train = model(windows, cross_batch_range=3, dataset_packing=1, cross_batch_stepping=False).logits
            torch.testing.assert_close(train.reshape(4 * W, -1), session[row], atol=1e-5, rtol=1e-5)
            if len(mem_layers) == 1:  # doc_aware_k4 pack after another: its last window sees its 3 positives only
                pack = model(torch.cat([windows.flip(0), windows]), cross_batch_range=3, dataset_packing=4).logits
                torch.testing.assert_close(pack[7], session[row, 3 * W :], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(pack[4], session[row, :W], atol=1e-5, rtol=1e-5)


def test_continuation_and_generation_across_eviction():
    """Oracle 15: prompt, a continuation call, then greedy tokens across two evictions, against the slow replay."""
    model = tiny_model(mem_layers=(1,), fot={"last_context_length": 5})
    prompt = torch.randint(0, 61, (2, 23))
    more = torch.randint(0, 61, (2, 9))
    steps = 20
    with torch.no_grad():
        session = FoTSession(model, batch_size=2)
        logits = [session.forward_logits(prompt), session.forward_logits(more)]
        seq = torch.cat([prompt, more], dim=1)
        for _ in range(steps):
            nxt = logits[-1][:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            logits.append(session.step(nxt)[:, None])
        ws = window_starts([23, 9] + [1] * steps, W, 5)
        expected = reference_logits(model, seq, ws)
    assert len(set(ws[32:])) >= 2  # the generated tokens crossed an eviction
    torch.testing.assert_close(torch.cat(logits, dim=1), expected, atol=2e-5, rtol=1e-5)
    assert (expected[:, 31:-1].argmax(-1) == seq[:, 32:]).all()  # greedy replay picks the same tokens
    assert session.memory_lengths[1] == ws[-1] and session.local_length == len(ws) - ws[-1]
    with torch.no_grad():  # generate() drives the same session
        tokens = generate(model, prompt, max_new_tokens=12)
        replay = torch.cat([prompt, torch.tensor(tokens)], dim=1)
        ref = reference_logits(model, replay, window_starts([23] + [1] * 12, W, 5))
    assert (ref[:, 22:-1].argmax(-1) == replay[:, 23:]).all()


@pytest.mark.parametrize("variant", [{"mem_attention_grouping": [1, 1]}, {"mem_attention_grouping": [4, 2048]},
                                     {"mem_attention_grouping": [3, 5]}, {"torch_attention": True},
                                     {"torch_attention": True, "mem_attention_grouping": [2, 4]}])
def test_grouping_and_torch_attention_are_identical(variant):
    """Oracle 13."""
    ids = torch.randint(0, 61, (2, 50))
    with torch.no_grad():
        base = FoTSession(tiny_model(mem_layers=(0, 1)), batch_size=2).forward_logits(ids)
        out = FoTSession(tiny_model(mem_layers=(0, 1), fot=variant), batch_size=2).forward_logits(ids)
    torch.testing.assert_close(out, base, atol=2e-6, rtol=1e-6)


def test_top_k_retrieval():
    ids = torch.randint(0, 61, (2, 40))
    with torch.no_grad():
        dense = FoTSession(tiny_model(), batch_size=2).forward_logits(ids)
        covering = FoTSession(tiny_model(fot={"top_k": 34}), batch_size=2).forward_logits(ids)  # ≥ 34 memory tokens
        model = tiny_model(fot={"top_k": 3})
        sparse = FoTSession(model, batch_size=2).forward_logits(ids)
        expected = reference_logits(model, ids, window_starts([40], W, 6), top_k=3)
    torch.testing.assert_close(covering, dense, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sparse, expected, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(sparse, dense, atol=1e-3)


def test_memory_dtype_and_masks():
    ids = torch.randint(0, 61, (1, 40))
    with torch.no_grad():
        exact = FoTSession(tiny_model()).forward_logits(ids)
        session = FoTSession(tiny_model(fot={"mem_dtype": "bfloat16"}))
        stored = session.forward_logits(ids)
    keys, values, masks = session.state.caches[1].memory()
    assert keys.dtype == values.dtype == torch.bfloat16 and masks.dtype == torch.float32
    assert (masks == 0).all()
    torch.testing.assert_close(stored, exact, atol=0.05, rtol=0.05)  # bf16 storage, fp32 compute
    assert not torch.equal(stored, exact)
    # oracle 14 (layer level): a masked memory entry receives no weight, however large its logit
    cache = FoTCache(1, 2, 8, torch.device("cpu"), torch.float32)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    mk, mv = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    cache.add_to_memory(mk, mv)
    without = memory_attention(q, k, v, cache.memory())
    cache.add_to_memory(q[:, ::2, :1] * 100, torch.full((1, 2, 1, 8), 1e3),
                        mask=torch.full((1, 1), torch.finfo(torch.float32).min))
    torch.testing.assert_close(memory_attention(q, k, v, cache.memory()), without, atol=1e-6, rtol=1e-6)


def test_session_errors():
    model = tiny_model()
    with pytest.raises(ConfigError, match="last_context_length=17 must lie in"):
        FoTSession(model, last_context_length=17)
    session = FoTSession(model)
    with pytest.raises(ValueError, match="at least one token"):
        session.forward_logits(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="pass cross_batch_range=0"):
        model(torch.zeros(2, 3, dtype=torch.long), state=model.new_state(2), cross_batch_range=1)
