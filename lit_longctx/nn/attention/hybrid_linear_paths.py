"""The computation paths of LoLCATs' hybrid attention (spec §2; see :mod:`lit_longctx.nn.attention.hybrid_linear` for
the math): the window masks, (a) the quadratic reference, the chunked causal linear prefix sum, (b) the linear-time
sliding window and (c) the terrace block scan. Pure functions over q, k, v and the feature maps' outputs.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

FEATURE_EPS = 1e-12
LINEAR_EPS = 1e-12
LINEAR_CHUNK = 64

WindowKind = Literal["sw", "tk", "none"]
LinearState = tuple[torch.Tensor, torch.Tensor]  # S (B, H, 2F, D), z (B, H, 2F)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/single precision inputs, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


# ------------------------------------------------------------------------------------------------------------ masks
def window_masks(
    q_len: int,
    k_len: int,
    window: str,
    window_size: int,
    block_offset: int | torch.Tensor = 0,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (q_len, k_len) masks of the window set W(i) and the linear set Λ(i) = causal minus W(i).

    The queries are the last ``q_len`` of the ``k_len`` positions. ``tk`` blocks: block(j) = ⌊(j + block_offset)/w⌋;
    a (B,) tensor of offsets (left-padded rows, whose blocks start at their first token) gives (B, q_len, k_len).
    """
    if isinstance(block_offset, torch.Tensor):
        block_offset = block_offset.view(-1, 1, 1)
    i = torch.arange(k_len - q_len, k_len, device=device).unsqueeze(1)
    j = torch.arange(k_len, device=device).unsqueeze(0)
    causal = j <= i
    if window == "none":
        win = torch.zeros_like(causal)
    elif window == "sw":
        win = causal & (j > i - window_size)
    elif window == "tk":
        win = causal & ((j + block_offset) // window_size >= (i + block_offset) // window_size - 1)
    else:
        raise ValueError(f"window={window!r} is unknown; use sw, tk or none")
    return win, causal & ~win


# ---------------------------------------------------------------------------------------- (a) quadratic reference
def hybrid_attention_quadratic(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    alpha: torch.Tensor,
    *,
    window: str,
    window_size: int,
    scale: float,
    block_offset: int | torch.Tensor = 0,
    state: LinearState | None = None,
    return_weights: bool = False,
    key_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hybrid attention with both L×L matrices materialised (spec §2 a). Reference for every other path.

    Args:
        q: (B, H, T, D) queries, the last T of the S key positions; k, v: (B, H, S, D) (already GQA-expanded).
        fq: (B, H, T, 2F) φ_q(q); fk: (B, H, S, 2F) φ_k(k).
        gamma, alpha: window / linear factors broadcastable to (B, H, T, 1), e.g. (1, H, 1, 1); unused for
            ``window="none"`` (pure linear attention has neither).
        state: (S0 (B, H, 2F, D), z0 (B, H, 2F)) over keys before the sequence; they belong to every Λ(i).
        return_weights: also return the normalised weights Â (B, H, T, S) (without the state's mass).
        key_mask: (B, S) bool, False = a pad key: in neither the window nor the linear set (so never in the state);
            ``query_mask`` (B, T): pad queries keep their window keys, so that no row is empty.

    Returns:
        y (B, H, T, D) in the inputs' dtype, and Â or None.
    """
    t, s = q.shape[2], k.shape[2]
    win, lin = window_masks(t, s, window, window_size, block_offset, q.device)
    if win.dim() == 3:  # per-row blocks: (B, T, S) -> broadcast over heads
        win, lin = win.unsqueeze(1), lin.unsqueeze(1)
    if key_mask is not None:
        keys = key_mask[:, None, None, :]
        lin = lin & keys
        win = win & (keys | ~query_mask[:, None, :, None]) if query_mask is not None else win & keys
    if window == "none":  # pure linear attention: no factors, ε in the denominator
        gamma, alpha = None, 1.0
    return hybrid_from_masks(q, k, v, fq, fk, gamma, alpha, win, lin, scale=scale, state=state,
                             return_weights=return_weights)


def hybrid_from_masks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor | None,
    alpha: torch.Tensor | float,
    win: torch.Tensor,
    lin: torch.Tensor,
    *,
    scale: float,
    state: LinearState | None = None,
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eq. 7 (spec §2 a) over given sets: ``win`` / ``lin`` bool, broadcastable to (B, H, T, S), the window W(i) and
    the linear set Λ(i) of each query (disjoint; every query needs a window key). ``gamma`` None is pure linear
    attention (ε in the denominator, α = 1). Other arguments as :func:`hybrid_attention_quadratic`.
    """
    a = alpha * (fq @ fk.transpose(-1, -2)).masked_fill(~lin, 0.0)  # (B, H, T, S)
    if gamma is not None:
        scores = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~win, float("-inf"))
        c = scores.amax(dim=-1, keepdim=True)  # max over the window scores only
        a = a + gamma * torch.exp(scores - c)
    num = a @ v  # (B, H, T, D)
    den = a.sum(dim=-1, keepdim=True)  # (B, H, T, 1)
    if state is not None:
        kv_state, k_state = state
        num = num + alpha * (fq @ kv_state)
        den = den + alpha * (fq @ k_state.unsqueeze(-1))
    if gamma is None:
        den = den + LINEAR_EPS
    return num / den, (a / den if return_weights else None)


# ------------------------------------------------------------------------------------- chunked causal prefix sum
def _state_or_zeros(state: LinearState | None, fq: torch.Tensor, v: torch.Tensor) -> LinearState:
    """``state``, or the empty (S, z) (zeros (B, H, 2F, D), (B, H, 2F)) for features fq (B, H, ·, 2F), values v."""
    if state is not None:
        return state
    b, h, _, f2 = fq.shape
    return fq.new_zeros(b, h, f2, v.shape[-1]), fq.new_zeros(b, h, f2)


def _window_plus_linear(
    scores: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor,
    alpha: torch.Tensor,
    num_lin: torch.Tensor,
    den_lin: torch.Tensor,
) -> torch.Tensor:
    """Eq. 7 for one tile: [γ Σ_W e^{s−c} v + α·num_lin] / [γ Σ_W e^{s−c} + α·den_lin], c = max of the window scores.

    scores (…, n) over the window keys (masked ones −inf), v (…, n, D); num_lin (…, D), den_lin (…, 1) the linear part.
    """
    p = gamma * torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    num = p @ v + alpha * num_lin
    den = p.sum(dim=-1, keepdim=True) + alpha * den_lin
    return num / den


def causal_linear_sums(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    *,
    state: LinearState | None = None,
    chunk_size: int = LINEAR_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, LinearState]:
    """Un-normalised causal linear attention, chunk by chunk (intra-chunk ψ tile + inter-chunk state).

    num_i = Σ_{j≤i} ψ_ij v_j + φ_q(q_i)ᵀS0,  den_i = Σ_{j≤i} ψ_ij + φ_q(q_i)ᵀz0.

    Args:
        fq, fk: (B, H, T, 2F); v: (B, H, T, D); state: (S0 (B, H, 2F, D), z0 (B, H, 2F)) or None (zeros).

    Returns:
        num (B, H, T, D), den (B, H, T), and the final state (S, z) including every key.
    """
    b, h, t, _ = fq.shape
    kv_state, k_state = _state_or_zeros(state, fq, v)
    tri = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=fq.device).tril()
    num = fq.new_empty(b, h, t, v.shape[-1])
    den = fq.new_empty(b, h, t)
    for a in range(0, t, chunk_size):
        qc, kc, vc = fq[:, :, a : a + chunk_size], fk[:, :, a : a + chunk_size], v[:, :, a : a + chunk_size]
        n = qc.shape[2]
        psi = (qc @ kc.transpose(-1, -2)).masked_fill_(~tri[:n, :n], 0.0)  # (B, H, n, n)
        num[:, :, a : a + n] = psi @ vc + qc @ kv_state
        den[:, :, a : a + n] = psi.sum(dim=-1) + (qc @ k_state.unsqueeze(-1)).squeeze(-1)
        kv_state = kv_state + kc.transpose(-1, -2) @ vc
        k_state = k_state + kc.sum(dim=2)
    return num, den, (kv_state, k_state)


def linear_attention(
    fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, *, state: LinearState | None = None
) -> tuple[torch.Tensor, LinearState]:
    """Pure causal linear attention φ_qᵀS_i / (φ_qᵀz_i + 1e-12) -> (y (B, H, T, D), final state)."""
    num, den, state = causal_linear_sums(fq, fk, v, state=state)
    return num / (den.unsqueeze(-1) + LINEAR_EPS), state


# ------------------------------------------------------------------------------ (b) sliding window, prefix sum
def sliding_hybrid_prefix_sum(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    alpha: torch.Tensor,
    *,
    window_size: int,
    scale: float,
    state: LinearState | None = None,
) -> torch.Tensor:
    """Linear-time ``sw`` hybrid (spec §2 b): (B, H, T, ·) inputs of equal length T -> y (B, H, T, D).

    The linear part is a causal prefix sum over φ_k(k), v shifted right by w, so query i collects Σ_{j≤i−w}: the
    shift is taken by pairing queries w.. with keys ..T−w (queries < w see only the initial state). The window
    part runs over banded tiles: C queries against the C+w−1 keys ending at the tile's last query, j ∈ (i−w, i].
    """
    t, w = fq.shape[2], window_size
    kv_state, k_state = _state_or_zeros(state, fq, v)
    head = fq[:, :, : min(w, t)]  # queries with an empty shifted prefix
    num_lin, den_lin = head @ kv_state, (head @ k_state.unsqueeze(-1)).squeeze(-1)  # (B, H, ≤w, D), (B, H, ≤w)
    if t > w:
        num_rest, den_rest, _ = causal_linear_sums(
            fq[:, :, w:], fk[:, :, : t - w], v[:, :, : t - w], state=(kv_state, k_state)
        )
        num_lin, den_lin = torch.cat([num_lin, num_rest], dim=2), torch.cat([den_lin, den_rest], dim=2)
    chunk = max(w, LINEAR_CHUNK)
    y = torch.empty_like(num_lin)
    for a in range(0, t, chunk):
        n, lo = min(chunk, t - a), max(0, a - w + 1)
        qpos = torch.arange(a, a + n, device=q.device).unsqueeze(1)
        kpos = torch.arange(lo, a + n, device=q.device).unsqueeze(0)
        band = (kpos <= qpos) & (kpos > qpos - w)  # (n, ≤ n+w−1)
        scores = ((q[:, :, a : a + n] @ k[:, :, lo : a + n].transpose(-1, -2)) * scale).masked_fill_(
            ~band, float("-inf")
        )
        y[:, :, a : a + n] = _window_plus_linear(
            scores, v[:, :, lo : a + n], gamma, alpha, num_lin[:, :, a : a + n], den_lin[:, :, a : a + n].unsqueeze(-1)
        )
    return y


# ------------------------------------------------------------------------------------- (c) terrace block scan
def terrace_hybrid_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    alpha: torch.Tensor,
    *,
    window_size: int,
    scale: float,
    block_offset: int = 0,
    state: LinearState | None = None,
) -> torch.Tensor:
    """Blockwise ``tk`` hybrid (spec §2 c, LoLCATs App. C.2 Alg. 1): (B, H, T, ·) inputs -> y (B, H, T, D).

    Positions are padded in front by ``block_offset`` (so block(j) = ⌊(j + o)/w⌋ becomes start-aligned) and at the
    end to whole blocks. Block t: tile of its w queries × the 2w keys of blocks t−1, t (causal on the diagonal
    sub-tile) plus α·φ_q(q)ᵀS_{≤t−2}; block t−1 is added to (S, z) after block t. Cost O(L·(2w·D + 2F·D)).
    """
    w, o, t = window_size, block_offset, q.shape[2]
    n_blocks = math.ceil((t + o) / w)
    pad_end = n_blocks * w - t - o
    if o or pad_end:  # padded φ rows are 0: they add nothing to the state
        q, k, v, fq, fk = (F.pad(x, (0, 0, o, pad_end)) for x in (q, k, v, fq, fk))
    is_pad = torch.ones(n_blocks * w, dtype=torch.bool, device=q.device)
    is_pad[o : o + t] = False
    ones = torch.ones(w, w, dtype=torch.bool, device=q.device)
    tile = torch.cat([ones, ones.tril()], dim=1)  # (w, 2w): previous block fully, own block causally
    kv_state, k_state = _state_or_zeros(state, fq, v)
    outs = []
    for blk in range(n_blocks):
        a, lo = blk * w, max(0, (blk - 1) * w)
        # padded keys are invisible to real queries; padded query rows (cropped below) keep themselves visible
        mask = tile[:, w if blk == 0 else 0 :] & (~is_pad[lo : a + w].unsqueeze(0) | is_pad[a : a + w].unsqueeze(1))
        scores = ((q[:, :, a : a + w] @ k[:, :, lo : a + w].transpose(-1, -2)) * scale).masked_fill(
            ~mask, float("-inf")
        )  # (B, H, w, ≤2w)
        fqb = fq[:, :, a : a + w]
        outs.append(
            _window_plus_linear(scores, v[:, :, lo : a + w], gamma, alpha, fqb @ kv_state, fqb @ k_state.unsqueeze(-1))
        )
        if blk >= 1:  # block t−1 joins the linear set of block t+1
            kv_state = kv_state + fk[:, :, lo:a].transpose(-1, -2) @ v[:, :, lo:a]
            k_state = k_state + fk[:, :, lo:a].sum(dim=2)
    return torch.cat(outs, dim=2)[:, :, o : o + t]
