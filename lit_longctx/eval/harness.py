"""The lm-evaluation-harness through each method's own inference path.

:class:`SessionLM` implements the harness's ``LM`` interface (``loglikelihood``, ``loglikelihood_rolling``,
``generate_until``) on a lit-longctx ``Transformer``; every request goes through a fresh ``DecodingSession`` of the
model (``session_for``: a KV cache for plain models, FoT's memory cache, landmark block retrieval, LoLCATs' linear
state), fed in chunks of the session's ``prefill_chunk``. So a FoT model is scored with its memory and a landmark model
with retrieval, on inputs longer than one window, exactly as it would generate.

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

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lit_longctx.eval.perplexity import per_token_scores
from lit_longctx.nn.generate import generate, session_for
from lit_longctx.nn.llama import Transformer
from lit_longctx.tokenizers import Tokenizer

try:
    from lm_eval.api.model import LM
except ImportError as e:  # pragma: no cover - exercised through the CLI test with lm-eval hidden
    raise ImportError(
        'the lm-evaluation-harness is not installed; install it with: pip install -e ".[eval]"  (or pip install '
        "lm-eval)"
    ) from e


class SessionLM(LM):
    """A lit-longctx model as an lm-evaluation-harness ``LM``; requests run one at a time through a fresh session.

    Args:
        model: the model (in eval mode while scoring; its mode is restored afterwards).
        tokenizer: its tokenizer.
        session_kwargs: options for the method's decoding session (e.g. FoT's ``last_context_length``, landmark
            ``top_k``).
        max_gen_toks: default generation length when a request names none.
        generator: random generator for sampled generation.
        session_factory: makes a fresh session (default: ``session_for(model, batch_size=1, **session_kwargs)``); a
            LightningModule passes its own ``inference_session``.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        session_kwargs: dict[str, Any] | None = None,
        max_gen_toks: int = 256,
        generator: torch.Generator | None = None,
        session_factory: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.session_kwargs = dict(session_kwargs or {})
        self.max_gen_toks = max_gen_toks
        self.generator = generator
        self.session_factory = session_factory or (lambda: session_for(model, batch_size=1, **self.session_kwargs))
        self.session_types: set[str] = set()  # the session classes requests went through (tests assert on it)

    # ---------------------------------------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def tokenizer_name(self) -> str:
        return f"lit-longctx-{self.tokenizer.kind}"

    def new_session(self) -> Any:
        session = self.session_factory()
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

    # -------------------------------------------------------------------------------------------- LM interface
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for request in requests:
            context, continuation = request.args
            out.append(self.score(*self.encode_pair(context, continuation)))
            self._cache(request, "loglikelihood", out[-1])
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            (text,) = request.args
            ids = self._prefix() + self.tokenizer.encode(text)
            # with BOS every token of the text is scored; without it the first token has no prediction
            out.append(self.score(ids[:1], ids[1:])[0] if ids else 0.0)
            self._cache(request, "loglikelihood_rolling", out[-1])
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            out.append(self.generate_one(context, dict(gen_kwargs or {})))
            self._cache(request, "generate_until", out[-1])
        return out

    def generate_one(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(gen_kwargs.pop("do_sample", False))
        temperature = float(gen_kwargs.pop("temperature", 1.0 if do_sample else 0.0)) if do_sample else 0.0
        top_k = gen_kwargs.pop("top_k", None)
        top_p = gen_kwargs.pop("top_p", None)
        ids = self._prefix() + self.tokenizer.encode(context)
        if not ids:
            raise ValueError("generate_until got an empty context and the tokenizer has no BOS to start from")
        stops = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []
        new = generate(self.model, ids, max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                       stop_tokens=stops, generator=self.generator, session=self.new_session())[0]
        return cut_at_stop(self.tokenizer.decode(new), until)

    def _cache(self, request: Any, kind: str, value: Any) -> None:
        hook = getattr(self, "cache_hook", None)
        if hook is not None:
            hook.add_partial(kind, request.args, value)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]
