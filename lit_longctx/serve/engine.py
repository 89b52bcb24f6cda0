"""The model side of ``lit-longctx serve``: one loaded checkpoint, decoded only through its method's session.

Every request runs on one worker thread, one at a time (padded batched inference is not available to the sessions
yet), so the server queues concurrent requests up to its concurrency limit. Generation is
``session_for(model, 1).prefill(prompt)`` followed by ``session.step`` per token with
:func:`lit_longctx.nn.generate.sample_next` -- the same operations, in the same order, as
:func:`lit_longctx.nn.generate.generate`, so a served greedy completion equals ``generate()`` token for token and
FoT's memory, landmark retrieval and LoLCATs' constant-size state are what answers a long prompt.

Cancellation: a forward pre-hook on the model raises :class:`Cancelled` when the running request's cancel event is
set (client gone, timeout), so even a long chunked prefill stops at the next chunk and its session is dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lit_longctx.nn.generate import DecodingSession, sample_next, session_for

#: sessions whose state does not need every past token at full attention (FoT: a local window plus memory; landmark:
#: top-k retrieval of blocks), so their prompts are not bounded by the training length
MEMORY_SESSIONS = ("FoTSession", "LandmarkSession")
#: attention kinds with a constant-size decoding state (LoLCATs' sliding window + linear-attention sums)
CONSTANT_STATE_KINDS = ("hybrid_linear",)


class Cancelled(Exception):
    """The request was cancelled (client disconnected or timed out) while the model was running it."""


@dataclass
class SampleParams:
    """Sampling settings of one request (validated by the schemas)."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    num_samples: int = 1
    seed: int | None = None


@dataclass
class Stats:
    """Counters reported by ``GET /health`` (the tests read them)."""

    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    active_sessions: int = 0
    last_session: str | None = None
    last_prompt_tokens: int = 0
    generated_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def to_dict(self) -> dict[str, Any]:
        with self.lock:
            return {k: v for k, v in self.__dict__.items() if k != "lock"}


def prompt_limit(model: Any) -> int | None:
    """The longest prompt the method supports: None (unbounded) for memory methods, else ``max_seq_len``."""
    from lit_longctx.nn.attention import get_attention

    session = {get_attention(k).session_class for k in model.kinds} - {None}
    if any(cls.__name__ in MEMORY_SESSIONS for cls in session):
        return None
    if all(kind in CONSTANT_STATE_KINDS for kind in model.kinds):
        return None
    return int(model.config.max_seq_len)


def read_chat_template(loaded: Any) -> str | None:
    """The checkpoint's chat template: tokenizer_config.json's ``chat_template``, or an HF dir's chat_template.jinja."""
    import json

    config = loaded.tokenizer_files.get("tokenizer_config.json")
    if config:
        template = json.loads(config).get("chat_template")
        if isinstance(template, list):  # transformers' named templates: use the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if isinstance(template, str):
            return template
    jinja = Path(loaded.source) / "chat_template.jinja"
    return jinja.read_text() if jinja.is_file() else None


