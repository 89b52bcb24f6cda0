"""Meta's original LLaMA checkpoint format (``params.json`` + ``consolidated.NN.pth`` + ``tokenizer.model``).

Pretraining spec §5 (from Meta's ``llama/model.py`` and transformers' ``convert_llama_weights_to_hf.py``):

- ``params.json`` maps to :class:`ModelConfig`: ``dim``, ``n_layers``, ``n_heads``, ``n_kv_heads`` (GQA; absent =
  ``n_heads``), ``norm_eps``, ``rope_theta`` (absent = 10 000; Code Llama 1e6), ``vocab_size`` (-1 = the tokenizer's),
  and the SwiGLU width from ``multiple_of`` / ``ffn_dim_multiplier`` exactly as Meta computes it (§5.3):
  ``h = int(2·4·dim/3)``, ``h = int(m·h)``, rounded up to a multiple of ``multiple_of`` (4096 → 11008, 8192 → 22016).
  Llama 3.1's ``use_scaled_rope`` becomes the ``llama3`` RoPE scaling (factor 8, low 1, high 4, original 8192).
- Model-parallel shards ``consolidated.00..K-1.pth`` are merged (§5.3): column-parallel weights (wq, wk, wv, w1, w3,
  output) along dim 0, row-parallel ones (wo, w2) along dim 1, the embedding along dim 1 (LLaMA 1/2; dim 0 when it
  is split by vocabulary, as in Llama 3), norms replicated.
- Meta rotates adjacent pairs (2j, 2j+1) of each head; lit-longctx and HF rotate (j, j+Q/2). After merging, the output
  rows of wq (H heads) and wk (Hkv heads) are permuted per head (§5.2): view (n, Q/2, 2, d_in), swap the middle axes,
  reshape, i.e. HF row r of a head is Meta row 2r for r < Q/2 and 2(r-Q/2)+1 after. Attention scores are unchanged.
Every shard is read with ``torch.load(weights_only=True)``; ``tokenizer.model`` travels with the converted weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from lit_longctx.hf import CheckpointError
from lit_longctx.nn.config import ModelConfig, RopeConfig, llama_ffn_dim

#: Meta name suffix -> (HF name suffix, dimension the model-parallel shards split it along; None = replicated)
_LAYER_MAP = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_TOP_MAP = {"output.weight": ("lm_head.weight", 0), "norm.weight": ("model.norm.weight", None)}
_IGNORED = ("rope.freqs",)


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved-pair rows of a q or k projection -> HF's half-split rows (spec §5.2)."""
    rows, d_in = w.shape
    q = rows // n_heads
    return w.view(n_heads, q // 2, 2, d_in).transpose(1, 2).reshape(rows, d_in)


def is_meta_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "params.json").exists()


def _tokenizer_vocab(directory: Path) -> int | None:
    """Pieces of a sentencepiece ``tokenizer.model`` (None when absent or not sentencepiece, e.g. Llama 3's)."""
    f = directory / "tokenizer.model"
    if not f.exists():
        return None
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(f)).get_piece_size()
    except (RuntimeError, OSError):
        return None


def meta_config(directory: str | os.PathLike, max_seq_len: int = 4096, vocab_size: int | None = None) -> ModelConfig:
    """ModelConfig of a Meta checkpoint directory from its ``params.json`` (see the module docstring)."""
    directory = Path(directory)
    f = directory / "params.json"
    if not f.exists():
        found = sorted(x.name for x in directory.iterdir())[:20] if directory.is_dir() else "(not a directory)"
        raise CheckpointError(
            f"no params.json in {str(directory)!r} (found {found}): a Meta checkpoint directory holds params.json, "
            "consolidated.NN.pth and tokenizer.model; for an HF directory use `lit-longctx convert from-hf`"
        )
    try:
        params = json.loads(f.read_text())
        dim, n_layers, n_heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{f} is not a Meta params.json (needs dim, n_layers, n_heads): {err}") from None
    vocab = int(params.get("vocab_size", -1))
    if vocab <= 0:
        vocab = _tokenizer_vocab(directory) or vocab_size or -1
    if vocab <= 0:
        raise CheckpointError(
            f"{f} has vocab_size {params.get('vocab_size')} and {directory} no sentencepiece tokenizer.model to take "
            "it from; add tokenizer.model"
        )
    rope = RopeConfig(rope_theta=float(params.get("rope_theta", 10000.0)))
    if params.get("use_scaled_rope"):
        rope = RopeConfig(rope_theta=rope.rope_theta, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192)
    return ModelConfig(
        vocab_size=vocab,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(params.get("n_kv_heads") or n_heads),
        ffn_dim=llama_ffn_dim(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")),
        norm_eps=float(params.get("norm_eps", 1e-5)),
        max_seq_len=max_seq_len,
        rope=rope,
    )


def _shard_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("consolidated.*.pth"))
    if not files:
        found = sorted(x.name for x in directory.iterdir())[:20]
        raise CheckpointError(f"no consolidated.NN.pth shards in {str(directory)!r} (found {found})")
    return files


