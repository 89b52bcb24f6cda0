"""Hugging Face LLaMA checkpoint directories in and out.

``read_hf_dir(path)`` is the one reader of HF-style directories: every path that reads one (``from_hf``, ``lit-longctx
convert from-hf``, ``generate``, ``init_from``, ``read_checkpoint``) goes through it, so they all build the same model.
The attention layout comes from a lit-longctx export's ``lit_longctx`` record, else from the attention kinds' own
``from_hf_config`` hooks (LongLLaMA's ``mem_layers`` are read by the FoT kind); an export's method tensors
(``lit_longctx_extras.safetensors``) are added to the weights.

``from_hf(path)`` reads ``config.json`` + weights (``model.safetensors``, sharded ``model.safetensors.index.json``,
or ``pytorch_model.bin`` files loaded with ``weights_only=True``) into a :class:`Transformer`; ``to_hf(model, path)``
writes ``config.json`` + safetensors that ``transformers.AutoModelForCausalLM.from_pretrained`` loads with no missing or
unexpected keys, RoPE scaling included (ALLaMo's exporter drops it; pretraining spec §5.3). Parameter names are
identical on both sides, and neither uses Meta's interleaved RoPE layout, so no q/k permutation is involved.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lit_longctx.inputs import hub_allowed, looks_local, nearest_match, not_found, read_json
from lit_longctx.nn.attention import hf_config_layout
from lit_longctx.nn.config import ModelConfig, RopeConfig
from lit_longctx.nn.llama import Transformer

LLAMA_MODEL_TYPES = ("llama", "longllama")
_IGNORED_KEYS = re.compile(r"(rotary_emb\.inv_freq|rope\.freqs)$")


class CheckpointError(ValueError):
    """A checkpoint cannot be read as asked; the message names the file and the fix."""


# ------------------------------------------------------------------------------------------------------- config
def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig from a transformers LLaMA ``config.json`` dict (v4 ``rope_theta``/``rope_scaling`` or v5
    ``rope_parameters``). ``overrides`` replace fields, e.g. ``rope_theta`` for Llemma's θ contraction."""
    model_type = hf.get("model_type")
    if model_type not in LLAMA_MODEL_TYPES:
        archs = hf.get("architectures")
        raise CheckpointError(
            f"not a LLaMA checkpoint: config.json has model_type={model_type!r} (architectures={archs}); "
            f"lit-longctx reads model types {', '.join(LLAMA_MODEL_TYPES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"unsupported hidden_act={hf['hidden_act']!r}: LLaMA models use silu")
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params:
        rope = RopeConfig.from_hf(params.get("rope_theta", 10000.0), params)
    else:
        rope = RopeConfig.from_hf(hf.get("rope_theta", 10000.0), hf.get("rope_scaling"))
    rope_theta = overrides.pop("rope_theta", None)
    if rope_theta is not None:
        rope.rope_theta = float(rope_theta)
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    fields = dict(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        ffn_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope=rope,
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) and eos else eos,
        pad_token_id=hf.get("pad_token_id"),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def config_to_hf(config: ModelConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """transformers ``LlamaConfig`` dict for a ModelConfig (attention kinds other than causal are method extras)."""
    from transformers import LlamaConfig

    if not config.is_llama:
        raise CheckpointError(
            f"this model has GPT-style blocks (norm={config.norm}, mlp={config.mlp}, fused_qkv={config.fused_qkv}, "
            f"rope_pairs={config.rope_pairs}), which an HF LLaMA directory cannot hold; keep the lit-longctx checkpoint"
        )
    rope_parameters = {"rope_theta": config.rope.rope_theta, "rope_type": "default"}
    rope_parameters.update(config.rope.to_hf() or {})
    hf = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters=rope_parameters,
        attention_bias=config.attention_bias,
        mlp_bias=config.mlp_bias,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        architectures=["LlamaForCausalLM"],
    ).to_dict()
    hf.update(extra or {})
    return hf


# ------------------------------------------------------------------------------------------------------ weights
def resolve_hf_path(path: str | os.PathLike) -> Path:
    """A local directory as is; a clear ``org/name`` hub id downloaded (config, weights, tokenizer) when the hub is
    allowed. A path that looks local (see :func:`lit_longctx.inputs.looks_local`) and does not exist is "not found"
    with the nearest existing match, and is never sent to the hub."""
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{str(p)!r} is a file; an HF checkpoint is a directory with config.json")
        return p
    if looks_local(path):
        raise not_found(path, "HF checkpoint directory", "give a directory holding config.json and the weights")
    if not hub_allowed():
        raise not_found(path, "HF checkpoint", "it is no local directory and HF_HUB_OFFLINE forbids downloading it "
                        "from the hub; download it first (huggingface-cli download) and pass the directory")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model"]
    try:
        return Path(snapshot_download(str(path), allow_patterns=patterns))
    except Exception as e:  # network errors come in many types; report them all the same way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"{str(path)!r} is no local path ({nearest_match(path)}) and could not be downloaded from the Hugging Face "
            f"hub ({first}): check the spelling, or download it first and pass the directory"
        ) from e


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    f = Path(path) / "config.json"
    if not f.exists():
        found = sorted(x.name for x in Path(path).iterdir())[:20] if Path(path).is_dir() else []
        raise CheckpointError(f"{str(path)!r} has no config.json, so it is not an HF checkpoint (found {found})")
    try:
        config = read_json(f, "HF config")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{f} holds a JSON {type(config).__name__}, not the object of an HF config; replace it")
    return config


