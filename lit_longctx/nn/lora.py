"""Folding LoRA adapters into plain weights (tensor math, used by every checkpoint reader and exporter).

A LoRA adapter (Hu et al. 2021) adds ``scaling · B A`` to a frozen weight W₀; training keeps the three tensors under
PEFT's names (``X.base_layer.weight``, ``X.lora_A.<adapter>.weight``, ``X.lora_B.<adapter>.weight``), and readers
(export, generate, evaluation, ``init_from``) see only the merged ``X.weight``. Checkpoints with adapters record
``extra["lora"] = {"scaling": ..., ...}`` (``--model.lora``, LoLCATs stage 2); this module declares the checkpoint
state hook that merges them (:data:`CHECKPOINT_STATE_HOOKS`, registered by ``lit_longctx.checkpoint`` on its first
read), so no reader knows LoRA by name and ``nn`` imports nothing above it.
"""

from __future__ import annotations

from typing import Any

import torch


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Fold PEFT LoRA adapters into plain weights: W = W₀ + scaling · B A, under the names without ``base_layer``.

    ``X.base_layer.weight`` + ``X.lora_A.<adapter>.weight`` (r, in) + ``X.lora_B.<adapter>.weight`` (out, r) become
    ``X.weight`` (computed in float32, stored in W₀'s dtype); every other tensor is kept as is.
    """
    out: dict[str, torch.Tensor] = {}
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            owner, _, rest = key.partition(".lora_")
            adapters.setdefault(owner, {})[rest[0]] = value  # "A" or "B"
        elif ".base_layer." in key:
            out[key.replace(".base_layer.", ".")] = value
        else:
            out[key] = value
    for owner, ab in adapters.items():
        name = f"{owner}.weight"
        if set(ab) != {"A", "B"} or name not in out:
            raise ValueError(f"the LoRA adapter of {owner} is incomplete (found {sorted(ab)}): damaged checkpoint")
        base = out[name]
        delta = ab["B"].float() @ ab["A"].float()  # (out, r) @ (r, in)
        out[name] = (base.float() + scaling * delta).to(base.dtype)
    return out


def merge_lora_extra(state: dict[str, torch.Tensor], record: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint state hook of ``extra["lora"]``: merge the adapters with the recorded scaling."""
    return merge_lora_state(state, record["scaling"])


#: ``extra`` key -> state hook, for :func:`lit_longctx.checkpoint.register_state_hook`
CHECKPOINT_STATE_HOOKS = {"lora": merge_lora_extra}
