"""Pure PyTorch model code (no Lightning import): config, RoPE, attention kinds, the decoder, generation."""

from lit_longctx.nn.config import PRESETS, ConfigError, ModelConfig, RopeConfig, resolve_model_config
from lit_longctx.nn.generate import DecodingSession, generate, sample_next, session_for
from lit_longctx.nn.llama import InferenceState, ModelOutput, Transformer
from lit_longctx.nn.loss import linear_cross_entropy

__all__ = [
    "PRESETS",
    "ConfigError",
    "DecodingSession",
    "InferenceState",
    "ModelConfig",
    "ModelOutput",
    "RopeConfig",
    "Transformer",
    "generate",
    "linear_cross_entropy",
    "resolve_model_config",
    "sample_next",
    "session_for",
]