def _load_file(f: Path) -> dict[str, torch.Tensor]:
    """The tensors of one weights file; an unreadable one (truncated download, wrong format) is a CheckpointError."""
    try:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(f))
        return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(f"cannot read weights file {str(f)!r} (UnpicklingError: {err}): it is corrupt or "
                                  "truncated; download or export it again") from err
        raise CheckpointError(
            f"weights file {str(f)!r} holds Python objects besides tensors and is refused: lit-longctx reads weights "
            "only and never runs code from a checkpoint; save it as safetensors with a tool you trust"
        ) from err
    except Exception as err:  # safetensors, pickle and zip errors have many types; all mean the file is unreadable
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read weights file {str(f)!r} ({type(err).__name__}: {first}): it is corrupt, truncated or not a "
            f"{'safetensors' if f.suffix == '.safetensors' else 'PyTorch'} file; download or export it again"
        ) from err


def load_hf_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (single or sharded safetensors / .bin)."""
    path = Path(path)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            data = read_json(index, "weight index")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no weight_map: the index is corrupt; download or export it again")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (path / s).exists()]
            if missing:
                raise CheckpointError(f"{index} lists shards that are missing: {missing}")
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_load_file(path / shard))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return _load_file(path / name)
    found = sorted(x.name for x in path.iterdir())[:20]
    raise CheckpointError(
        f"no weights in {str(path)!r}: expected model.safetensors, pytorch_model.bin or a sharded index; found {found}"
    )


def load_weights(model: Transformer, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load an HF-named state dict into ``model`` (which may live on the meta device), strictly.

    Missing or unexpected keys and shape mismatches raise one error that lists them.
    """
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items() if not _IGNORED_KEYS.search(k)}
    tied = model.config.tie_embeddings
    if tied:
        state.pop("lm_head.weight", None)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if not (tied and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source} does not fit a model of this config: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, shape mismatches {shapes[:4]}"
        )
    meta = any(p.is_meta for p in model.parameters())
    if meta:
        dtype = next(iter(state.values())).dtype
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=meta)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


#: what a lit-longctx export writes beside the weights: method tensors (e.g. LoLCATs feature maps)
EXTRAS_FILE = "lit_longctx_extras.safetensors"


