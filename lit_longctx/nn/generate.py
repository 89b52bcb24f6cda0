"""Autoregressive generation over any attention kind's inference state.

A *session* drives one batch of sequences through the model: ``prefill(ids)`` ingests a prompt (in chunks, so a prompt
longer than one forward chunk never builds a T×T score matrix at once) and ``step(ids)`` feeds generated tokens.
:class:`DecodingSession` is the plain KV-cache driver; an attention kind that needs its own driver (FoT's memory
with ``last_context_length``, landmark insertion, ...) names a subclass in ``Attention.session_class``.

Sampling: greedy (temperature 0), temperature, top-k, top-p (nucleus, Holtzman et al. 2020), stop tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # attention kinds subclass DecodingSession, so this module imports nothing of the model at load time
    from lit_longctx.nn.llama import Transformer


class DecodingSession:
    """Chunked prefill and token-by-token decoding with the model's per-layer caches."""

    def __init__(self, model: Transformer, batch_size: int = 1, prefill_chunk: int | None = None, **_: Any) -> None:
        self.model = model
        self.batch_size = batch_size
        self.prefill_chunk = prefill_chunk or model.config.max_seq_len
        self.state = model.new_state(batch_size)

    @property
    def position(self) -> int:
        return self.state.position

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed (B, n) ids through the caches; return the last position's logits (B, V) in float32."""
        return self.model(ids, state=self.state, return_logits="last").logits[:, -1].float()

    def forward_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed (B, n) ids through the caches; return float32 logits (B, n, V) of every fed token (perplexity).

        Methods override this with their own path (FoT memory schedule, landmark insertion) so evaluation scores
        what the method would compute.
        """
        return self.model(ids, state=self.state, return_logits=True).logits.float()

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        logits = None
        for start in range(0, ids.shape[1], self.prefill_chunk):
            logits = self.forward(ids[:, start : start + self.prefill_chunk])
        if logits is None:
            raise ValueError("the prompt is empty: give at least one token (e.g. the tokenizer's BOS)")
        return logits

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        return self.forward(ids)


def session_for(model: Transformer, batch_size: int = 1, **kwargs: Any) -> DecodingSession:
    """The decoding session the model's attention kinds ask for (plain KV cache unless a kind names another)."""
    from lit_longctx.nn.attention import get_attention

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


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt: torch.Tensor | Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    generator: torch.Generator | None = None,
    session: DecodingSession | None = None,
    prefill_chunk: int | None = None,
    **session_kwargs: Any,
) -> list[list[int]]:
    """Continue each prompt row; returns the new tokens per row, stopping at (and excluding) a stop token.

    ``prompt`` is a (B, N) tensor of equal-length prompts or one list of ids. ``session_kwargs`` go to the session
    (e.g. FoT's ``last_context_length``).
    """
    device = model.lm_head.weight.device
    ids = torch.as_tensor(prompt, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
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
        logits = session.prefill(ids)
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
