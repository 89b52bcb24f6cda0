"""Attention kinds. Importing this package registers the built-in kinds."""

from lit_longctx.nn.attention.base import (
    Attention,
    AttentionContext,
    available_attentions,
    build_attention,
    get_attention,
    register_attention,
)
from lit_longctx.nn.attention.causal import CausalAttention, KVCache, attend
from lit_longctx.nn.attention.hybrid_linear import HybridLinearAttention, HybridLinearCache

__all__ = [
    "Attention",
    "AttentionContext",
    "CausalAttention",
    "HybridLinearAttention",
    "HybridLinearCache",
    "KVCache",
    "attend",
    "available_attentions",
    "build_attention",
    "get_attention",
    "register_attention",
]
