"""LightningModules: ``CausalLM`` and the methods built on it."""

from lit_longctx.modules.causal_lm import CausalLM
from lit_longctx.modules.fot import FoT
from lit_longctx.modules.landmark import Landmark
from lit_longctx.modules.lolcats import AttentionTransfer, LinearizedLoRA

__all__ = ["AttentionTransfer", "CausalLM", "FoT", "Landmark", "LinearizedLoRA"]
