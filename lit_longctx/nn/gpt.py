"""GPT-2-style block parts for the Landmark Attention seed's from-scratch model (``lm_benchmark/models/base_new.py``;
landmark spec §6): LayerNorm without bias and a GELU MLP. ``ModelConfig(norm="layernorm", mlp="gelu")`` selects them
(:data:`lit_longctx.nn.llama.NORMS`, :data:`~lit_longctx.nn.llama.MLPS`); fused q/k/v (``fused_qkv``) and
interleaved-pair RoPE (``rope_pairs``) live in the attention base class. The LLaMA defaults are untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lit_longctx.nn.config import ModelConfig


class LayerNorm(nn.Module):
    """(x − mean) / sqrt(var + eps) · weight, no bias (the seed's ``LayerNorm(bias=False)``), in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.weight.shape, None, None, self.eps).to(x.dtype) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class GELUMLP(nn.Module):
    """down(GELU(up(x))) with the exact (erf) GELU: GPT-2's MLP (``c_fc`` is ``up_proj``, ``c_proj`` ``down_proj``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))
