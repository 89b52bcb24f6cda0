"""The model side of ``lit-longctx serve``: one loaded checkpoint, decoded only through its method's session.

Requests queue as :class:`Job` s for one worker thread. Each turn the worker takes the oldest job and, when it is a
single-sample generation, every other queued single-sample generation up to ``max_batch``: their prompts are
left-padded into one batch, prefilled with an ``attention_mask`` through ONE ``session_for(model, batch_size=B)``
and decoded with one ``session.step`` per token for the whole batch; each row samples with its own generator and
feeds its own stream (a row that finished -- EOS, its max tokens, cancelled, timed out -- is stepped along and
ignored until all rows are done). Each row of a padded batch equals that row run alone (docs/CONTRACTS.md), so a
served greedy completion equals ``generate()`` token for token, and FoT's memory, landmark retrieval and LoLCATs'
constant-size state are what answers a long prompt. Embeddings run alone, and so do the jobs of a batch whose
session refuses the padded prefill with a ValueError (landmark ``record_retrieval``): they then run one by one,
``session_for(model, 1).prefill(prompt)`` and ``step``.

A multi-sample request (``num_samples`` / ``n`` > 1) runs as its own job, its samples decoded together as the rows of
one batch (the prompt repeated, so no padding), up to ``max_batch`` rows at a time; sample i samples with its own
generator seeded ``seed + i`` (:func:`sample_seeds`), so its tokens do not depend on the other samples, on
``max_batch`` or on whether the session could batch them (a session that refuses the batched prefill with a
ValueError gets the samples one by one).

Cancellation: a forward pre-hook on the model raises :class:`Cancelled` when the running request's cancel event is
set (client gone, timeout) -- for a batch, when every row's is -- so even a long chunked prefill stops at the next
chunk and its session is dropped; a single cancelled row of a batch stops at the next token.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lit_longctx.nn.generate import DecodingSession, sample_next, session_for
from lit_longctx.nn.session import left_pad

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
    batches: int = 0  # padded batches of more than one request run
    largest_batch: int = 0  # most requests decoded together in one session
    batched_forwards: int = 0  # forwards (prefill chunks and steps) over a batch of more than one request
    sample_batches: int = 0  # batches of more than one sample of a multi-sample request run
    largest_sample_batch: int = 0  # most samples of one request decoded together
    sample_forwards: int = 0  # forwards (prefill chunks and steps) over such a batch
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def to_dict(self) -> dict[str, Any]:
        with self.lock:
            return {k: v for k, v in self.__dict__.items() if k != "lock"}


@dataclass
class Job:
    """One queued request: ``work(cancel)`` run alone, or a generation (``ids``, ``params``, ``emit(sample, token)``
    per token) that may share a padded batch; ``future`` gets the work's result, or None for a generation."""

    cancel: threading.Event
    work: Callable[[threading.Event], Any] | None = None
    ids: list[int] | None = None
    params: SampleParams | None = None
    emit: Callable[[int, int], None] | None = None
    future: Future = field(default_factory=Future)

    @property
    def batchable(self) -> bool:
        return self.ids is not None and self.params.num_samples == 1 and self.params.max_new_tokens > 0


