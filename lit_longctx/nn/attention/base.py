"""The attention contract every kind implements, the per-batch context, and the registry of kinds.

Every kind owns the same ``q_proj/k_proj/v_proj/o_proj`` (HF names, so HF checkpoints load unchanged) and differs only
in how it turns q, k, v (+ positions, + its own inference state) into an output. Structure that depends on the batch
(document boundaries, RoPE tables, landmark positions, ...) is computed once per forward into an
:class:`AttentionContext`, never inside the layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lit_longctx.nn.attention.kv_cache import KVCache
from lit_longctx.nn.config import ConfigError, ModelConfig
from lit_longctx.nn.rope import RotaryEmbedding, apply_rotary


@dataclass
class AttentionContext:
    """What every layer needs to know about the current batch, built once per forward.

    Attributes:
        position_ids: (B, T) integer RoPE positions (restart at 0 for each packed document).
        cos, sin: (B, T, head_dim) float32 RoPE tables for ``position_ids``.
        rope: the table builder, for kinds that rotate keys at other positions (FoT memory, landmark retrieval).
        doc_ids: (B, T) document index per token, or None when every row is a single document.
        extras: per-method batch layout (e.g. landmark flags, cross-batch ranges), filled by
            ``Attention.prepare_context`` or passed to ``Transformer.forward`` as keyword arguments.
        attention_mask: (B, T) bool, True = token, False = pad (``Transformer.forward(attention_mask=...)``), or None
            when every token of this call is a real one. Every kind must keep pads out of what real tokens attend to
            (and out of its inference state); caches remember the masks of earlier calls.
    """

    position_ids: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    rope: RotaryEmbedding
    doc_ids: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    attention_mask: torch.Tensor | None = None


class Attention(nn.Module):
    """Base class of attention kinds: projections, RoPE helper, cache factory.

    Subclasses set ``kind`` and implement :meth:`forward`. Options from ``ModelConfig.attention_options[kind]`` arrive
    as keyword arguments to ``__init__``.
    """

    kind: ClassVar[str] = ""
    #: an inference-session class (see ``lit_longctx.nn.generate``) when the kind needs its own decoding driver
    session_class: ClassVar[type | None] = None
    #: per-batch keyword arguments of ``Transformer.forward`` this kind reads from ``ctx.extras`` (others are rejected)
    forward_extras: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        if config.fused_qkv:  # GPT-2's c_attn: q, k, v rows stacked in one matrix
            self.qkv_proj = nn.Linear(config.dim, config.q_dim + 2 * config.kv_dim, bias=config.attention_bias)
        else:
            self.q_proj = nn.Linear(config.dim, config.q_dim, bias=config.attention_bias)
            self.k_proj = nn.Linear(config.dim, config.kv_dim, bias=config.attention_bias)
            self.v_proj = nn.Linear(config.dim, config.kv_dim, bias=config.attention_bias)
        self.interleaved_rope = config.rope_pairs == "interleaved"
        self.o_proj = nn.Linear(config.q_dim, config.dim, bias=config.attention_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, dim) -> q (B, T, H, D), k and v (B, T, Hkv, D), not rotated."""
        b, t, _ = x.shape
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, *[self.n_kv_heads * self.head_dim] * 2], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv_heads, self.head_dim)
        v = v.view(b, t, self.n_kv_heads, self.head_dim)
        if self.interleaved_rope:
            # RoPE on pairs (2i, 2i+1) == half-split RoPE on dims reordered [evens | odds] (same angle θ_i for both
            # halves' i-th entry); q·k is invariant to one permutation of both, so every later rotation (caches,
            # retrieval) stays exact
            q, k = (torch.cat([z[..., 0::2], z[..., 1::2]], dim=-1) for z in (q, k))
        return q, k, v

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on (B, T, heads, D) with tables (B, T, D)."""
        return apply_rotary(x, cos.unsqueeze(2), sin.unsqueeze(2))

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) attention output -> (B, T, dim)."""
        b, _, t, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: Any | None = None) -> torch.Tensor:
        raise NotImplementedError(f"attention kind {self.kind!r} must implement forward")

    def new_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Any:
        """Inference state of this layer (e.g. a KV cache); created by ``Transformer.new_state``."""
        return KVCache(batch_size, self.n_kv_heads, self.head_dim, device, dtype)

    @classmethod
    def prepare_context(cls, ctx: AttentionContext, input_ids: torch.Tensor, config: ModelConfig) -> None:
        """Add this kind's per-batch layout to ``ctx.extras`` once per forward (default: nothing)."""

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> dict[str, Any] | None:
        """ModelConfig fields (``layer_attention``, ``attention_options``) for a foreign HF ``config.json`` that this
        kind's original code wrote (e.g. LongLLaMA's ``mem_layers``), or None when the dict is not one of them.

        Every HF-directory reader asks each registered kind through :func:`hf_config_layout`, so method keys are
        recognised by the method's own code in one place.
        """
        return None

    def flops_per_token(self, context_len: int) -> float:
        """Attention-score FLOPs per token (fwd + bwd, PaLM convention: 12·H·Q·T) at ``context_len`` keys.

        Kinds with another cost (linear attention, cross-batch memory) override this; the throughput callback uses it.
        """
        return 12.0 * self.n_heads * self.head_dim * context_len