def _merge(name: str, split: int | None, tensors: list[torch.Tensor], files: list[Path], config: ModelConfig
           ) -> torch.Tensor:
    shapes = [tuple(t.shape) for t in tensors]
    if len(set(shapes)) > 1:
        listing = ", ".join(f"{f.name}: {s}" for f, s in zip(files, shapes))
        raise CheckpointError(
            f"inconsistent shard shapes for {name} ({listing}): model-parallel shards of one checkpoint have equal "
            "shapes; the directory mixes files of different checkpoints"
        )
    if len(tensors) == 1 or split is None:
        return tensors[0]
    if name == "tok_embeddings.weight":  # split along the width in LLaMA 1/2, along the vocabulary in Llama 3
        split = 1 if shapes[0][1] * len(tensors) == config.dim else 0
    return torch.cat(tensors, dim=split)


def read_meta_state_dict(directory: str | os.PathLike, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The merged, renamed and q/k-permuted weights of a Meta checkpoint directory (HF / lit-longctx names)."""
    directory = Path(directory)
    files = _shard_files(directory)
    shards = []
    for f in files:
        try:
            shards.append(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as err:  # truncated files, pickles with code, foreign formats
            raise CheckpointError(f"cannot read {f} as a Meta shard ({type(err).__name__}: {err})") from None
    keys = [set(k for k in s if not k.endswith(_IGNORED)) for s in shards]
    for f, k in zip(files[1:], keys[1:]):
        if k != keys[0]:
            diff = sorted(k ^ keys[0])[:5]
            raise CheckpointError(f"{f.name} and {files[0].name} hold different tensors ({diff}): not shards of one "
                                  "checkpoint")
    state = {}
    for key in sorted(keys[0]):
        if key == "tok_embeddings.weight":
            hf_name, split = "model.embed_tokens.weight", 1
        elif key in _TOP_MAP:
            hf_name, split = _TOP_MAP[key]
        elif key.startswith("layers."):
            _, idx, rest = key.split(".", 2)
            if rest not in _LAYER_MAP:
                raise CheckpointError(f"unexpected tensor {key!r} in {files[0]}: not a LLaMA weight")
            suffix, split = _LAYER_MAP[rest]
            hf_name = f"model.layers.{idx}.{suffix}"
        else:
            raise CheckpointError(f"unexpected tensor {key!r} in {files[0]}: not a LLaMA weight")
        w = _merge(key, split, [s[key] for s in shards], files, config)
        if key.endswith("attention.wq.weight"):
            w = permute_to_hf(w, config.n_heads)
        elif key.endswith("attention.wk.weight"):
            w = permute_to_hf(w, config.n_kv_heads)
        state[hf_name] = w.contiguous()
    return state


def read_meta_checkpoint(directory: str | os.PathLike, with_weights: bool = True, max_seq_len: int = 4096) -> Any:
    """A :class:`lit_longctx.checkpoint.LoadedCheckpoint` of a Meta directory (``init_from`` and the readers)."""
    from lit_longctx.checkpoint import LoadedCheckpoint

    directory = Path(directory)
    config = meta_config(directory, max_seq_len)
    state = read_meta_state_dict(directory, config) if with_weights else {}
    tok = directory / "tokenizer.model"
    files = {"tokenizer.model": tok.read_bytes()} if tok.exists() else {}
    return LoadedCheckpoint(config, state, "causal", files, {}, str(directory))


def convert_from_meta(
    source: str,
    output: str,
    dtype: str | None = None,
    rope_theta: float | None = None,
    max_seq_len: int = 4096,
) -> Path:
    """Convert a Meta checkpoint directory (params.json, consolidated.NN.pth, tokenizer.model) into a lit-longctx
    checkpoint file.

    Args:
        source: the Meta directory.
        output: path of the lit-longctx checkpoint to write.
        dtype: store the weights in this dtype (float32, bfloat16, float16); default: as in the shards.
        rope_theta: override the RoPE base (Llemma contracted Code Llama's 1e6 to 1e4).
        max_seq_len: the context recorded in the config (params.json does not carry it; Llama 2: 4096).
    """
    from lit_longctx.checkpoint import save_checkpoint
    from lit_longctx.hf import load_weights
    from lit_longctx.nn.config import parse_dtype
    from lit_longctx.nn.llama import Transformer

    src = Path(source).expanduser()
    if not src.is_dir():
        raise FileNotFoundError(f"Meta checkpoint directory {source!r} does not exist")
    loaded = read_meta_checkpoint(src, max_seq_len=max_seq_len)
    config = loaded.model_config
    if rope_theta is not None:
        config = config.replace(rope=dataclasses.replace(config.rope, rope_theta=float(rope_theta)))
    with torch.device("meta"):
        model = Transformer(config)
    load_weights(model, loaded.state_dict, source=f"Meta checkpoint {str(src)!r}")
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    out = save_checkpoint(output, model, tokenizer=loaded.tokenizer())
    print(f"wrote {out} ({model.num_params() / 1e6:.1f}M parameters)")
    return out
