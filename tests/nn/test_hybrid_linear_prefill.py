"""LoLCATs generation with the reference's prefill semantics (``prefill="forward"``, the default): the prompt runs the
terrace forward over its own length (end-aligned blocks, as ``linear_window_attention_tk.py``), decoded tokens run
the w-key sliding-window recurrence over the prompt's keys.

Oracles: the full ``tk`` forward over the prompt; the ``sw`` forward (equal to the sliding recurrence, spec §7 oracle
8) for decoded positions; at model level, a by-hand composition of the blocks with exactly those two rules per layer.
"""

from __future__ import annotations

import pytest
import torch

from lit_longctx.nn import ModelConfig, Transformer
from lit_longctx.nn.config import ConfigError
from lit_longctx.nn.generate import DecodingSession
from tests.nn.test_hybrid_linear import DT, FD, W, clone_layer, make_layer, run_layer

P = 11  # prompt: not a multiple of w = 4 and longer than 2w, so tk(end) != tk(start) != sw on it


@pytest.mark.parametrize("alignment", ["end", "start"])
def test_prompt_is_the_terrace_forward_and_decoding_the_sliding_recurrence(alignment):
    layer, cfg = make_layer(window="tk", block_alignment=alignment)
    assert layer.prefill == "forward"
    x = torch.randn(2, P + 6, 32, dtype=DT)
    cache = layer.new_cache(2, x.device, x.dtype)
    with torch.no_grad():
        prompt = run_layer(layer, cfg, x[:, :P], cache)
        decoded = torch.cat([run_layer(layer, cfg, x[:, i : i + 1], cache, i) for i in range(P, P + 6)], 1)
        sliding = run_layer(clone_layer(layer, cfg, window="sw"), cfg, x)
        terrace = run_layer(layer, cfg, x[:, :P])
    torch.testing.assert_close(prompt, terrace, rtol=0, atol=1e-12)
    torch.testing.assert_close(decoded, sliding[:, P:], rtol=0, atol=1e-12)
    assert float((prompt - sliding[:, :P]).abs().max()) > 1e-3  # the prompt really is not the sliding window
    assert cache.k.shape[2] == W and cache.length == P + 6


def test_decode_window_prefill_keeps_the_old_semantics():
    layer, cfg = make_layer(window="tk", block_alignment="end", prefill="decode_window")
    x = torch.randn(2, P, 32, dtype=DT)
    with torch.no_grad():
        got = run_layer(layer, cfg, x, layer.new_cache(2, x.device, x.dtype))
        sliding = run_layer(clone_layer(layer, cfg, window="sw"), cfg, x)
    torch.testing.assert_close(got, sliding, rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match="prefill='all' is unknown"):
        make_layer(prefill="all")


def _blocks_by_hand(model: Transformer, sliding: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """Per layer: tk forward of the prompt positions, sw forward (over prompt + decoded keys) of the later ones."""
    b, t = ids.shape
    pos = torch.arange(t).expand(b, t)
    ctx_all = model.context(ids, pos, None, {})
    ctx_prompt = model.context(ids[:, :P], pos[:, :P], None, {})
    h = model.model.embed_tokens(ids)
    for block, ref in zip(model.layers, sliding.layers):
        a = block.input_layernorm(h)
        y = torch.cat([block.self_attn(a[:, :P], ctx_prompt), ref.self_attn(a, ctx_all)[:, P:]], 1)
        h = h + y
        h = h + block.mlp(block.post_attention_layernorm(h))
    return model.lm_head(model.model.norm(h))


def test_session_logits_follow_the_reference_generation():
    opts = {"feature_dim": FD, "window_size": W, "feature_map_init": "normal", "block_alignment": "end"}
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64,
                      max_seq_len=64, attention="hybrid_linear", attention_options={"hybrid_linear": opts},
                      init_std=0.2)
    model = Transformer(cfg).double().eval()
    sliding = Transformer(cfg.replace(attention_options={"hybrid_linear": {**opts, "window": "sw"}})).double().eval()
    sliding.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, P + 5))
    with torch.no_grad():
        session = DecodingSession(model, batch_size=2)
        prompt_logits = session.forward_logits(ids[:, :P])
        steps = torch.stack([session.step(ids[:, i : i + 1]) for i in range(P, P + 5)], 1)
        full_tk = model(ids[:, :P]).logits
        expected = _blocks_by_hand(model, sliding, ids)
        everything_tk = model(ids).logits[:, P:].float()
    torch.testing.assert_close(prompt_logits, full_tk.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(steps, expected[:, P:].float(), rtol=1e-6, atol=1e-6)
    assert float((steps - everything_tk).abs().max()) > 1e-3  # != the tk forward of everything
