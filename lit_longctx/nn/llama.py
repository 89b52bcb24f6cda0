"""The LLaMA-family decoder (Touvron et al. 2023): pre-norm blocks of attention + SwiGLU MLP with RMSNorm.

Parameter names follow transformers' ``LlamaForCausalLM`` (``model.embed_tokens``, ``model.layers.N.self_attn.q_proj``,
``model.layers.N.mlp.gate_proj``, ``model.norm``, ``lm_head``), so HF state dicts load without renaming and without
q/k permutation (both use the half-rotated RoPE layout). The attention of each layer comes from the registry in
:mod:`lit_longctx.nn.attention`; this file has no per-method flags.

Shapes: B batch, T tokens, d model width, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lit_longctx.nn.attention import AttentionContext, build_attention, check_forward_extras, get_attention
from lit_longctx.nn.config import ModelConfig
from lit_longctx.nn.gpt import GELUMLP, LayerNorm
from lit_longctx.nn.loss import linear_cross_entropy
from lit_longctx.nn.rope import RotaryEmbedding
from lit_longctx.nn.session import check_attention_mask, padded_positions


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, normalised in float32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x)) (Shazeer 2020)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


#: ``ModelConfig.norm`` / ``ModelConfig.mlp`` -> module (GPT-2-style parts for the Landmark seed's model, nn/gpt.py)
NORMS: dict[str, type[nn.Module]] = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}
MLPS: dict[str, type[nn.Module]] = {"swiglu": MLP, "gelu": GELUMLP}


def build_norm(config: ModelConfig) -> nn.Module:
    return NORMS[config.norm](config.dim, config.norm_eps)


class Block(nn.Module):
    """Pre-norm decoder block: h + attn(norm(h)), then + mlp(norm(h))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = build_norm(config)
        self.self_attn = build_attention(config, layer_idx)
        self.post_attention_layernorm = build_norm(config)
        self.mlp = MLPS[config.mlp](config)

    def forward(self, h: torch.Tensor, ctx: AttentionContext, cache: Any | None = None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), ctx, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """Container matching HF's ``LlamaModel`` naming (``model.*``); the loop lives in :class:`Transformer`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = build_norm(config)


@dataclass
class InferenceState:
    """Per-layer inference caches (whatever each attention kind creates) and the next position id.

    ``position`` counts every id fed (pads included: the caches' length); ``lengths`` (B,) the tokens fed per row,
    set once a padded chunk was fed, after which default positions continue per row.
    """

    caches: list[Any]
    position: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    lengths: torch.Tensor | None = None


@dataclass
class ModelOutput:
    """``loss`` when labels were given; ``logits`` (B, T', V) when asked for; ``extras`` from attention kinds."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def doc_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document index per token for packed rows: a new document starts wherever positions do not increase by one.

    Returns None (no masking needed) when every row is one contiguous run of positions. On XLA the ids are always
    returned: testing for restarts is a host sync that would split the compiled step (the mask gives the same result).
    """
    if position_ids.shape[1] < 2:
        return None
    starts = torch.diff(position_ids, dim=1) != 1
    if position_ids.device.type != "xla" and not bool(starts.any()):
        return None
    return torch.nn.functional.pad(starts.long().cumsum(1), (1, 0))


#: the keyword parameters of :meth:`Transformer.forward` itself (named in the error for an unknown keyword)
FORWARD_PARAMETERS = ("input_ids", "position_ids", "labels", "state", "doc_ids", "attention_mask", "return_logits",
                      "return_hidden")


class Transformer(nn.Module):
    """LLaMA-family causal LM.

    ``forward(input_ids, position_ids=None, labels=None)``: ``labels`` are the targets *aligned* with the inputs
    (``labels[b, t]`` is the token that should follow ``input_ids[b, t]``; -100 = no loss), so data modules decide
    the shift once and packed rows lose no token. With labels the loss is computed chunk-wise
    (:func:`linear_cross_entropy`) and no logits are returned unless asked for.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RotaryEmbedding(config.rope, config.head_dim, config.max_seq_len)
        self.kinds = sorted({config.attention_kind(i) for i in range(config.n_layers)})
        self.activation_checkpointing = False
        self.loss_chunk_size: int | None = None
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------------------------------------ parameters
    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def init_weights(self) -> None:
        """Normal(0, init_std) for projections and embeddings, zeros for biases, ones for norms.

        Call after ``to_empty`` when the model was built on the meta device.
        """
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif hasattr(module, "reset_parameters") and not isinstance(module, (Transformer, Decoder, Block)):
                module.reset_parameters()

    def num_params(self, include_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if include_embedding else n - self.model.embed_tokens.weight.numel() * (
            0 if self.config.tie_embeddings else 1
        )

    def flops_per_token(self, seq_len: int, include_embedding: bool = False) -> float:
        """Training FLOPs per token (fwd + bwd): 6·N' + Σ_layers attention FLOPs (PaLM appendix B form).

        N' excludes the input embedding (a gather) unless ``include_embedding`` (ALLaMo's convention).
        """
        n = self.num_params(include_embedding=include_embedding)
        attn = sum(layer.self_attn.flops_per_token(seq_len) for layer in self.layers)
        return 6.0 * n + attn

    # ---------------------------------------------------------------------------------------------------- forward
    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        # meta (FLOP counting): no values; XLA: reading values is a host sync that splits the compiled step (the data
        # module's max_token_id is checked against vocab_size in CausalLM.setup instead)
        if input_ids.device.type in ("meta", "xla"):
            return
        vocab = self.config.vocab_size
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.numel() and bool(((input_ids < 0) | (input_ids >= vocab)).any()):
            lo, hi = int(input_ids.min()), int(input_ids.max())
            raise ValueError(
                f"token ids must lie in [0, {vocab}) for this model's vocab_size={vocab}, got ids in [{lo}, {hi}]; "
                "the tokenizer or data was made for another vocabulary (set model.vocab_size to the tokenizer's "
                "vocabulary size, or re-tokenize the data)"
            )

    def new_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> InferenceState:
        """Empty inference caches for every layer (KV cache, FoT memory, ... as each attention kind defines)."""
        p = self.lm_head.weight
        device, dtype = device or p.device, dtype or p.dtype
        return InferenceState([layer.self_attn.new_cache(batch_size, device, dtype) for layer in self.layers])

    def context(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        doc_ids: torch.Tensor | None,
        extras: dict[str, Any],
        attention_mask: torch.Tensor | None = None,
    ) -> AttentionContext:
        cos, sin = self.rope(position_ids)
        ctx = AttentionContext(position_ids, cos, sin, self.rope, doc_ids, dict(extras), attention_mask)
        for kind in self.kinds:
            get_attention(kind).prepare_context(ctx, input_ids, self.config)
        return ctx

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        state: InferenceState | None = None,
        doc_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_logits: bool | str | None = None,
        return_hidden: bool = False,
        **extras: Any,
    ) -> ModelOutput:
        """Run the decoder.

        Args:
            input_ids: (B, T) token ids.
            position_ids: (B, T) RoPE positions; default ``state.position + arange(T)``. Packed documents restart at
                0, which also restricts attention to each document (``doc_ids`` derived from the positions).
            labels: (B, T) aligned targets (-100 = ignored) -> ``output.loss`` (mean over counted targets).
            state: inference caches from :meth:`new_state`; updated in place.
            doc_ids: explicit document index per token (overrides the one derived from positions).
            attention_mask: (B, T) 1 = token, 0 = pad (HF convention; left padding for generation) for the tokens of
                this call; with a ``state`` the caches remember earlier calls' masks. Pads are never attended to
                and default positions count each row's tokens only (0 at a row's first token); the logits at pads
                are meaningless.
            return_logits: True / "all", "last" (only the last position), False; default: logits iff no labels.
            return_hidden: also return the final normalised hidden states.
            **extras: per-batch options of the model's attention kinds (their ``forward_extras``; placed into
                ``AttentionContext.extras``). Any other keyword is an error naming the accepted ones.
        """
        self.check_input_ids(input_ids)
        check_forward_extras(self.kinds, extras, FORWARD_PARAMETERS)
        b, t = input_ids.shape
        mask = check_attention_mask(attention_mask, input_ids)
        if mask is not None and bool(mask.all()):
            mask = None  # no pad in this call: the unpadded kernels (caches keep the masks of earlier calls)
        lengths = state.lengths if state is not None else None
        if position_ids is None:
            start = state.position if state is not None else 0
            if mask is not None or lengths is not None:
                position_ids = padded_positions(mask if mask is not None else input_ids.new_ones(b, t, dtype=bool),
                                                lengths if lengths is not None else start)
            else:
                position_ids = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
        elif doc_ids is None and state is None:
            doc_ids = doc_ids_from_positions(position_ids)
        ctx = self.context(input_ids, position_ids, doc_ids, extras, mask)

        h = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            cache = state.caches[i] if state is not None else None
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, ctx, cache, use_reentrant=False)
            else:
                h = layer(h, ctx, cache)
        h = self.model.norm(h)
        if state is not None:
            if mask is not None or lengths is not None:
                base = lengths if lengths is not None else torch.full((b,), state.position, device=input_ids.device)
                state.lengths = base + (mask.sum(1) if mask is not None else t)
            state.position += t

        out = ModelOutput(hidden=h if return_hidden else None, extras=ctx.extras)
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
            out.loss = linear_cross_entropy(h, self.lm_head.weight, labels, chunk_size=self.loss_chunk_size)
        if return_logits is None:
            return_logits = labels is None
        if return_logits == "last":
            out.logits = self.lm_head(h[:, -1:])
        elif return_logits:
            out.logits = self.lm_head(h)
        return out