class _AllCancelled:
    """The cancel flag of a batch: set once every row's is."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs

    def is_set(self) -> bool:
        return all(j.cancel.is_set() for j in self.jobs)


class Unbatchable(Exception):
    """The session refused the padded batch at prefill (its ValueError is the cause); run the rows one by one."""


def sample_seeds(seed: int | None, num_samples: int) -> list[int | None]:
    """The seed of each sample of a request: ``seed + i`` for sample i (sample 0 is the single-sample request with
    the same seed; as vLLM seeds the n choices of a request), or None (fresh randomness) for every sample."""
    return [None if seed is None else seed + i for i in range(num_samples)]


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
        max_batch: most single-sample generations decoded together in one padded batch (1 = one at a time).
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
        max_batch: int = 8,
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
        self.max_batch = max_batch
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self._pending: deque[Job] = deque()
        self._pending_lock = threading.Lock()
        self._cancel: threading.Event | _AllCancelled | None = None  # the running request's (or batch's)
        self._capture: Callable[[torch.Tensor, torch.Tensor], None] | None = None
        self._ids: torch.Tensor | None = None
        self._sample_rows = 0  # rows of the multi-sample batch being decoded (0: none)
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
        if self._ids is not None and self._ids.shape[0] > 1 and isinstance(self._cancel, _AllCancelled):
            with self.stats.lock:
                self.stats.batched_forwards += 1
        elif self._ids is not None and self._sample_rows > 1:
            with self.stats.lock:
                self.stats.sample_forwards += 1

    def _after_norm(self, module: Any, args: tuple, output: torch.Tensor) -> None:
        if self._capture is not None and self._ids is not None:
            self._capture(self._ids, output)

    # ---------------------------------------------------------------------------------------------------- helpers
    def encode(self, text: str) -> list[int]:
        """Prompt ids: the text with the tokenizer's BOS first (as ``lit-longctx generate`` does)."""
        return self.tokenizer.encode(text, bos=self.tokenizer.bos_id is not None)

    def new_session(self, batch_size: int = 1) -> DecodingSession:
        session = session_for(self.model, batch_size, **self.session_kwargs)
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

    # ------------------------------------------------------------------------------------------------ the queue
    def enqueue(self, job: Job) -> Future:
        """Queue ``job``; the caller then has the worker thread call :meth:`drain` once for it."""
        if job.work is None:
            job.work = lambda cancel: self._emit_all(job, self.stream(job.ids, job.params, cancel))
        with self._pending_lock:
            self._pending.append(job)
        return job.future

    def drain(self) -> None:
        """On the worker thread: run the oldest queued job, batched with queued single-sample generations."""
        with self._pending_lock:
            if not self._pending:  # an earlier turn ran this turn's job in its batch
                return
            batch, skipped = [self._pending.popleft()], []
            while batch[0].batchable and self._pending and len(batch) < self.max_batch:
                job = self._pending.popleft()
                (batch if job.batchable else skipped).append(job)
            self._pending.extendleft(reversed(skipped))
        if len(batch) > 1:
            try:
                self._run_batch(batch)
                return
            except Unbatchable:  # the session cannot take this padded batch: the same jobs, one at a time
                pass
        for job in batch:
            if not job.future.done():  # not already answered (cancelled while queued)
                self._run_one(job)

    def _run_one(self, job: Job) -> None:
        try:
            job.future.set_result(self.run(job.cancel, job.work))
        except BaseException as e:  # the future carries it to the waiting request
            job.future.set_exception(e)

    @staticmethod
    def _emit_all(job: Job, tokens: Iterator[tuple[int, int]]) -> None:
        for sample, token in tokens:
            job.emit(sample, token)

    def _finish(self, job: Job, error: BaseException | None = None) -> None:
        with self.stats.lock:
            if error is None:
                self.stats.completed += 1
            elif isinstance(error, Cancelled):
                self.stats.cancelled += 1
            else:
                self.stats.failed += 1
        if error is None:
            job.future.set_result(None)
        else:
            job.future.set_exception(error)

    def _run_batch(self, jobs: list[Job]) -> None:
        """Decode ``jobs`` (single-sample generations) as one left-padded batch; each row samples with its own
        generator exactly as :meth:`stream` would. Raises :class:`Unbatchable` (no job touched) when the session
        refuses the padded prefill."""
        live = []
        for job in jobs:
            if job.cancel.is_set():  # cancelled while queued: never touch the model
                self._finish(job, Cancelled())
            else:
                live.append(job)
        if len(live) <= 1:
            for job in live:
                self._run_one(job)
            return
        generators = [self._generator(j.params.seed) for j in live]
        ids, mask = left_pad([j.ids for j in live], self.pad_id, self.device)
        open_rows = set(range(len(live)))
        counts = [0] * len(live)
        session = self.new_session(len(live))
        self._cancel = _AllCancelled(live)
        try:
            with torch.inference_mode():
                try:
                    logits = session.prefill(ids, attention_mask=mask)
                except ValueError as e:
                    raise Unbatchable() from e
                with self.stats.lock:
                    self.stats.batches += 1
                    self.stats.largest_batch = max(self.stats.largest_batch, len(live))
                    self.stats.last_prompt_tokens = len(live[-1].ids)
                while True:
                    nxt = torch.full((len(live),), self.pad_id, dtype=torch.long, device=self.device)
                    for row in sorted(open_rows):
                        job = live[row]
                        if job.cancel.is_set():
                            open_rows.discard(row)
                            self._finish(job, Cancelled())
                            continue
                        p = job.params
                        token = int(sample_next(logits[row : row + 1], p.temperature, p.top_k, p.top_p,
                                                generators[row])[0])
                        if token in self.stop_ids:
                            open_rows.discard(row)
                            self._finish(job)
                            continue
                        nxt[row] = token
                        with self.stats.lock:
                            self.stats.generated_tokens += 1
                        try:
                            job.emit(0, token)
                        except Exception as e:  # this request's consumer is gone; the others go on
                            open_rows.discard(row)
                            self._finish(job, e)
                            continue
                        counts[row] += 1
                        if counts[row] == p.max_new_tokens:
                            open_rows.discard(row)
                            self._finish(job)
                    if not open_rows:
                        break
                    logits = session.step(nxt.unsqueeze(1))  # finished rows are stepped along and ignored
        except Unbatchable:
            raise
        except BaseException as e:  # Cancelled (every row was) or a failure: the rows still open end with it
            for row in sorted(open_rows):
                self._finish(live[row], e)
        finally:
            self._cancel = None
            self._free(session)
            del session

    def _generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        return generator

    # ------------------------------------------------------------------------------------------------ generation
    def stream(self, ids: list[int], params: SampleParams, cancel: threading.Event) -> Iterator[tuple[int, int]]:
        """Yield (sample index, token id) for every generated token; stops at EOS (not yielded).

        The samples decode together, up to ``max_batch`` at a time, as rows of one batch (each step yields the
        tokens of the rows still open, in sample order); sample i draws from its own ``torch.Generator`` seeded
        with :func:`sample_seeds`, so a seed reproduces every sample whatever the batching. A session that refuses
        the batched prefill (ValueError) decodes the samples one by one instead, with the same generators.
        """
        with self.stats.lock:
            self.stats.last_prompt_tokens = len(ids)
        if params.max_new_tokens == 0:
            return
        seeds = sample_seeds(params.seed, params.num_samples)
        rows = max(1, self.max_batch)
        start = 0
        while start < params.num_samples:
            samples = list(range(start, min(start + rows, params.num_samples)))
            try:
                yield from self._decode_samples(ids, params, samples, [seeds[s] for s in samples], cancel)
            except Unbatchable:  # nothing was yielded for these samples: one by one from here on
                rows = 1
                continue
            start = samples[-1] + 1

    def _decode_samples(self, ids: list[int], params: SampleParams, samples: list[int], seeds: list[int | None],
                        cancel: threading.Event) -> Iterator[tuple[int, int]]:
        """Decode ``samples`` of one prompt as the rows of one unpadded batch; raises :class:`Unbatchable` before
        yielding anything when the session refuses a batch of more than one row at prefill."""
        b = len(samples)
        generators = [self._generator(seed) for seed in seeds]
        prompt = torch.tensor([ids] * b, dtype=torch.long, device=self.device)
        session = self.new_session(b)
        self._sample_rows = b
        try:
            try:
                logits = session.prefill(prompt)
            except ValueError as e:
                if b == 1:
                    raise
                raise Unbatchable() from e
            if b > 1:
                with self.stats.lock:
                    self.stats.sample_batches += 1
                    self.stats.largest_sample_batch = max(self.stats.largest_sample_batch, b)
            open_rows = list(range(b))
            for i in range(params.max_new_tokens):
                if cancel.is_set():
                    raise Cancelled()
                nxt = torch.full((b, 1), self.pad_id, dtype=torch.long, device=self.device)
                for row, token in zip(list(open_rows), self._pick(logits, open_rows, params, generators)):
                    if token in self.stop_ids:
                        open_rows.remove(row)
                        continue
                    nxt[row, 0] = token
                    with self.stats.lock:
                        self.stats.generated_tokens += 1
                    yield samples[row], token
                if not open_rows or i == params.max_new_tokens - 1:
                    break
                logits = session.step(nxt)  # finished rows are stepped along (a pad) and ignored
        finally:
            self._sample_rows = 0
            self._free(session)
            del session

    @staticmethod
    def _pick(logits: torch.Tensor, rows: list[int], params: SampleParams,
              generators: list[torch.Generator]) -> list[int]:
        """The next token of each row in ``rows``, sampled from its logits with that row's generator."""
        if params.temperature == 0:  # greedy draws nothing from the generators: one argmax for all rows
            return logits[rows].argmax(dim=-1).tolist()
        return [int(sample_next(logits[row : row + 1], params.temperature, params.top_k, params.top_p,
                                generators[row])[0]) for row in rows]

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

