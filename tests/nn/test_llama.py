"""The decoder against ``transformers.LlamaForCausalLM`` on the same random weights (fp32, CPU), plus its own API.

Oracle: transformers' implementation (eager and sdpa attention). Weights are re-drawn with larger scales than the
0.02 init so attention is far from uniform and every RoPE or masking difference shows in the logits (checked by
``test_parity_harness_detects_a_wrong_theta``).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from lit_longctx.hf import config_from_hf, load_weights
from lit_longctx.nn import ModelConfig, RopeConfig, Transformer
from lit_longctx.nn.llama import doc_ids_from_positions

TOL = 1e-4  # max |Δ logits| (issue 2)
VOCAB, MAX_POS = 256, 64


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights that make attention peaked: unit-variance embeddings, 1.5/sqrt(fan_in) projections, norms ≈ 1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif "embed" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            p.copy_(1.5 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def hf_config(*, heads=4, kv_heads=2, head_dim=None, tie=False, rope=None, attn="eager", layers=2) -> LlamaConfig:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=MAX_POS, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, **(rope or {})},
        **({"head_dim": head_dim} if head_dim else {}),
    )
    config._attn_implementation = attn
    return config


def pair(config: LlamaConfig) -> tuple[LlamaForCausalLM, Transformer]:
    """HF model with random weights and ours loaded from its state dict (same attention backend name)."""
    hf = LlamaForCausalLM(config).eval()
    randomize_(hf)
    ours = Transformer(config_from_hf(config.to_dict(), attn_backend=config._attn_implementation)).eval()
    load_weights(ours, hf.state_dict())
    return hf, ours


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


ARCHS = {"mha": dict(heads=4, kv_heads=4), "gqa": dict(heads=4, kv_heads=2), "mqa": dict(heads=4, kv_heads=1),
         "head_dim_100": dict(heads=2, kv_heads=1, head_dim=100)}


# --------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
@torch.no_grad()
def test_logits_match_transformers(arch, tie, attn):
    hf, ours = pair(hf_config(**ARCHS[arch], tie=tie, attn=attn))
    assert ours.config.tie_embeddings is tie
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) is tie
    x = ids(2, 48)
    expected, got = hf(x).logits, ours(x).logits
    assert got.shape == expected.shape == (2, 48, VOCAB)
    assert max_diff(got, expected) < TOL


ROPES = {
    "default": {},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("rope", sorted(ROPES))
@torch.no_grad()
def test_rope_scaling_logits_match_transformers_beyond_max_positions(rope, attn):
    hf, ours = pair(hf_config(rope=ROPES[rope], attn=attn))
    # within the trained context, then 2.5x beyond it (dynamic NTK rescales there), then back (dynamic resets)
    for t in (48, 160, 40):
        x = ids(1, t, seed=t)
        assert max_diff(ours(x).logits, hf(x).logits) < TOL, t


@pytest.mark.parametrize("rope", ["default", "linear", "yarn", "llama3"])
@torch.no_grad()
def test_spec_oracle_11_with_transformers_init(rope):
    """Spec §7.11 verbatim: transformers' own init (seed 0), eager attention, a (2, 32) batch, max |Δ| < 1e-5."""
    params = {"linear": {"rope_type": "linear", "factor": 2.0}}.get(rope, ROPES[rope])
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_config(rope=params)).eval()
    ours = Transformer(config_from_hf(hf.config.to_dict(), attn_backend="eager")).eval()
    load_weights(ours, hf.state_dict())
    x = ids(2, 32)
    assert max_diff(ours(x).logits, hf(x).logits) < 1e-5


@torch.no_grad()
def test_freq_scale_equals_transformers_linear_scaling():
    """llama.cpp-style freq_scale 0.5 on our side == HF linear factor 2."""
    hf, ours = pair(hf_config(rope=ROPES["linear"]))
    scaled = Transformer(ours.config.replace(rope=RopeConfig(rope_theta=1e4, freq_scale=0.5))).eval()
    load_weights(scaled, hf.state_dict())
    x = ids(2, 100)
    assert max_diff(scaled(x).logits, hf(x).logits) < TOL