class Engine:
    """A loaded model and tokenizer plus the single worker that runs requests on them.

    Args:
        model: the :class:`~lit_longctx.nn.llama.Transformer` (eval mode is set here).
        tokenizer: its tokenizer.
        name: the model id reported by ``/v1/models``.
        method: the checkpoint's method (``causal``, ``fot``, ...).
        max_prompt_tokens: prompt limit; None = what the method supports (:func:`prompt_limit`); 0 = unbounded.
        session_kwargs: options for the method's session (e.g. FoT's ``last_context_length``).
        chat_template: a Jinja chat template, or None (chat endpoint answers 400).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str = "model",
        method: str = "causal",
        max_prompt_tokens: int | None = None,
        session_kwargs: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.method = method
        self.max_prompt_tokens = prompt_limit(model) if max_prompt_tokens is None else (max_prompt_tokens or None)
        self.session_kwargs = dict(session_kwargs or {})
        self.chat_template = chat_template
        self.device = model.lm_head.weight.device
        self.stop_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        self.stats = Stats()
        self._cancel: threading.Event | None = None  # the running request's
        self._capture: Callable[[torch.Tensor, torch.Tensor], None] | None = None
        self._ids: torch.Tensor | None = None
        model.register_forward_pre_hook(self._before_forward)
        model.model.norm.register_forward_hook(self._after_norm)
        probe = session_for(model, 1, **self.session_kwargs)  # fails now (bad session options), not per request
        self.session_name = type(probe).__name__
        del probe

    # ------------------------------------------------------------------------------------------------------ hooks
    def _before_forward(self, module: Any, args: tuple) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled()
        self._ids = args[0] if args else None

    def _after_norm(self, module: Any, args: tuple, output: torch.Tensor) -> None:
        if self._capture is not None and self._ids is not None:
            self._capture(self._ids, output)

    # ---------------------------------------------------------------------------------------------------- helpers
    def encode(self, text: str) -> list[int]:
        """Prompt ids: the text with the tokenizer's BOS first (as ``lit-longctx generate`` does)."""
        return self.tokenizer.encode(text, bos=self.tokenizer.bos_id is not None)

    def new_session(self) -> DecodingSession:
        session = session_for(self.model, 1, **self.session_kwargs)
        with self.stats.lock:
            self.stats.active_sessions += 1
            self.stats.last_session = type(session).__name__
        return session

    def _free(self, session: DecodingSession | None) -> None:
        if session is not None:
            with self.stats.lock:
                self.stats.active_sessions -= 1

    def run(self, cancel: threading.Event, work: Callable[[threading.Event], Any]) -> Any:
        """Run ``work(cancel)`` as the current request (on the worker thread); count how it ended."""
        if cancel.is_set():  # cancelled while queued: never touch the model
            with self.stats.lock:
                self.stats.cancelled += 1
            raise Cancelled()
        self._cancel = cancel
        try:
            with torch.inference_mode():
                result = work(cancel)
        except Cancelled:
            with self.stats.lock:
                self.stats.cancelled += 1
            raise
        except Exception:
            with self.stats.lock:
                self.stats.failed += 1
            raise
        finally:
            self._cancel = None
            self._capture = None
        with self.stats.lock:
            self.stats.completed += 1
        return result

    # ------------------------------------------------------------------------------------------------ generation
    def stream(self, ids: list[int], params: SampleParams, cancel: threading.Event) -> Iterator[tuple[int, int]]:
        """Yield (sample index, token id) for every generated token; samples run one after another.

        Sample i draws from one ``torch.Generator`` seeded with ``params.seed``, continued across samples (as
        ``lit-longctx generate --num_samples``), so a seed reproduces all samples. Stops at EOS (not yielded).
        """
        generator = torch.Generator(device=self.device)
        if params.seed is not None:
            generator.manual_seed(params.seed)
        else:
            generator.seed()
        prompt = torch.tensor([ids], dtype=torch.long, device=self.device)
        with self.stats.lock:
            self.stats.last_prompt_tokens = len(ids)
        for sample in range(params.num_samples):
            if params.max_new_tokens == 0:
                continue
            session = self.new_session()
            try:
                logits = session.prefill(prompt)
                for i in range(params.max_new_tokens):
                    if cancel.is_set():
                        raise Cancelled()
                    nxt = sample_next(logits, params.temperature, params.top_k, params.top_p, generator)
                    token = int(nxt[0])
                    if token in self.stop_ids:
                        break
                    with self.stats.lock:
                        self.stats.generated_tokens += 1
                    yield sample, token
                    if i < params.max_new_tokens - 1:
                        logits = session.step(nxt.unsqueeze(1))
            finally:
                self._free(session)
                del session

    def embed(self, ids: list[int]) -> list[float]:
        """Mean over the prompt's tokens of the final-norm hidden states, L2-normalised (see README "Serving").

        The prompt goes through the method's session (``prefill``), so a FoT / landmark model embeds a long prompt
        with its memory; tokens the session inserts itself (landmarks) are left out of the mean.
        """
        session = self.new_session()
        inserted = getattr(session, "landmark_id", None)  # ids the session inserts itself are no prompt tokens
        total = torch.zeros(self.model.config.dim, dtype=torch.float64, device=self.device)
        count = 0

        def capture(fed: torch.Tensor, hidden: torch.Tensor) -> None:
            nonlocal total, count
            keep = torch.ones_like(fed[0], dtype=torch.bool) if inserted is None else fed[0] != inserted
            total = total + hidden[0][keep].double().sum(0)
            count += int(keep.sum())

        try:
            self._capture = capture
            session.prefill(torch.tensor([ids], dtype=torch.long, device=self.device))
        finally:
            self._capture = None
            self._free(session)
        mean = total / max(count, 1)
        return torch.nn.functional.normalize(mean, dim=0).float().tolist()

