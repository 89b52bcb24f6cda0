"""RoPE tables and scaling kinds against float64 reference formulas and transformers' own functions.

Oracles: pretraining spec §7.4-7.8 (closed-form values), float64 recomputations of the published formulas, and
``transformers.modeling_rope_utils`` / ``LlamaRotaryEmbedding`` (independent implementation).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import (
    _compute_dynamic_ntk_parameters,
    _compute_llama3_parameters,
    _compute_yarn_parameters,
)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from lit_longctx.nn import ModelConfig, RopeConfig, Transformer
from lit_longctx.nn.rope import (
    RotaryEmbedding,
    apply_rotary,
    compute_inv_freq,
    dynamic_ntk_theta,
    llama3_inv_freq,
    yarn_inv_freq,
)


def reference_tables(positions: torch.Tensor, theta: float, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 cos/sin of p·θ^(-2i/Q), concatenated twice (half-rotated layout), written out from the definition."""
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    inv = torch.tensor([theta ** (-2.0 * k / head_dim) for k in i.tolist()], dtype=torch.float64)
    a = positions.to(torch.float64).unsqueeze(-1) * inv
    a = torch.cat([a, a], dim=-1)
    return a.cos(), a.sin()


def plain(theta: float = 1e4, head_dim: int = 128, max_seq_len: int = 4096) -> RotaryEmbedding:
    return RotaryEmbedding(RopeConfig(rope_theta=theta), head_dim, max_seq_len)


def hf_rope_config(head_dim: int, max_pos: int, params: dict) -> LlamaConfig:
    return LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim,
                       max_position_embeddings=max_pos, rope_parameters=params)


# --------------------------------------------------------------------------------------------------- plain RoPE
def test_default_tables_equal_float64_reference():
    pos = torch.arange(4096)
    cos, sin = plain()(pos)
    ref_cos, ref_sin = reference_tables(pos, 1e4, 128)
    assert cos.shape == sin.shape == (4096, 128) and cos.dtype == sin.dtype == torch.float32
    torch.testing.assert_close(cos.double(), ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin.double(), ref_sin, atol=1e-6, rtol=0)


def test_tables_follow_arbitrary_position_shapes():
    pos = torch.tensor([[0, 5, 3], [9, 9, 1]])
    cos, sin = plain(head_dim=16)(pos)
    ref_cos, ref_sin = reference_tables(pos, 1e4, 16)
    assert cos.shape == (2, 3, 16)
    torch.testing.assert_close(cos.double(), ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin.double(), ref_sin, atol=1e-6, rtol=0)


def test_scale_one_equals_plain_rope():
    pos = torch.arange(3000)
    ref = plain()(pos)
    for rope in (RopeConfig(rope_type="linear", factor=1.0), RopeConfig(freq_scale=1.0),
                 RopeConfig(rope_type="dynamic", factor=1.0)):
        got = RotaryEmbedding(rope, 128, 4096)(pos)
        torch.testing.assert_close(got, ref, atol=0, rtol=0)


@pytest.mark.parametrize("factor", [2.0, 4.0, 8.0])
def test_linear_factor_at_p_equals_plain_at_p_over_factor(factor):
    pos = torch.arange(0, 20000, 7)
    got = RotaryEmbedding(RopeConfig(rope_type="linear", factor=factor), 128, 4096)(pos)
    ref = plain()(pos.double() / factor)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("freq_scale", [0.125, 0.5, 0.83])
def test_freq_scale_at_p_equals_plain_at_p_times_scale(freq_scale):
    pos = torch.arange(0, 20000, 7)
    got = RotaryEmbedding(RopeConfig(freq_scale=freq_scale), 128, 4096)(pos)
    ref = plain()(pos.double() * freq_scale)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_freq_scale_is_reciprocal_of_linear_factor():
    pos = torch.arange(10000)
    a = RotaryEmbedding(RopeConfig(freq_scale=0.25), 128, 4096)(pos)
    b = RotaryEmbedding(RopeConfig(rope_type="linear", factor=4.0), 128, 4096)(pos)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------- precision
