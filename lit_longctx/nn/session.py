"""The decoding-session contract: a batch of sequences driven through a model's per-layer caches.

``prefill(ids, attention_mask=None)`` ingests prompts (in chunks, so a prompt longer than one forward chunk never
builds a T×T score matrix at once); ``step(ids)`` feeds one generated token per row. Prompts of different lengths come
left-padded with an ``attention_mask`` (HF convention: 1 = token, 0 = pad): pads are never attended to and each row's
positions start at 0 at its first token, so every row continues exactly as it would alone.

This module sits below the attention kinds (which subclass :class:`DecodingSession` for their own drivers) and imports
nothing of the model at load time; :mod:`lit_longctx.nn.generate` (sampling, ``generate``) sits above both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lit_longctx.nn.llama import Transformer


def check_attention_mask(mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor | None:
    """A (B, T) 0/1 (or bool) ``attention_mask`` for ``ids`` (B, T) as a bool tensor; None stays None.

    Raises a ValueError naming the expected shape (the mask covers the tokens fed in this call only: sessions and
    caches remember the masks of earlier calls) or the bad values.
    """
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=ids.device)
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)} but the input_ids fed in this call have shape "
            f"{tuple(ids.shape)}; give one 1 (token) or 0 (pad) per input id, (batch, tokens), for these tokens only "
            "(the cache remembers the masks of earlier calls)"
        )
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask must hold 1 (token) and 0 (pad) only, as an integer or bool tensor")
        mask = mask != 0
    return mask


def padded_positions(mask: torch.Tensor, start: torch.Tensor | int = 0) -> torch.Tensor:
    """Positions (B, T) of a padded chunk: each row's tokens count on from ``start`` (int or (B,)) in order; pads before
    a row's first token continue its run backwards (start - 1, start - 2, ...), later pads repeat the last position.

    With left padding every row thus reads ``start + arange`` shifted to its first token, as the row would alone.
    """
    start = torch.as_tensor(start, device=mask.device).reshape(-1, 1)
    count = mask.long().cumsum(1)
    lead = count == 0
    first = torch.where(mask.any(1), mask.int().argmax(1), mask.shape[1]).unsqueeze(1)
    back = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0) - first
    return torch.where(lead, start + back, start + count - 1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> left-padded ids (B, N) and their attention_mask (B, N) (1 = token)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the tokenizer's BOS)")
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), n, dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        ids[row, n - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        mask[row, n - len(p):] = True
    return ids, mask


def chunks(ids: torch.Tensor, mask: torch.Tensor | None, size: int):
    """(ids, mask) slices of ``size`` tokens along dim 1 (the mask slice is None without a mask)."""
    for start in range(0, ids.shape[1], size):
        yield ids[:, start : start + size], None if mask is None else mask[:, start : start + size]


class DecodingSession:
    """Chunked prefill and token-by-token decoding with the model's per-layer caches (padded batches included)."""

    def __init__(self, model: Transformer, batch_size: int = 1, prefill_chunk: int | None = None, **_: Any) -> None:
        self.model = model
        self.batch_size = batch_size
        self.prefill_chunk = prefill_chunk or model.config.max_seq_len
        self.state = model.new_state(batch_size)

    @property
    def position(self) -> int:
        return self.state.position

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed (B, n) ids through the caches; return the last position's logits (B, V) in float32."""
        out = self.model(ids, state=self.state, attention_mask=attention_mask, return_logits="last")
        return out.logits[:, -1].float()

    def forward_logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed (B, n) ids through the caches; return float32 logits (B, n, V) of every fed token (perplexity;
        the logits at pads are meaningless).

        Methods override this with their own path (FoT memory schedule, landmark insertion) so evaluation scores
        what the method would compute.
        """
        return self.model(ids, state=self.state, attention_mask=attention_mask, return_logits=True).logits.float()

    def padded_logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Score a left-padded batch (B, N) as every row alone would be scored: fed in chunks of ``prefill_chunk`` of
        its own tokens through :meth:`forward_logits` (what ``eval.perplexity.per_token_scores`` does for one row).

        Yields pieces (logits (B, c, V) float32, cols (B, c) long): ``logits[b, i]`` are the logits after
        ``ids[b, cols[b, i]]``; ``cols`` is -1 where a piece holds no token of the row (pads, filler). Every real
        token's logits come exactly once. Here the batch is cut into column chunks with the mask, which equals each
        row's own chunking wherever chunk boundaries do not change the result (a KV cache); methods whose result
        depends on the calls a row is fed override this.
        """
        mask = check_attention_mask(attention_mask, ids)
        cols = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        if mask is not None:
            cols = cols.masked_fill(~mask, -1)
        for start in range(0, ids.shape[1], self.prefill_chunk):
            part = slice(start, start + self.prefill_chunk)
            yield self.forward_logits(ids[:, part], None if mask is None else mask[:, part]), cols[:, part]

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Ingest (B, N) prompts, left-padded when ``attention_mask`` marks pads; logits (B, V) after each row's
        last token."""
        attention_mask = check_attention_mask(attention_mask, ids)
        logits = None
        for part, mask in chunks(ids, attention_mask, self.prefill_chunk):
            logits = self.forward(part, mask)
        if logits is None:
            raise ValueError("the prompt is empty: give at least one token (e.g. the tokenizer's BOS)")
        return logits

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        return self.forward(ids)
