"""FLOP formulas and utilisation ratios against hand-derived numbers (spec pretraining §7 oracles 1 and 3)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lit_longctx.flops import (
    flops_per_batch,
    flops_per_token,
    measured_flops_per_batch,
    mfu,
    mtu,
    palm_flops_per_token,
)
from lit_longctx.nn import ModelConfig, Transformer
from lit_longctx.nn.attention import register_attention
from lit_longctx.nn.attention.causal import CausalAttention


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=80, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


def matmul_params(c: ModelConfig) -> int:
    """Weights that take part in a matmul, written out from the shapes: q, k, v, o, gate, up, down, lm_head."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    per_layer = c.dim * q + 2 * c.dim * kv + q * c.dim + 3 * c.dim * c.ffn_dim
    return c.n_layers * per_layer + c.vocab_size * c.dim


@register_attention("test_flops_costly")
class CostlyAttention(CausalAttention):
    """A kind with its own cost and one extra weight, as linear-attention or memory kinds have."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.feature_map = nn.Parameter(torch.zeros(config.head_dim, 3))

    def flops_per_token(self, context_len):
        return 1000.0 + context_len


@register_attention("test_flops_data_dependent")
class DataDependentAttention(CausalAttention):
    """A kind whose forward reads a value (as block-retrieval kinds do), impossible on the meta device."""

    def forward(self, x, ctx, cache=None):
        if int(x.abs().sum()) < 0:
            raise AssertionError("unreachable")
        return super().forward(x, ctx, cache)


# ---------------------------------------------------------------------------------------------- oracle 1 (ALLaMo)
def test_allamo_mfu_and_mtu_oracle():
    f_tok = palm_flops_per_token(1e9, n_layers=20, n_heads=16, head_dim=128, seq_len=2048)
    assert f_tok == 7_006_632_960
    f_iter = f_tok * 2048 * 8  # T · (B·G)
    assert f_iter == pytest.approx(1.1479667e14, rel=1e-7)
    assert mfu(f_iter, seconds=1.0, peak_flops=312e12) == pytest.approx(0.367938, abs=5e-7)
    assert mtu(model_time=1.0 - 0.25, iteration_time=1.0) == 0.75


def test_allamo_1b_preset_counts_all_parameters_with_include_embedding():
    c = ModelConfig.from_preset("allamo-1b")
    # d=2048, f=5632, V=8000, 20 layers: 20·(4·d² + 3·d·f + 2·d) + d + 2·V·d, by hand
    n_all = 1_060_456_448
    with torch.device("meta"):
        assert sum(p.numel() for p in Transformer(c).parameters()) == n_all  # ALLaMo's sum(p.numel())
    attn = 12 * 20 * 16 * 128 * 2048
    assert flops_per_token(c, 2048, include_embedding=True) == 6 * n_all + attn
    assert flops_per_token(c, 2048) == 6 * (n_all - 8000 * 2048) + attn


@pytest.mark.parametrize("tie", [False, True])
def test_config_and_built_model_agree(tie):
    c = tiny(tie_embeddings=tie, attention_bias=True)
    model = Transformer(c)
    for emb in (False, True):
        assert flops_per_token(c, 48, include_embedding=emb) == flops_per_token(model, 48, include_embedding=emb)
    # a tied table is the lm_head weight: its matmul stays counted even without the embedding
    n = sum(p.numel() for p in model.parameters())
    expected_n = n if tie else n - c.vocab_size * c.dim
    assert flops_per_token(c, 48) == 6 * expected_n + 12 * c.n_layers * c.n_heads * c.head_dim * 48


def test_attention_kind_with_its_own_cost_is_used_per_layer():
    c = tiny(layer_attention={1: "test_flops_costly"})
    n = tiny().num_params(include_embedding=False) + c.head_dim * 3  # + the kind's extra weight
    expected = 6 * n + 12 * c.n_heads * c.head_dim * 40 + (1000 + 40)  # layer 0 softmax, layer 1 its own cost
    assert flops_per_token(c, 40) == expected
    assert flops_per_token(Transformer(c), 40) == expected


def test_flops_per_batch_scales_with_batch_and_tensor_parallel():
    c = tiny()
    per_token = flops_per_token(c, 32)
    assert flops_per_batch(c, 3, 32) == per_token * 3 * 32
    assert flops_per_batch(c, 3, 32, tensor_parallel=4) == per_token * 3 * 32 / 4
    assert flops_per_batch(c, 2, 32, formula="measured", tensor_parallel=2) == measured_flops_per_batch(c, 2, 32) / 2


# -------------------------------------------------------------------------------------------- oracle 3 (measured)
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_measured_flops_equal_matmul_params_plus_dense_attention(backend, n_kv_heads):
    # on the meta device torch 2.13 runs SDPA through its math path, so SDPA counts 12·L·H·Q·T²·B like eager (GQA too)
    c = tiny(attn_backend=backend, n_kv_heads=n_kv_heads)
    b, t = 3, 24
    expected = 6 * matmul_params(c) * b * t + 12 * c.n_layers * c.n_heads * c.head_dim * t * t * b
    assert measured_flops_per_batch(c, b, t) == expected
    assert flops_per_token(c, t, formula="measured") == measured_flops_per_batch(c, 1, t) / t


def test_measured_differs_from_palm_by_norms_and_biases_only():
    c = tiny(attention_bias=True, mlp_bias=True)
    b, t = 2, 16
    norms = (2 * c.n_layers + 1) * c.dim
    biases = c.n_layers * (c.n_heads * c.head_dim + 2 * c.n_kv_heads * c.head_dim + c.dim + 2 * c.ffn_dim + c.dim)
    assert flops_per_batch(c, b, t) - measured_flops_per_batch(c, b, t) == 6 * (norms + biases) * b * t


def test_measured_on_a_real_cpu_model_matches_meta():
    c = tiny(attn_backend="eager")
    assert measured_flops_per_batch(c, 2, 16, device="cpu") == measured_flops_per_batch(c, 2, 16)


def test_cpu_fused_sdpa_is_invisible_to_the_flop_counter_so_measuring_there_is_refused():
    q = k = v = torch.randn(1, 2, 8, 4)
    counter = FlopCounterMode(display=False)
    with counter:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert counter.get_total_flops() == 0  # why measured_flops_per_batch refuses cpu + sdpa
    with pytest.raises(ValueError, match="device='meta'"):
        measured_flops_per_batch(tiny(), 1, 8, device="cpu")


def test_a_model_that_reads_values_cannot_be_measured_on_meta_and_says_what_to_do():
    c = tiny(attn_backend="eager", layer_attention={0: "test_flops_data_dependent"})
    with pytest.raises(ValueError, match=r"reads tensor values.*formula='palm'.*attn_backend='eager'"):
        measured_flops_per_batch(c, 1, 8)
    assert measured_flops_per_batch(c, 1, 8, device="cpu") == measured_flops_per_batch(tiny(attn_backend="eager"), 1, 8)


def test_fused_loss_hides_an_lm_head_matmul_from_the_counter():
    # why measured_flops_per_batch measures through logits.sum(): the chunked cross-entropy's in-place addmm_ is not
    # counted, so measuring through the model's own loss misses 2·V·d FLOPs per token
    c = tiny()
    b, t = 2, 16
    with torch.device("meta"):
        model = Transformer(c)
        ids = torch.zeros(b, t, dtype=torch.long)
    model.check_input_ids = lambda ids: None
    counter = FlopCounterMode(display=False)
    with counter:
        model(ids, labels=ids).loss.backward()
    assert measured_flops_per_batch(c, b, t) - counter.get_total_flops() == 2 * c.vocab_size * c.dim * b * t


@pytest.mark.gpu
def test_fused_cuda_sdpa_counts_its_backward_recompute():
    c = tiny(n_kv_heads=4, attn_backend="sdpa")
    b, t = 2, 64
    attention = measured_flops_per_batch(c, b, t, device="cuda") - 6 * matmul_params(c) * b * t
    assert attention == 14 * c.n_layers * c.n_heads * c.head_dim * t * t * b


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_arguments_are_refused_with_the_fix():
    c = tiny()
    with pytest.raises(ValueError, match="unknown FLOP formula 'megatron'; use one of palm, measured"):
        flops_per_token(c, 8, formula="megatron")
    with pytest.raises(ValueError, match="formula='palm' to reproduce ALLaMo"):
        flops_per_batch(c, 1, 8, formula="measured", include_embedding=True)
    with pytest.raises(ValueError, match="seq_len must be positive, got 0"):
        flops_per_token(c, 0)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        flops_per_batch(c, 0, 8)
    with pytest.raises(ValueError, match="tensor_parallel must be positive"):
        flops_per_batch(c, 1, 8, tensor_parallel=0)
    with pytest.raises(ValueError, match="peak_flops must be positive"):
        mfu(1e12, 1.0, 0)
    with pytest.raises(ValueError, match="iteration_time must be positive"):
        mtu(1.0, 0.0)
    with pytest.raises(ValueError, match="model_time must be >= 0"):
        mtu(-1.0, 1.0)
