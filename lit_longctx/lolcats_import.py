"""Read the LoLCATs reference's own checkpoint files (HazyResearch/lolcats) onto a base HF LLaMA model.

The reference saves partial state dicts as ``torch.save({'model_state_dict': ...})`` (lolcats spec §3-4,
``src/model/load_model.py``):

- stage 1, ``<run>_distill.pt``: per converted layer m, ``model.layers.{m}.self_attn.feature_map_{q,k}.mlp.layer``
  (H, d, F) and ``model.layers.{m}.self_attn.window_factors`` (1, H, 1, 1) (no factors for pure linear attention);
  layers without feature maps stayed softmax (``softmax_attentions``);
- stage 2, ``<run>_ft.pt``: the PEFT LoRA tensors ``...{q,k,v,o}_proj.lora_A.default.weight`` (r, in) and
  ``lora_B.default.weight`` (out, r), with PEFT's ``base_model.model.`` prefix, plus φ and θ when they kept training
  (``fqkvo``).

Names are accepted under the prefixes the reference produced over time (``base_model.model.`` from PEFT, a bare
``layers.`` from the mini-model "trenchcoat" blocks, ``_orig_mod.`` from ``torch.compile``) and the legacy
``hedgehog_*`` attention-type names. The assembled model uses the reference's semantics: end-aligned terrace blocks
and the reference's prefill (prompt with the terrace forward, decoding with the sliding window). LoRA adapters are
merged (W = W₀ + α/r · B A, the reference's ``merge_and_unload``) or kept under PEFT's names for more training.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from lit_longctx.checkpoint import FORMAT, LoadedCheckpoint, read_checkpoint
from lit_longctx.hf import CheckpointError

HYBRID = "hybrid_linear"


def recognise_reference_checkpoint(ckpt: dict[str, Any], source: str) -> str | None:
    """The message for a reference ``{'model_state_dict': ...}`` file given where a lit-longctx checkpoint goes."""
    if "model_state_dict" not in ckpt:
        return None
    return (f"{source} is a LoLCATs reference checkpoint (feature maps / LoRA only): assemble it onto its base model "
            "with `lit-longctx convert from-lolcats --base HF_DIR --distill RUN_distill.pt [--finetune RUN_ft.pt] "
            "--output model.ckpt` and use that file")


#: read by :mod:`lit_longctx.checkpoint` when a file is not a lit-longctx checkpoint
CHECKPOINT_FOREIGN_FORMATS = [recognise_reference_checkpoint]
_PREFIXES = ("_orig_mod.", "base_model.model.")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(.+)$")
_LORA = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp)\.\w+_proj)\.lora_([AB])\.[\w-]+\.weight$")
_TRANSFER = ("feature_map_q.mlp.layer", "feature_map_k.mlp.layer", "window_factors")

#: reference ``attention_type`` -> lit-longctx ``window`` (the ``hedgehog_*`` names are the repository's older ones)
ATTENTION_TYPES: dict[str, str] = {
    "lolcats_llama": "none",
    "lolcats_llama_window_tk": "tk",
    "lolcats_llama_window_tk_gen": "tk",
    "lolcats_llama_window_sw": "sw",
    "lolcats_llama_window_sw_linear": "sw",
    "hedgehog_llama": "none",
    "hedgehog_llama_window_tk": "tk",
    "hedgehog_llama_window_sw": "sw",
}


def _canonical(key: str) -> str:
    for prefix in _PREFIXES:
        key = key.removeprefix(prefix)
    return f"model.{key}" if key.startswith("layers.") else key


def read_seed_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a reference ``{'model_state_dict': ...}`` file under lit-longctx (= HF LLaMA) names."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"LoLCATs checkpoint {str(p)!r} does not exist")
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files
        raise CheckpointError(f"cannot read {p} as a LoLCATs checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("model_state_dict"), dict):
        keys = sorted(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{p} is not a LoLCATs reference checkpoint: expected {{'model_state_dict': ...}}, "
                              f"found {keys}")
    return {_canonical(k): v for k, v in raw["model_state_dict"].items()}


def _transfer_layers(state: dict[str, torch.Tensor], source: str,
                     allow_lora: bool) -> dict[int, dict[str, torch.Tensor]]:
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _LAYER.match(key)
        if m and m.group(2) in _TRANSFER:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
        elif not (allow_lora and _LORA.match(key)):
            raise CheckpointError(f"{source} holds {key!r}, which is neither a feature map, a window factor nor a "
                                  "LoRA tensor of the LoLCATs reference; is it a full model checkpoint?")
    return layers


def _check_layers(layers: dict[int, dict[str, torch.Tensor]], n_layers: int, n_heads: int, head_dim: int,
                  window: str, source: str) -> int:
    """Validate shapes against the base model; return F."""
    features = set()
    for m, tensors in sorted(layers.items()):
        if not 0 <= m < n_layers:
            raise CheckpointError(f"{source} has feature maps for layer {m}, but the base model has {n_layers} layers")
        for name in ("feature_map_q.mlp.layer", "feature_map_k.mlp.layer"):
            if name not in tensors:
                raise CheckpointError(f"{source}: layer {m} lacks self_attn.{name} (damaged or partial checkpoint)")
            shape = tuple(tensors[name].shape)
            if len(shape) != 3 or shape[:2] != (n_heads, head_dim):
                raise CheckpointError(
                    f"{source}: layer {m} self_attn.{name} has shape {shape}, but the base model needs "
                    f"({n_heads}, {head_dim}, F) (n_heads, head_dim, feature_dim): use the base model the feature "
                    "maps were trained on"
                )
            features.add(shape[2])
        has_factor = "window_factors" in tensors
        if window != "none" and not has_factor:
            raise CheckpointError(f"{source}: layer {m} has no window_factors, so it was trained as pure linear "
                                  "attention; pass attention_type='lolcats_llama'")
        if has_factor and tuple(tensors["window_factors"].shape) != (1, n_heads, 1, 1):
            raise CheckpointError(f"{source}: layer {m} window_factors has shape "
                                  f"{tuple(tensors['window_factors'].shape)}, expected (1, {n_heads}, 1, 1)")
        if window == "none" and has_factor:
            raise CheckpointError(f"{source}: layer {m} has window_factors, so it is a windowed model; pass its "
                                  "attention_type (e.g. lolcats_llama_window_tk)")
    if len(features) > 1:
        raise CheckpointError(f"{source}: feature maps of different feature_dim {sorted(features)} across layers")
    return features.pop()


def _lora_tensors(state: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _LORA.match(key)
        if m:
            out.setdefault(m.group(1), {})[m.group(2)] = value
    for owner, ab in out.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{source}: the LoRA adapter of {owner} lacks lora_{'B' if 'A' in ab else 'A'}")
    return out


def assemble_lolcats(
    base: str | os.PathLike,
    distill: str | os.PathLike,
    finetune: str | os.PathLike | None = None,
    *,
    attention_type: str = "lolcats_llama_window_tk",
    window_size: int = 64,
    block_alignment: str = "end",
    lora_alpha: float = 16.0,
    merge_lora: bool = True,
) -> LoadedCheckpoint:
    """A LoLCATs model from a base HF LLaMA directory + the reference's stage-1 (and stage-2) files.

    Args:
        base: the softmax model the reference converted (an HF directory or anything ``read_checkpoint`` reads).
        distill: the stage-1 ``_distill.pt`` file (feature maps, window factors).
        finetune: the stage-2 ``_ft.pt`` file (LoRA adapters, maybe φ/θ), or None for a stage-1 model.
        attention_type: the reference's ``attention.attention_type`` (its model config), which sets the window.
        window_size: the reference's ``window_size`` (64 in every published config).
        block_alignment: terrace blocks ``end`` (the reference) or ``start``.
        lora_alpha: the stage-2 config's ``lora_alpha`` (16 for r = 8); the scaling is alpha / r.
        merge_lora: fold the adapters into the weights (default), else keep them under PEFT's names with their
            scaling recorded (``extra['lora']``), as a ``LinearizedLoRA`` model holds them.

    Returns:
        A LoadedCheckpoint (method ``lolcats_transfer`` or ``lolcats_lora``) that ``lit_longctx.checkpoint`` users
        build as any other.
    """
    if attention_type not in ATTENTION_TYPES:
        raise CheckpointError(f"attention_type={attention_type!r} is not a LoLCATs attention type; use one of "
                              f"{', '.join(sorted(ATTENTION_TYPES))}")
    window = ATTENTION_TYPES[attention_type]
    loaded = read_checkpoint(base)
    config = loaded.model_config
    stage1 = read_seed_state(distill)
    layers = _transfer_layers(stage1, str(distill), allow_lora=False)
    if not layers:
        raise CheckpointError(f"{distill} has no feature maps (model.layers.N.self_attn.feature_map_q.mlp.layer): "
                              "give the stage-1 `_distill.pt` file")
    stage2 = read_seed_state(finetune) if finetune is not None else {}
    # fqkvo: feature maps / factors that kept training in stage 2 replace the stage-1 ones
    for m, tensors in _transfer_layers(stage2, str(finetune), allow_lora=True).items():
        if m not in layers:
            raise CheckpointError(f"{finetune} trains feature maps of layer {m}, which {distill} did not convert")
        layers[m].update(tensors)
    feature_dim = _check_layers(layers, config.n_layers, config.n_heads, config.head_dim, window, str(distill))
    options: dict[str, Any] = {"feature_dim": feature_dim, "window_size": window_size, "window": window,
                               "feature_map_init": "kaiming_uniform", "decode_window": "sliding", "prefill": "forward"}
    if window == "tk":
        options["block_alignment"] = block_alignment
    config = config.replace(
        attention=HYBRID,
        layer_attention={i: "causal" for i in range(config.n_layers) if i not in layers},
        attention_options={**config.attention_options, HYBRID: options},
    )
    state = dict(loaded.state_dict)
    for m, tensors in layers.items():
        state.update({f"model.layers.{m}.self_attn.{name}": t for name, t in tensors.items()})
    method, extra = "lolcats_transfer", {}
    lora = _lora_tensors(stage2, str(finetune))
    if finetune is not None and not lora:
        raise CheckpointError(f"{finetune} holds no LoRA tensors (…q_proj.lora_A.default.weight): give the stage-2 "
                              "`_ft.pt` file")
    if lora:
        method = "lolcats_lora"
        ranks = {ab["A"].shape[0] for ab in lora.values()}
        if len(ranks) != 1:
            raise CheckpointError(f"{finetune}: LoRA adapters of different ranks {sorted(ranks)}")
        rank = ranks.pop()
        scaling = lora_alpha / rank
        for owner, ab in lora.items():
            name = f"{owner}.weight"
            if name not in state:
                raise CheckpointError(f"{finetune} adapts {owner}, which the base model does not have")
            if merge_lora:
                weight = state[name]
                state[name] = (weight.float() + scaling * (ab["B"].float() @ ab["A"].float())).to(weight.dtype)
            else:
                state[f"{owner}.base_layer.weight"] = state.pop(name)
                state[f"{owner}.lora_A.default.weight"] = ab["A"]
                state[f"{owner}.lora_B.default.weight"] = ab["B"]
        if not merge_lora:
            targets = sorted({owner.rsplit(".", 1)[1] for owner in lora})
            extra = {"lora": {"scaling": scaling, "r": rank, "targets": targets}}
    source = f"{base} + {distill}" + (f" + {finetune}" if finetune is not None else "")
    return LoadedCheckpoint(config, state, method, loaded.tokenizer_files, extra, source)


def convert_from_lolcats(
    base: str,
    distill: str,
    output: str,
    finetune: str | None = None,
    attention_type: str = "lolcats_llama_window_tk",
    window_size: int = 64,
    block_alignment: str = "end",
    lora_alpha: float = 16.0,
    keep_lora: bool = False,
) -> Path:
    """Assemble the LoLCATs reference's stage-1/2 files onto their base model as one lit-longctx checkpoint.

    ``init_from``, ``generate``, ``convert to-hf`` and the evaluations read the result.

    Args:
        base: the base HF LLaMA directory the reference converted.
        distill: its stage-1 ``<run>_distill.pt`` (feature maps, window factors).
        output: the lit-longctx checkpoint file to write.
        finetune: its stage-2 ``<run>_ft.pt`` (LoRA adapters), if any.
        attention_type: the reference model config's ``attention_type`` (sets the window kind).
        window_size: the reference's ``window_size``.
        block_alignment: terrace blocks ``end`` (the reference) or ``start``.
        lora_alpha: the stage-2 ``lora_alpha`` (scaling alpha / r).
        keep_lora: keep the adapters separate (a ``LinearizedLoRA`` can continue from them); readers merge them.
    """
    from lit_longctx.hf import load_weights
    from lit_longctx.io import atomic_write
    from lit_longctx.nn.llama import Transformer

    loaded = assemble_lolcats(base, distill, finetune, attention_type=attention_type, window_size=window_size,
                              block_alignment=block_alignment, lora_alpha=lora_alpha, merge_lora=not keep_lora)
    state = loaded.state_dict
    if "lora" in loaded.extra:
        from lit_longctx.nn.lora import merge_lora_state

        state = merge_lora_state(state, loaded.extra["lora"]["scaling"])
    with torch.device("meta"):  # the assembled tensors must fit the model they describe before anything is written
        load_weights(Transformer(loaded.model_config), state, source=loaded.source)
    record = {"format": FORMAT, "method": loaded.method, "model_config": loaded.model_config.to_dict(),
              "state_dict": loaded.state_dict, "tokenizer_files": loaded.tokenizer_files, "extra": loaded.extra}
    with atomic_write(output) as f:
        torch.save(record, f)
    print(f"wrote {output} ({loaded.method}, {len(loaded.state_dict)} tensors)")
    return Path(output)
