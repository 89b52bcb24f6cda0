"""Per-row decoding of left-padded batches through a LoLCATs ``hybrid_linear`` cache (spec §2 "Generation state").

A left-padded batch gives every row what it gives alone (docs/CONTRACTS.md). A row's windows are defined on ITS OWN
absolute positions (its tokens fed so far, pads not counted), and the rows of a padded batch sit at different
positions at every fed column. So the cache keeps, next to the shared buffer of raw keys/values, each buffered key's
row position (``pos``, (B, n)) and whether it is still in that row's window buffer (``mask``: False for pads and for
keys already folded into the row's (S, z)). For each query at row position p the window is W = [ws(p), p] and every
unfolded key before ws(p) is in the linear set Λ; the window start is

- sliding (``decode_window=sliding``): ws(p) = max(0, p − w + 1), the reference's decode;
- terrace (``decode_window=terrace``, start-aligned ``tk``): ws(p) = max(0, (⌊p/w⌋ − 1)·w), the previous full block
  plus the current partial one, so a row folds its oldest block into (S, z) when IT crosses a block boundary;
- ``prefill=forward`` with ``tk``: the reference computes a prompt's first chunk with the terrace forward, and a
  row alone with ``prefill_chunk`` C puts its first L = min(C, n) prompt tokens (n = its prompt length) in that
  chunk. :class:`HybridLinearSession` tells the caches each row's L while it prefills, so prompt queries at p < L
  get the forward's window start, max(0, (⌊(p + o)/w⌋ − 1)·w − o) with o = 0 (``start``) or (−L) mod w (``end``),
  and every other query the decode window's.

ws(p) never decreases along a row, so keys before it are folded lazily (before and after each call) without ever
removing a key a later query still needs; leading buffer columns no row holds are dropped, so the buffer stays
within 2w keys plus the chunk being fed. Fed through the layer without that session (a cache passed to the model by
hand), a ``tk`` padded prompt under ``prefill=forward`` with a sliding decode window must come in one call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from lit_longctx.nn.attention.hybrid_linear_paths import (
    _window_plus_linear,
    compute_dtype,
    hybrid_from_masks,
    linear_attention,
)
from lit_longctx.nn.session import DecodingSession, check_attention_mask

if TYPE_CHECKING:
    from lit_longctx.nn.attention.hybrid_linear import HybridLinearAttention, HybridLinearCache


def enter_rows(cache: HybridLinearCache, batch_size: int, device: torch.device) -> None:
    """Switch ``cache`` to per-row bookkeeping (first padded call); keys already buffered are every row's tokens."""
    if cache.mask is not None:
        return
    n = cache.k.shape[2]
    cache.mask = torch.ones(batch_size, n, dtype=torch.bool, device=device)
    cache.pos = torch.arange(cache.length - n, cache.length, device=device).expand(batch_size, n)
    cache.seen = torch.full((batch_size,), cache.length, dtype=torch.long, device=device)


def window_starts(layer: HybridLinearAttention, cache: HybridLinearCache, pos: torch.Tensor) -> torch.Tensor:
    """Row position of the first window key of the queries at row positions ``pos`` (B, T) (see the module)."""
    w = layer.window_size
    if layer.decode_window == "terrace":
        decode = ((torch.div(pos, w, rounding_mode="floor") - 1) * w).clamp_min(0)
    else:
        decode = (pos - w + 1).clamp_min(0)
    if not (forward_prompt(layer) and cache.in_prompt and cache.forward_len is not None):
        return decode
    length = cache.forward_len[:, None]
    o = (-length) % w if layer.block_alignment == "end" else torch.zeros_like(length)
    forward = ((torch.div(pos + o, w, rounding_mode="floor") - 1) * w - o).clamp_min(0)
    return torch.where(pos < length, forward, decode)


def forward_prompt(layer: HybridLinearAttention) -> bool:
    """Whether the prompt's forward windows differ from the decode window's (``tk`` forward, sliding decode)."""
    return layer.window == "tk" and layer.prefill == "forward" and layer.decode_window == "sliding"


def fold_rows(layer: HybridLinearAttention, cache: HybridLinearCache, upto: torch.Tensor) -> None:
    """Fold each row's buffered keys at row positions < ``upto`` (B,) into its (S, z); drop columns no row holds."""
    fold = cache.mask & (cache.pos < upto[:, None])  # (B, n)
    held = fold.any(0)
    if bool(held.any()):
        n = int(held.nonzero().max()) + 1
        acc = cache.kv_state.dtype
        fk = layer.feature_map_k(layer._expand_kv(cache.k[:, :, :n], acc)) * fold[:, None, :n, None]
        cache.kv_state = cache.kv_state + fk.transpose(-1, -2) @ layer._expand_kv(cache.v[:, :, :n], acc)
        cache.k_state = cache.k_state + fk.sum(dim=2)
        cache.mask = cache.mask & ~fold
    keep = cache.mask.any(0)
    drop = int(keep.int().argmax()) if bool(keep.any()) else keep.shape[0]
    if drop:
        cache.k, cache.v = cache.k[:, :, drop:], cache.v[:, :, drop:]
        cache.mask, cache.pos = cache.mask[:, drop:], cache.pos[:, drop:]


def check_split_prompt(layer: HybridLinearAttention, cache: HybridLinearCache, mask: torch.Tensor | None) -> None:
    """Without :class:`HybridLinearSession`'s prompt lengths, a padded prompt's forward must come in one call."""
    if (forward_prompt(layer) and cache.padded and cache.length and mask is not None
            and not (cache.in_prompt and cache.forward_len is not None)):
        raise ValueError(
            "prefill=forward runs each row's prompt through the layer's terrace forward, and the rows of a padded "
            "batch start in different places: feed a padded prompt split over several calls through "
            "session_for(model, batch_size).prefill(ids, attention_mask), which knows each row's prompt length, give "
            "it in one call, or set the hybrid_linear option prefill=decode_window"
        )