@torch.no_grad()
def test_parity_harness_detects_a_wrong_theta():
    """The comparison can fail: 1 % off in θ moves the logits by far more than the tolerance."""
    hf, ours = pair(hf_config())
    wrong = Transformer(ours.config.replace(rope=RopeConfig(rope_theta=1.01e4))).eval()
    load_weights(wrong, hf.state_dict())
    x = ids(2, 48)
    assert max_diff(wrong(x).logits, hf(x).logits) > 100 * TOL


# ------------------------------------------------------------------------------------------- positions, packing
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@torch.no_grad()
def test_packed_rows_equal_each_document_run_alone(attn):
    """Positions restarting inside a row restrict attention per document; compare with HF on each document alone."""
    hf, ours = pair(hf_config(rope=ROPES["llama3"], attn=attn))
    docs = [[20, 30, 14], [64], [5, 1, 40, 18]]  # document lengths per row, each row 64 tokens
    x = ids(len(docs), 64, seed=3)
    pos = torch.cat([torch.cat([torch.arange(n) for n in row]).unsqueeze(0) for row in docs])
    got = ours(x, position_ids=pos).logits
    for r, row in enumerate(docs):
        start = 0
        for n in row:
            alone = hf(x[r : r + 1, start : start + n]).logits[0]
            assert max_diff(got[r, start : start + n], alone) < TOL, (r, start, n)
            start += n
    # transformers >= 5 derives the same document mask from packed position ids when it runs without a cache
    assert max_diff(got, hf(x, position_ids=pos, use_cache=False).logits) < TOL


@torch.no_grad()
def test_document_continuing_at_an_offset_position():
    """A packed piece whose positions start at p > 0 equals HF run on that piece with the same positions."""
    hf, ours = pair(hf_config())
    x = ids(1, 40, seed=4)
    pos = torch.cat([torch.arange(15), torch.arange(100, 125)]).unsqueeze(0)
    got = ours(x, position_ids=pos).logits
    assert max_diff(got[:, :15], hf(x[:, :15]).logits) < TOL
    assert max_diff(got[:, 15:], hf(x[:, 15:], position_ids=pos[:, 15:]).logits) < TOL


@torch.no_grad()
def test_contiguous_position_ids_need_no_mask_and_match_transformers():
    hf, ours = pair(hf_config())
    x = ids(2, 32)
    pos = torch.arange(7, 39).expand(2, 32)
    assert doc_ids_from_positions(pos) is None
    assert max_diff(ours(x, position_ids=pos).logits, hf(x, position_ids=pos).logits) < TOL
    assert max_diff(ours(x, position_ids=torch.arange(32).expand(2, 32)).logits, hf(x).logits) < TOL


def test_doc_ids_from_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1, 5, 6, 0], [3, 4, 5, 6, 7, 8, 9, 10]])
    expected = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 3], [0, 0, 0, 0, 0, 0, 0, 0]])
    assert torch.equal(doc_ids_from_positions(pos), expected)
    assert doc_ids_from_positions(torch.tensor([[0]])) is None


@torch.no_grad()
def test_explicit_doc_ids_override_positions():
    _, ours = pair(hf_config())
    x = ids(1, 24)
    pos = torch.arange(24).unsqueeze(0)
    doc = torch.tensor([[0] * 10 + [1] * 14])
    got = ours(x, position_ids=pos, doc_ids=doc).logits
    # the second document sees only itself but keeps its positions 10..23
    alone = ours(x[:, 10:], position_ids=pos[:, 10:]).logits
    assert max_diff(got[:, 10:], alone) < TOL
    assert max_diff(got[:, :10], ours(x[:, :10]).logits) < TOL


# --------------------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_aligned_label_loss_and_gradients_match_transformers_shifted_loss(tie):
    hf, ours = pair(hf_config(tie=tie, attn="sdpa"))
    hf.train(), ours.train()
    x = ids(2, 40)
    hf_labels = x.clone()
    hf_labels[0, 10:15] = -100
    hf_labels[1, :3] = -100
    aligned = torch.cat([hf_labels[:, 1:], torch.full((2, 1), -100)], dim=1)  # labels[t] = token t + 1
    ours.loss_chunk_size = 7  # several chunks, a ragged last one
    loss = ours(x, labels=aligned).loss
    hf_loss = hf(x, labels=hf_labels).loss
    assert loss.item() == pytest.approx(hf_loss.item(), rel=1e-5)
    loss.backward()
    hf_loss.backward()
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref = hf_grads[name].grad
        assert max_diff(p.grad, ref) <= 1e-4 * ref.abs().max().item() + 1e-7, name


