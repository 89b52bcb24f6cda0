"""FoT decoding: LongLLaMA's schedule of a long input and of generation over every layer's cache (spec §3).

The prefix of a long input goes to memory W tokens at a time, the last ``last_context_length`` tokens stay local, and
generation evicts the whole local window into memory when it would exceed W (``modeling_longllama.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from lit_longctx.nn.attention.fot_memory import FoTCache
from lit_longctx.nn.config import ConfigError
from lit_longctx.nn.session import DecodingSession, check_attention_mask, padded_positions

if TYPE_CHECKING:
    from lit_longctx.nn.llama import Transformer


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
        # memory layers are those with a FoTCache (as in evict()): this module sits below fot.py, which imports it
        memory_layers = [layer.self_attn for layer, cache in zip(model.layers, self.state.caches)
                         if isinstance(cache, FoTCache)]
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

    def padded_logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every row fed its own chunks of ``prefill_chunk`` tokens in one batch: call j gets each row's j-th chunk
        (left-padded), as the row alone would be fed call by call, since the memory schedule depends on the calls
        (the first one sends its prefix to memory). A row out of chunks gets one filler token (its own last), which
        nothing it scored can see; its ``cols`` are -1 there."""
        mask = check_attention_mask(attention_mask, ids)
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
        index = [torch.nonzero(row).squeeze(1) for row in mask]  # where each row's tokens are
        if min(len(i) for i in index) == 0:
            raise ValueError("no tokens to score: every row needs at least one token (e.g. the tokenizer's BOS)")
        c = self.prefill_chunk
        for start in range(0, max(len(i) for i in index), c):
            cols = [i[start : start + c] if start < len(i) else i[-1:] for i in index]
            width = max(len(x) for x in cols)
            part = ids.new_zeros(len(index), width)
            where = torch.full_like(part, -1)
            part_mask = torch.zeros_like(part, dtype=torch.bool)
            for row, (x, own) in enumerate(zip(cols, index)):
                part[row, width - len(x) :], part_mask[row, width - len(x) :] = ids[row, x], True
                if start < len(own):
                    where[row, width - len(x) :] = x
            yield self.forward_logits(part, part_mask), where

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