def cached_rows(
    layer: HybridLinearAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: HybridLinearCache,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Attend T new tokens of a (left-padded) batch through ``cache``, each row on its own positions.

    q (B, H, T, D), k, v (B, Hkv, T, D) after RoPE; ``mask`` (B, T) marks the tokens of this call (None: all are
    tokens, e.g. a decode step). Pads are in no set and never folded into (S, z). Returns (B, H, T, D) in the compute
    dtype (pad queries get a finite, meaningless output).
    """
    b, t = q.shape[0], q.shape[2]
    enter_rows(cache, b, q.device)
    if mask is not None and bool(((cache.seen > 0) & ~mask.all(1)).any()):
        raise ValueError("a pad after a row's first token: hybrid_linear caches take left-padded prompts only")
    new = mask if mask is not None else torch.ones(b, t, dtype=torch.bool, device=q.device)
    cache.padded = cache.padded or not bool(new.all())
    qpos = cache.seen[:, None] + new.long().cumsum(1) - 1  # (B, T) row positions of the queries (pads: before 0)
    if layer.window == "none":  # no window: every token goes straight into (S, z)
        acc = cache.kv_state.dtype
        fk = layer.feature_map_k(layer._expand_kv(k, acc)) * new[:, None, :, None]
        y, (cache.kv_state, cache.k_state) = linear_attention(
            layer.feature_map_q(q.to(acc)), fk, layer._expand_kv(v, acc), state=(cache.kv_state, cache.k_state)
        )
        cache.seen, cache.length = cache.seen + new.sum(1), cache.length + t
        return y
    check_split_prompt(layer, cache, mask)
    # the prompt in one call without the session's lengths: every row's own forward (blocks on its own tokens)
    own_forward = layer.prefill == "forward" and cache.length == 0 and t > 1 and not cache.in_prompt
    fold_rows(layer, cache, window_starts(layer, cache, qpos[:, :1])[:, 0])
    state = (cache.kv_state, cache.k_state)
    cache.k, cache.v = torch.cat([cache.k, k.to(cache.k.dtype)], dim=2), torch.cat([cache.v, v.to(cache.v.dtype)], 2)
    cache.mask, cache.pos = torch.cat([cache.mask, new], dim=1), torch.cat([cache.pos, qpos], dim=1)
    cache.seen, cache.length = cache.seen + new.sum(1), cache.length + t
    if own_forward:
        y = layer._full(q, k, v, mask)
    else:
        y = _attend_rows(layer, q, cache, qpos, new, window_starts(layer, cache, qpos), state)
    fold_rows(layer, cache, window_starts(layer, cache, qpos[:, -1:])[:, 0])
    return y


def _attend_rows(
    layer: HybridLinearAttention,
    q: torch.Tensor,
    cache: HybridLinearCache,
    qpos: torch.Tensor,
    new: torch.Tensor,
    starts: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """q (B, H, T, D) over the whole buffer (which ends with this call's keys) plus ``state``: W(i) = the row's
    unfolded keys at positions [starts, qpos], Λ(i) = its unfolded keys before ``starts``."""
    acc = compute_dtype(q.dtype)
    q, k, v = q.to(acc), layer._expand_kv(cache.k, acc), layer._expand_kv(cache.v, acc)
    kpos, held = cache.pos[:, None, :], cache.mask[:, None, :]  # (B, 1, S)
    ws = starts[:, :, None]
    win = held & (kpos >= ws) & (kpos <= qpos[:, :, None])
    win = win | ~new[:, :, None]  # a pad query sees every key, so that its row stays finite (its output is unused)
    gamma, alpha = layer.factors(acc)
    if q.shape[2] == 1:  # one query: the fold before it left only its window keys held, so Λ is empty (no φ_k)
        scores = ((q @ k.transpose(-1, -2)) * layer.scale).masked_fill(~win[:, None], float("-inf"))
        fq = layer.feature_map_q(q)
        return _window_plus_linear(scores, v, gamma, alpha, fq @ state[0], fq @ state[1].unsqueeze(-1))
    lin = held & (kpos < ws) & new[:, :, None]
    return hybrid_from_masks(
        q, k, v, layer.feature_map_q(q), layer.feature_map_k(k), gamma, alpha, win[:, None], lin[:, None],
        scale=layer.scale, state=state,
    )[0]


class HybridLinearSession(DecodingSession):
    """:class:`DecodingSession` that tells the ``hybrid_linear`` caches, while a first prompt is prefilled (or scored,
    :meth:`padded_logits`), how many of each row's tokens the row alone would put in its forward chunk:
    min(``prefill_chunk``, its prompt length)."""

    @contextmanager
    def _prompt(self, ids: torch.Tensor, mask: torch.Tensor | None) -> Iterator[None]:
        from lit_longctx.nn.attention.hybrid_linear import HybridLinearCache

        lengths = mask.sum(1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1], device=ids.device)
        caches = [c for c in self.state.caches if isinstance(c, HybridLinearCache) and c.length == 0]
        for cache in caches:
            cache.forward_len, cache.in_prompt = lengths.clamp_max(self.prefill_chunk), True
        try:
            yield
        finally:
            for cache in caches:
                cache.in_prompt = False

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = check_attention_mask(attention_mask, ids)
        with self._prompt(ids, mask):
            return super().prefill(ids, mask)

    def padded_logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        mask = check_attention_mask(attention_mask, ids)
        with self._prompt(ids, mask):
            yield from super().padded_logits(ids, mask)