def hf_dir_config(hf: dict[str, Any], **overrides: Any) -> tuple[ModelConfig, dict[str, Any]]:
    """ModelConfig of an HF ``config.json`` dict with its attention layout, and the export's ``lit_longctx`` record.

    The layout comes from the record of a lit-longctx export, else from the attention kinds' ``from_hf_config``
    hooks (e.g. LongLLaMA's ``mem_layers`` -> ``fot`` layers); ``overrides`` (ModelConfig fields, ``rope_theta``)
    replace it.
    """
    record = hf.get("lit_longctx") or {}
    if record:
        layout = {"attention": record.get("attention", "causal"),
                  "layer_attention": {int(k): v for k, v in record.get("layer_attention", {}).items()},
                  "attention_options": record.get("attention_options", {})}
    else:
        layout = hf_config_layout(hf)
    return config_from_hf(hf, **{**layout, **overrides}), record


@dataclass
class HFDirectory:
    """An HF-style checkpoint directory as read by :func:`read_hf_dir`, before any model is built."""

    path: Path
    config: ModelConfig
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        """The lit-longctx method that exported it (``causal`` for foreign directories such as LongLLaMA's)."""
        return self.record.get("method", "causal")

    def build(self, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> Transformer:
        """The model with the directory's weights (strict: every tensor must fit)."""
        with torch.device("meta"):
            model = Transformer(self.config)
        load_weights(model, self.state_dict, source=f"HF checkpoint {str(self.path)!r}")
        return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def read_hf_dir(path: str | os.PathLike, *, with_weights: bool = True, **config_overrides: Any) -> HFDirectory:
    """Read an HF-style directory (local path; see :func:`resolve_hf_path` for hub ids): config with its attention
    layout (:func:`hf_dir_config`), weights plus the export's method tensors unless ``with_weights=False``."""
    path = Path(path)
    config, record = hf_dir_config(read_hf_config(path), **config_overrides)
    state: dict[str, torch.Tensor] = {}
    if with_weights:
        state = load_hf_state_dict(path)
        if (path / EXTRAS_FILE).exists():
            from safetensors.torch import load_file

            state.update(load_file(str(path / EXTRAS_FILE)))
    return HFDirectory(path, config, state, record)


def from_hf(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    **config_overrides: Any,
) -> Transformer:
    """Build a :class:`Transformer` from an HF LLaMA directory (or hub id) with its weights (:func:`read_hf_dir`).

    ``dtype`` defaults to the checkpoint's; ``config_overrides`` replace ModelConfig fields (e.g. ``rope_theta``,
    ``attention``, ``layer_attention``) before the model is built.
    """
    return read_hf_dir(resolve_hf_path(path), **config_overrides).build(dtype=dtype, device=device)


def hf_state_dict(model: Transformer, dtype: torch.dtype | None = None,
                  exclude: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """The model's tensors under HF names, contiguous, in ``dtype`` (default: as stored); tied head and the names in
    ``exclude`` dropped."""
    out = {}
    for k, v in model.state_dict().items():
        if (model.config.tie_embeddings and k == "lm_head.weight") or k in exclude:
            continue
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous().cpu()
    return out


def to_hf(
    model: Transformer,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    tokenizer: Any | None = None,
    extra_config: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Write an HF checkpoint directory: config.json, safetensors (sharded above ``max_shard_size``), tokenizer files.

    ``extra_config`` adds keys to config.json (method settings such as FoT's ``mem_layers``); ``extra_tensors``
    (method tensors such as LoLCATs feature maps) go to ``lit_longctx_extras.safetensors`` beside the weights, which
    transformers ignores, and are left out of the weights.
    """
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(model, dtype, exclude=set(extra_tensors or ()))
    config = config_to_hf(model.config, extra_config)
    config["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_torch_state_dict(state, path, max_shard_size=max_shard_size)
    if extra_tensors:
        save_file({k: v.detach().contiguous().cpu() for k, v in extra_tensors.items()}, str(path / EXTRAS_FILE))
    if tokenizer is not None:
        tokenizer.save(path)
    return path
