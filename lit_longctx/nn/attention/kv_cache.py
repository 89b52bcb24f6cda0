"""The plain KV cache of softmax attention layers, with the padding mask of every cached key.

It lives below ``base.py`` and ``causal.py`` (both import it; it imports neither), so the default ``new_cache`` of
every kind needs no import inside a function.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys (after RoPE) and values of one layer, (B, Hkv, S, D), in a buffer that doubles when full.

    ``key_mask`` (B, S) bool (True = a token, False = a pad that no query may attend to) exists once a padded chunk
    was appended (or rows were forgotten); until then every cached key is a token and it is None.
    """

    def __init__(
        self, batch_size: int, n_kv_heads: int, head_dim: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.shape = (batch_size, n_kv_heads, 0, head_dim)
        self.device, self.dtype = device, dtype
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None  # (B, capacity) bool, allocated at the first pad
        self.length = 0

    def append(
        self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add (B, Hkv, T, D) keys/values and their (B, T) token mask (None = all tokens); return views of everything
        cached so far (their mask is :attr:`key_mask`)."""
        new_len = self.length + k.shape[2]
        if self.k is None or new_len > self.k.shape[2]:
            capacity = max(new_len, 2 * (self.k.shape[2] if self.k is not None else 0), 64)
            b, h, _, d = self.shape
            kb = torch.empty(b, h, capacity, d, device=self.device, dtype=self.dtype)
            vb = torch.empty_like(kb)
            if self.k is not None:
                kb[:, :, : self.length] = self.k[:, :, : self.length]
                vb[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = kb, vb
            if self.mask is not None:
                self.mask = torch.cat([self.mask[:, : self.length], self.mask.new_ones(b, capacity - self.length)], 1)
        if mask is not None and self.mask is None:
            self.mask = torch.ones(self.shape[0], self.k.shape[2], dtype=torch.bool, device=self.device)
        if self.mask is not None:
            self.mask[:, self.length : new_len] = True if mask is None else mask
        self.k[:, :, self.length : new_len] = k
        self.v[:, :, self.length : new_len] = v
        self.length = new_len
        return self.k[:, :, :new_len], self.v[:, :, :new_len]

    @property
    def key_mask(self) -> torch.Tensor | None:
        """(B, S) token mask of the cached keys, or None when all are tokens."""
        return None if self.mask is None else self.mask[:, : self.length]

    def forget(self, rows: torch.Tensor) -> None:
        """Make every cached key of the rows where ``rows`` (B,) bool is True invisible (a per-row cache reset)."""
        if self.length == 0 or not bool(rows.any()):
            return
        if self.mask is None:
            self.mask = torch.ones(self.shape[0], self.k.shape[2], dtype=torch.bool, device=self.device)
        self.mask[rows.to(self.device), : self.length] = False

    def select(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (beam search / finished rows)."""
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)
        self.shape = (len(index),) + self.shape[1:]
