"""LightningModules: ``CausalLM`` and the methods built on it."""

from lit_longctx.modules.causal_lm import CausalLM

__all__ = ["CausalLM"]
