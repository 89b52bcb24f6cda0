"""FoT memory layers: the ``fot`` attention kind (Focused Transformer / LongLLaMA) and its HF config interop.

Tworkowski et al., "Focused Transformer: Contrastive Training for Context Scaling", arXiv 2307.03170 (NeurIPS 2023).
The semantics are those of the released code (CStanKonrad/long_llama: ``FoT/cross_batch.py`` for training,
``src/modeling_longllama.py`` for inference), as pinned down in the project spec ``specs/fot.md`` §1-§3. The pieces:

- :mod:`~lit_longctx.nn.attention.fot_cross_batch`: training without a cache (``cross_batch_range`` r > 0): the layout
  of which rows fill each row's additional-context slots and the joint softmax over them (dense or chunked), §1-§2.
- :mod:`~lit_longctx.nn.attention.fot_memory`: inference, a :class:`FoTCache` per layer (local window and memory of
  evicted keys at position 0) and :func:`memory_attention` over both (dense, grouped or exact top-k), §3.
- :mod:`~lit_longctx.nn.attention.fot_session`: :class:`FoTSession`, LongLLaMA's schedule of long inputs and
  generation (prefix to memory W tokens at a time, the last ``last_context_length`` tokens local), §3.
- this module: :class:`FoTAttention`, which routes a forward to one of the above, and the HF interop:
  :func:`longllama_config` writes the memory settings under LongLLaMA's config.json keys (and the JAX ones),
  :func:`longllama_layout` reads a LongLLaMA config.json's ``mem_layers`` back into ``fot`` layers (spec §8).

Every public name of the pieces is importable from here too.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lit_longctx.nn.attention.base import Attention, AttentionContext, register_attention
from lit_longctx.nn.attention.causal import attend
from lit_longctx.nn.attention.fot_cross_batch import (
    CROSS_BATCH_MODES,
    MASK_VALUE,
    CrossBatchLayout,
    cross_batch_attention,
    cross_batch_bias,
    cross_batch_layout,
    cross_batch_row_ranges,
    cross_batch_scores,
    gather_slots,
)
from lit_longctx.nn.attention.fot_memory import FoTCache, memory_attention
from lit_longctx.nn.attention.fot_session import FoTSession
from lit_longctx.nn.config import ConfigError, ModelConfig, parse_dtype

#: ``AttentionContext.extras`` key under which :meth:`FoTAttention.prepare_context` stores the batch's layout
LAYOUT_KEY = "fot_layout"
__all__ = [
    "CROSS_BATCH_MODES", "JAX_KEYS", "LAYOUT_KEY", "LONGLLAMA_KEYS", "MASK_VALUE", "CrossBatchLayout", "FoTAttention",
    "FoTCache", "FoTSession", "cross_batch_attention", "cross_batch_bias", "cross_batch_layout",
    "cross_batch_row_ranges", "cross_batch_scores", "gather_slots", "longllama_config", "longllama_layout",
    "memory_attention", "memory_layers",
]


# ------------------------------------------------------------------------------------------- HF config interop
#: LongLLaMA's HF config keys (``configuration_longllama.py``) and their defaults there, held as ``fot`` options
LONGLLAMA_KEYS: dict[str, Any] = {"last_context_length": 1024, "mem_dtype": "bfloat16", "mem_positionals": True,
                                  "mem_attention_grouping": None, "torch_attention": False}
#: the JAX trainer's cross-batch keys (``llama_model.py`` ``LLaMAConfig``) and their defaults there
JAX_KEYS: dict[str, Any] = {"cross_batch_range": 0, "cross_batch_stepping": True, "dataset_packing": 1,
                            "scan_cross_batch": False}


def memory_layers(config: ModelConfig) -> list[int]:
    """Indices of the layers whose attention kind is ``fot``."""
    return [i for i in range(config.n_layers) if config.attention_kind(i) == "fot"]


def longllama_config(config: ModelConfig) -> dict[str, Any]:
    """The memory settings of ``config`` under LongLLaMA's and the JAX code's config.json key names (spec §8).

    ``mem_layers`` lists the ``fot`` layers; the other keys come from ``attention_options["fot"]``, else the defaults of
    the original code. A dtype is written as its torch name (``"bfloat16"``), a grouping as a list.
    """
    opts = config.attention_options.get("fot", {})
    out: dict[str, Any] = {"mem_layers": memory_layers(config)}
    for key, default in {**LONGLLAMA_KEYS, **JAX_KEYS}.items():
        out[key] = opts.get(key, default)
    dtype = parse_dtype(out["mem_dtype"], "mem_dtype")
    out["mem_dtype"] = None if dtype is None else str(dtype).removeprefix("torch.")
    if out["mem_attention_grouping"] is not None:
        out["mem_attention_grouping"] = [int(x) for x in out["mem_attention_grouping"]]
    return out


def longllama_layout(hf: dict[str, Any]) -> dict[str, Any] | None:
    """``layer_attention`` and ``attention_options`` (ModelConfig fields) for an HF config.json that carries LongLLaMA's
    ``mem_layers`` (a LongLLaMA checkpoint, ``model_type: longllama``); None when it has no memory layers.

    ``mem_layers`` naming a layer the model does not have is an error (it would otherwise be dropped silently).
    """
    layers = hf.get("mem_layers")
    if not layers:
        return None
    n_layers = hf.get("num_hidden_layers")
    try:
        layers = [int(i) for i in layers]
    except (TypeError, ValueError):
        raise ConfigError(f"config.json mem_layers={hf['mem_layers']!r} must be a list of layer indices") from None
    bad = [i for i in layers if n_layers is not None and not 0 <= i < int(n_layers)]
    if bad:
        raise ConfigError(
            f"config.json mem_layers={layers} names layers {bad} that a model of num_hidden_layers={n_layers} does not "
            f"have (indices 0..{int(n_layers) - 1}); fix mem_layers in the checkpoint's config.json"
        )
    options = {key: hf[key] for key in (*LONGLLAMA_KEYS, *JAX_KEYS) if key in hf}
    return {"layer_attention": {i: "fot" for i in layers}, "attention_options": {"fot": options}}


# ----------------------------------------------------------------------------------------------- the attention kind
@register_attention("fot")
class FoTAttention(Attention):
    """FoT memory layer: cross-batch attention in training, memory-cache attention at inference.

    Options (``ModelConfig.attention_options["fot"]``; names of LongLLaMA's HF config and JAX code, spec §8):
        mem_positionals: RoPE in this layer (memory keys at position 0); False turns RoPE off here entirely, as in the
            paper's small models.
        mem_dtype: storage dtype of the inference memory (``"bfloat16"`` as in LongLLaMA; None = compute dtype).
        mem_attention_grouping: (heads, queries) block size of the inference memory attention; None = one block.
        torch_attention: inference blocks through ``scaled_dot_product_attention`` instead of the explicit softmax.
        top_k: None = dense memory attention; an int = only the top_k memory keys per head and query take part in the
            softmax (exact kNN; inference only, training is dense cross-batch as in the paper).
        last_context_length: Lc, tokens of a long input that stay in the local window (:class:`FoTSession`).
        scan_cross_batch: training through the chunked (memory-lean) path instead of the dense one.
        scan_query_chunk_size, scan_key_chunk_size: block sizes of the chunked path.
        cross_batch_mode: ``longllama`` (default, the released code) or ``paper`` (two-context variant, App. B.3).
        cross_batch_range, cross_batch_stepping, dataset_packing, cross_batch_ranges: defaults of the per-batch
            settings; ``Transformer.forward(..., cross_batch_range=3, dataset_packing=4)`` overrides them per batch.
        dropout: attention dropout; must be 0 (cross-batch has no dropout in the original code).
    """

    session_class: ClassVar[type | None] = FoTSession
    forward_extras: ClassVar[tuple[str, ...]] = ("cross_batch_range", "cross_batch_stepping", "dataset_packing",
                                                 "cross_batch_ranges")

    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        *,
        mem_positionals: bool = True,
        mem_dtype: str | torch.dtype | None = "bfloat16",
        mem_attention_grouping: tuple[int, int] | list[int] | None = None,
        torch_attention: bool = False,
        top_k: int | None = None,
        last_context_length: int = 1024,
        scan_cross_batch: bool = False,
        scan_query_chunk_size: int = 1024,
        scan_key_chunk_size: int = 1024,
        cross_batch_mode: str = "longllama",
        cross_batch_range: int = 0,
        cross_batch_stepping: bool = True,
        dataset_packing: int | None = None,
        cross_batch_ranges: list[int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(config, layer_idx)
        if dropout:
            raise ConfigError(
                f"attention dropout={dropout} in FoT memory layer {layer_idx}: cross-batch attention has no dropout "
                "(the original code raises too); set attention_options.fot.dropout to 0"
            )
        if mem_attention_grouping is not None:
            grouping = tuple(int(x) for x in mem_attention_grouping)
            if len(grouping) != 2 or min(grouping) < 1:
                raise ConfigError(
                    f"mem_attention_grouping={mem_attention_grouping!r} must be two positive ints (heads, queries), "
                    "e.g. [4, 2048], or null for one block"
                )
            mem_attention_grouping = grouping
        if top_k is not None and int(top_k) < 1:
            raise ConfigError(f"top_k={top_k} must be a positive number of memory keys, or null for dense memory")
        if int(last_context_length) < 1:
            raise ConfigError(f"last_context_length must be >= 1, got {last_context_length}")
        if min(int(scan_query_chunk_size), int(scan_key_chunk_size)) < 1:
            raise ConfigError("scan_query_chunk_size and scan_key_chunk_size must be positive")
        if cross_batch_mode not in CROSS_BATCH_MODES:
            raise ConfigError(f"cross_batch_mode={cross_batch_mode!r} is unknown; use longllama or paper")
        self.mem_positionals = bool(mem_positionals)
        self.mem_dtype = parse_dtype(mem_dtype, "mem_dtype")
        self.mem_attention_grouping = mem_attention_grouping
        self.torch_attention = bool(torch_attention)
        self.top_k = None if top_k is None else int(top_k)
        self.last_context_length = int(last_context_length)
        self.scan_cross_batch = bool(scan_cross_batch)
        self.scan_query_chunk_size = int(scan_query_chunk_size)
        self.scan_key_chunk_size = int(scan_key_chunk_size)
        self.cross_batch_mode = cross_batch_mode
        self.cross_batch_range = int(cross_batch_range)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> dict[str, Any] | None:
        """A LongLLaMA config.json's memory layers and settings (:func:`longllama_layout`)."""
        return longllama_layout(hf)

    # ------------------------------------------------------------------------------------------------- layout
    @classmethod
    def prepare_context(cls, ctx: AttentionContext, input_ids: torch.Tensor, config: ModelConfig) -> None:
        """Build the batch's :class:`CrossBatchLayout` once per forward into ``ctx.extras["fot_layout"]``.

        Per-batch keys of ``Transformer.forward`` (``cross_batch_range``, ``cross_batch_stepping``,
        ``dataset_packing``, ``cross_batch_ranges``) override the kind's options. Explicit ranges given as options are
        dropped when the batch sets ``cross_batch_range`` (e.g. evaluation with range 0).
        """
        opts = config.attention_options.get(cls.kind, {})
        extras = ctx.extras

        def setting(name: str, default: Any) -> Any:
            return extras[name] if name in extras else opts.get(name, default)

        if "cross_batch_ranges" in extras:
            ranges = extras["cross_batch_ranges"]
        elif "cross_batch_range" in extras:
            ranges = None
        else:
            ranges = opts.get("cross_batch_ranges")
        extras[LAYOUT_KEY] = cross_batch_layout(
            input_ids.shape[0],
            int(setting("cross_batch_range", 0)),
            dataset_packing=setting("dataset_packing", None),
            stepping=bool(setting("cross_batch_stepping", True)),
            ranges=ranges,
            mode=opts.get("cross_batch_mode", "longllama"),
            device=input_ids.device,
        )

    # ------------------------------------------------------------------------------------------------ forward
    def rotate_first(self, k: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """RoPE "as if at the position of the first local token" (position 0) on (B, T, heads, D)."""
        cos, sin = ctx.rope(torch.zeros(1, 1, dtype=torch.long, device=k.device))
        return self.rotate(k, cos, sin)

    def attention_inputs(
        self, x: torch.Tensor, ctx: AttentionContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, dim) -> q (B, H, T, D) and k_local, k_first, v (B, Hkv, T, D): RoPE at local positions for q and
        k_local, at position 0 for k_first; no rotation at all without ``mem_positionals``."""
        q, k, v = self.project(x)
        if self.mem_positionals:
            k_first = self.rotate_first(k, ctx)
            q, k = self.rotate(q, ctx.cos, ctx.sin), self.rotate(k, ctx.cos, ctx.sin)
        else:
            k_first = k
        return q.transpose(1, 2), k.transpose(1, 2), k_first.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: FoTCache | None = None) -> torch.Tensor:
        layout: CrossBatchLayout | None = ctx.extras.get(LAYOUT_KEY)
        if cache is not None:
            return self._forward_cached(x, ctx, cache, layout)
        q, k, k_first, v = self.attention_inputs(x, ctx)
        if layout is None:
            y = attend(q, k, v, backend=self.config.attn_backend, scale=self.scale, doc_ids=ctx.doc_ids,
                       key_mask=ctx.attention_mask, query_mask=ctx.attention_mask)
            return self.output(y)
        if ctx.attention_mask is not None:
            raise ValueError(
                "cross-batch training windows are never padded (every row is a full window of a stream); pass no "
                "attention_mask with cross_batch_range > 0"
            )
        if ctx.doc_ids is not None:
            raise ValueError(
                "cross-batch attention does not mask packed documents: FoT rows hold documents joined by <eos><bos> "
                "with positions 0..T-1 (doc_aware pipelines); do not pass restarting position_ids or doc_ids"
            )
        if ctx.position_ids.device.type != "xla" and bool((ctx.position_ids[:, 0] != 0).any()):  # XLA: no host sync
            raise ValueError(
                "cross-batch training numbers every window from 0 (memory keys sit at position 0, spec §1.2); got "
                "position_ids that do not start at 0; leave position_ids unset for FoT training batches"
            )
        impl = "chunked" if self.scan_cross_batch else self.config.attn_backend
        y = cross_batch_attention(q, k, k_first, v, layout, scale=self.scale, impl=impl,
                                  q_chunk=self.scan_query_chunk_size, k_chunk=self.scan_key_chunk_size)
        return self.output(y)

    def _forward_cached(
        self, x: torch.Tensor, ctx: AttentionContext, cache: FoTCache, layout: CrossBatchLayout | None
    ) -> torch.Tensor:
        if not isinstance(cache, FoTCache):
            raise TypeError(f"a FoT memory layer needs a FoTCache from new_cache(), got {type(cache).__name__}")
        if layout is not None:
            raise ValueError(
                "cross-batch (cross_batch_range > 0) is a training mechanism; inference with a cache uses the memory "
                "instead: pass cross_batch_range=0 (FoTSession does)"
            )
        if ctx.doc_ids is not None:
            raise ValueError("packed documents (doc_ids) cannot be combined with a FoT memory cache")
        q, k, k_first, v = self.attention_inputs(x, ctx)
        k_all, v_all = cache.append_local(k, k_first, v, ctx.attention_mask)
        y = memory_attention(q, k_all, v_all, cache.memory(), scale=self.scale, grouping=self.mem_attention_grouping,
                             top_k=self.top_k, use_sdpa=self.torch_attention, local_mask=cache.local_mask,
                             query_mask=ctx.attention_mask)
        return self.output(y)

    def new_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> FoTCache:
        return FoTCache(batch_size, self.n_kv_heads, self.head_dim, device, dtype, self.mem_dtype,
                        self.mem_positionals)

    def flops_per_token(self, context_len: int) -> float:
        """12·H·D·T·(1 + r): the dense paths score every query against all r+1 windows (r = the option default)."""
        return 12.0 * self.n_heads * self.head_dim * context_len * (1 + self.cross_batch_range)
