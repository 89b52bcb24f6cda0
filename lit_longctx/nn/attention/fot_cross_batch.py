"""FoT cross-batch training: which rows each row attends to, and the joint softmax over them (spec §1).

Tworkowski et al., "Focused Transformer: Contrastive Training for Context Scaling", arXiv 2307.03170 (NeurIPS 2023):
§3 (memory attention and crossbatch training), App. B.2 (the memory layer: one softmax over local and additional keys),
App. A.2 (LongLLaMA's cross-batch with k-packing), App. B.3 (the paper's two-context variant). The semantics are those
of the released code (CStanKonrad/long_llama ``FoT/cross_batch.py``), as pinned down in ``specs/fot.md`` §1-§2.

Row b of a microbatch of windows (B, T) attends with one softmax to
    z(0, j) = <R_i q_i, R_j k_{b,j}>/√D + causal(i, j)         its own window, standard RoPE;
    z(c, j) = <R_i q_i, R_0 k_{b-c,j}>/√D + m_b(c), c = 1..r   rows b-1..b-r of the same forward, keys "as if first";
    o_i = Σ_{c,j} softmax(z)_{c,j} · v_{b-c,j}.
There is no causal mask on the additional contexts. m_b(c) = 0 for c < n_b, -1e6 otherwise, with n_b = min(pack_b, b+1),
pack_b = r+1 without stepping (or k = 1), else min((b mod k)·ceil((r+1)/max(k-1, 1)) + 1, r+1) (k = dataset_packing).
Nothing wraps around: a row never sees a later row. Gradients flow into the keys and values of every visible row.
Two paths compute it: ``dense`` (SDPA, or the eager reference, over [B, H, T, (S+1)·T] with the additive mask) and
``chunked`` (``scan_cross_batch``: blockwise online softmax with a recomputing backward, never holding the score
matrix, skipping the slots a row cannot see); both in promote(dtype, float32).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from lit_longctx.nn.attention.causal import causal_doc_mask, repeat_kv
from lit_longctx.nn.config import ConfigError

#: additive mask value of the original code (JAX ``min_value``, PyTorch floor); exactly 0 weight in a float32 softmax
MASK_VALUE = -1e6
CROSS_BATCH_MODES = ("longllama", "paper")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """promote(dtype, float32): logits and softmax are at least float32 (spec §1.3)."""
    return torch.promote_types(dtype, torch.float32)


# ------------------------------------------------------------------------------------------------ cross-batch layout
def cross_batch_row_ranges(
    batch_size: int,
    cross_batch_range: int,
    dataset_packing: int = 1,
    stepping: bool = True,
    ranges: list[int] | None = None,
) -> list[int]:
    """d_b, the number of additional contexts row b sees (LongLLaMA, spec §1.2).

    n_b = min(pack_b, b + 1) visible slots (local included), d_b = n_b - 1, with pack_b = r+1 when k = 1 or stepping is
    off, else min((b mod k)·s + 1, r+1), s = ceil((r+1) / max(k-1, 1)); with explicit per-in-pack ``ranges`` pack_b =
    ranges[b mod k] + 1. The ``b + 1`` cap means no row ever sees a slot that would wrap around the batch.
    """
    slots = cross_batch_range + 1
    step = math.ceil(slots / max(dataset_packing - 1, 1))
    out = []
    for b in range(batch_size):
        j = b % dataset_packing
        if ranges is not None:
            pack = ranges[j] + 1
        elif dataset_packing == 1 or not stepping:
            pack = slots
        else:
            pack = min(j * step + 1, slots)
        out.append(min(pack, b + 1) - 1)
    return out


@dataclass(frozen=True)
class CrossBatchLayout:
    """Which batch rows fill the additional-context slots of every row, and which of those slots a row may see.

    Attributes:
        sources: (B, S) long; ``sources[b, c-1]`` is the row whose keys and values fill slot c of row b.
        visible: (B, S) bool; slot c of row b takes part in row b's softmax.
        ranges: d_b, the number of visible additional contexts per row.
        positives: per row, how many visible slots are earlier windows of the row's own stream (same pack).
        negatives: per row, how many visible slots come from other streams.
    """

    sources: torch.Tensor
    visible: torch.Tensor
    ranges: tuple[int, ...]
    positives: tuple[int, ...]
    negatives: tuple[int, ...]

    @property
    def num_slots(self) -> int:
        return self.sources.shape[1]


def cross_batch_layout(
    batch_size: int,
    cross_batch_range: int = 0,
    dataset_packing: int | None = None,
    stepping: bool = True,
    ranges: list[int] | None = None,
    mode: str = "longllama",
    device: torch.device | str | None = None,
) -> CrossBatchLayout | None:
    """The cross-batch layout of one microbatch, or None when no row sees an additional context (plain attention).

    Args:
        batch_size: rows in the microbatch (windows of one forward pass).
        cross_batch_range: r, additional contexts (``longllama``), or d, documents including the positive one
            (``paper``).
        dataset_packing: k, consecutive rows holding consecutive windows of one stream; default 1, or len(ranges).
        stepping: LongLLaMA's ``cross_batch_stepping`` (ranges that grow with the position inside a pack).
        ranges: explicit per-in-pack ranges (e.g. ``[0, 3, 7, 7]``), replacing r and stepping.
        mode: ``longllama`` (the released code: rows b-1..b-d_b, no wrap-around) or ``paper`` (App. B.3: the last row
            of each pack sees its own k-1 previous windows and the k-1 previous windows of the next d-1 packs, mod B/k).

    "Larger than the microbatch allows": row b sees at most the b rows before it, so a slot that no row of this
    microbatch can see (max_b d_b < r; for the formula this is r > B - 1) is an error, not silently dropped compute.
    """
    if mode not in CROSS_BATCH_MODES:
        raise ConfigError(f"cross_batch_mode={mode!r} is unknown; use one of {', '.join(CROSS_BATCH_MODES)}")
    if ranges is not None:
        ranges = [int(x) for x in ranges]
        if mode == "paper":
            raise ConfigError("explicit cross_batch_ranges are a LongLLaMA-mode option; cross_batch_mode='paper' "
                              "takes one cross_batch_range (the number of documents d)")
        if not ranges or min(ranges) < 0:
            raise ConfigError(f"cross_batch_ranges must be a non-empty list of ranges >= 0, got {ranges}")
        if dataset_packing is not None and dataset_packing != len(ranges):
            raise ConfigError(
                f"cross_batch_ranges={ranges} gives one range per position in a pack, so it needs "
                f"len(cross_batch_ranges) == dataset_packing, got dataset_packing={dataset_packing}"
            )
        dataset_packing = len(ranges)
    k = 1 if dataset_packing is None else int(dataset_packing)
    r = int(cross_batch_range)
    if k < 1:
        raise ConfigError(f"dataset_packing must be >= 1, got {k}")
    if r < 0:
        raise ConfigError(f"cross_batch_range must be >= 0, got {r}")
    slots = max(ranges) if ranges is not None else r
    if slots == 0:  # plain attention: the rows need not form packs (e.g. a single prompt at inference)
        return None
    if batch_size % k:
        raise ValueError(
            f"a microbatch of {batch_size} rows is not divisible by dataset_packing={k}: a pack of k consecutive "
            "windows of one stream must not straddle microbatches or ranks; use a (per-device, per-accumulation-step) "
            f"batch size that is a multiple of {k}"
        )
    if mode == "paper":
        return _paper_layout(batch_size, r, k, device)
    d = cross_batch_row_ranges(batch_size, r, k, stepping, ranges)
    if max(d) < slots:
        needed = k
        while max(cross_batch_row_ranges(needed, r, k, stepping, ranges)) < slots:
            needed += k
        asked = f"cross_batch_ranges={ranges}" if ranges is not None else f"cross_batch_range={r}"
        raise ValueError(
            f"{asked} is larger than a microbatch of {batch_size} rows allows: row b can only see the b rows before it "
            f"(nothing wraps around), so no row here sees more than {max(d)} additional contexts; lower the range or "
            f"use a microbatch of at least {needed} rows (fewer gradient-accumulation steps or devices)"
        )
    rows = torch.arange(batch_size).unsqueeze(1)
    slot = torch.arange(1, slots + 1).unsqueeze(0)
    sources = (rows - slot) % batch_size  # JAX indexing; wrapped slots are never visible
    visible = slot <= torch.tensor(d).unsqueeze(1)
    pos = tuple(min(db, b % k) for b, db in enumerate(d))
    neg = tuple(db - p for db, p in zip(d, pos))
    return CrossBatchLayout(sources.to(device), visible.to(device), tuple(d), pos, neg)


def _paper_layout(batch_size: int, d: int, k: int, device: torch.device | str | None) -> CrossBatchLayout | None:
    """Paper variant (§3.2, App. B.3): packs are [C_prev_w, ..., C_prev_1, C_curr] with w = k-1 previous windows."""
    if d == 0:
        return None
    if k < 2:
        raise ConfigError(
            "cross_batch_mode='paper' needs dataset_packing >= 2: each pack holds w = k-1 previous windows and the "
            "current window (use the doc_aware_k2 pipeline for the paper's C_prev/C_curr pairs)"
        )
    n_packs = batch_size // k
    if d > n_packs:
        raise ValueError(
            f"cross_batch_mode='paper' with cross_batch_range={d} needs d-1 other packs for negatives, but the "
            f"microbatch holds only {n_packs} packs of {k} rows; lower the range or raise the microbatch size"
        )
    w = k - 1
    slots = w * d
    sources = torch.arange(batch_size).unsqueeze(1).repeat(1, slots)
    visible = torch.zeros(batch_size, slots, dtype=torch.bool)
    pos, neg = [0] * batch_size, [0] * batch_size
    for p in range(n_packs):
        row = p * k + w
        prev = [(q % n_packs) * k + w - 1 - i for q in range(p, p + d) for i in range(w)]
        sources[row] = torch.tensor(prev)
        visible[row] = True
        pos[row], neg[row] = w, w * (d - 1)
    ranges = tuple(slots if (b % k) == w else 0 for b in range(batch_size))
    return CrossBatchLayout(sources.to(device), visible.to(device), ranges, tuple(pos), tuple(neg))


# ----------------------------------------------------------------------------------------- cross-batch attention
def cross_batch_bias(layout: CrossBatchLayout, seq_len: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, T, (S+1)·T): causal on slot 0, 0 on visible slots, -1e6 elsewhere."""
    b, s = layout.visible.shape
    causal = causal_doc_mask(seq_len, seq_len, device)
    local = torch.where(causal, 0.0, MASK_VALUE).to(dtype)[None, :, None, :].expand(b, seq_len, 1, seq_len)
    extra = torch.where(layout.visible.to(device), 0.0, MASK_VALUE).to(dtype)  # (B, S)
    extra = extra[:, None, :, None].expand(b, seq_len, s, seq_len)
    return torch.cat([local, extra], dim=2).reshape(b, 1, seq_len, (s + 1) * seq_len)