def test_tables_stay_exact_above_65k_while_bf16_recipe_is_far_off():
    pos = torch.tensor([65_537, 70_001, 100_003, 131_071, 262_143, 1_000_003])
    cos, sin = plain()(pos)
    ref_cos, ref_sin = reference_tables(pos, 1e4, 128)
    assert (cos.double() - ref_cos).abs().max() < 1e-6
    assert (sin.double() - ref_sin).abs().max() < 1e-6
    # The pre-fix recipe (gpt-neox #1003): bf16 positions times bf16 inverse frequencies.
    inv_bf16 = (1.0 / 1e4 ** (torch.arange(0, 128, 2).float() / 128)).bfloat16()
    angles = pos.bfloat16().unsqueeze(-1) * inv_bf16
    bad_cos = torch.cat([angles, angles], -1).float().cos().double()
    assert (bad_cos - ref_cos).abs().max() > 1.0


def test_bf16_cannot_hold_positions_above_256():
    assert torch.tensor(257.0).bfloat16().item() == 256.0
    assert torch.tensor(4095.0).bfloat16().item() == 4096.0


def test_model_cast_to_bf16_keeps_fp32_exact_tables():
    """Spec §7.6: T=4096, Q=128, θ=1e4; ≤ 3e-4 before and ≤ 5e-3 after the final bf16 cast; pre-fix recipe ≈ 2."""
    config = ModelConfig(vocab_size=16, dim=128, n_layers=1, n_heads=1, ffn_dim=32, max_seq_len=4096)
    model = Transformer(config).to(torch.bfloat16)
    assert not any("freq" in k or "rope" in k for k in model.state_dict())  # nothing a cast or checkpoint can touch
    pos = torch.arange(4096).unsqueeze(0)
    ctx = model.context(torch.zeros_like(pos), pos, None, {})
    ref_cos, _ = reference_tables(pos, 1e4, 128)
    assert ctx.cos.dtype == torch.float32
    assert (ctx.cos.double() - ref_cos).abs().max() <= 3e-4
    assert (ctx.cos.bfloat16().double() - ref_cos).abs().max() <= 5e-3
    t = torch.arange(4096, dtype=torch.bfloat16)
    inv = (1.0 / (1e4 ** (torch.arange(0, 128, 2).float() / 128))).bfloat16()
    prefix = torch.outer(t, inv)
    prefix_cos = torch.cat([prefix, prefix], -1).cos().double()
    assert (prefix_cos - ref_cos[0]).abs().max() > 1.5


def test_rotation_runs_in_fp32_for_bf16_inputs():
    x = torch.randn(2, 300, 4, 64)
    cos, sin = plain(head_dim=64)(torch.arange(300).unsqueeze(0))
    ref = apply_rotary(x, cos.unsqueeze(2), sin.unsqueeze(2))
    got = apply_rotary(x.bfloat16(), cos.unsqueeze(2), sin.unsqueeze(2))
    assert got.dtype == torch.bfloat16
    # Only the input and the output roundings of bf16 (2^-8 relative each), no error from the tables.
    torch.testing.assert_close(got.float(), ref, atol=0.05, rtol=0.02)


# ----------------------------------------------------------------------------------------------------- rotation
def test_rotation_equals_complex_multiplication_of_half_pairs():
    """Half-rotated layout: pair i is (x_i, x_{i+Q/2}) rotated by angle p·inv_i, i.e. (x_i + i·x_{i+Q/2})·e^{ia}."""
    x = torch.randn(5, 32, dtype=torch.float64)
    pos = torch.arange(5) * 37
    cos, sin = plain(head_dim=32)(pos)
    got = apply_rotary(x.float(), cos, sin).double()
    z = torch.complex(x[:, :16], x[:, 16:])
    angles = pos.double().unsqueeze(1) * torch.tensor([1e4 ** (-2 * i / 32) for i in range(16)], dtype=torch.float64)
    rz = z * torch.polar(torch.ones_like(angles), angles)
    torch.testing.assert_close(got, torch.cat([rz.real, rz.imag], -1), atol=1e-5, rtol=0)


def test_scores_depend_only_on_relative_position():
    q, k = torch.randn(64), torch.randn(64)
    rope = plain(head_dim=64)

    def score(pq: int, pk: int) -> float:
        cq, sq = rope(torch.tensor([pq]))
        ck, sk = rope(torch.tensor([pk]))
        return float(apply_rotary(q, cq[0], sq[0]) @ apply_rotary(k, ck[0], sk[0]))

    assert score(10, 3) == pytest.approx(score(1010, 1003), abs=1e-4)
    assert score(100, 250) == pytest.approx(score(70_100, 70_250), abs=1e-4)
    assert abs(score(10, 3) - score(10, 4)) > 1e-3


