"""Autoregressive generation over any attention kind's inference state.

A *session* (:mod:`lit_longctx.nn.session`) drives one batch of sequences through the model: ``prefill(ids,
attention_mask)`` ingests prompts and ``step(ids)`` feeds generated tokens. :class:`DecodingSession` is the plain
KV-cache driver; an attention kind that needs its own driver (FoT's memory with ``last_context_length``, landmark
insertion, ...) names a subclass in ``Attention.session_class``. ``generate`` takes several prompts of different
lengths and batches them with left padding; every row continues as it would alone.

Sampling: greedy (temperature 0), temperature, top-k, top-p (nucleus, Holtzman et al. 2020), stop tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lit_longctx.nn.attention import get_attention
from lit_longctx.nn.session import DecodingSession, left_pad

if TYPE_CHECKING:
    from lit_longctx.nn.llama import Transformer

__all__ = ["DecodingSession", "generate", "sample_next", "session_for"]


def session_for(model: Transformer, batch_size: int = 1, **kwargs: Any) -> DecodingSession:
    """The decoding session the model's attention kinds ask for (plain KV cache unless a kind names another)."""
    classes = {get_attention(k).session_class for k in model.kinds} - {None}
    if len(classes) > 1:
        names = ", ".join(sorted(c.__name__ for c in classes))
        raise ValueError(f"attention kinds of this model need different decoding sessions ({names}); pass session=")
    cls = classes.pop() if classes else DecodingSession
    return cls(model, batch_size=batch_size, **kwargs)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from (B, V) logits: greedy when temperature == 0, else filtered sampling."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prompt_batch(
    prompt: torch.Tensor | Sequence[int] | Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids (B, N), attention_mask or None) of a (B, N) tensor, one list of ids, or several lists (left-padded)."""
    if isinstance(prompt, torch.Tensor):
        ids = prompt.to(device=device, dtype=torch.long)
        return (ids.unsqueeze(0) if ids.dim() == 1 else ids), None
    prompt = list(prompt)
    if prompt and not isinstance(prompt[0], int) and hasattr(prompt[0], "__len__"):
        lengths = {len(p) for p in prompt}
        if len(lengths) > 1:
            return left_pad([list(p) for p in prompt], pad_id, device)
    ids = torch.as_tensor(prompt, dtype=torch.long, device=device)
    return (ids.unsqueeze(0) if ids.dim() == 1 else ids), None


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    generator: torch.Generator | None = None,
    session: DecodingSession | None = None,
    prefill_chunk: int | None = None,
    attention_mask: torch.Tensor | None = None,
    **session_kwargs: Any,
) -> list[list[int]]:
    """Continue each prompt row; returns the new tokens per row, stopping at (and excluding) a stop token.

    ``prompt`` is a (B, N) tensor (with ``attention_mask`` (B, N) when rows are left-padded), one list of ids, or
    several lists of ids of any lengths, which are left-padded (pad id: the model's ``pad_token_id``, else 0) and
    batched; each row's continuation equals that of the row generated alone (greedy). ``session_kwargs`` go to the
    session (e.g. FoT's ``last_context_length``).
    """
    device = model.lm_head.weight.device
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids, mask = prompt_batch(prompt, pad_id, device)
    if attention_mask is not None:
        if mask is not None:
            raise ValueError("prompts of different lengths are padded here: give either lists of ids or a padded "
                             "tensor with its attention_mask, not both")
        mask = attention_mask
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    b = ids.shape[0]
    was_training = model.training
    model.eval()
    try:
        session = session or session_for(model, batch_size=b, prefill_chunk=prefill_chunk, **session_kwargs)
        out: list[list[int]] = [[] for _ in range(b)]
        if max_new_tokens == 0:
            return out
        logits = session.prefill(ids, attention_mask=mask) if mask is not None else session.prefill(ids)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            hit = torch.isin(nxt, stops) if len(stop_tokens) else torch.zeros_like(done)
            for row in torch.nonzero(~done & ~hit).flatten().tolist():
                out[row].append(int(nxt[row]))
            done |= hit
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            logits = session.step(nxt.unsqueeze(1))
        return out
    finally:
        model.train(was_training)
