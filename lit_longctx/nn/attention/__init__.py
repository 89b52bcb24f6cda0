"""Attention kinds. Importing this package registers the built-in kinds."""

from lit_longctx.nn.attention.base import (
    Attention,
    AttentionContext,
    available_attentions,
    build_attention,
    check_forward_extras,
    get_attention,
    hf_config_layout,
    register_attention,
)
from lit_longctx.nn.attention.causal import CausalAttention, KVCache, attend
from lit_longctx.nn.attention.fot import FoTAttention, FoTCache, FoTSession
from lit_longctx.nn.attention.hybrid_linear import HybridLinearAttention, HybridLinearCache
from lit_longctx.nn.attention.landmark import LandmarkAttention, LandmarkCache

__all__ = [
    "Attention",
    "AttentionContext",
    "CausalAttention",
    "FoTAttention",
    "FoTCache",
    "FoTSession",
    "HybridLinearAttention",
    "HybridLinearCache",
    "KVCache",
    "LandmarkAttention",
    "LandmarkCache",
    "attend",
    "available_attentions",
    "build_attention",
    "check_forward_extras",
    "get_attention",
    "hf_config_layout",
    "register_attention",
]