# --------------------------------------------------------------------------------------------------------- YaRN
def yarn(factor: float, l0: int = 4096, **kw) -> RopeConfig:
    return RopeConfig(rope_type="yarn", factor=factor, original_max_position_embeddings=l0, **kw)


def test_yarn_correction_range_and_attention_factors():
    """Q=128, θ=1e4, L0=4096, β=32/1: low=20, high=46; pairs up to 20 keep their frequency (the ramp is 0 at low),
    pairs ≥ 46 are divided by f, pairs in between are interpolated."""
    plain_inv = 1.0 / 1e4 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    inv, attn = yarn_inv_freq(yarn(4.0), 128, 16384)
    torch.testing.assert_close(inv[:21], plain_inv[:21], atol=0, rtol=1e-12)
    torch.testing.assert_close(inv[46:], plain_inv[46:] / 4.0, atol=0, rtol=1e-12)
    ramp = (torch.arange(21, 46, dtype=torch.float64) - 20) / (46 - 20)
    expected = plain_inv[21:46] * (1 - ramp) + plain_inv[21:46] / 4.0 * ramp
    torch.testing.assert_close(inv[21:46], expected, atol=0, rtol=1e-12)
    assert attn == pytest.approx(1.138629, abs=1e-6)
    assert yarn_inv_freq(yarn(16.0), 128, 65536)[1] == pytest.approx(1.277259, abs=1e-6)
    # The closed form of the correction dims: dim(r) = Q·ln(L0/(2πr))/(2·ln θ).
    low = 128 * math.log(4096 / (32 * 2 * math.pi)) / (2 * math.log(1e4))
    high = 128 * math.log(4096 / (1 * 2 * math.pi)) / (2 * math.log(1e4))
    assert (math.floor(low), math.ceil(high)) == (20, 46)


def test_yarn_multiplies_tables_by_attention_factor():
    pos = torch.arange(100)
    cos, sin = RotaryEmbedding(yarn(4.0), 128, 16384)(pos)
    inv, attn = yarn_inv_freq(yarn(4.0), 128, 16384)
    a = pos.double().unsqueeze(1) * inv
    torch.testing.assert_close(cos.double(), torch.cat([a, a], -1).cos() * attn, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin.double(), torch.cat([a, a], -1).sin() * attn, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("factor", "l0", "extra"),
    [(4.0, 4096, {}), (16.0, 4096, {}), (2.0, 2048, {}), (8.0, 32, {"beta_fast": 16.0, "beta_slow": 2.0}),
     (4.0, 4096, {"mscale": 1.0, "mscale_all_dim": 0.5}), (4.0, 4096, {"truncate": False}),
     (4.0, 4096, {"attention_factor": 1.5})],
)
def test_yarn_matches_transformers(factor, l0, extra):
    params = {"rope_type": "yarn", "rope_theta": 1e4, "factor": factor, "original_max_position_embeddings": l0,
              **extra}
    hf_inv, hf_attn = _compute_yarn_parameters(hf_rope_config(128, int(factor * l0), params))
    inv, attn = yarn_inv_freq(yarn(factor, l0, **extra), 128, int(factor * l0))
    torch.testing.assert_close(inv.float(), hf_inv, rtol=1e-6, atol=0)
    assert attn == pytest.approx(hf_attn, rel=1e-12)


def test_yarn_without_factor_uses_context_ratio():
    rope = RopeConfig(rope_type="yarn", original_max_position_embeddings=1024)
    inv, attn = yarn_inv_freq(rope, 64, 8192)
    ref_inv, ref_attn = yarn_inv_freq(yarn(8.0, 1024), 64, 8192)
    torch.testing.assert_close(inv, ref_inv)
    assert attn == ref_attn == pytest.approx(0.1 * math.log(8.0) + 1.0)


# ------------------------------------------------------------------------------------------------------- llama3
def llama3(factor: float = 8.0, l0: int = 8192, theta: float = 5e5) -> RopeConfig:
    return RopeConfig(rope_theta=theta, rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=l0)