def gather_slots(x_local: torch.Tensor, x_other: torch.Tensor, layout: CrossBatchLayout) -> torch.Tensor:
    """[x_local[b]; x_other[src(b, 1)]; ...; x_other[src(b, S)]] flattened over slots: (B, Hkv, (S+1)·T, D).

    Keys: ``x_local`` rotated at local positions, ``x_other`` rotated at position 0. Values: v for both.
    """
    b, h, t, d = x_local.shape
    slots = torch.cat([x_local.unsqueeze(1), x_other[layout.sources]], dim=1)  # (B, S+1, Hkv, T, D)
    return slots.transpose(1, 2).reshape(b, h, (layout.num_slots + 1) * t, d)


def cross_batch_scores(
    q: torch.Tensor, k_local: torch.Tensor, k_mem: torch.Tensor, layout: CrossBatchLayout, scale: float
) -> torch.Tensor:
    """The masked logits z of every row, (B, H, T, (S+1)·T), in promote(dtype, float32): the eager reference."""
    dt = compute_dtype(q.dtype)
    keys = gather_slots(k_local, k_mem, layout)
    keys = repeat_kv(keys, q.shape[1] // keys.shape[1]).to(dt)
    scores = torch.matmul(q.to(dt), keys.transpose(-1, -2)) * scale
    return scores + cross_batch_bias(layout, q.shape[2], q.device, dt)


def _dense_cross_batch(
    q: torch.Tensor,
    k_local: torch.Tensor,
    k_mem: torch.Tensor,
    v: torch.Tensor,
    layout: CrossBatchLayout,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """Dense path: all (S+1)·T keys per row with the additive mask; ``eager`` is the written-out reference."""
    dt = compute_dtype(q.dtype)
    values = gather_slots(v, v, layout)
    if backend == "eager":
        probs = torch.softmax(cross_batch_scores(q, k_local, k_mem, layout, scale), dim=-1)
        values = repeat_kv(values, q.shape[1] // values.shape[1]).to(dt)
        return torch.matmul(probs, values).to(q.dtype)
    keys = gather_slots(k_local, k_mem, layout)
    bias = cross_batch_bias(layout, q.shape[2], q.device, dt)
    y = F.scaled_dot_product_attention(q.to(dt), keys.to(dt), values.to(dt), attn_mask=bias, scale=scale,
                                       enable_gqa=q.shape[1] != keys.shape[1])
    return y.to(q.dtype)


@dataclass
class _Slot:
    """The rows that see one slot, and where their keys (in the bank [k_local; k_mem]) and values come from."""

    rows: torch.Tensor | None  # (b',) rows that see the slot, or None for every row
    key_rows: torch.Tensor  # (b',) rows of the key bank (2B, Hkv, T, D)
    value_rows: torch.Tensor  # (b',) rows of v (B, Hkv, T, D)
    local: bool  # slot 0: causal


def _slots(sources: torch.Tensor, visible: torch.Tensor) -> list[_Slot]:
    b = sources.shape[0]
    every = torch.arange(b, device=sources.device)
    slots = [_Slot(None, every, every, True)]
    for c in range(sources.shape[1]):
        rows = None if bool(visible[:, c].all()) else visible[:, c].nonzero().squeeze(1)
        if rows is not None and rows.numel() == 0:
            continue  # masked for every row: contributes exactly 0
        src = sources[:, c] if rows is None else sources[rows, c]
        slots.append(_Slot(rows, src + b, src, False))
    return slots


def _pick(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)


def _key_blocks(
    slots: list[_Slot], seq_len: int, chunk: int, q_start: int, q_end: int, dtype: torch.dtype
) -> Iterator[tuple[_Slot, int, int, torch.Tensor | None]]:
    """Every (slot, t0, t1, bias) block that queries [q_start, q_end) may see; bias (qc, kc) or None (no mask).

    A slot's rows either see all of it (extra slots) or its causal part (slot 0), so invisible rows are left out of
    the computation instead of being masked, and future blocks of slot 0 are skipped.
    """
    for slot in slots:
        end = q_end if slot.local else seq_len
        for t0 in range(0, end, chunk):
            t1 = min(t0 + chunk, end)
            bias = None
            if slot.local and t1 - 1 > q_start:  # the block reaches past the diagonal of the first query
                i = torch.arange(q_start, q_end, device=slot.key_rows.device).unsqueeze(1)
                bias = torch.where(torch.arange(t0, t1, device=i.device) <= i, 0.0, MASK_VALUE).to(dtype)
            yield slot, t0, t1, bias


class _ChunkedCrossBatch(torch.autograd.Function):
    """Blockwise cross-batch attention (online softmax; FlashAttention-2-style recomputing backward, Dao 2023).

    Key blocks are slices ``bank[rows, :, t0:t1]`` of the bank [k_local; k_mem] (2B, Hkv, T, D): neither the
    (S+1)-fold keys nor the [T, (S+1)·T] scores are ever held, and rows that cannot see a slot skip it. Saved for
    backward: the inputs, the float32 output and the log-sum-exp per query.
    """

    @staticmethod
    def forward(ctx, q, k_local, k_mem, v, sources, visible, scale, q_chunk, k_chunk):  # noqa: D102 - autograd API
        dt = compute_dtype(q.dtype)
        b, h, t, d = q.shape
        hkv = k_local.shape[1]
        g = h // hkv
        bank_k = torch.cat([k_local, k_mem]).to(dt)  # (2B, Hkv, T, D)
        bank_v = v.to(dt)  # (B, Hkv, T, D)
        slots = _slots(sources, visible)
        out = torch.empty(b, h, t, d, dtype=dt, device=q.device)
        lse = torch.empty(b, h, t, dtype=dt, device=q.device)
        for i0 in range(0, t, q_chunk):
            i1 = min(i0 + q_chunk, t)
            qb = q[:, :, i0:i1].to(dt).reshape(b, hkv, g, i1 - i0, d)
            m = torch.full((b, hkv, g, i1 - i0, 1), float("-inf"), dtype=dt, device=q.device)
            den = torch.zeros_like(m)
            acc = torch.zeros_like(qb)
            for slot, t0, t1, bias in _key_blocks(slots, t, k_chunk, i0, i1, dt):
                kb = bank_k[:, :, t0:t1].index_select(0, slot.key_rows).unsqueeze(2)  # (b', Hkv, 1, kc, D)
                vb = bank_v[:, :, t0:t1].index_select(0, slot.value_rows).unsqueeze(2)
                s = torch.matmul(_pick(qb, slot.rows), kb.transpose(-1, -2)) * scale  # (b', Hkv, G, qc, kc)
                if bias is not None:
                    s = s + bias
                m_old = _pick(m, slot.rows)
                m_new = torch.maximum(m_old, s.amax(dim=-1, keepdim=True))
                p = torch.exp(s - m_new)
                corr = torch.exp(m_old - m_new)
                den_new = _pick(den, slot.rows) * corr + p.sum(dim=-1, keepdim=True)
                acc_new = _pick(acc, slot.rows) * corr + torch.matmul(p, vb)
                if slot.rows is None:
                    m, den, acc = m_new, den_new, acc_new
                else:
                    m[slot.rows], den[slot.rows], acc[slot.rows] = m_new, den_new, acc_new
            out[:, :, i0:i1] = (acc / den).reshape(b, h, i1 - i0, d)
            lse[:, :, i0:i1] = (m + den.log()).reshape(b, h, i1 - i0)
        ctx.save_for_backward(q, k_local, k_mem, v, sources, visible, out, lse)
        ctx.scale, ctx.q_chunk, ctx.k_chunk = scale, q_chunk, k_chunk
        return out.to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: D102 - autograd API
        q, k_local, k_mem, v, sources, visible, out, lse = ctx.saved_tensors
        scale = ctx.scale
        dt = out.dtype
        b, h, t, d = q.shape
        hkv = k_local.shape[1]
        g = h // hkv
        bank_k = torch.cat([k_local, k_mem]).to(dt)
        bank_v = v.to(dt)
        grad_bank_k = torch.zeros_like(bank_k)
        grad_bank_v = torch.zeros_like(bank_v)
        grad_q = torch.empty(b, h, t, d, dtype=dt, device=q.device)
        do = grad_out.to(dt)
        delta = (do * out).sum(dim=-1)  # (B, H, T): rowsum(dO ∘ O)
        slots = _slots(sources, visible)
        for i0 in range(0, t, ctx.q_chunk):
            i1 = min(i0 + ctx.q_chunk, t)
            shape = (b, hkv, g, i1 - i0)
            qb = q[:, :, i0:i1].to(dt).reshape(*shape, d)
            dob = do[:, :, i0:i1].reshape(*shape, d)
            lse_b = lse[:, :, i0:i1].reshape(*shape, 1)
            delta_b = delta[:, :, i0:i1].reshape(*shape, 1)
            dqb = torch.zeros_like(qb)
            for slot, t0, t1, bias in _key_blocks(slots, t, ctx.k_chunk, i0, i1, dt):
                kb = bank_k[:, :, t0:t1].index_select(0, slot.key_rows).unsqueeze(2)
                vb = bank_v[:, :, t0:t1].index_select(0, slot.value_rows).unsqueeze(2)
                qs, dos = _pick(qb, slot.rows), _pick(dob, slot.rows)
                s = torch.matmul(qs, kb.transpose(-1, -2)) * scale
                if bias is not None:
                    s = s + bias
                p = torch.exp(s - _pick(lse_b, slot.rows))  # (b', Hkv, G, qc, kc)
                ds = p * (torch.matmul(dos, vb.transpose(-1, -2)) - _pick(delta_b, slot.rows))
                dq = torch.matmul(ds, kb) * scale
                if slot.rows is None:
                    dqb += dq
                else:
                    dqb.index_add_(0, slot.rows, dq)
                dv = torch.matmul(p.transpose(-1, -2), dos).sum(dim=2)  # (b', Hkv, kc, D)
                dk = (torch.matmul(ds.transpose(-1, -2), qs) * scale).sum(dim=2)
                grad_bank_v[:, :, t0:t1].index_add_(0, slot.value_rows, dv)
                grad_bank_k[:, :, t0:t1].index_add_(0, slot.key_rows, dk)
            grad_q[:, :, i0:i1] = dqb.reshape(b, h, i1 - i0, d)
        return (grad_q.to(q.dtype), grad_bank_k[:b].to(k_local.dtype), grad_bank_k[b:].to(k_mem.dtype),
                grad_bank_v.to(v.dtype), None, None, None, None, None)


def cross_batch_attention(
    q: torch.Tensor,
    k_local: torch.Tensor,
    k_mem: torch.Tensor,
    v: torch.Tensor,
    layout: CrossBatchLayout,
    *,
    scale: float | None = None,
    impl: str = "sdpa",
    q_chunk: int = 1024,
    k_chunk: int = 1024,
) -> torch.Tensor:
    """Cross-batch attention of one microbatch (spec §1.2): one joint softmax over every row's slots.

    Args:
        q: (B, H, T, D) queries, rotated at their local positions.
        k_local: (B, Hkv, T, D) keys rotated at their local positions (slot 0).
        k_mem: (B, Hkv, T, D) the same keys rotated at position 0 (what other rows see).
        v: (B, Hkv, T, D) values (never rotated).
        layout: from :func:`cross_batch_layout`.
        impl: ``sdpa`` / ``eager`` (dense, [B, H, T, (S+1)·T] scores) or ``chunked`` (blockwise, memory-lean).
        q_chunk, k_chunk: block sizes of the chunked path (any positive size; the last block may be ragged).

    Returns (B, H, T, D) in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl == "chunked":
        if q_chunk < 1 or k_chunk < 1:
            raise ConfigError(f"scan chunk sizes must be positive, got query {q_chunk}, key {k_chunk}")
        return _ChunkedCrossBatch.apply(q, k_local, k_mem, v, layout.sources, layout.visible, scale, q_chunk, k_chunk)
    if impl not in ("sdpa", "eager", "flash_attn"):
        raise ConfigError(f"cross-batch impl={impl!r} is unknown; use sdpa, eager or chunked")
    return _dense_cross_batch(q, k_local, k_mem, v, layout, scale, impl)
