"""Landmark inference memory (paper §3.2, spec §3): the per-layer block cache, top-k retrieval and stingy positions.

:class:`LandmarkCache` keeps complete blocks of keys *before* RoPE (landmark last) and the trailing incomplete block
apart; :func:`attend_with_cache` runs one chunk against ``[k retrieved blocks | incomplete block | chunk]``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from lit_longctx.nn.attention.causal import repeat_kv
from lit_longctx.nn.attention.landmark_softmax import grouped_softmax_weights
from lit_longctx.nn.config import ConfigError
from lit_longctx.nn.rope import apply_rotary

Selection = Literal["per_token_and_head", "max_over_heads", "max_over_tokens"]
SELECTIONS = ("per_token_and_head", "max_over_heads", "max_over_tokens")


def check_top_k(top_k: Any) -> int:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ConfigError(f"landmark top_k must be an integer >= 1 (blocks retrieved per token and head), got "
                          f"{top_k!r}")
    return top_k


def check_mem_cache_size(size: Any) -> int | None:
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ConfigError(f"landmark mem_cache_size must be None (keep every block) or an integer >= 1 (blocks kept, "
                          f"oldest evicted first), got {size!r}")
    return size


def check_selection(selection: str) -> str:
    if selection not in SELECTIONS:
        raise ConfigError(f"landmark selection={selection!r} is unknown; use one of {', '.join(SELECTIONS)}")
    return selection


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
    change them per run.

    ``mem_cache_size`` bounds the memory to that many blocks, as ``lm_benchmark``'s ``mem_cache_size`` (the blocks
    column of paper Table 1): a FIFO ring whose newest block overwrites the oldest, and a chunk that completes more
    blocks than fit keeps only its newest ones. ``None`` keeps every block (the maintained LLaMA code). Blocks are
    addressed by chronological rank r ∈ [0, n) (0 = oldest still cached); ``evicted`` counts the blocks dropped, so
    ``evicted + r`` is a block's index in the whole stream.

    ``record_retrieval`` keeps, per chunk, the stream indices of the blocks each (token, head) retrieved in
    ``retrieved`` (a list of (B, H, Tr, k') CPU tensors, Tr = 1 for ``max_over_tokens``; off by default).

    Padded batches (``store`` with a mask): a complete block is all tokens or all pads, and ``block_mask`` marks the
    blocks a row may retrieve. Bounded and padded, the memory is each row's own FIFO: the store turns chronological
    (no ring), a row keeps its ``mem_cache_size`` newest *token* blocks (older ones leave its ``block_mask``), and the
    oldest blocks that no row keeps are dropped, so that a row's memory is the one it would have alone.
    """

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
        mem_cache_size: int | None = None,
        record_retrieval: bool = False,
    ) -> None:
        self.batch_size, self.n_kv_heads, self.head_dim, self.block = batch_size, n_kv_heads, head_dim, block
        self.device, self.dtype = torch.device(device), dtype
        self.top_k = check_top_k(top_k)
        self.selection = check_selection(selection)
        self._offload = bool(offload_to_cpu)
        self._size = check_mem_cache_size(mem_cache_size)
        self.record_retrieval = bool(record_retrieval)
        self.retrieved: list[torch.Tensor] = []
        self.n_blocks = 0
        self.evicted = 0
        self._head = 0  # physical slot of the oldest cached block (always 0 when unbounded)
        self.k_blocks: torch.Tensor | None = None
        self.v_blocks: torch.Tensor | None = None
        self.mem_keys: torch.Tensor | None = None
        self.tail_k = torch.empty(batch_size, n_kv_heads, 0, head_dim, device=self.device, dtype=dtype)
        self.tail_v = torch.empty_like(self.tail_k)
        self.tail_mask = torch.ones(batch_size, 0, dtype=torch.bool, device=self.device)  # token (True) or pad
        self.tail_pos = torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)  # the positions fed at
        self.block_mask: torch.Tensor | None = None  # (B, capacity) bool: False = never retrieved (pads, evicted)
        self._chronological = False  # a bounded store holding pads: slots are ranks, eviction is per row

    @property
    def offload_to_cpu(self) -> bool:
        return self._offload

    @offload_to_cpu.setter
    def offload_to_cpu(self, value: bool) -> None:
        if self.n_blocks and bool(value) != self._offload:
            raise ValueError("offload_to_cpu can only be changed while the landmark cache is empty")
        self._offload = bool(value)

    @property
    def mem_cache_size(self) -> int | None:
        return self._size

    @mem_cache_size.setter
    def mem_cache_size(self, value: int | None) -> None:
        if self.n_blocks and value != self._size:
            raise ValueError("mem_cache_size can only be changed while the landmark cache is empty")
        self._size = check_mem_cache_size(value)
        self.k_blocks = self.v_blocks = self.mem_keys = self.block_mask = None

    @property
    def storage_device(self) -> torch.device:
        """Where complete blocks live: the CPU when offloading, else the compute device."""
        return torch.device("cpu") if self._offload else self.device

    @property
    def tail_len(self) -> int:
        return self.tail_k.shape[2]

    def _physical(self, rank: torch.Tensor) -> torch.Tensor:
        """Storage slot of chronological rank(s) ``rank``."""
        if self._size is None or self._chronological:
            return rank
        return torch.remainder(rank + self._head, self._size)

    @property
    def _ring(self) -> bool:
        return self._size is not None and not self._chronological

    def _grow(self, needed: int) -> None:
        cap = 0 if self.k_blocks is None else self.k_blocks.shape[2]
        if needed <= cap:
            return
        cap = self._size if self._ring else max(needed, 2 * cap, 8)
        b, hk, bk, d = self.batch_size, self.n_kv_heads, self.block, self.head_dim
        kb = torch.empty(b, hk, cap, bk, d, device=self.storage_device, dtype=self.dtype)
        vb = torch.empty_like(kb)
        mk = torch.empty(b, hk, cap, d, device=self.device, dtype=self.dtype)
        bm = torch.ones(b, cap, dtype=torch.bool, device=self.device)
        if self.k_blocks is not None:  # only a chronological store grows, and its slots are ranks
            kb[:, :, : self.n_blocks] = self.k_blocks[:, :, : self.n_blocks]
            vb[:, :, : self.n_blocks] = self.v_blocks[:, :, : self.n_blocks]
            mk[:, :, : self.n_blocks] = self.mem_keys[:, :, : self.n_blocks]
            bm[:, : self.n_blocks] = self.block_mask[:, : self.n_blocks]
        self.k_blocks, self.v_blocks, self.mem_keys, self.block_mask = kb, vb, mk, bm

    def _to_chronological(self) -> None:
        """Reorder a ring into rank order (the first padded store of a bounded cache): eviction becomes per row."""
        if self.k_blocks is not None:
            rank = self._physical(torch.arange(self.n_blocks, device=self.device))
            self.k_blocks = self.k_blocks[:, :, rank.to(self.storage_device)]
            self.v_blocks = self.v_blocks[:, :, rank.to(self.storage_device)]
            self.mem_keys, self.block_mask = self.mem_keys[:, :, rank], self.block_mask[:, rank]
        self._head, self._chronological = 0, True

    def _evict_per_row(self) -> None:
        """Bounded padded store: each row keeps its ``mem_cache_size`` newest token blocks; blocks no row keeps
        (the oldest) leave the store."""
        n = self.n_blocks
        tokens = self.block_mask[:, :n]
        newer = tokens.long().flip(1).cumsum(1).flip(1)  # token blocks at or after each rank, per row
        kept = tokens & (newer <= self._size)
        alive = kept.any(0)
        drop = int(alive.long().argmax()) if bool(alive.any()) else n
        self.block_mask = torch.cat([kept[:, drop:], self.block_mask[:, n:]], dim=1)
        self.k_blocks, self.v_blocks = self.k_blocks[:, :, drop:], self.v_blocks[:, :, drop:]
        self.mem_keys = self.mem_keys[:, :, drop:]
        self.n_blocks, self.evicted = n - drop, self.evicted + drop

    def store(
        self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> None:
        """Replace the incomplete block with ``k, v`` (B, Hkv, S, D) pre-RoPE = old incomplete block + new tokens
        (``mask`` (B, S): False = pad; ``positions`` (B, S) the positions they were fed at); their complete blocks
        move to the block store (evicting the oldest beyond ``mem_cache_size``), the rest becomes the new incomplete
        block. A complete block is all tokens or all pads (padded batches pad whole blocks)."""
        full = k.shape[2] // self.block
        b = k.shape[0]
        if mask is not None and self._ring and not bool(mask.all()):
            self._to_chronological()
        mask = torch.ones(b, k.shape[2], dtype=torch.bool, device=k.device) if mask is None else mask
        if full:
            hk, d = k.shape[1], k.shape[3]
            blocks = mask[:, : full * self.block].reshape(b, full, self.block)
            if bool((blocks != blocks[:, :, -1:]).any()):
                raise ValueError(
                    "a landmark block mixes pads and tokens: pad whole blocks of mem_freq tokens (LandmarkSession "
                    "pads prompts that way), so that a block is either retrieved whole or never"
                )
            kb = k[:, :, : full * self.block].reshape(b, hk, full, self.block, d)
            vb = v[:, :, : full * self.block].reshape(b, hk, full, self.block, d)
            keep = min(full, self._size) if self._ring else full
            kb, vb = kb[:, :, full - keep :], vb[:, :, full - keep :]
            self._grow(self.n_blocks + keep)
            # ranks n .. n+keep-1; in the ring the ones past the size land on (and so evict) the oldest slots
            slots = self._physical(torch.arange(self.n_blocks, self.n_blocks + keep))
            self.k_blocks[:, :, slots.to(self.storage_device)] = kb.to(self.storage_device, self.dtype)
            self.v_blocks[:, :, slots.to(self.storage_device)] = vb.to(self.storage_device, self.dtype)
            self.mem_keys[:, :, slots.to(self.device)] = kb[:, :, :, -1].to(self.dtype)
            self.block_mask[:, slots.to(self.device)] = blocks[:, full - keep :, -1].to(self.device)
            total = self.n_blocks + keep
            dropped = max(0, total - self._size) if self._ring else 0
            if dropped:
                self._head = (self._head + dropped) % self._size
            self.n_blocks = total - dropped
            self.evicted += dropped + full - keep
            if self._chronological:
                self._evict_per_row()
        self.tail_k = k[:, :, full * self.block :].to(self.dtype).clone()
        self.tail_v = v[:, :, full * self.block :].to(self.dtype).clone()
        self.tail_mask = mask[:, full * self.block :].to(self.device).clone()
        if positions is not None:
            self.tail_pos = positions[:, full * self.block :].clone()

    def valid_blocks(self) -> torch.Tensor:
        """(B, n) bool, chronological: the cached blocks each row may retrieve (False: pads, or evicted for it)."""
        return self.block_mask[:, self._physical(torch.arange(self.n_blocks, device=self.device))]

    @property
    def padded(self) -> bool:
        """Whether any cached block or tail entry is hidden from some row (pads, or per-row eviction)."""
        blocks = self.block_mask is not None and not bool(self.valid_blocks().all())
        return blocks or not bool(self.tail_mask.all())

    def landmark_keys(self) -> torch.Tensor:
        """(B, Hkv, n, D) landmark keys of the cached blocks in chronological order, before RoPE, on the compute
        device."""
        if self._size is None:
            return self.mem_keys[:, :, : self.n_blocks]
        return self.mem_keys[:, :, self._physical(torch.arange(self.n_blocks, device=self.device))]

    def gather(self, selected: torch.Tensor, n_rep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks ``selected`` (B, H, Tr, k') for query heads (KV head h // n_rep) -> keys (pre-RoPE) and values
        (B, H, Tr, k', Bk, D) on the compute device."""
        b, h = selected.shape[:2]
        idx = self._physical(selected).to(self.storage_device)
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
            self.block_mask = self.block_mask.index_select(0, index)
        self.tail_k, self.tail_v = self.tail_k.index_select(0, index), self.tail_v.index_select(0, index)
        self.tail_mask, self.tail_pos = self.tail_mask.index_select(0, index), self.tail_pos.index_select(0, index)
        self.batch_size = len(index)


def select_blocks(mem_scores: torch.Tensor, top_k: int, selection: str) -> torch.Tensor:
    """Top-k cached blocks per retriever from landmark scores (B, H, T, n), sorted chronologically.

    Returns (B, H, T, k') for ``per_token_and_head`` and ``max_over_heads`` (the latter equal over heads), (B, H, 1, k')
    for ``max_over_tokens``. The reduced variants take the max of the softmax probabilities (softmax first puts heads
    and tokens on one scale, paper Table 2). Equal scores go to the older block.
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
    # equal scores (e.g. layer-0 landmark keys at the shared slot 0) go to the older block: a documented, device-
    # independent rule (topk leaves ties unspecified) that pad blocks of padded batches cannot shift; the scores are
    # in chronological order (oldest cached block first) for bounded caches too
    return rank.sort(dim=-1, descending=True, stable=True).indices[..., :kk].sort(dim=-1).values


def attend_with_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_mem: torch.Tensor,
    start: torch.Tensor,
    cache: LandmarkCache,
    rope: Any,
    scale: float,
    mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """One chunk of cached landmark inference (spec §3.1-3.3), then the chunk is written to ``cache``.

    Args:
        q: (B, H, T, D) queries rotated at their positions; k, v: (B, Hkv, T, D) keys *before* RoPE and values.
        is_mem: (T,) landmark flags of the chunk (equal for all rows).
        start: (B, 1) position P of the first token of the incomplete block (= first chunk position − its length).
        rope: the model's rotary table builder (``ctx.rope``).
        mask: (B, T) token mask of the chunk (False = pad) or None. Pads (of the chunk, the incomplete block and
            whole pad blocks) are hidden from the grouped softmax, and pad blocks are never retrieved: their landmark
            scores sit at the dtype minimum, below every token block's.
        positions: (B, T) positions of the chunk when padded; then the incomplete block's tokens keep the positions
            they were fed at and P is each row's first token there, so pad blocks between a row's chunks shift nothing.

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
    if positions is None:
        local_pos = start + torch.arange(m + t, device=q.device)  # (B, m + T)
        local_tokens = None
    else:
        local_pos = torch.cat([cache.tail_pos, positions], dim=1)
        local_tokens = torch.cat([cache.tail_mask, mask], dim=1)  # (B, m + T)
        first = torch.where(local_tokens.any(1), local_tokens.int().argmax(1), 0).unsqueeze(1)
        start = local_pos.gather(1, first)  # P: the first token of the incomplete block
    # one seq_len for every table (dynamic-NTK RoPE depends on it), the one the queries were rotated with
    seq_len = int(local_pos.max()) + 1
    cos, sin = rope(local_pos, seq_len=seq_len)
    local_kr = apply_rotary(local_k, cos.unsqueeze(1), sin.unsqueeze(1))  # (B, Hkv, m + T, D)
    scores = torch.matmul(q.to(cdt), repeat_kv(local_kr, n_rep).to(cdt).transpose(-1, -2)) * scale  # (B,H,T,m+T)
    flags = local_mem.unsqueeze(0).expand(b, -1)
    padded = local_tokens is not None or cache.padded
    if padded:
        if local_tokens is None:
            local_tokens = torch.cat([cache.tail_mask, torch.ones(b, t, dtype=torch.bool, device=q.device)], dim=1)
        key_mask = local_tokens.view(b, 1, 1, m + t)

    prefix_v = None
    n = cache.n_blocks
    if n:
        kk = min(cache.top_k, n)
        if padded:  # stingy positions count each row's own blocks: hidden blocks are skipped, wherever they sit
            valid = cache.valid_blocks()  # (B, n)
            rank = valid.long().cumsum(1) - 1  # index of each block among the row's retrievable blocks
            n_row = valid.sum(1, keepdim=True)  # (B, 1)
            kk_row = n_row.clamp(max=cache.top_k)  # k' of each row alone
            recent = rank >= n_row - kk_row
            mem_slot = torch.where(recent, rank - (n_row - kk_row) + 1, torch.zeros_like(rank))
            mem_pos = start + slot_start(mem_slot, kk_row, bk) + bk - 1
        else:
            kk_row = torch.full((b, 1), kk, device=q.device)
            mem_pos = start + slot_start(scoring_slots(n, kk, q.device), kk, bk) + bk - 1  # (B, n)
        cos, sin = rope(mem_pos, seq_len=seq_len)
        mem_k = apply_rotary(cache.landmark_keys(), cos.unsqueeze(1), sin.unsqueeze(1))
        mem_k = repeat_kv(mem_k, n_rep).to(cdt)  # (B, H, n, D)
        mem_scores = torch.matmul(q.to(cdt), mem_k.transpose(-1, -2)) * scale  # (B, H, T, n)
        if padded:
            mem_scores = mem_scores.masked_fill(~valid.view(b, 1, 1, n), torch.finfo(cdt).min)
        selected = select_blocks(mem_scores, kk, cache.selection)
        if cache.record_retrieval:
            cache.retrieved.append((selected + cache.evicted).cpu())
        kb, vb = cache.gather(selected, n_rep)  # (B, H, Tr, k', Bk, D)
        tr = selected.shape[2]
        # only (k'+1)·Bk positions exist (k'+1 slots of Bk tokens): one RoPE table per row, indexed by slot
        slot = torch.arange(kk + 1, device=q.device)
        slot_pos = start.view(b, 1, 1) + (slot_start(slot.view(1, -1, 1), kk_row.view(b, 1, 1), bk)
                                          + torch.arange(bk, device=q.device))
        cos, sin = rope(slot_pos, seq_len=seq_len)  # (B, k'+1, Bk, D)
        rows = torch.arange(b, device=q.device).view(b, 1, 1, 1)
        if padded:  # the row's own selection_slots: j counts its selected blocks, recency its own blocks
            picked = valid[rows, selected]  # (B, H, Tr, k')
            j = picked.long().cumsum(-1) - picked.long()
            slots = j + (rank[rows, selected] >= (n_row - kk_row).view(b, 1, 1, 1)).long()
        else:
            slots = selection_slots(selected, n)  # (B, H, Tr, k')
        kb = apply_rotary(kb, cos[rows, slots], sin[rows, slots]).reshape(b, h, tr, kk * bk, d).to(cdt)
        prefix_v = vb.reshape(b, h, tr, kk * bk, d).to(cdt)
        prefix_scores = torch.matmul(q.to(cdt).unsqueeze(3), kb.transpose(-1, -2)).squeeze(3) * scale  # (B,H,T,k'Bk)
        scores = torch.cat([prefix_scores, scores], dim=-1)
        prefix_mem = (torch.arange(kk * bk, device=q.device) % bk == bk - 1).unsqueeze(0).expand(b, -1)
        flags = torch.cat([prefix_mem, flags], dim=1)
        if padded:  # a selected hidden block (rows with fewer retrievable blocks than k') is hidden whole
            picked = picked.unsqueeze(-1).expand(*picked.shape, bk).reshape(b, h, tr, kk * bk)
            key_mask = torch.cat([picked, key_mask.expand(b, h, tr, m + t)], dim=-1)

    w = grouped_softmax_weights(scores, flags, key_mask if padded else None)  # (B, H, T, [k'Bk +] m + T)
    y = torch.matmul(w[..., -(m + t) :], repeat_kv(local_v, n_rep).to(cdt))
    if prefix_v is not None:
        y = y + torch.matmul(w[..., : -(m + t)].unsqueeze(3), prefix_v).squeeze(3)
    cache.store(local_k, local_v, local_tokens if padded else None, local_pos)
    return y.to(q.dtype)
