"""Grouped softmax of landmark attention (paper §3.1, spec §2): the reference formula and the blockwise tiling.

``reference`` (:func:`grouped_softmax_weights`) writes the formula out over the full ``(B, H, T, T)`` score matrix;
``blockwise`` (:func:`blockwise_landmark_attention`) is the tiling of the authors' Triton kernel (spec §2.4) in plain
PyTorch. See :mod:`lit_longctx.nn.attention.landmark` for the math.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.utils.checkpoint import checkpoint

from lit_longctx.nn.attention.causal import causal_doc_mask, repeat_kv


# ------------------------------------------------------------------------------------------------ reference path
def _safe_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where fully masked rows (all −inf) give zeros instead of NaN."""
    peak = scores.amax(-1, keepdim=True).detach()  # softmax is shift invariant: the max needs no gradient
    peak = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)
    e = torch.exp(scores - peak)
    denom = e.sum(-1, keepdim=True)
    return e / torch.where(denom > 0, denom, torch.ones_like(denom))


def grouped_softmax_weights(
    scores: torch.Tensor, is_mem: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention weights of the grouped softmax (paper §3.1, spec §2.1), straight from the formula.

    Args:
        scores: (B, H, Tq, S) scores s_ij (any float dtype; computed in it). The queries are the last Tq of the S
            key positions (causal mask aligned to the end, as after a cache).
        is_mem: (B, S) landmark flags of the key positions.
        key_mask: optional boolean visibility (broadcastable to (B, H, Tq, S)) applied on top of causality.

    Returns:
        (B, H, Tq, S) weights w_ij: landmark columns exactly 0; rows sum to 1 except the degenerate cases of §2.3.
    """
    b, h, tq, s = scores.shape
    off = s - tq
    dev = scores.device
    blk = torch.cumsum(is_mem.long(), dim=1) - is_mem.long()  # (B, S) landmarks strictly before j
    own = blk[:, off:]  # (B, Tq) block of each query
    visible = causal_doc_mask(tq, s, dev).view(1, 1, tq, s)
    if key_mask is not None:
        visible = visible & key_mask
    mem = is_mem.view(b, 1, 1, s)
    earlier = (blk.unsqueeze(1) < own.unsqueeze(2)).unsqueeze(1)  # (B, 1, Tq, S)
    same = (blk.unsqueeze(1) == own.unsqueeze(2)).unsqueeze(1)
    main = visible & ((mem & earlier) | (~mem & same))  # older landmarks + own block's regular tokens
    grouped = visible & ~mem & earlier  # regular tokens of earlier blocks, grouped by block

    p = _safe_softmax(scores.masked_fill(~main, float("-inf")))  # (B, H, Tq, S) main-group softmax

    n_groups = int(blk.max()) + 1 if s else 1  # one group per block present in the input
    index = blk.view(b, 1, 1, s).expand(b, h, tq, s)
    s_grp = scores.masked_fill(~grouped, float("-inf"))
    with torch.no_grad():
        peak = scores.new_full((b, h, tq, n_groups), float("-inf"))
        peak = peak.scatter_reduce(-1, index, s_grp, reduce="amax", include_self=True)
        peak = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)
    e = torch.exp(s_grp - peak.gather(-1, index))
    denom = scores.new_zeros(b, h, tq, n_groups).scatter_add(-1, index, e).gather(-1, index)
    within = e / torch.where(denom > 0, denom, torch.ones_like(denom))  # softmax inside each earlier block
    gate = scores.new_zeros(b, h, tq, n_groups).scatter_add(-1, index, p * mem)  # gate[b] = p_i(l_b)
    return p * (main & ~mem) + within * gate.gather(-1, index)


def reference_landmark_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_mem: torch.Tensor,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped-softmax attention of q (B, H, T, D) over k, v (B, Hkv, T, D), already rotated; holds (B, H, T, T).

    ``key_mask`` (B, T) bool hides pad keys (False) from every query."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cdt = torch.promote_types(q.dtype, torch.float32)
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep).to(cdt), repeat_kv(v, n_rep).to(cdt)
    scores = torch.matmul(q.to(cdt), k.transpose(-1, -2)) * scale  # (B, H, T, T)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return torch.matmul(grouped_softmax_weights(scores, is_mem, mask), v).to(q.dtype)


# ------------------------------------------------------------------------------------------------ blockwise path
class _Online:
    """Running max / sum / weighted values of an online softmax over key tiles (Milakov & Gimelshein 2018)."""

    def __init__(self, ref: torch.Tensor, d: int) -> None:
        self.peak = ref.new_full(ref.shape, float("-inf"))
        self.total = ref.new_zeros(ref.shape)
        self.acc = ref.new_zeros(*ref.shape, d)

    def rescale(self, scores_peak: torch.Tensor) -> torch.Tensor:
        """Move to the new running max; returns it with −inf replaced by 0 (for safe exponentials)."""
        new = torch.maximum(self.peak, scores_peak.detach())
        safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
        alpha = torch.exp(self.peak - safe)
        self.total = self.total * alpha
        self.acc = self.acc * alpha.unsqueeze(-1)
        self.peak = new
        return safe

    def result(self) -> torch.Tensor:
        total = torch.where(self.total > 0, self.total, torch.ones_like(self.total))
        return self.acc / total.unsqueeze(-1)


def _query_tiles(
    q: torch.Tensor,
    k_diag: torch.Tensor,
    v_diag: torch.Tensor,
    *steps: torch.Tensor,
    tiles_valid: torch.Tensor,
    m0: int,
    k_tile_blocks: int,
) -> torch.Tensor:
    """Output of the query tiles m0 .. m0+Qn−1.

    q: (B, H, Qn·Bk, D) pre-scaled by 1/√D; k_diag, v_diag: (B, H, Qn, Bk, D) the same tiles' keys and values;
    ``steps``: for each key step j (tiles j·Nk …): regular keys, then regular values (B, H, Nk·(Bk−1), D), then
    landmark keys (B, H, Nk, D); tiles_valid: (B, N, Bk) real (non-padding) positions.
    """
    b, h, nq, d = q.shape
    qn, block = k_diag.shape[2], k_diag.shape[3]
    reg = block - 1
    n_steps = len(steps) // 3
    k_regs, v_regs, k_lands = steps[:n_steps], steps[n_steps : 2 * n_steps], steps[2 * n_steps :]
    state = _Online(q.new_empty(b, h, nq), d)

    # diagonal tiles: causal softmax over the tile's regular keys (the tile's landmark key is never seen)
    s = torch.matmul(q.view(b, h, qn, block, d), k_diag.transpose(-1, -2))  # (B, H, Qn, Bk, Bk)
    a = torch.arange(block, device=q.device)
    inside = (a.view(1, block) <= a.view(block, 1)) & (a < reg).view(1, block)  # (Bk query, Bk key)
    mask = inside.view(1, 1, block, block) & tiles_valid[:, m0 : m0 + qn].unsqueeze(2)  # (B, Qn, Bk, Bk)
    s = s.masked_fill(~mask.unsqueeze(1), float("-inf")).view(b, h, nq, block)
    safe = state.rescale(s.amax(-1))
    p = torch.exp(s - safe.unsqueeze(-1))
    state.total = state.total + p.sum(-1)
    state.acc = state.acc + torch.matmul(p.view(b, h, qn, block, block), v_diag).view(b, h, nq, d)

    # earlier tiles: one virtual key each (landmark score, within-tile softmax average of the regular values)
    row_tile = m0 + torch.arange(nq, device=q.device) // block  # (Q,) tile index of each query row
    for j in range(n_steps):
        n0 = j * k_tile_blocks
        nk = k_lands[j].shape[2]
        s_reg = torch.matmul(q, k_regs[j].transpose(-1, -2)).view(b, h, nq, nk, reg)  # (B, H, Q, Nk, Bk-1)
        reg_valid = tiles_valid[:, n0 : n0 + nk, :reg]
        if q.device.type == "xla" or not bool(reg_valid.all()):  # only tiles with padding need it (XLA: no sync)
            s_reg = s_reg.masked_fill(~reg_valid.view(b, 1, 1, nk, reg), float("-inf"))
        peak = s_reg.amax(-1, keepdim=True).detach()
        peak = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)
        e = torch.exp(s_reg - peak)
        denom = e.sum(-1)  # (B, H, Q, Nk) within-tile normaliser
        s_land = torch.matmul(q, k_lands[j].transpose(-1, -2))  # (B, H, Q, Nk) landmark scores
        earlier = row_tile.view(nq, 1) > torch.arange(n0, n0 + nk, device=q.device).view(1, nk)  # (Q, Nk)
        land_ok = earlier.view(1, 1, nq, nk) & tiles_valid[:, n0 : n0 + nk, reg].view(b, 1, 1, nk)
        s_land = s_land.masked_fill(~land_ok, float("-inf"))
        safe = state.rescale(s_land.amax(-1))
        gate = torch.exp(s_land - safe.unsqueeze(-1))  # virtual-key weights
        state.total = state.total + gate.sum(-1)
        coef = gate / torch.where(denom > 0, denom, torch.ones_like(denom))
        weights = (e * coef.unsqueeze(-1)).view(b, h, nq, nk * reg)
        state.acc = state.acc + torch.matmul(weights, v_regs[j])
    return state.result()


def blockwise_landmark_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    block: int,
    scale: float | None = None,
    q_tile_blocks: int | None = None,
    k_tile_blocks: int | None = None,
) -> torch.Tensor:
    """Grouped-softmax attention in block tiles (spec §2.4), equal to :func:`reference_landmark_attention`.

    Args:
        q: (B, H, T, D) rotated queries; k, v: (B, Hkv, T, D) rotated keys and values.
        offsets: (B,) index of the first landmark slot per row (:func:`grid_offsets`): row r has its landmarks at
            exactly o_r, o_r + Bk, o_r + 2·Bk, … (< T), o_r < Bk.
        block: Bk = mem_freq + 1.
        q_tile_blocks, k_tile_blocks: blocks per query step / per key step (memory per step ∝ their product);
            defaults aim at ~512 queries × ~1024 keys.

    Each row is left-padded by Bk − 1 − o_r and right-padded to whole tiles (padding keys are masked), so windows
    that start or end mid-block are exact. With gradients enabled each query step runs under activation
    checkpointing: the backward recomputes one step at a time. Keys and values are split into steps once, outside
    the loop, so no step slices a tensor that needs a gradient (whose backward would allocate a full-size zero
    gradient per step).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, h, t, d = q.shape
    cdt = torch.promote_types(q.dtype, torch.float32)
    n_rep = h // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    qn = q_tile_blocks or max(1, 512 // block)
    kn = k_tile_blocks or max(1, 1024 // block)
    reg = block - 1

    lpad = (block - 1 - offsets).to(q.device)  # (B,)
    # XLA: the bound lpad <= Bk - 1 instead of a host sync (at most one more all-padding tile, masked)
    n_tiles = math.ceil(((block - 1 if q.device.type == "xla" else int(lpad.max())) + t) / block)
    tp = n_tiles * block
    src = torch.arange(tp, device=q.device).unsqueeze(0) - lpad.unsqueeze(1)  # (B, Tp) source index per slot
    valid = (src >= 0) & (src < t)
    gather_idx = src.clamp(0, t - 1).view(b, 1, tp, 1).expand(b, h, tp, d)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return x.to(cdt).gather(2, gather_idx) * valid.view(b, 1, tp, 1)

    qp = pad(q) * scale
    k4, v4 = pad(k).view(b, h, n_tiles, block, d), pad(v).view(b, h, n_tiles, block, d)
    k_regs = k4[:, :, :, :reg].reshape(b, h, n_tiles * reg, d).split(kn * reg, dim=2)
    v_regs = v4[:, :, :, :reg].reshape(b, h, n_tiles * reg, d).split(kn * reg, dim=2)
    k_lands = k4[:, :, :, reg].split(kn, dim=2)
    tiles_valid = valid.view(b, n_tiles, block)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    outs = []
    for qc, kd, vd, m0 in zip(qp.split(qn * block, dim=2), k4.split(qn, dim=2), v4.split(qn, dim=2),
                              range(0, n_tiles, qn)):
        used = -(-(m0 + kd.shape[2] - 1) // kn)  # key steps holding a tile earlier than the chunk's last tile
        steps = (*k_regs[:used], *v_regs[:used], *k_lands[:used])
        fn = functools.partial(_query_tiles, tiles_valid=tiles_valid, m0=m0, k_tile_blocks=kn)
        if grad and q.device.type == "xla":  # torch's checkpoint has no XLA device module; torch_xla's keeps the
            from torch_xla.utils.checkpoint import checkpoint as xla_checkpoint  # recompute (optimization barrier)

            outs.append(xla_checkpoint(fn, qc, kd, vd, *steps))
            continue
        outs.append(checkpoint(fn, qc, kd, vd, *steps, use_reentrant=False) if grad else fn(qc, kd, vd, *steps))
    y = torch.cat(outs, dim=2)  # (B, H, Tp, D)
    back = (torch.arange(t, device=q.device).unsqueeze(0) + lpad.unsqueeze(1)).view(b, 1, t, 1).expand(b, h, t, d)
    return y.gather(2, back).to(q.dtype)
