"""GPT-style model options (LayerNorm, GELU MLP, fused q/k/v, interleaved-pair RoPE) and the importer for the Landmark
seed's ``lm_benchmark`` checkpoints.

Oracle: a tiny GPT forward written here from the seed's model description (landmark spec §6, ``base_new.py``): pre-LN
blocks, ``c_attn`` split into q/k/v, rotary on pairs (2i, 2i+1) with θ^(−2i/D) computed pair by pair, causal softmax
(or the §2.1 per-row grouped softmax of tests/nn/test_landmark.py for the landmark model), exact GELU, tied output.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_longctx.checkpoint import load_model
from lit_longctx.hf import CheckpointError, config_to_hf, load_weights
from lit_longctx.lm_benchmark import read_lm_benchmark
from lit_longctx.nn import ModelConfig, Transformer
from tests.cli_helpers import in_process_error
from tests.nn.test_landmark import brute_force_weights

V, C, NH, HS, NL, T_MAX, FF = 64, 32, 2, 16, 2, 32, 128
LM_ID, FREQ = 63, 4


def seed_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {"transformer.wte.weight": torch.randn(V, C, generator=g) * 0.5,
         "transformer.wpe.freqs": 10 ** (-4 * torch.arange(0, HS, 2)[: HS // 2].float() / HS),
         "transformer.ln_f.weight": 1 + 0.1 * torch.randn(C, generator=g)}
    for i in range(NL):
        h = f"transformer.h.{i}."
        w[h + "ln_1.weight"] = 1 + 0.1 * torch.randn(C, generator=g)
        w[h + "attn.c_attn.weight"] = torch.randn(3 * C, C, generator=g) * 0.3
        w[h + "attn.c_proj.weight"] = torch.randn(C, C, generator=g) * 0.2
        w[h + "attn.bias"] = torch.tril(torch.ones(T_MAX, T_MAX)).view(1, 1, T_MAX, T_MAX)
        w[h + "ln_2.weight"] = 1 + 0.1 * torch.randn(C, generator=g)
        w[h + "mlp.c_fc.weight"] = torch.randn(FF, C, generator=g) * 0.2
        w[h + "mlp.c_proj.weight"] = torch.randn(C, FF, generator=g) * 0.1
    w["lm_head.weight"] = w["transformer.wte.weight"]  # tied
    return w


def rotate_pairs(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D): pair (x_2i, x_2i+1) at position t turned by angle t·freqs[i]."""
    out = torch.empty_like(x)
    t = torch.arange(x.shape[2], dtype=torch.float64).view(-1, 1)
    for i in range(len(freqs)):
        a = t * float(freqs[i])
        c, s = torch.cos(a).to(x.dtype), torch.sin(a).to(x.dtype)
        xe, xo = x[..., 2 * i : 2 * i + 1], x[..., 2 * i + 1 : 2 * i + 2]
        out[..., 2 * i : 2 * i + 1] = xe * c - xo * s
        out[..., 2 * i + 1 : 2 * i + 2] = xo * c + xe * s
    return out


def gpt_forward(w: dict[str, torch.Tensor], idx: torch.Tensor, landmark: bool = False) -> torch.Tensor:
    b, t = idx.shape
    x = w["transformer.wte.weight"][idx]
    for i in range(NL):
        h = f"transformer.h.{i}."
        a = F.layer_norm(x, (C,), w[h + "ln_1.weight"], None, 1e-5)
        q, k, v = (z.view(b, t, NH, HS).transpose(1, 2) for z in (a @ w[h + "attn.c_attn.weight"].T).split(C, -1))
        q, k = rotate_pairs(q, w["transformer.wpe.freqs"]), rotate_pairs(k, w["transformer.wpe.freqs"])
        s = q @ k.transpose(-1, -2) / math.sqrt(HS)
        if landmark:
            att = brute_force_weights(s, (idx == LM_ID))
        else:
            att = torch.softmax(s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")), -1)
        y = (att @ v).transpose(1, 2).reshape(b, t, C)
        x = x + y @ w[h + "attn.c_proj.weight"].T
        m = F.layer_norm(x, (C,), w[h + "ln_2.weight"], None, 1e-5)
        x = x + F.gelu(m @ w[h + "mlp.c_fc.weight"].T) @ w[h + "mlp.c_proj.weight"].T
    x = F.layer_norm(x, (C,), w["transformer.ln_f.weight"], None, 1e-5)
    return x @ w["lm_head.weight"].T


def build(loaded) -> Transformer:
    with torch.device("meta"):
        model = Transformer(loaded.model_config)
    load_weights(model, loaded.state_dict, source=loaded.source)
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("lmb") / "ckpt.pt"
    state = {f"_orig_mod.{k}": v for k, v in seed_state().items()}  # the seed compiles its model
    torch.save({"model": state, "itr": 20000}, path)
    return path


def test_imported_gpt_reproduces_the_hand_written_forward(ckpt):
    loaded = read_lm_benchmark(ckpt, attention="causal")
    cfg = loaded.model_config
    assert (cfg.norm, cfg.mlp, cfg.fused_qkv, cfg.rope_pairs) == ("layernorm", "gelu", True, "interleaved")
    assert (cfg.n_heads, cfg.head_dim, cfg.max_seq_len, cfg.rope.rope_theta, cfg.tie_embeddings) == (
        NH, HS, T_MAX, 10000.0, True)
    assert cfg.num_params() == build(loaded).num_params()
    idx = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(build(loaded)(idx).logits, gpt_forward(seed_state(), idx), rtol=1e-4, atol=1e-4)


def test_imported_landmark_model_and_its_converted_file(ckpt, tmp_path):
    loaded = read_lm_benchmark(ckpt, mem_freq=FREQ, landmark_id=LM_ID)
    assert loaded.method == "landmark" and loaded.model_config.attention == "landmark"
    idx = torch.randint(0, LM_ID, (1, 19))
    idx[:, FREQ :: FREQ + 1] = LM_ID  # the seed's data: a landmark after every mem_freq tokens
    with torch.no_grad():
        expected = gpt_forward(seed_state(), idx, landmark=True)
        torch.testing.assert_close(build(loaded)(idx).logits, expected, rtol=1e-4, atol=1e-4)
    from lit_longctx.cli import main

    main(["convert", "from-lm-benchmark", "--checkpoint", str(ckpt), "--output", str(tmp_path / "m.ckpt"),
          "--mem_freq", str(FREQ), "--landmark_id", str(LM_ID)])
    model, _, record = load_model(tmp_path / "m.ckpt")
    assert record.method == "landmark"
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx).logits, expected, rtol=1e-4, atol=1e-4)


def test_llama_defaults_and_refusals(ckpt, tmp_path, capsys):
    gpt = read_lm_benchmark(ckpt, attention="causal").model_config
    assert ModelConfig().is_llama and not gpt.is_llama
    with pytest.raises(CheckpointError, match="GPT-style blocks .* an HF LLaMA directory cannot hold"):
        config_to_hf(gpt)
    with pytest.raises(Exception, match="rope_pairs='diagonal' is unknown"):
        ModelConfig(rope_pairs="diagonal")
    bad = tmp_path / "bad.pt"
    torch.save({"model": {**seed_state(), "transformer.h.0.ln_1.bias": torch.zeros(C)}}, bad)
    err = in_process_error(capsys, "convert", "from-lm-benchmark", "--checkpoint", str(bad), "--output",
                           str(tmp_path / "x"), "--attention", "causal")
    assert "transformer.h.0.ln_1.bias" in err and "LayerNorm bias" in err


