"""FoT inference memory: the per-layer cache of local window and memory, and attention over both (spec §3).

Tworkowski et al., arXiv 2307.03170, §5.1 (exact kNN over the memory at inference), as implemented by
CStanKonrad/long_llama ``src/modeling_longllama.py`` and pinned down in ``specs/fot.md`` §3. A :class:`FoTCache` holds a
local window whose keys are rotated at window-relative positions, and a memory of evicted keys rotated at position 0
with their values and additive masks, stored in ``mem_dtype``. A query attends to [local (causal); memory] with one
float32 softmax, masks floored at -1e6 (:func:`memory_attention`); ``mem_attention_grouping`` (h, q) computes it in
blocks of h heads × q queries; ``top_k`` keeps only the k best memory keys per head and query (the paper's exact kNN;
dense memory attention when None).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lit_longctx.nn.attention.causal import causal_doc_mask, padding_mask
from lit_longctx.nn.attention.fot_cross_batch import MASK_VALUE, compute_dtype


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
    dt = compute_dtype(q.dtype)
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
