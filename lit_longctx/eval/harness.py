"""The lm-evaluation-harness through each method's own inference path.

:class:`SessionLM` implements the harness's ``LM`` interface (``loglikelihood``, ``loglikelihood_rolling``,
``generate_until``) on a lit-longctx ``Transformer``; every request goes through a fresh ``DecodingSession`` of the
model (``session_for``: a KV cache for plain models, FoT's memory cache, landmark block retrieval, LoLCATs' linear
state), fed in chunks of the session's ``prefill_chunk``. So a FoT model is scored with its memory and a landmark model
with retrieval, on inputs longer than one window, exactly as it would generate.

With ``batch_size`` B > 1, requests are sorted by token length (longest first, as the HF backend does, so a batch pads
little) and scored B at a time as one left-padded batch through a session of batch size B (``per_token_scores_batch``:
every row fed as it would be alone); ``generate_until`` batches requests with equal generation settings through
``generate`` with several prompts. Each row equals the request scored alone; results come back in the request order.
A session that refuses a padded batch (ValueError, e.g. landmark ``record_retrieval``) scores that batch one by one.
Sampled generation draws for the rows of a batch together, so its samples (not their distribution) depend on B.

Scoring conventions (those of the harness's HF backend, ``lm_eval.models.huggingface.HFLM``):

- a request's text is ``context + continuation``; the continuation's tokens are the tokens of the whole text that
  follow the tokens of the context (so a merge across the boundary is scored as the model sees it); when the
  context's tokens are not a prefix of the whole's, context and continuation are encoded separately;
- the sequence starts with BOS when the tokenizer has one, so the first real token is scored too; without BOS the
  first token of a rolling request has no prediction and is left out;
- ``loglikelihood`` returns (sum of the continuation's log-probs, whether every continuation token is the argmax);
- ``generate_until`` decodes greedily (``temperature`` 0, the harness's default) or samples, up to ``max_gen_toks``
  tokens or EOS, and cuts the text at the first ``until`` string.

``lm-eval`` is an optional dependency (``pip install -e ".[eval]"``), imported only when this module is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from tqdm import tqdm

from lit_longctx.eval.perplexity import per_token_scores, per_token_scores_batch
from lit_longctx.nn.generate import generate, session_for
from lit_longctx.nn.llama import Transformer
from lit_longctx.nn.session import left_pad
from lit_longctx.tokenizers import Tokenizer

try:
    from lm_eval.api.model import LM
except ImportError as e:  # pragma: no cover - exercised through the CLI test with lm-eval hidden
    raise ImportError(
        'the lm-evaluation-harness is not installed; install it with: pip install -e ".[eval]"  (or pip install '
        "lm-eval)"
    ) from e


class SessionLM(LM):
    """A lit-longctx model as an lm-evaluation-harness ``LM``; requests run through fresh sessions, ``batch_size`` at a
    time.

    Args:
        model: the model (in eval mode while scoring; its mode is restored afterwards).
        tokenizer: its tokenizer.
        session_kwargs: options for the method's decoding session (e.g. FoT's ``last_context_length``, landmark
            ``top_k``).
        max_gen_toks: default generation length when a request names none.
        generator: random generator for sampled generation.
        session_factory: makes a fresh session of a batch size (default: ``session_for(model, batch_size=b,
            **session_kwargs)``); a LightningModule passes its own ``inference_session``.
        batch_size: requests scored together (1: one at a time; larger: sorted by length, left-padded batches).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        session_kwargs: dict[str, Any] | None = None,
        max_gen_toks: int = 256,
        generator: torch.Generator | None = None,
        session_factory: Callable[[int], Any] | None = None,
        batch_size: int = 1,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.session_kwargs = dict(session_kwargs or {})
        self.max_gen_toks = max_gen_toks
        self.generator = generator
        self.session_factory = session_factory or (lambda b: session_for(model, batch_size=b, **self.session_kwargs))
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1 requests, got {batch_size}")
        self._batch_size = int(batch_size)
        self.session_types: set[str] = set()  # the session classes requests went through (tests assert on it)

    # ---------------------------------------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def tokenizer_name(self) -> str:
        return f"lit-longctx-{self.tokenizer.kind}"

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def new_session(self, batch_size: int = 1) -> Any:
        session = self.session_factory(batch_size)
        self.session_types.add(type(session).__name__)
        return session

    def _prefix(self) -> list[int]:
        return [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids with BOS, continuation ids) as the harness's HF backend splits them."""
        # the harness moves trailing spaces of the context to the continuation before encoding
        n_spaces = len(context) - len(context.rstrip(" "))
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            cont = whole[len(ctx):]
        else:
            cont = self.tokenizer.encode(continuation)
        return self._prefix() + ctx, cont

    @torch.no_grad()
    def score(self, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> tuple[float, bool]:
        """(log-probability of ``continuation_ids`` after ``context_ids``, all of them greedy) through a session."""
        if not continuation_ids:
            return 0.0, True
        if not context_ids:
            raise ValueError("an empty context has no prediction for the first continuation token and the tokenizer "
                             "has no BOS to start from; give a non-empty context")
        ids = torch.tensor([list(context_ids) + list(continuation_ids)], dtype=torch.long, device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            nll, greedy = per_token_scores(self.new_session(), ids)
        finally:
            self.model.train(was_training)
        n = len(continuation_ids)
        return -float(nll[-n:].double().sum()), bool(greedy[-n:].all())

    @torch.no_grad()
    def score_batch(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """:meth:`score` of several (context ids, continuation ids) pairs in one left-padded batch."""
        if any(not ctx for ctx, cont in pairs if cont):
            raise ValueError("an empty context has no prediction for the first continuation token and the tokenizer "
                             "has no BOS to start from; give a non-empty context")
        seqs = [list(ctx) + list(cont) for ctx, cont in pairs]
        ids, mask = left_pad(seqs, self.model.config.pad_token_id or 0, self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            nll, greedy = per_token_scores_batch(self.new_session(len(seqs)), ids, mask)
        finally:
            self.model.train(was_training)
        out = []
        for row, (_, cont) in enumerate(pairs):
            n = len(cont)
            out.append((-float(nll[row, -n:].double().sum()), bool(greedy[row, -n:].all())) if n else (0.0, True))
        return out

    def _scored(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        """Scores of ``pairs`` in their order: one at a time (batch size 1) or longest first in batches."""
        if self.batch_size == 1:
            return [self.score(*pair) for pair in tqdm(pairs, disable=disable_tqdm)]
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        bar = tqdm(total=len(pairs), disable=disable_tqdm)
        for group in self._batches(pairs, lambda p: len(p[0]) + len(p[1])):
            chosen = [pairs[i] for i in group]
            try:
                scores = self.score_batch(chosen) if len(group) > 1 else [self.score(*chosen[0])]
            except ValueError:  # a session that refuses a padded batch: this batch one request at a time
                scores = [self.score(*pair) for pair in chosen]
            for i, score in zip(group, scores):
                out[i] = score
            bar.update(len(group))
        bar.close()
        return out  # type: ignore[return-value]

    def _batches(self, items: Sequence[Any], length: Callable[[Any], int]) -> Iterator[list[int]]:
        """Indices of ``items`` sorted by length, longest first (ties in order), ``batch_size`` at a time (batch size 1:
        in order, as requests always ran, so sampled generation draws in the same order)."""
        order = list(range(len(items)))
        if self.batch_size > 1:
            order.sort(key=lambda i: -length(items[i]))
        for s in range(0, len(order), self.batch_size):
            yield order[s : s + self.batch_size]

    # -------------------------------------------------------------------------------------------- LM interface
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = self._scored([self.encode_pair(*request.args) for request in requests], disable_tqdm)
        for request, value in zip(requests, out):
            self._cache(request, "loglikelihood", value)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        texts = [self._prefix() + self.tokenizer.encode(request.args[0]) for request in requests]
        # with BOS every token of the text is scored; without it the first token has no prediction
        scored = self._scored([(ids[:1], ids[1:]) for ids in texts if ids], disable_tqdm)
        it = iter(scored)
        out = [next(it)[0] if ids else 0.0 for ids in texts]
        for request, value in zip(requests, out):
            self._cache(request, "loglikelihood_rolling", value)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        settings = [self.generation_settings(request.args[1]) for request in requests]
        prompts = [self._prefix() + self.tokenizer.encode(request.args[0]) for request in requests]
        if any(not ids for ids in prompts):
            raise ValueError("generate_until got an empty context and the tokenizer has no BOS to start from")
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}  # requests with equal settings can share a batch
        for i, setting in enumerate(settings):
            groups.setdefault(_key(setting), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm)
        for members in groups.values():
            for batch in self._batches(members, lambda i: len(prompts[i])):
                chosen = [members[j] for j in batch]
                for i, text in zip(chosen, self._generate([prompts[i] for i in chosen], settings[chosen[0]])):
                    out[i] = text
                    self._cache(requests[i], "generate_until", text)
                bar.update(len(chosen))
        bar.close()
        return out  # type: ignore[return-value]

    def generation_settings(self, gen_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        """A request's generation settings (stop strings, length, sampling) with this LM's defaults filled in."""
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None) or []
        do_sample = bool(gen_kwargs.pop("do_sample", False))
        return {
            "until": [until] if isinstance(until, str) else list(until),
            "max_new": int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks)),
            "temperature": float(gen_kwargs.pop("temperature", 1.0)) if do_sample else 0.0,
            "top_k": gen_kwargs.pop("top_k", None),
            "top_p": gen_kwargs.pop("top_p", None),
        }

    def generate_one(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        ids = self._prefix() + self.tokenizer.encode(context)
        if not ids:
            raise ValueError("generate_until got an empty context and the tokenizer has no BOS to start from")
        return self._generate([ids], self.generation_settings(gen_kwargs))[0]

    def _generate(self, prompts: list[list[int]], setting: dict[str, Any]) -> list[str]:
        """Continuations of ``prompts`` (one batch, left-padded by ``generate``), each cut at its stop strings; a
        session that refuses the padded batch generates them one at a time."""
        stops = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []

        def run(batch: list[list[int]]) -> list[list[int]]:
            return generate(self.model, batch if len(batch) > 1 else batch[0], setting["max_new"],
                            temperature=setting["temperature"], top_k=setting["top_k"], top_p=setting["top_p"],
                            stop_tokens=stops, generator=self.generator, session=self.new_session(len(batch)))

        try:
            new = run(prompts)
        except ValueError:
            if len(prompts) == 1:
                raise
            new = [run([p])[0] for p in prompts]
        return [cut_at_stop(self.tokenizer.decode(tokens), setting["until"]) for tokens in new]

    def _cache(self, request: Any, kind: str, value: Any) -> None:
        hook = getattr(self, "cache_hook", None)
        if hook is not None:
            hook.add_partial(kind, request.args, value)


def _key(setting: dict[str, Any]) -> tuple:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(setting.items()))


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]
