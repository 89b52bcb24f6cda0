"""Causal softmax attention with GQA/MQA, document masking for packed rows, and a KV cache.

Backends (``ModelConfig.attn_backend``):
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (default; GQA through ``enable_gqa``);
- ``eager``: the reference, written out (float32 scores and softmax);
- ``flash_attn``: FlashAttention-2 (Dao 2023), used only when the package imports and the inputs are fp16/bf16 on
  CUDA; otherwise the call silently takes the sdpa path, so configs stay portable.

Masks are derived from positions: the causal part is aligned to the end of the keys (a chunk of queries that follows a
cache sees all cached keys), and packed documents see only their own document (``doc_ids`` from the context).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from lit_longctx.nn.attention.base import Attention, AttentionContext, register_attention
from lit_longctx.nn.attention.kv_cache import KVCache


@functools.cache
def _flash_attn() -> Any | None:
    try:
        import flash_attn
    except ImportError:
        return None
    return flash_attn


def flash_attn_available() -> bool:
    return _flash_attn() is not None


def _flash_usable(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and flash_attn_available()


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv·n_rep, S, D), each KV head repeated for its group of query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def causal_doc_mask(
    q_len: int, k_len: int, device: torch.device, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask (True = attend), causal aligned to the last key; (Tq, S) or (B, 1, Tq, S) with documents."""
    offset = k_len - q_len
    qi = torch.arange(q_len, device=device).unsqueeze(1) + offset
    kj = torch.arange(k_len, device=device).unsqueeze(0)
    mask = kj <= qi
    if doc_ids is not None:
        if k_len != q_len:
            raise ValueError("document masking needs queries and keys of the same length (no cache)")
        same = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)
        mask = (same & mask).unsqueeze(1)
    return mask


def padding_mask(mask: torch.Tensor, key_mask: torch.Tensor | None, query_mask: torch.Tensor | None) -> torch.Tensor:
    """``mask`` ((Tq, S) or (B, 1, Tq, S), True = attend) restricted to token keys: (B, 1, Tq, S), or ``mask`` itself
    when ``key_mask`` is None.

    ``key_mask`` (B, S) marks token keys (False = pad); ``query_mask`` (B, Tq) the token queries. A pad query keeps
    every key its causal mask allows, so that no row of the softmax is empty (its output is never read).
    """
    if key_mask is None:
        return mask
    keys = key_mask[:, None, None, :]
    if query_mask is not None:
        keys = keys | ~query_mask[:, None, :, None]
    return mask & keys


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Reference attention: float32 scores, boolean or additive mask, float32 softmax."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor, scale: float):
    fa = _flash_attn()
    b, h, t, d = q.shape
    row = torch.arange(b, device=doc_ids.device).unsqueeze(1) * (int(doc_ids.max()) + 1)
    seg = (doc_ids + row).reshape(-1)
    starts = torch.nonzero(torch.diff(seg, prepend=seg[:1] - 1)).squeeze(1)
    cu = torch.cat([starts, starts.new_tensor([seg.numel()])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(b * t, x.shape[1], d)

    out = fa.flash_attn_varlen_func(flat(q), flat(k), flat(v), cu, cu, max_len, max_len, softmax_scale=scale,
                                    causal=True)
    return out.view(b, t, h, d).transpose(1, 2)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "sdpa",
    scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q (B, H, Tq, D) over k, v (B, Hkv, S, D), S ≥ Tq, the queries being the last Tq positions.

    ``doc_ids`` (B, T) restricts each query to keys of its own document (packed sequences; needs Tq == S).
    ``key_mask`` (B, S) bool hides pad keys (False) from every query; ``query_mask`` (B, Tq) marks the token queries
    (see :func:`padding_mask`). Padded batches take the sdpa/eager path (FlashAttention has no key mask here).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_len, k_len = q.shape[2], k.shape[2]
    if key_mask is not None:
        mask = padding_mask(causal_doc_mask(q_len, k_len, q.device, doc_ids), key_mask, query_mask)
        if backend == "eager":
            return eager_attention(q, k, v, mask, scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    if backend == "flash_attn" and _flash_usable(q):
        if doc_ids is not None:
            return _flash_varlen(q, k, v, doc_ids, scale)
        out = _flash_attn().flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            softmax_scale=scale, causal=True)
        return out.transpose(1, 2)
    simple = doc_ids is None and (q_len == k_len or q_len == 1)
    mask = None if simple else causal_doc_mask(q_len, k_len, q.device, doc_ids)
    if backend == "eager":
        if simple and q_len > 1:
            mask = causal_doc_mask(q_len, k_len, q.device)
        return eager_attention(q, k, v, mask, scale)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=simple and q_len > 1, scale=scale, enable_gqa=gqa
    )


@register_attention("causal")
class CausalAttention(Attention):
    """Plain causal self-attention with RoPE (LLaMA)."""

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = self.project(x)
        q = self.rotate(q, ctx.cos, ctx.sin).transpose(1, 2)
        k = self.rotate(k, ctx.cos, ctx.sin).transpose(1, 2)
        v = v.transpose(1, 2)
        key_mask = ctx.attention_mask
        if cache is not None:
            if ctx.doc_ids is not None:
                raise ValueError("packed documents (doc_ids) cannot be combined with a KV cache")
            k, v = cache.append(k, v, ctx.attention_mask)
            key_mask = cache.key_mask
        y = attend(q, k, v, backend=self.config.attn_backend, scale=self.scale, doc_ids=ctx.doc_ids,
                   key_mask=key_mask, query_mask=ctx.attention_mask)
        return self.output(y)
