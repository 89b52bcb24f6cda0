"""LoRA adapters for any method (``--model.lora`` on ``CausalLM``): LongLoRA-style context extension on small hardware.

LoRA (Hu et al. 2021): a frozen projection W₀ (out, in) gets a trainable low-rank update, y = W₀x + (α/r)·B A x with
A (r, in) and B (out, r); B starts at zero, so training starts from exactly the base model. LongLoRA (Chen et al.
2023, §3.2) adds that for context extension the input embedding and the norms must train too ("LoRA+"), which
``trainable`` names.

The adapters are attached to the projections in place: ``X.weight`` keeps its HF name and the adapter tensors are
``X.lora_A.default.weight`` / ``X.lora_B.default.weight`` (PEFT's names), applied by a forward hook. So ``init_from``
weights load by their plain names (:func:`complete_state` adds fresh adapters), FSDP2 shards the adapters with their
Block, and every checkpoint reader merges W = W₀ + (α/r)·B A (``lit_longctx.checkpoint`` via
``lit_longctx.nn.lora.merge_lora_state``): export, generation and evaluation see plain LLaMA weights. A small own
implementation rather than PEFT's ``inject_adapter_in_model``, which renames the base weight to
``X.base_layer.weight`` and costs ~5 s of import.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lit_longctx.nn.config import ConfigError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: names for groups of extra trainable tensors (LongLoRA trains embeddings and norms) -> name pieces
EXTRA = {"embeddings": ("embed_tokens",), "norms": ("norm",), "lm_head": ("lm_head",)}
ADAPTER = "default"


@dataclass
class LoraSettings:
    """``--model.lora``: rank, alpha, dropout, target projections and extra trainable tensors.

    Args:
        r: rank of the update.
        alpha: scaling numerator (update scaled by alpha / r).
        dropout: dropout on the adapter input.
        targets: projections that get adapters (attention: q_proj, k_proj, v_proj, o_proj; MLP: gate_proj,
            up_proj, down_proj).
        trainable: further tensors that train in full: ``embeddings``, ``norms``, ``lm_head`` or a name piece (e.g.
            ``layers.0.``); LongLoRA: [embeddings, norms].
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    trainable: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, value: dict[str, Any] | LoraSettings) -> LoraSettings:
        if isinstance(value, LoraSettings):
            return value
        try:
            settings = cls(**value)
        except TypeError as err:
            raise ConfigError(f"model.lora: {err}; keys are r, alpha, dropout, targets, trainable") from err
        if not isinstance(settings.r, int) or settings.r < 1:
            raise ConfigError(f"model.lora.r must be a positive integer, got {settings.r!r}")
        if settings.alpha <= 0 or not 0 <= settings.dropout < 1:
            raise ConfigError("model.lora.alpha must be > 0 and model.lora.dropout in [0, 1)")
        bad = [t for t in settings.targets if t not in TARGETS]
        if bad or not settings.targets:
            raise ConfigError(f"model.lora.targets {bad or settings.targets} are not projections; choose from "
                              f"{', '.join(TARGETS)}")
        return settings

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def is_trainable(self, name: str) -> bool:
        if ".lora_A." in name or ".lora_B." in name:
            return True
        return any(piece in name for extra in self.trainable for piece in EXTRA.get(extra, (extra,)))


class LoraFactor(nn.Module):
    """One LoRA factor: A (r, in) Kaiming-uniform as PEFT, or B (out, r) zeros, seeded by the owner's name so every
    rank (and a meta-built model after ``to_empty``) draws the same A."""

    def __init__(self, out_features: int, in_features: int, kind: str, key: str) -> None:
        super().__init__()
        self.kind, self.key = kind, key
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        if not self.weight.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(initial_factor(self.key, self.kind, tuple(self.weight.shape)))


def initial_factor(key: str, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    tensor = torch.empty(shape)
    if kind == "B":
        return tensor.zero_()
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


def _lora_hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    x = module.lora_dropout(inputs[0])
    a, b = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
    return output + module.lora_scaling * F.linear(F.linear(x.to(a.dtype), a), b).to(output.dtype)


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Attach adapters to the target projections of ``model`` and freeze everything ``settings`` does not train."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in settings.targets:
            out_f, in_f = module.weight.shape
            with torch.device(module.weight.device):
                module.lora_A = nn.ModuleDict({ADAPTER: LoraFactor(settings.r, in_f, "A", f"{name}.lora_A")})
                module.lora_B = nn.ModuleDict({ADAPTER: LoraFactor(out_f, settings.r, "B", f"{name}.lora_B")})
            module.lora_dropout = nn.Dropout(settings.dropout) if settings.dropout else nn.Identity()
            module.lora_scaling = settings.scaling
            module.register_forward_hook(_lora_hook)
    for name, p in model.named_parameters():
        p.requires_grad_(settings.is_trainable(name))
    return model


def complete_state(state: dict[str, torch.Tensor], settings: LoraSettings) -> dict[str, torch.Tensor]:
    """``state`` (plain HF names) plus the initial adapter tensors of every target projection (B = 0) it lacks."""
    out = dict(state)
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        if leaf == "weight" and owner.rsplit(".", 1)[-1] in settings.targets and value.ndim == 2:
            out_f, in_f = value.shape
            for kind, shape in (("A", (settings.r, in_f)), ("B", (out_f, settings.r))):
                out.setdefault(f"{owner}.lora_{kind}.{ADAPTER}.weight", initial_factor(f"{owner}.lora_{kind}", kind,
                                                                                     shape).to(value.dtype))
    return out
