"""FoT memory layers: cross-batch training and memory-cache inference (Focused Transformer / LongLLaMA).

Tworkowski et al., "Focused Transformer: Contrastive Training for Context Scaling", arXiv 2307.03170 (NeurIPS 2023):
§3 (memory attention and crossbatch training), App. B.2 (the memory layer: one softmax over local and additional keys),
App. A.2 (LongLLaMA's cross-batch with k-packing), §5.1 (exact kNN over the memory at inference). The semantics are
those of the released code (CStanKonrad/long_llama: ``FoT/cross_batch.py`` for training, ``src/modeling_longllama.py``
for inference), as pinned down in the project spec ``specs/fot.md`` §1-§3.

Training (no cache, ``cross_batch_range`` r > 0). Row b of a microbatch of windows (B, T) attends with one softmax to
    z(0, j) = <R_i q_i, R_j k_{b,j}>/√D + causal(i, j)         its own window, standard RoPE;
    z(c, j) = <R_i q_i, R_0 k_{b-c,j}>/√D + m_b(c), c = 1..r   rows b-1..b-r of the same forward, keys "as if first";
    o_i = Σ_{c,j} softmax(z)_{c,j} · v_{b-c,j}.
There is no causal mask on the additional contexts. m_b(c) = 0 for c < n_b, -1e6 otherwise, with n_b = min(pack_b, b+1),
pack_b = r+1 without stepping (or k = 1), else min((b mod k)·ceil((r+1)/max(k-1, 1)) + 1, r+1) (k = dataset_packing).
Nothing wraps around: a row never sees a later row. Gradients flow into the keys and values of every visible row.
Two paths compute it: ``dense`` (SDPA, or the eager reference, over [B, H, T, (S+1)·T] with the additive mask) and
``chunked`` (``scan_cross_batch``: blockwise online softmax with a recomputing backward, never holding the score
matrix, skipping the slots a row cannot see); both in promote(dtype, float32).

Inference (a :class:`FoTCache` per layer). A local window whose keys are rotated at window-relative positions, and a
memory of evicted keys rotated at position 0 with their values and additive masks, stored in ``mem_dtype``. A query
attends to [local (causal); memory] with one float32 softmax, masks floored at -1e6; ``mem_attention_grouping`` (h, q)
computes it in blocks of h heads × q queries; ``top_k`` keeps only the k best memory keys per head and query (the
paper's exact kNN; dense memory attention when None). :class:`FoTSession` drives LongLLaMA's schedule (spec §3): the
prefix of a long input goes to memory W tokens at a time, the last ``last_context_length`` tokens stay local, and
generation evicts the whole local window into memory when it would exceed W.

HF interop: :func:`longllama_config` writes the memory settings under LongLLaMA's config.json keys (and the JAX ones),
:func:`longllama_layout` reads a LongLLaMA config.json's ``mem_layers`` back into ``fot`` layers (spec §8).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from lit_longctx.nn.attention.base import Attention, AttentionContext, register_attention
from lit_longctx.nn.attention.causal import attend, causal_doc_mask, padding_mask, repeat_kv
from lit_longctx.nn.config import ConfigError, ModelConfig, parse_dtype
from lit_longctx.nn.session import DecodingSession, check_attention_mask, padded_positions

if TYPE_CHECKING:
    from lit_longctx.nn.llama import Transformer

#: additive mask value of the original code (JAX ``min_value``, PyTorch floor); exactly 0 weight in a float32 softmax
MASK_VALUE = -1e6
#: ``AttentionContext.extras`` key under which :meth:`FoTAttention.prepare_context` stores the batch's layout
LAYOUT_KEY = "fot_layout"
CROSS_BATCH_MODES = ("longllama", "paper")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """promote(dtype, float32): logits and softmax are at least float32 (spec §1.3)."""
    return torch.promote_types(dtype, torch.float32)



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
    dt = _compute_dtype(q.dtype)
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
    dt = _compute_dtype(q.dtype)
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
        dt = _compute_dtype(q.dtype)
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


# ---------------------------------------------------------------------------------------------- inference memory
class _SeqBuffer:
    """Tensors (B, heads, S, ...) that grow together along dim 2 with amortised doubling (linear total cost)."""

    def __init__(self) -> None:
        self.data: list[torch.Tensor] = []
        self.length = 0

    def append(self, *parts: torch.Tensor) -> None:
        new_len = self.length + parts[0].shape[2]
        if not self.data or new_len > self.data[0].shape[2]:
            capacity = max(new_len, 2 * (self.data[0].shape[2] if self.data else 0), 64)
            grown = [p.new_empty(p.shape[:2] + (capacity,) + p.shape[3:]) for p in parts]
            for new, old in zip(grown, self.data):
                new[:, :, : self.length] = old[:, :, : self.length]
            self.data = grown
        for buf, p in zip(self.data, parts):
            buf[:, :, self.length : new_len] = p
        self.length = new_len

    def views(self) -> list[torch.Tensor]:
        return [buf[:, :, : self.length] for buf in self.data]

    def clear(self) -> None:
        self.length = 0

    def drop_front(self, n: int) -> None:
        """Forget the first ``n`` entries (keeps the rest in place of them)."""
        self.data = [buf[:, :, n:] for buf in self.data]
        self.length -= n

    def select(self, index: torch.Tensor) -> None:
        self.data = [buf.index_select(0, index) for buf in self.data]


class FoTCache:
    """Inference state of one FoT memory layer (spec §3): the local window and the memory.

    Local: keys rotated at window-relative positions, the same keys rotated at position 0 (what eviction moves to
    memory; kept only with ``mem_positionals``), values, in the compute dtype, and a (B, 1, L) token mask (False =
    pad, or a row's window already evicted). Memory: keys at position 0 and values in ``mem_dtype`` plus additive masks
    (B, 1, M) in float32 (0 = attend, float32 min = masked, as LongLLaMA stores pad slots), cast to the compute dtype
    when attended to.
    """

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        mem_dtype: torch.dtype | None = None,
        positionals: bool = True,
    ) -> None:
        self.batch_size, self.n_kv_heads, self.head_dim = batch_size, n_kv_heads, head_dim
        self.device, self.dtype = device, dtype
        self.mem_dtype = mem_dtype or dtype
        self.positionals = positionals
        self._local = _SeqBuffer()
        self._memory = _SeqBuffer()

    @property
    def local_length(self) -> int:
        return self._local.length

    @property
    def memory_length(self) -> int:
        return self._memory.length

    def append_local(
        self, k: torch.Tensor, k_first: torch.Tensor | None, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add (B, Hkv, n, D) keys (local positions), keys at position 0, values and their (B, n) token mask (None =
        all tokens); return the whole window's k, v (their mask is :attr:`local_mask`)."""
        b, _, n, _ = k.shape
        mask = torch.ones(b, 1, n, dtype=torch.bool, device=k.device) if mask is None else mask.view(b, 1, n)
        parts = (k, k_first, v, mask) if self.positionals else (k, v, mask)
        self._local.append(*parts)
        views = self._local.views()
        return views[0], views[-2]

    @property
    def local_mask(self) -> torch.Tensor | None:
        """(B, L) token mask of the local window, or None when every entry is a token."""
        if self._local.length == 0:
            return None
        mask = self._local.views()[-1][:, 0]
        return None if bool(mask.all()) else mask

    def memory(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(keys (B, Hkv, M, D), values, masks (B, 1, M)) in storage dtypes, or None while the memory is empty."""
        if self._memory.length == 0:
            return None
        k, v, mask = self._memory.views()
        return k, v, mask

    def add_to_memory(self, k_first: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Append (B, Hkv, n, D) keys at position 0 and values; ``mask`` (B, n) additive, default 0 (attend)."""
        b, _, n, _ = k_first.shape
        if mask is None:
            mask = torch.zeros(b, n, device=k_first.device)
        self._memory.append(k_first.to(self.mem_dtype), v.to(self.mem_dtype), mask.float().reshape(b, 1, n))

    def evict(self, rows: torch.Tensor | None = None) -> None:
        """Move the local window into memory (LongLLaMA's saw-tooth window): of every row, or only of the rows where
        ``rows`` (B,) bool is True (padded batches, whose rows reach the window limit at different steps).

        Pad slots (and the other rows' slots on a per-row eviction) enter memory masked with the float32 minimum; the
        evicted rows' local entries are then masked, and leading columns no row still sees are dropped.
        """
        if self._local.length == 0:
            return
        views = self._local.views()
        token = views[-1][:, 0]  # (B, L)
        every = rows is None or bool(rows.all())
        keep = token if every else token & rows.to(token.device).unsqueeze(1)
        masks = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
        self.add_to_memory(views[1] if self.positionals else views[0], views[-2], masks)
        if every:
            self._local.clear()
            return
        token[rows.to(token.device)] = False
        seen = token.any(0)
        self._local.drop_front(int(seen.int().argmax()) if bool(seen.any()) else self._local.length)

    def select(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (beam search / finished rows)."""
        self._local.select(index)
        self._memory.select(index)
        self.batch_size = len(index)


def memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    memory: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    *,
    scale: float | None = None,
    grouping: tuple[int, int] | None = None,
    top_k: int | None = None,
    use_sdpa: bool = False,
    local_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """A memory layer at inference: q (B, H, n, D) over the local window k, v (B, Hkv, L, D) (causal, queries being the
    last n positions) and the memory (keys (B, Hkv, M, D), values, additive masks (B, 1, M)), one float32 softmax.
    ``local_mask`` (B, L) bool hides pad keys of the window (``query_mask`` (B, n): pad queries keep their causal keys,
    so no softmax row is empty).

    Masks are floored at -1e6 (``modeling_longllama.py`` floors masked logits there; a masked key gets weight 0 either
    way). ``grouping`` (h, q) computes blocks of h heads × q queries (``mem_attention_grouping``); ``top_k`` keeps the
    k largest memory logits per head and query; ``use_sdpa`` (``torch_attention``) runs each block through
    ``scaled_dot_product_attention`` with the concatenated additive mask, the default path normalises local and memory
    logits jointly without concatenating them. All variants compute the same function. Returns (B, H, n, D), q's dtype.
    """
    b, h, n, d = q.shape
    length = k.shape[2]
    g = h // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    dt = _compute_dtype(q.dtype)
    heads, queries = grouping if grouping is not None else (h, n)
    visible = causal_doc_mask(n, length, q.device)
    if local_mask is not None:
        visible = padding_mask(visible, local_mask, query_mask)  # (B, 1, n, L)
    local_bias = torch.where(visible, 0.0, MASK_VALUE).to(dt)  # (n, L) or (B, 1, n, L)
    mem_bias = None
    if memory is not None and bool((memory[2] != 0).any()):
        mem_bias = memory[2].to(dt).clamp_min(MASK_VALUE).unsqueeze(1)  # (B, 1, 1, M)
    out = torch.empty_like(q)
    for h0 in range(0, h, heads):
        h1 = min(h0 + heads, h)
        kv = torch.arange(h0, h1, device=q.device) // g
        kl, vl = k.index_select(1, kv).to(dt), v.index_select(1, kv).to(dt)  # (B, h, L, D)
        if memory is not None:
            mk, mv = memory[0].index_select(1, kv).to(dt), memory[1].index_select(1, kv).to(dt)  # (B, h, M, D)
            if use_sdpa:
                keys, values = torch.cat([kl, mk], dim=2), torch.cat([vl, mv], dim=2)
        for i0 in range(0, n, queries):
            i1 = min(i0 + queries, n)
            qb = q[:, h0:h1, i0:i1].to(dt)  # (B, h, qc, D)
            local = local_bias[..., i0:i1, :]  # (qc, L) or (B, 1, qc, L)
            if memory is None:
                if use_sdpa:
                    y = F.scaled_dot_product_attention(qb, kl, vl, attn_mask=local, scale=scale)
                else:
                    y = torch.matmul(torch.softmax(torch.matmul(qb, kl.transpose(-1, -2)) * scale + local, -1), vl)
                out[:, h0:h1, i0:i1] = y.to(q.dtype)
                continue
            s_mem, kept = None, None
            if not use_sdpa or top_k is not None:
                s_mem = torch.matmul(qb, mk.transpose(-1, -2)).mul_(scale)  # (B, h, qc, M)
                if mem_bias is not None:
                    s_mem.add_(mem_bias)
                if top_k is not None and top_k < mk.shape[2]:
                    kept = torch.zeros_like(s_mem, dtype=torch.bool).scatter_(-1, s_mem.topk(top_k, -1).indices, True)
                    s_mem.masked_fill_(~kept, MASK_VALUE)
            if use_sdpa:
                shape = (b, h1 - h0, i1 - i0, mk.shape[2])
                bias_mem = mem_bias.expand(shape) if mem_bias is not None else qb.new_zeros(shape)
                if kept is not None:
                    bias_mem = bias_mem.masked_fill(~kept, MASK_VALUE)
                bias = torch.cat([local.expand(b, h1 - h0, i1 - i0, -1), bias_mem], dim=-1)
                y = F.scaled_dot_product_attention(qb, keys, values, attn_mask=bias, scale=scale)
            else:  # one softmax over [local; memory] without concatenating them
                s_local = torch.matmul(qb, kl.transpose(-1, -2)).mul_(scale).add_(local)  # (B, h, qc, L)
                top = torch.maximum(s_local.amax(dim=-1, keepdim=True), s_mem.amax(dim=-1, keepdim=True))
                p_local, p_mem = s_local.sub_(top).exp_(), s_mem.sub_(top).exp_()
                den = p_local.sum(dim=-1, keepdim=True) + p_mem.sum(dim=-1, keepdim=True)
                y = (torch.matmul(p_local, vl) + torch.matmul(p_mem, mv)) / den
            out[:, h0:h1, i0:i1] = y.to(q.dtype)
    return out


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

    session_class: ClassVar[type | None] = None  # FoTSession, set below
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


# ------------------------------------------------------------------------------------------------------ the session
class FoTSession(DecodingSession):
    """LongLLaMA's long-input forward and generation (``modeling_longllama.py``, spec §3) over every layer's cache.

    - First call, N tokens: the first N - Lc tokens go through the model W at a time; each chunk attends to itself
      (positions 0..) and, in memory layers, to the memory; then memory layers append it to memory and every other
      layer drops it. The last min(N, Lc) tokens start the local window (positions 0..).
    - Later calls and generated tokens extend the local window; when it would exceed W, the whole previous window is
      evicted first (into memory in memory layers, dropped elsewhere) and the window restarts with the new tokens.
    - Positions are always relative to the local window's start, in all layers; memory keys sit at position 0.

    Args:
        model: a :class:`Transformer` (any mix of ``fot`` and ``causal`` layers).
        last_context_length: Lc; default the ``last_context_length`` option of the first memory layer (else W).
        context_window: W, the local window limit; default ``model.config.max_seq_len`` (HF max_position_embeddings).
        prefill_chunk: unused (prefixes go in chunks of W, as in LongLLaMA).
    """

    def __init__(
        self,
        model: Transformer,
        batch_size: int = 1,
        prefill_chunk: int | None = None,
        *,
        last_context_length: int | None = None,
        context_window: int | None = None,
        **_: Any,
    ) -> None:
        super().__init__(model, batch_size, prefill_chunk)
        self.window = int(context_window or model.config.max_seq_len)
        memory_layers = [layer.self_attn for layer in model.layers if isinstance(layer.self_attn, FoTAttention)]
        if last_context_length is None:
            last_context_length = memory_layers[0].last_context_length if memory_layers else self.window
        self.last_context_length = int(last_context_length)
        if not 1 <= self.last_context_length <= self.window:
            raise ConfigError(
                f"last_context_length={self.last_context_length} must lie in [1, W={self.window}]: the last tokens of "
                "an input form the local window, which holds at most W = max_seq_len tokens; lower it or pass a "
                "larger context_window"
            )
        self.local_lengths = torch.zeros(batch_size, dtype=torch.long)  # tokens in each row's local window
        self._first_call = True

    @property
    def local_length(self) -> int:
        """Tokens in the local window (of the fullest row, when padded rows differ)."""
        return int(self.local_lengths.max())

    @property
    def memory_lengths(self) -> list[int]:
        """Entries in memory per layer (0 for layers without memory; pad slots of padded batches included)."""
        return [c.memory_length if isinstance(c, FoTCache) else 0 for c in self.state.caches]

    def forward_logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed (B, N) ids with LongLLaMA's schedule; return float32 logits (B, N, V) for every fed token (0 at
        pads)."""
        return self._ingest(ids, attention_mask, all_logits=True)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed (B, N) ids with LongLLaMA's schedule; return the float32 logits (B, V) after each row's last token."""
        return self._ingest(ids, attention_mask, all_logits=False)[:, -1]

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward(ids, attention_mask)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        return self.forward(ids)

    def _plan(self, counts: list[int]) -> list[list[int]]:
        """Per row, the sizes of the pieces its n tokens are fed in: the first n - Lc in chunks of W, then the rest."""
        plans = []
        for n in counts:
            prefix = max(n - self.last_context_length, 0)
            plans.append([min(self.window, prefix - s) for s in range(0, prefix, self.window)] + [n - prefix])
        return plans

    def _ingest(self, ids: torch.Tensor, attention_mask: torch.Tensor | None, all_logits: bool) -> torch.Tensor:
        """LongLLaMA's schedule for every row on its own tokens (spec §3), all rows in one batch.

        Each row is cut into its own pieces (:meth:`_plan`); piece slots are aligned to the end (every row's last
        piece in the last slot) and each slot is fed left-padded, so a row of a padded batch sees exactly the chunks,
        positions and memory it would see alone. Without pads every row has the same plan (LongLLaMA's loop).
        """
        mask = check_attention_mask(attention_mask, ids)
        b, n = ids.shape
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
        counts = mask.sum(1).tolist()
        if n == 0 or min(counts) == 0:
            raise ValueError("no tokens to feed: every row needs at least one token (e.g. the tokenizer's BOS)")
        plans = self._plan(counts)
        slots = max(len(p) for p in plans)
        index = [torch.nonzero(mask[row]).squeeze(1) for row in range(b)]  # where each row's tokens are
        taken = [0] * b
        out = None
        last = None
        for slot in range(slots):
            pieces = [(p[slot - slots + len(p)] if slot >= slots - len(p) else 0) for p in plans]
            width = max(pieces)
            part = ids.new_zeros(b, width)
            part_mask = torch.zeros(b, width, dtype=torch.bool, device=ids.device)
            where = []
            for row, size in enumerate(pieces):
                cols = index[row][taken[row] : taken[row] + size]
                part[row, width - size :] = ids[row, cols]
                part_mask[row, width - size :] = True
                where.append(cols)
                taken[row] += size
            final = slot == slots - 1
            logits = self._extend(part, part_mask, torch.tensor(pieces), True if all_logits else final and "last")
            if all_logits:
                out = logits.new_zeros(b, n, logits.shape[-1]) if out is None else out
                for row, cols in enumerate(where):
                    out[row, cols] = logits[row, width - len(cols) :]
            elif final:
                last = logits
            if self._first_call and not final:  # a prefix chunk of the first call goes straight to memory
                self.evict(torch.tensor([0 <= slot - slots + len(p) < len(p) - 1 for p in plans]))
        self._first_call = False
        return out if all_logits else last

    def _extend(self, ids: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor,
                want_logits: bool | str) -> torch.Tensor | None:
        """Add each row's ``counts`` tokens (left-padded ids (B, n), n ≤ W) to its local window, first evicting the
        window of every row that would exceed W."""
        self.evict((self.local_lengths + counts > self.window) & (counts > 0))
        positions = padded_positions(mask, self.local_lengths.to(ids.device))
        extras = {"cross_batch_range": 0} if "fot" in self.model.kinds else {}  # memory, never cross-batch
        out = self.model(ids, position_ids=positions, state=self.state, attention_mask=mask,
                         return_logits=want_logits, **extras)
        self.local_lengths += counts
        return out.logits.float() if want_logits else None

    def evict(self, rows: torch.Tensor | None = None) -> None:
        """End the local window (of every row, or of the rows where ``rows`` (B,) bool is True): memory layers move it
        into memory, every other layer drops (forgets) its cache."""
        if rows is not None and not bool(rows.any()):
            return
        every = rows is None or bool(rows.all())
        weight = self.model.lm_head.weight
        for i, layer in enumerate(self.model.layers):
            cache = self.state.caches[i]
            if isinstance(cache, FoTCache):
                cache.evict(None if every else rows)
            elif every:
                self.state.caches[i] = layer.self_attn.new_cache(self.batch_size, weight.device, weight.dtype)
            else:
                cache.forget(rows)
        if every:
            self.local_lengths.zero_()
        else:
            self.local_lengths[rows] = 0


FoTAttention.session_class = FoTSession