def test_llama3_pair_ranges():
    """Q=128, θ=5e5, f=8, lf=1, hf=4, L0=8192: pairs 0-28 unchanged, 35-63 divided by 8, 29-34 smoothed."""
    base = 1.0 / 5e5 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    inv = llama3_inv_freq(llama3(), 128)
    torch.testing.assert_close(inv[:29], base[:29], atol=0, rtol=1e-12)
    torch.testing.assert_close(inv[35:], base[35:] / 8, atol=0, rtol=1e-12)
    mid = inv[29:35]
    assert bool(((mid < base[29:35]) & (mid > base[29:35] / 8)).all())
    # smoothing weight s = (L0/λ - lf)/(hf - lf): inv = (1 - s)·inv/f + s·inv
    s = (8192 * base[29:35] / (2 * math.pi) - 1.0) / 3.0
    torch.testing.assert_close(mid, (1 - s) * base[29:35] / 8 + s * base[29:35], atol=0, rtol=1e-12)


@pytest.mark.parametrize(("factor", "l0", "theta"), [(8.0, 8192, 5e5), (32.0, 8192, 5e5), (4.0, 2048, 1e4)])
def test_llama3_matches_transformers(factor, l0, theta):
    params = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": l0}
    hf_inv, _ = _compute_llama3_parameters(hf_rope_config(128, 131072, params))
    inv = llama3_inv_freq(llama3(factor, l0, theta), 128)
    torch.testing.assert_close(inv.float(), hf_inv, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------- dynamic NTK
def test_dynamic_ntk_theta_closed_form():
    # Q=128, f=2, Lmax=4096, L=8192: θ' = 1e4·(2·2 - 1)^(128/126)
    assert dynamic_ntk_theta(1e4, 2.0, 128, 8192, 4096) == pytest.approx(10000 * 3 ** (128 / 126), rel=1e-12)
    assert dynamic_ntk_theta(1e4, 2.0, 128, 8192, 4096) == pytest.approx(30527.7, abs=0.05)
    # NTK-aware base for α = 2 (f = 1 at L = 2·Lmax reduces to θ·α^(Q/(Q-2)))
    assert dynamic_ntk_theta(1e4, 1.0, 128, 8192, 4096) == pytest.approx(20221.3, abs=0.05)
    # within the trained context nothing changes
    assert dynamic_ntk_theta(1e4, 2.0, 128, 1000, 4096) == 1e4


def test_dynamic_tables_grow_with_sequence_only_beyond_max():
    rope = RotaryEmbedding(RopeConfig(rope_type="dynamic", factor=2.0), 128, 4096)
    short = torch.arange(4096)
    torch.testing.assert_close(rope(short), plain()(short), atol=0, rtol=0)
    long = torch.arange(8192)
    cos, sin = rope(long)
    ref_cos, ref_sin = reference_tables(long, 10000 * 3 ** (128 / 126), 128)
    torch.testing.assert_close(cos.double(), ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin.double(), ref_sin, atol=1e-6, rtol=0)
    # explicit seq_len (e.g. one decoding step at position 8191) gives the same θ'
    step = rope(torch.tensor([8191]), seq_len=8192)
    torch.testing.assert_close(step[0][0], cos[-1])


@pytest.mark.parametrize("seq_len", [4096, 5000, 8192, 20000])
def test_dynamic_matches_transformers(seq_len):
    params = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
    hf_inv, _ = _compute_dynamic_ntk_parameters(hf_rope_config(128, 4096, params), seq_len=seq_len)
    inv, _ = compute_inv_freq(RopeConfig(rope_type="dynamic", factor=2.0), 128, 4096, seq_len)
    torch.testing.assert_close(inv.float(), hf_inv, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------ whole tables vs transformers
@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "default"},
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 256},
    ],
    ids=lambda p: p["rope_type"],
)


def test_tables_match_transformers_rotary_embedding(params):
    """Positions up to 4x the trained context; HF builds its tables in fp32, so the tolerance is fp32 angle error."""
    config = hf_rope_config(64, 1024, {"rope_theta": 1e4, **params})
    hf = LlamaRotaryEmbedding(config)
    pos = torch.arange(4096).unsqueeze(0)
    hf_cos, hf_sin = hf(torch.zeros(1, dtype=torch.float32), pos)
    ours = RotaryEmbedding(RopeConfig.from_hf(1e4, params), 64, 1024)
    cos, sin = ours(pos)
    # fp32 angles of HF at position 4096 carry ~4096·2^-24 rad of error
    torch.testing.assert_close(cos, hf_cos, atol=1e-3, rtol=0)
    torch.testing.assert_close(sin, hf_sin, atol=1e-3, rtol=0)
    torch.testing.assert_close(cos[:, :64], hf_cos[:, :64], atol=1e-5, rtol=0)
