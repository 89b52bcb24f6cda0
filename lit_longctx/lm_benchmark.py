"""Import checkpoints of the Landmark Attention seed's from-scratch code (``epfml/landmark-attention``,
``lm_benchmark/``; landmark spec §6): a GPT-2-style decoder with pre-LN LayerNorm (no bias), fused q/k/v (``c_attn``),
a GELU MLP, tied embeddings and rotary embeddings on interleaved pairs (``transformer.wpe.freqs`` = θ^(−2i/D)).

The seed saves ``{'model': state_dict, 'optimizer': ..., 'scheduler': ..., 'itr': ...}`` (``torch.compile`` adds
``_orig_mod.``, DDP ``module.``). Its names map onto lit-longctx's with the GPT-style ``ModelConfig`` options
(``norm="layernorm"``, ``mlp="gelu"``, ``fused_qkv=True``, ``rope_pairs="interleaved"``); head size and RoPE base
come from ``wpe.freqs``, the context from the causal-mask buffer ``attn.bias``. The landmark model (``--model
landmark``) becomes the ``landmark`` attention kind with the seed's landmark id 50260 and ``mem_freq`` 50.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from lit_longctx.checkpoint import LoadedCheckpoint
from lit_longctx.hf import CheckpointError
from lit_longctx.nn.config import ModelConfig, RopeConfig

LANDMARK_ID = 50260  # an unused id between GPT-2's 50257 tokens and the padded 50304 rows (spec §1.1)
EOT_ID = 50256
_PREFIXES = ("_orig_mod.", "module.")
_BLOCK = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_BLOCK_NAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "attn.c_attn.weight": "self_attn.qkv_proj.weight",
    "attn.c_attn.bias": "self_attn.qkv_proj.bias",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "attn.c_proj.bias": "self_attn.o_proj.bias",
    "ln_2.weight": "post_attention_layernorm.weight",
    "mlp.c_fc.weight": "mlp.up_proj.weight",
    "mlp.c_fc.bias": "mlp.up_proj.bias",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
    "mlp.c_proj.bias": "mlp.down_proj.bias",
}


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _rope_theta(freqs: torch.Tensor, head_dim: int) -> float:
    """θ from the seed's ``freqs`` = θ^(−2i/D), rounded when it is an integer up to float32 error (10^4)."""
    if len(freqs) < 2:
        return 10000.0
    theta = float(freqs[1].double() ** (-head_dim / 2))
    return float(round(theta)) if abs(theta - round(theta)) < 1e-3 * theta else theta