_REGISTRY: dict[str, type[Attention]] = {}


def register_attention(kind: str):
    """Class decorator adding an attention kind to the registry under ``kind``."""

    def deco(cls: type[Attention]) -> type[Attention]:
        if kind in _REGISTRY and _REGISTRY[kind] is not cls:
            raise ValueError(f"attention kind {kind!r} is already registered by {_REGISTRY[kind].__qualname__}")
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return deco


def get_attention(kind: str) -> type[Attention]:
    if kind not in _REGISTRY:
        raise ConfigError(
            f"unknown attention kind {kind!r}; available kinds: {', '.join(available_attentions())} "
            "(a kind registers itself with @register_attention when its module is imported)"
        )
    return _REGISTRY[kind]


def available_attentions() -> list[str]:
    return sorted(_REGISTRY)


def check_forward_extras(kinds: list[str], extras: dict[str, Any], fixed: tuple[str, ...] = ()) -> None:
    """Reject keyword arguments of a forward that none of ``kinds`` declares in ``forward_extras``.

    A misspelt option (``cross_batch_rang=3``) or one of a kind the model does not use would otherwise be ignored
    silently and the batch run with plain attention. ``fixed`` names the forward's own parameters, for the message.
    """
    accepted = {name for kind in kinds for name in get_attention(kind).forward_extras}
    unknown = sorted(set(extras) - accepted)
    if not unknown:
        return
    import difflib

    owners = {name: kind for kind, cls in _REGISTRY.items() for name in cls.forward_extras}
    hints = []
    for name in unknown:
        if name in owners:
            hints.append(f"{name} is an option of attention kind {owners[name]!r}, which no layer of this model uses")
        elif close := difflib.get_close_matches(name, sorted(accepted) + list(fixed), n=1):
            hints.append(f"did you mean {close[0]}?")
    per_kind = "; ".join(f"{kind}: {', '.join(get_attention(kind).forward_extras) or 'none'}" for kind in kinds)
    raise ValueError(
        f"unknown keyword argument(s) {unknown} for the model forward" + (f" ({'; '.join(hints)})" if hints else "")
        + f"; it accepts {', '.join(fixed)} and the per-batch options of this model's attention kinds ({per_kind})"
    )


def hf_config_layout(hf: dict[str, Any]) -> dict[str, Any]:
    """The attention layout the registered kinds read from a foreign HF ``config.json`` ({} for a plain LLaMA).

    Two kinds claiming the same dict is an error: a directory has one origin.
    """
    found = {kind: layout for kind, cls in _REGISTRY.items() if (layout := cls.from_hf_config(hf)) is not None}
    if len(found) > 1:
        raise ConfigError(f"config.json is claimed by several attention kinds ({', '.join(sorted(found))})")
    return next(iter(found.values()), {})


def build_attention(config: ModelConfig, layer_idx: int) -> Attention:
    kind = config.attention_kind(layer_idx)
    cls = get_attention(kind)
    options = dict(config.attention_options.get(kind, {}))
    try:
        return cls(config, layer_idx, **options)
    except TypeError as e:
        raise ConfigError(f"bad attention_options for kind {kind!r}: {e}") from e
