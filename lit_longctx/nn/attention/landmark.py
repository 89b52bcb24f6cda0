"""Landmark attention (Mohtashami & Jaggi 2023, arXiv 2305.16300): grouped softmax for training, block retrieval for
inference.

The input carries a landmark token after every ``mem_freq`` regular tokens; a landmark closes its block, so a block is
B = mem_freq + 1 tokens with the landmark last. For query i let blk(j) be the number of landmarks strictly before j and
c = blk(i). Paper §3.1 (spec §2.1), over the causally visible keys:

    main group  M_i = {landmarks l with blk(l) < c} ∪ {regular j with blk(j) = c}      (own landmark excluded)
    p_i         = softmax of s_i. over M_i
    w_ij        = p_i(j)                                        regular j in the own block
                = p_i(l_b) · exp(s_ij) / Σ_{t ∈ R_b} exp(s_it)   regular j of an earlier block b (R_b: its regulars)
                = 0                                             every landmark j (landmark values are never read)
    y_i         = Σ_j w_ij v_j

Two training paths compute it:

- ``reference`` (:func:`grouped_softmax_weights`): the formula written out over the full ``(B, H, T, T)`` score
  matrix; the gate table has one column per landmark present in the input (sized from the input, never a fixed G, so
  any number of landmarks is exact — the repo's fixed G silently merges groups, spec §2.2). The degenerate rows of
  spec §2.3 are reproduced: a block without regular tokens keeps its gate mass (row sums to 1 − p(l_b)), and a query
  with an empty main group (a window that starts on a landmark) gets a zero row.
- ``blockwise`` (:func:`blockwise_landmark_attention`): the tiling of the authors' Triton kernel (spec §2.4) in plain
  PyTorch. Tiles are blocks; every earlier key tile enters an online softmax as one *virtual key* whose score is its
  landmark's score and whose value is the within-tile softmax average of its regular values; the diagonal tile is
  ordinary causal softmax without the tile's landmark key. Rows are padded per row so that landmarks sit last in
  their tile (windows may start and end mid-block, as PG19 windows do). Query tiles are processed under activation
  checkpointing, so no ``[T, T]`` score matrix exists for all heads at once, in the forward or the backward.

Inference (paper §3.2, spec §3): :class:`LandmarkCache` keeps complete blocks of keys *before* RoPE (landmark last) and
the trailing incomplete block apart. A chunk attends, through the same grouped softmax, to
``[k retrieved blocks | incomplete block | chunk]``: per layer and per (token, head) (or max over heads / over tokens,
softmax before the max) the landmark keys of all cached blocks are scored at their stingy positions (paper §3.2.1,
:func:`scoring_slots`), the top-k blocks are taken in chronological order and placed at their slots
(:func:`selection_slots`), and RoPE is applied at those positions. :class:`LandmarkSession` inserts landmarks into
ordinary token streams on the fly (grid aligned to the prompt start) and returns next-token logits.

Shapes: B batch, H query heads, Hkv key/value heads, T queries, S keys, D head dim, Bk = mem_freq + 1 block length,
n cached blocks, k' = min(top_k, n).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch.utils.checkpoint import checkpoint

from lit_longctx.nn.attention.base import Attention, AttentionContext, register_attention
from lit_longctx.nn.attention.causal import causal_doc_mask, repeat_kv
from lit_longctx.nn.config import ConfigError, ModelConfig
from lit_longctx.nn.generate import DecodingSession
from lit_longctx.nn.rope import apply_rotary

KIND = "landmark"
LAYOUT_KEY = "landmark"
Selection = Literal["per_token_and_head", "max_over_heads", "max_over_tokens"]
SELECTIONS = ("per_token_and_head", "max_over_heads", "max_over_tokens")


# --------------------------------------------------------------------------------------------------------- options
@dataclass
class LandmarkOptions:
    """Options of the ``landmark`` attention kind (``ModelConfig.attention_options["landmark"]``).

    Args:
        landmark_id: token id of ``<landmark>`` (required; must be < vocab_size).
        mem_freq: regular tokens per block (ℓ_block); a block is mem_freq + 1 tokens with the landmark last.
            The paper's LLaMA fine-tune and PG19 runs use 50, the maintained LLaMA code 63.
        path: training attention: ``blockwise`` (memory-lean tiles, landmarks on a regular grid) or ``reference``
            (full score matrix, any landmark placement).
        top_k: blocks retrieved per (token, head) at inference (≥ 1; fewer when fewer blocks are cached).
        selection: ``per_token_and_head`` (paper default), ``max_over_heads`` (same blocks for all heads of a token)
            or ``max_over_tokens`` (same blocks for all tokens of a chunk, per head; used with CPU offload).
        chunk_length: regular tokens per prefill chunk (ℓ_local); default derived from train_context_length (else
            max_seq_len) and top_k as in the maintained LLaMA code (:func:`default_chunk_length`).
        offload_to_cpu: keep complete cached blocks in CPU memory; only landmark keys stay on the compute device.
        train_context_length: regular tokens per training row (the seed's ``train_context_length``, 512); the
            default chunk length is derived from it (else from max_seq_len), so retrieved blocks and the chunk stay
            within the distances seen in training.
        include_landmark_in_loss: the training label convention (spec §1.3): True when the token before a landmark
            learnt to predict ``<landmark>`` (the released LLaMA weights); :class:`LandmarkSession` then reads the
            next ordinary token from the landmark's output.
    """

    landmark_id: int | None = None
    mem_freq: int = 50
    path: Literal["blockwise", "reference"] = "blockwise"
    top_k: int = 5
    selection: Selection = "per_token_and_head"
    chunk_length: int | None = None
    offload_to_cpu: bool = False
    train_context_length: int | None = None
    include_landmark_in_loss: bool = False

    @property
    def block(self) -> int:
        return self.mem_freq + 1

    def check_settings(self) -> LandmarkOptions:
        """Validate everything but the landmark id (which needs the vocabulary)."""
        where = "attention_options['landmark']"
        if not isinstance(self.mem_freq, int) or isinstance(self.mem_freq, bool) or self.mem_freq < 1:
            raise ConfigError(f"{where}['mem_freq'] must be an integer >= 1 (e.g. 50), got {self.mem_freq!r}")
        if self.path not in ("blockwise", "reference"):
            raise ConfigError(f"{where}['path']={self.path!r} is unknown; use 'blockwise' or 'reference'")
        check_top_k(self.top_k)
        check_selection(self.selection)
        for name in ("chunk_length", "train_context_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{where}['{name}'] must be None or an integer >= 1, got {value!r}")
        return self

    def validate(self, vocab_size: int) -> LandmarkOptions:
        where = "attention_options['landmark']"
        self.check_settings()
        if self.landmark_id is None:
            raise ConfigError(
                f"landmark attention needs {where}['landmark_id']: the id of the <landmark> token (add it with "
                "lit_longctx.datamodules.landmark.landmark_token_id(tokenizer) and resize the embeddings)"
            )
        if not isinstance(self.landmark_id, int) or not 0 <= self.landmark_id < vocab_size:
            raise ConfigError(
                f"{where}['landmark_id']={self.landmark_id!r} is outside the vocabulary [0, {vocab_size}); add the "
                "token to the tokenizer and grow the embeddings first (resize_token_embeddings), or set vocab_size "
                "to include it"
            )
        return self

    @classmethod
    def from_config(cls, config: ModelConfig) -> LandmarkOptions:
        raw = dict(config.attention_options.get(KIND, {}))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown attention_options['landmark'] keys {unknown}; valid keys: {sorted(known)}")
        return cls(**raw).validate(config.vocab_size)


def check_top_k(top_k: Any) -> int:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ConfigError(f"landmark top_k must be an integer >= 1 (blocks retrieved per token and head), got "
                          f"{top_k!r}")
    return top_k


def check_selection(selection: str) -> str:
    if selection not in SELECTIONS:
        raise ConfigError(f"landmark selection={selection!r} is unknown; use one of {', '.join(SELECTIONS)}")
    return selection


def default_chunk_length(context: int, mem_freq: int, top_k: int) -> int:
    """Regular tokens per prefill chunk for a model trained on ``context`` tokens: the maintained LLaMA code's window
    L − (L mod Bk) − (k+1)·Bk (204 for L = 512, Bk = 51, k = 5), in whole blocks, at least one block."""
    block = mem_freq + 1
    window = context - context % block - (top_k + 1) * block
    return max(1, window // block) * mem_freq


# ---------------------------------------------------------------------------------------------------- batch layout
@dataclass
class LandmarkLayout:
    """Landmark flags of one batch, derived once per forward from ``input_ids == landmark_id``."""

    is_mem: torch.Tensor  # (B, T) bool
    block: int

    @functools.cached_property
    def grid_offsets(self) -> torch.Tensor | None:
        """(B,) index of the first landmark slot of each row when landmarks sit exactly every ``block`` positions
        (row r: at o_r, o_r + Bk, …, with o_r < Bk), else None. A row without landmarks shorter than Bk is regular."""
        return grid_offsets(self.is_mem, self.block)


def grid_offsets(is_mem: torch.Tensor, block: int) -> torch.Tensor | None:
    """See :attr:`LandmarkLayout.grid_offsets`."""
    _, t = is_mem.shape
    pos = torch.arange(t, device=is_mem.device)
    none = torch.full_like(is_mem[:, 0], block - 1, dtype=torch.long)
    first = torch.where(is_mem.any(1), is_mem.int().argmax(1), none)
    expected = torch.remainder(pos.unsqueeze(0) - first.unsqueeze(1), block) == 0
    if is_mem.device.type == "xla":  # checking the grid is a host sync that splits the compiled step; landmark
        return first  # data modules insert on the grid (insert_landmarks), and other placements use path=reference
    regular = (first < block) & (expected == is_mem).all(1)
    return first if bool(regular.all()) else None


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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_mem: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Grouped-softmax attention of q (B, H, T, D) over k, v (B, Hkv, T, D), already rotated; holds (B, H, T, T)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cdt = torch.promote_types(q.dtype, torch.float32)
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep).to(cdt), repeat_kv(v, n_rep).to(cdt)
    scores = torch.matmul(q.to(cdt), k.transpose(-1, -2)) * scale  # (B, H, T, T)
    return torch.matmul(grouped_softmax_weights(scores, is_mem), v).to(q.dtype)


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


# -------------------------------------------------------------------------------------- stingy positions (§3.2.1)
def scoring_slots(n_blocks: int, top_k: int, device: torch.device | None = None) -> torch.Tensor:
    """(n,) slot of each cached block's landmark while scoring: the k' newest blocks take slots 1..k' in order, all
    older blocks share slot 0 (k' = min(top_k, n))."""
    kk = min(top_k, n_blocks)
    r = torch.arange(n_blocks, device=device)
    return torch.where(r >= n_blocks - kk, r - (n_blocks - kk) + 1, torch.zeros_like(r))


def selection_slots(selected: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Slot of each selected block (``selected`` (..., k') sorted chronologically): the j-th goes to slot j if it is
    not among the k' newest blocks, to slot j + 1 if it is (old picks fill from the left, recent picks are
    right-aligned, one slot stays free between them)."""
    kk = selected.shape[-1]
    j = torch.arange(kk, device=selected.device)
    return j + (selected >= n_blocks - kk).long()


def slot_start(slot: torch.Tensor, top_k_eff: int, block: int) -> torch.Tensor:
    """First position of a slot relative to P (the first position of the incomplete block): −(k'+1−s)·Bk."""
    return -(top_k_eff + 1 - slot) * block


# -------------------------------------------------------------------------------------------------------- the cache
class LandmarkCache:
    """Per-layer landmark memory (spec §3.1): complete blocks (B, Hkv, n, Bk, D) of keys before RoPE and values,
    landmark last, on ``storage_device`` (CPU when offloading); landmark keys (B, Hkv, n, D) on the compute device;
    the trailing incomplete block (B, Hkv, m < Bk, D) held apart. Retrieval settings live here so a session can
    change them per run."""

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        block: int,
        device: torch.device,
        dtype: torch.dtype,
        top_k: int = 5,
        selection: Selection = "per_token_and_head",
        offload_to_cpu: bool = False,
    ) -> None:
        self.batch_size, self.n_kv_heads, self.head_dim, self.block = batch_size, n_kv_heads, head_dim, block
        self.device, self.dtype = torch.device(device), dtype
        self.top_k = check_top_k(top_k)
        self.selection = check_selection(selection)
        self._offload = bool(offload_to_cpu)
        self.n_blocks = 0
        self.k_blocks: torch.Tensor | None = None
        self.v_blocks: torch.Tensor | None = None
        self.mem_keys: torch.Tensor | None = None
        self.tail_k = torch.empty(batch_size, n_kv_heads, 0, head_dim, device=self.device, dtype=dtype)
        self.tail_v = torch.empty_like(self.tail_k)

    @property
    def offload_to_cpu(self) -> bool:
        return self._offload

    @offload_to_cpu.setter
    def offload_to_cpu(self, value: bool) -> None:
        if self.n_blocks and bool(value) != self._offload:
            raise ValueError("offload_to_cpu can only be changed while the landmark cache is empty")
        self._offload = bool(value)

    @property
    def storage_device(self) -> torch.device:
        """Where complete blocks live: the CPU when offloading, else the compute device."""
        return torch.device("cpu") if self._offload else self.device

    @property
    def tail_len(self) -> int:
        return self.tail_k.shape[2]

    def _grow(self, needed: int) -> None:
        cap = 0 if self.k_blocks is None else self.k_blocks.shape[2]
        if needed <= cap:
            return
        cap = max(needed, 2 * cap, 8)
        b, hk, bk, d = self.batch_size, self.n_kv_heads, self.block, self.head_dim
        kb = torch.empty(b, hk, cap, bk, d, device=self.storage_device, dtype=self.dtype)
        vb = torch.empty_like(kb)
        mk = torch.empty(b, hk, cap, d, device=self.device, dtype=self.dtype)
        if self.k_blocks is not None:
            kb[:, :, : self.n_blocks] = self.k_blocks[:, :, : self.n_blocks]
            vb[:, :, : self.n_blocks] = self.v_blocks[:, :, : self.n_blocks]
            mk[:, :, : self.n_blocks] = self.mem_keys[:, :, : self.n_blocks]
        self.k_blocks, self.v_blocks, self.mem_keys = kb, vb, mk

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Replace the incomplete block with ``k, v`` (B, Hkv, S, D) pre-RoPE = old incomplete block + new tokens;
        their complete blocks move to the block store, the rest becomes the new incomplete block."""
        full = k.shape[2] // self.block
        if full:
            b, hk, d = k.shape[0], k.shape[1], k.shape[3]
            kb = k[:, :, : full * self.block].reshape(b, hk, full, self.block, d)
            vb = v[:, :, : full * self.block].reshape(b, hk, full, self.block, d)
            self._grow(self.n_blocks + full)
            sl = slice(self.n_blocks, self.n_blocks + full)
            self.k_blocks[:, :, sl] = kb.to(self.storage_device, self.dtype)
            self.v_blocks[:, :, sl] = vb.to(self.storage_device, self.dtype)
            self.mem_keys[:, :, sl] = kb[:, :, :, -1].to(self.dtype)
            self.n_blocks += full
        self.tail_k = k[:, :, full * self.block :].to(self.dtype).clone()
        self.tail_v = v[:, :, full * self.block :].to(self.dtype).clone()

    def landmark_keys(self) -> torch.Tensor:
        """(B, Hkv, n, D) landmark keys of the cached blocks, before RoPE, on the compute device."""
        return self.mem_keys[:, :, : self.n_blocks]

    def gather(self, selected: torch.Tensor, n_rep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks ``selected`` (B, H, Tr, k') for query heads (KV head h // n_rep) -> keys (pre-RoPE) and values
        (B, H, Tr, k', Bk, D) on the compute device."""
        b, h = selected.shape[:2]
        idx = selected.to(self.storage_device)
        bi = torch.arange(b, device=self.storage_device).view(b, 1, 1, 1)
        hi = (torch.arange(h, device=self.storage_device) // n_rep).view(1, h, 1, 1)
        kb = self.k_blocks[bi, hi, idx].to(self.device, non_blocking=True)
        vb = self.v_blocks[bi, hi, idx].to(self.device, non_blocking=True)
        return kb, vb

    def select(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (finished rows / beam search)."""
        if self.k_blocks is not None:
            self.k_blocks = self.k_blocks.index_select(0, index.to(self.storage_device))
            self.v_blocks = self.v_blocks.index_select(0, index.to(self.storage_device))
            self.mem_keys = self.mem_keys.index_select(0, index)
        self.tail_k, self.tail_v = self.tail_k.index_select(0, index), self.tail_v.index_select(0, index)
        self.batch_size = len(index)


def select_blocks(mem_scores: torch.Tensor, top_k: int, selection: str) -> torch.Tensor:
    """Top-k cached blocks per retriever from landmark scores (B, H, T, n), sorted chronologically.

    Returns (B, H, T, k') for ``per_token_and_head`` and ``max_over_heads`` (the latter equal over heads), (B, H, 1, k')
    for ``max_over_tokens``. The reduced variants take the max of the softmax probabilities (softmax first puts heads
    and tokens on one scale, paper Table 2).
    """
    kk = min(top_k, mem_scores.shape[-1])
    if selection == "per_token_and_head":
        rank = mem_scores
    else:
        probs = torch.softmax(mem_scores.float(), dim=-1)
        if selection == "max_over_heads":
            rank = probs.amax(dim=1, keepdim=True).expand_as(probs)
        else:
            rank = probs.amax(dim=2, keepdim=True)
    return rank.topk(kk, dim=-1).indices.sort(dim=-1).values


def attend_with_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_mem: torch.Tensor,
    start: torch.Tensor,
    cache: LandmarkCache,
    rope: Any,
    scale: float,
) -> torch.Tensor:
    """One chunk of cached landmark inference (spec §3.1-3.3), then the chunk is written to ``cache``.

    Args:
        q: (B, H, T, D) queries rotated at their positions; k, v: (B, Hkv, T, D) keys *before* RoPE and values.
        is_mem: (T,) landmark flags of the chunk (equal for all rows).
        start: (B, 1) position P of the first token of the incomplete block (= first chunk position − its length).
        rope: the model's rotary table builder (``ctx.rope``).

    The keys are ``[k' retrieved blocks | incomplete block | chunk]`` and the weights the grouped softmax over them.
    """
    b, h, t, d = q.shape
    bk, m = cache.block, cache.tail_len
    n_rep = h // k.shape[1]
    cdt = torch.promote_types(q.dtype, torch.float32)
    local_k = torch.cat([cache.tail_k.to(k.dtype), k], dim=2)  # (B, Hkv, m + T, D) pre-RoPE
    local_v = torch.cat([cache.tail_v.to(v.dtype), v], dim=2)
    local_mem = torch.cat([is_mem.new_zeros(m), is_mem])
    bad = local_mem != (torch.arange(m + t, device=is_mem.device) % bk == bk - 1)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0]) - m
        raise ValueError(
            f"landmark tokens must close every block of {bk - 1} regular tokens counted from the first token fed to "
            f"the cache; chunk token {pos} breaks the grid (incomplete block holds {m} tokens). Feed ordinary tokens "
            "through LandmarkSession, which inserts the landmarks itself"
        )
    local_pos = start + torch.arange(m + t, device=q.device)  # (B, m + T)
    # one seq_len for every table (dynamic-NTK RoPE depends on it), the one the queries were rotated with
    seq_len = int(local_pos.max()) + 1
    cos, sin = rope(local_pos, seq_len=seq_len)
    local_kr = apply_rotary(local_k, cos.unsqueeze(1), sin.unsqueeze(1))  # (B, Hkv, m + T, D)
    scores = torch.matmul(q.to(cdt), repeat_kv(local_kr, n_rep).to(cdt).transpose(-1, -2)) * scale  # (B,H,T,m+T)
    flags = local_mem.unsqueeze(0).expand(b, -1)

    prefix_v = None
    n = cache.n_blocks
    if n:
        kk = min(cache.top_k, n)
        mem_pos = start + slot_start(scoring_slots(n, kk, q.device), kk, bk) + bk - 1  # (B, n)
        cos, sin = rope(mem_pos, seq_len=seq_len)
        mem_k = apply_rotary(cache.landmark_keys(), cos.unsqueeze(1), sin.unsqueeze(1))
        mem_k = repeat_kv(mem_k, n_rep).to(cdt)  # (B, H, n, D)
        selected = select_blocks(torch.matmul(q.to(cdt), mem_k.transpose(-1, -2)) * scale, kk, cache.selection)
        kb, vb = cache.gather(selected, n_rep)  # (B, H, Tr, k', Bk, D)
        tr = selected.shape[2]
        # only (k'+1)·Bk positions exist (k'+1 slots of Bk tokens): one RoPE table per row, indexed by slot
        slot = torch.arange(kk + 1, device=q.device)
        slot_pos = start.view(b, 1, 1) + (slot_start(slot, kk, bk).view(1, -1, 1) + torch.arange(bk, device=q.device))
        cos, sin = rope(slot_pos, seq_len=seq_len)  # (B, k'+1, Bk, D)
        rows = torch.arange(b, device=q.device).view(b, 1, 1, 1)
        slots = selection_slots(selected, n)  # (B, H, Tr, k')
        kb = apply_rotary(kb, cos[rows, slots], sin[rows, slots]).reshape(b, h, tr, kk * bk, d).to(cdt)
        prefix_v = vb.reshape(b, h, tr, kk * bk, d).to(cdt)
        prefix_scores = torch.matmul(q.to(cdt).unsqueeze(3), kb.transpose(-1, -2)).squeeze(3) * scale  # (B,H,T,k'Bk)
        scores = torch.cat([prefix_scores, scores], dim=-1)
        prefix_mem = (torch.arange(kk * bk, device=q.device) % bk == bk - 1).unsqueeze(0).expand(b, -1)
        flags = torch.cat([prefix_mem, flags], dim=1)

    w = grouped_softmax_weights(scores, flags)  # (B, H, T, [k'Bk +] m + T)
    y = torch.matmul(w[..., -(m + t) :], repeat_kv(local_v, n_rep).to(cdt))
    if prefix_v is not None:
        y = y + torch.matmul(w[..., : -(m + t)].unsqueeze(3), prefix_v).squeeze(3)
    cache.store(local_k, local_v)
    return y.to(q.dtype)


# ------------------------------------------------------------------------------------------------------- the layer
@register_attention(KIND)
class LandmarkAttention(Attention):
    """Landmark attention layer: grouped softmax in training (``path``), block retrieval with a cache at inference."""

    def __init__(self, config: ModelConfig, layer_idx: int, **options: Any) -> None:
        super().__init__(config, layer_idx)
        self.options = LandmarkOptions(**options).validate(config.vocab_size)

    @classmethod
    def prepare_context(cls, ctx: AttentionContext, input_ids: torch.Tensor, config: ModelConfig) -> None:
        opts = LandmarkOptions.from_config(config)
        ctx.extras[LAYOUT_KEY] = LandmarkLayout(input_ids == opts.landmark_id, opts.block)

    def new_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> LandmarkCache:
        o = self.options
        return LandmarkCache(batch_size, self.n_kv_heads, self.head_dim, o.block, device, dtype, o.top_k,
                             o.selection, o.offload_to_cpu)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: LandmarkCache | None = None) -> torch.Tensor:
        if ctx.doc_ids is not None:
            raise ValueError(
                "landmark attention attends over the whole window (blocks may straddle documents, as in the paper); "
                "give contiguous position_ids (no restarts inside a row) instead of packed-document positions"
            )
        layout: LandmarkLayout = ctx.extras[LAYOUT_KEY]
        q, k, v = self.project(x)  # (B, T, H|Hkv, D)
        q = self.rotate(q, ctx.cos, ctx.sin).transpose(1, 2)  # (B, H, T, D)
        v = v.transpose(1, 2)
        if cache is not None:
            mem = layout.is_mem
            if bool((mem != mem[:1]).any()):
                raise ValueError("with a landmark cache every batch row must have its landmarks at the same places")
            start = ctx.position_ids[:, :1] - cache.tail_len
            y = attend_with_cache(q, k.transpose(1, 2), v, mem[0], start, cache, ctx.rope, self.scale)
            return self.output(y)
        k = self.rotate(k, ctx.cos, ctx.sin).transpose(1, 2)
        if self.options.path == "reference":
            return self.output(reference_landmark_attention(q, k, v, layout.is_mem, self.scale))
        offsets = layout.grid_offsets
        if offsets is None:
            raise ValueError(
                f"the blockwise landmark path needs a landmark exactly every {self.options.block} tokens "
                f"(mem_freq={self.options.mem_freq}) in every row; this batch has another placement. Insert landmarks "
                "with lit_longctx.datamodules.landmark.insert_landmarks using the same mem_freq, or set "
                "attention_options['landmark']['path']='reference'"
            )
        return self.output(blockwise_landmark_attention(q, k, v, offsets, self.options.block, self.scale))


# ----------------------------------------------------------------------------------------------------- the session
def insert_on_grid(ids: torch.Tensor, mem_freq: int, landmark_id: int, start: int = 0) -> torch.Tensor:
    """Insert ``landmark_id`` after every token whose grid count (start + t + 1) is a multiple of ``mem_freq``.

    ``ids`` (..., n); ``start`` = regular tokens already in the open block (0 ≤ start < mem_freq). This is the PG19
    global-grid rule (spec §1.2) for a stream whose first token has stream index ``start``.
    """
    n = ids.shape[-1]
    t = torch.arange(n, device=ids.device)
    n_before = (start + t) // mem_freq - start // mem_freq  # landmarks inserted before regular token t
    closes = (start + t + 1) % mem_freq == 0
    total = n + int(closes.sum())
    out = ids.new_full((*ids.shape[:-1], total), landmark_id)
    out[..., t + n_before] = ids
    return out


class LandmarkSession(DecodingSession):
    """Decoding driver for landmark models: callers feed ordinary token ids, the session inserts landmarks.

    The grid is aligned to the first token fed (the prompt start); a landmark is appended whenever fed or generated
    tokens complete a block of ``mem_freq``. Prompts are prefilled in chunks of ``prefill_chunk`` regular tokens
    (default: ``chunk_length``, else :func:`default_chunk_length` of ``train_context_length`` or max_seq_len).

    Which output predicts the next ordinary token after a regular token that a landmark follows:
    ``include_landmark_in_loss=False`` (landmarks never predicted in training) uses the regular token's own
    output, as the Triton-path model's ``drop_last_logit_if_mem``; ``True`` (the released LLaMA weights, which
    learnt to predict ``<landmark>`` there) uses the landmark's output. Default: the model's option of that name.
    ``suppress_landmark`` sets the landmark logit to −inf so that sampling never emits it.

    Keyword overrides ``top_k``, ``selection``, ``offload_to_cpu`` replace the layers' options for this session.
    :meth:`forward_logits` returns the logits of every fed ordinary token (perplexity over long inputs).
    """

    def __init__(
        self,
        model: Any,
        batch_size: int = 1,
        prefill_chunk: int | None = None,
        *,
        top_k: int | None = None,
        selection: str | None = None,
        offload_to_cpu: bool | None = None,
        include_landmark_in_loss: bool | None = None,
        suppress_landmark: bool = True,
        **_: Any,
    ) -> None:
        opts = LandmarkOptions.from_config(model.config)
        self.mem_freq, self.landmark_id = opts.mem_freq, opts.landmark_id
        k_eff = check_top_k(top_k) if top_k is not None else opts.top_k
        context = opts.train_context_length or model.config.max_seq_len
        chunk = prefill_chunk or opts.chunk_length or default_chunk_length(context, opts.mem_freq, k_eff)
        if chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 regular tokens, got {chunk}")
        super().__init__(model, batch_size=batch_size, prefill_chunk=chunk)
        for cache in self.state.caches:
            if isinstance(cache, LandmarkCache):
                if top_k is not None:
                    cache.top_k = k_eff
                if selection is not None:
                    cache.selection = check_selection(selection)
                if offload_to_cpu is not None:
                    cache.offload_to_cpu = offload_to_cpu
        self.include_landmark_in_loss = (opts.include_landmark_in_loss if include_landmark_in_loss is None
                                         else include_landmark_in_loss)
        self.suppress_landmark = suppress_landmark
        self.filled = 0  # regular tokens in the open block

    def _run(self, ids: torch.Tensor, last_only: bool) -> torch.Tensor:
        """Feed ordinary ids (B, n): insert landmarks, run the model; float32 logits (B, n | 1, V) per fed token."""
        if bool((ids == self.landmark_id).any()):
            raise ValueError(
                f"feed ordinary tokens only: id {self.landmark_id} is the landmark, which the session inserts itself"
            )
        n = ids.shape[1]
        start = self.filled
        aug = insert_on_grid(ids, self.mem_freq, self.landmark_id, start)
        t = torch.arange(n, device=ids.device)
        index = t + (start + t) // self.mem_freq  # augmented index of each fed token
        if self.include_landmark_in_loss:
            index = index + ((start + t + 1) % self.mem_freq == 0).long()
        if last_only:
            index = index[-1:]
        hidden = self.model(aug, state=self.state, return_logits=False, return_hidden=True).hidden
        logits = self.model.lm_head(hidden[:, index]).float()
        self.filled = (start + n) % self.mem_freq
        if self.suppress_landmark:
            logits[..., self.landmark_id] = float("-inf")
        return logits

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ordinary ids (B, n); return the next-token logits (B, V) after the last of them."""
        return self._run(ids, last_only=True)[:, -1]

    def forward_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ordinary ids (B, n) (in prefill chunks) and return (B, n, V) float32 logits, position t predicting
        the ordinary token after ``ids[:, t]``. The caches advance as in prefill, so calls can continue a stream."""
        if ids.shape[1] == 0:
            raise ValueError("forward_logits needs at least one token")
        parts = [self._run(ids[:, s : s + self.prefill_chunk], last_only=False)
                 for s in range(0, ids.shape[1], self.prefill_chunk)]
        return torch.cat(parts, dim=1)


LandmarkAttention.session_class = LandmarkSession