def read_lm_benchmark(
    path: str | os.PathLike,
    *,
    attention: str = "landmark",
    mem_freq: int = 50,
    landmark_id: int = LANDMARK_ID,
) -> LoadedCheckpoint:
    """A lit-longctx model (config + weights) from an ``lm_benchmark`` checkpoint file.

    Args:
        path: the seed's ``ckpt.pt`` (or a bare state dict file).
        attention: ``landmark`` (the seed's ``--model landmark``) or ``causal`` (``--model base``).
        mem_freq: regular tokens per block (the seed's ``--mem_freq``, 50).
        landmark_id: the landmark token (the seed's ``landmark_id``, 50260).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"lm_benchmark checkpoint {str(p)!r} does not exist")
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files
        raise CheckpointError(f"cannot read {p} as an lm_benchmark checkpoint ({type(e).__name__}: {e})") from e
    state = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not any(_strip(k) == "transformer.wte.weight" for k in state):
        keys = sorted(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{p} is not an lm_benchmark checkpoint: no transformer.wte.weight (top-level keys "
                              f"{keys})")
    state = {_strip(k): v for k, v in state.items()}
    if attention not in ("landmark", "causal"):
        raise CheckpointError(f"attention={attention!r}: lm_benchmark models are 'landmark' or 'causal' (base)")

    wte = state["transformer.wte.weight"]
    vocab, dim = wte.shape
    freqs = state.get("transformer.wpe.freqs")
    if freqs is None:
        raise CheckpointError(f"{p} has no transformer.wpe.freqs: only the rotary lm_benchmark models are supported")
    head_dim = 2 * len(freqs)
    if dim % head_dim:
        raise CheckpointError(f"{p}: head size {head_dim} (from wpe.freqs) does not divide n_embd={dim}")
    layers = sorted({int(m.group(1)) for k in state if (m := _BLOCK.match(k))})
    if layers != list(range(len(layers))) or not layers:
        raise CheckpointError(f"{p}: transformer.h.N blocks are missing or not numbered 0..n-1 (found {layers[:8]})")
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": wte}
    context = None
    for key, value in state.items():
        m = _BLOCK.match(key)
        if m:
            name = m.group(2)
            if name == "attn.bias":  # the causal-mask buffer (1, 1, T, T): only its size matters
                context = value.shape[-1]
                continue
            if name not in _BLOCK_NAMES:
                raise CheckpointError(f"{p}: {key!r} has no counterpart in lit-longctx's GPT-style blocks (a "
                                      "LayerNorm bias, i.e. --bias true, is not supported)")
            out[f"model.layers.{m.group(1)}.{_BLOCK_NAMES[name]}"] = value
        elif key == "transformer.ln_f.weight":
            out["model.norm.weight"] = value
        elif key == "lm_head.weight":
            if not torch.equal(value, wte):
                out["lm_head.weight"] = value
        elif key not in ("transformer.wte.weight", "transformer.wpe.freqs"):
            raise CheckpointError(f"{p}: unexpected tensor {key!r} for an lm_benchmark GPT model")
    ffn = out["model.layers.0.mlp.up_proj.weight"].shape[0]
    options: dict[str, Any] = {}
    if attention == "landmark":
        if not 0 <= landmark_id < vocab:
            raise CheckpointError(f"landmark_id={landmark_id} is outside the checkpoint's {vocab} embedding rows")
        options = {"landmark": {"landmark_id": landmark_id, "mem_freq": mem_freq,
                                "train_context_length": (context or 512)}}
    config = ModelConfig(
        vocab_size=vocab, dim=dim, n_layers=len(layers), n_heads=dim // head_dim, head_dim=head_dim, ffn_dim=ffn,
        norm_eps=1e-5, tie_embeddings="lm_head.weight" not in out, max_seq_len=context or 512,
        rope=RopeConfig(rope_theta=_rope_theta(freqs, head_dim)), attention=attention, attention_options=options,
        attention_bias="model.layers.0.self_attn.qkv_proj.bias" in out,
        mlp_bias="model.layers.0.mlp.up_proj.bias" in out, eos_token_id=EOT_ID if vocab > EOT_ID else None,
        norm="layernorm", mlp="gelu", fused_qkv=True, rope_pairs="interleaved",
    )
    if not math.isfinite(config.rope.rope_theta) or config.rope.rope_theta <= 1:
        raise CheckpointError(f"{p}: transformer.wpe.freqs does not hold rotary frequencies θ^(-2i/D)")
    return LoadedCheckpoint(config, out, "landmark" if attention == "landmark" else "causal", {}, {}, str(p))


def convert_from_lm_benchmark(checkpoint: str, output: str, attention: str = "landmark", mem_freq: int = 50,
                              landmark_id: int = LANDMARK_ID) -> Path:
    """Convert a Landmark Attention ``lm_benchmark`` checkpoint into a lit-longctx checkpoint file.

    Args:
        checkpoint: the seed's ``ckpt.pt``.
        output: the lit-longctx checkpoint to write.
        attention: ``landmark`` (``--model landmark``) or ``causal`` (``--model base``).
        mem_freq: the seed's ``--mem_freq``.
        landmark_id: the landmark token id (50260 with GPT-2's tokenizer).
    """
    from lit_longctx.checkpoint import save_checkpoint
    from lit_longctx.hf import load_weights
    from lit_longctx.nn.llama import Transformer

    loaded = read_lm_benchmark(checkpoint, attention=attention, mem_freq=mem_freq, landmark_id=landmark_id)
    with torch.device("meta"):
        model = Transformer(loaded.model_config)
    load_weights(model, loaded.state_dict, source=loaded.source)
    out = save_checkpoint(output, model, method=loaded.method)
    print(f"wrote {out} ({model.num_params() / 1e6:.1f}M parameters, {loaded.method})")
    return out