def test_loss_with_labels_returns_no_logits_unless_asked():
    _, ours = pair(hf_config())
    x = ids(2, 16)
    labels = ids(2, 16, seed=9)
    out = ours(x, labels=labels)
    assert out.logits is None and out.loss is not None
    out = ours(x, labels=labels, return_logits=True, return_hidden=True)
    ref = torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB), labels.reshape(-1))
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert max_diff(ours.lm_head(out.hidden), out.logits) < 1e-5


class _LargestLogits(TorchDispatchMode):
    """Records the largest new (non-view) tensor with ``vocab`` columns of any op (forward and backward)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in () if func.is_view else out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab and t.dtype.is_floating_point:
                self.largest = max(self.largest, t.numel())
        return out


def test_training_step_never_materialises_full_logits():
    config = ModelConfig(vocab_size=1000, dim=32, n_layers=1, n_heads=2, ffn_dim=64)
    model = Transformer(config)
    model.loss_chunk_size = 16
    x = torch.randint(0, 1000, (2, 64))
    with _LargestLogits(1000) as probe:
        model(x, labels=x).loss.backward()
    assert probe.largest == 16 * 1000  # one 16-token tile, never the (2·64, 1000) logits


# ---------------------------------------------------------------------------------------------- API and errors
def test_return_logits_last_and_false():
    _, ours = pair(hf_config())
    x = ids(2, 20)
    full = ours(x).logits
    assert max_diff(ours(x, return_logits="last").logits, full[:, -1:]) < 1e-5
    assert ours(x, return_logits=False).logits is None


def test_extras_reach_the_attention_context():
    """Declared per-batch options land in the context (and the output's extras); undeclared ones are errors."""
    _, ours = pair(hf_config())
    with pytest.raises(ValueError, match=r"unknown keyword argument\(s\) \['my_option'\]"):
        ours(ids(1, 8), my_option=3)
    fot = Transformer(ours.config.replace(layer_attention={0: "fot"}))
    out = fot(ids(1, 8), cross_batch_range=0)
    assert out.extras["cross_batch_range"] == 0 and "fot_layout" in out.extras


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 17, -1])
def test_token_ids_outside_vocab_raise_value_error(bad):
    _, ours = pair(hf_config())
    x = ids(1, 10)
    x[0, 4] = bad
    with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {VOCAB}\).*vocab_size={VOCAB}.*re-tokenize"):
        ours(x)


def test_non_integer_ids_and_label_shape_errors():
    _, ours = pair(hf_config())
    with pytest.raises(TypeError, match="input_ids must be an integer tensor, got torch.float32"):
        ours(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"labels shape \(1, 3\) != input_ids shape \(1, 4\)"):
        ours(ids(1, 4), labels=ids(1, 3))


def test_activation_checkpointing_gives_the_same_gradients():
    _, ours = pair(hf_config())
    x = ids(2, 24)
    ours.train()
    ours(x, labels=x).loss.backward()
    ref = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    ours.activation_checkpointing = True
    ours(x, labels=x).loss.backward()
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_num_params_and_flops(tie):
    config = ModelConfig(vocab_size=100, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48, tie_embeddings=tie)
    model = Transformer(config)
    total = sum(p.numel() for p in model.parameters())  # deduplicates the tied weight
    assert model.num_params() == config.num_params() == total
    n_no_embed = total - (0 if tie else 100 * 32)
    assert model.num_params(include_embedding=False) == n_no_embed
    # 6·N' + 12·L·H·Q·T (PaLM appendix B)
    assert model.flops_per_token(256) == 6 * n_no_embed + 12 * 3 * 4 * 8 * 256


def test_meta_build_then_init_weights():
    config = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, ffn_dim=128, attention_bias=True, init_std=0.05)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_weights()
    q = model.layers[0].self_attn.q_proj
    assert q.weight.std().item() == pytest.approx(0.05, rel=0.1)
    assert torch.equal(q.bias, torch.zeros_like(q.bias))
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(0.05, rel=0.1)
