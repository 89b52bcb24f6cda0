"""Synthetic long-context retrieval prompts on a grid of context lengths x needle depths, and their scoring.

Two tasks:

- ``passkey`` — the Landmark Attention test (Mohtashami & Jaggi 2023, §4.2 and App. G; also FoT/LongLLaMA §6):
  five parts joined by newlines: the task sentence, prefix filler, ``The pass key is K. Remember it. K is the pass
  key.``, suffix filler, ``What is the pass key? The pass key is``. The filler is the 89-character sentence group
  :data:`FILLER` repeated with single spaces; K ~ Uniform{1..50000}. As in the seeds' scripts, prefix and suffix are
  both cut from the start of the filler and the suffix may end mid-sentence.
- ``multikey`` — several key/value needles (``One of the special magic numbers for {name} is: {value}.``) at sentence
  boundaries of the same filler, one of them asked for (RULER's ``niah_multikey``, Hsieh et al. 2024, in spirit).

Differences from the seeds, made so that results form a clean grid: lengths are *token* counts of the model's
tokenizer (the filler's character count is searched so that the tokenized prompt is the largest one not longer than
the target), and the depth ``d`` places the needle so that the prefix filler is ``d`` of the filler, snapped to the
nearest sentence boundary (the seeds draw the split uniformly). Every random choice comes from a ``random.Random``
seeded by ``(task, seed, length, depth, trial)``, so a cell's prompts do not depend on the rest of the grid, the rank
or the tokenizer.

Scoring (seeds: ``llama/run_test.py``): the first integer (regex ``\\d+``) of the greedy continuation must equal the
answer; a continuation without an integer is wrong.

Training documents (:meth:`PasskeyTask.document`): the same prompt, tokenized the same way, followed by its answer
(``" {key}."``) and EOS, for training retrieval (``lit_longctx.datamodules.passkey.PasskeyMixData``).
"""

from __future__ import annotations

import itertools
import math
import random
import re
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lit_longctx.tokenizers import Tokenizer

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TASK_SENTENCE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
PASSKEY_TEMPLATE = (
    TASK_SENTENCE + "\n{prefix}\nThe pass key is {key}. Remember it. {key} is the pass key.\n{suffix}\n"
    "What is the pass key? The pass key is"
)
MULTIKEY_TEMPLATE = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz you "
    "about the numbers afterwards.\n{context}\nWhat is the special magic number for {name} mentioned in the provided "
    "text? The special magic number for {name} mentioned in the provided text is"
)
MULTIKEY_NEEDLE = "One of the special magic numbers for {name} is: {value}."
#: what a training document puts after the prompt: the continuation a model should generate
ANSWER_TEMPLATE = " {key}."
TASKS = ("passkey", "multikey")

_ADJECTIVES = (
    "amber", "bold", "brave", "bright", "calm", "clever", "cold", "crisp", "dark", "eager", "early", "fancy", "gentle",
    "golden", "grand", "happy", "hidden", "honest", "humble", "icy", "jolly", "kind", "lively", "lucky", "mellow",
    "misty", "noble", "odd", "pale", "proud", "quick", "quiet", "rapid", "rough", "rusty", "silent", "silver", "sleepy",
    "smooth", "sunny", "swift", "tall", "tender", "tiny", "vivid", "warm", "wild", "wise", "young", "zesty",
)
_NOUNS = (
    "anchor", "apple", "badger", "banjo", "basket", "beacon", "breeze", "bridge", "candle", "canyon", "castle", "cedar",
    "comet", "copper", "cradle", "desert", "dolphin", "engine", "falcon", "feather", "forest", "garden", "glacier",
    "harbor", "hammer", "island", "jacket", "kettle", "ladder", "lantern", "meadow", "mirror", "needle", "orchard",
    "otter", "pebble", "pepper", "pillow", "planet", "pocket", "rabbit", "ribbon", "river", "saddle", "spider",
    "thunder", "tunnel", "violin", "walnut", "window",
)
#: needle names for ``multikey``: ``adjective-noun`` pairs (2500 distinct names).
NAMES = tuple(f"{a}-{n}" for a, n in itertools.product(_ADJECTIVES, _NOUNS))

_PERIOD = len(FILLER) + 1  # the filler repeats every 90 characters (89 + the joining space)
_SENTENCE_ENDS = tuple(i + 1 for i, c in enumerate(FILLER) if c == ".")
_INTEGER = re.compile(r"\d+")


def filler_text(n_chars: int) -> str:
    """The first ``n_chars`` characters of :data:`FILLER` repeated with single spaces (the seeds' garbage text)."""
    if n_chars < 0:
        raise ValueError(f"n_chars must be >= 0, got {n_chars}")
    return " ".join([FILLER] * (n_chars // _PERIOD + 1))[:n_chars]


def snap_to_sentence(offset: float, limit: int) -> int:
    """The filler offset nearest to ``offset`` that is 0 or just after a sentence's full stop, not beyond ``limit``."""
    group = int(offset) // _PERIOD
    candidates = [0] + [g * _PERIOD + e for g in (group - 1, group, group + 1) if g >= 0 for e in _SENTENCE_ENDS]
    return min((c for c in candidates if c <= limit), key=lambda c: (abs(c - offset), c))


def first_integer(text: str) -> int | None:
    """The first run of digits in ``text`` as an int, or None when there is none."""
    match = _INTEGER.search(text)
    return int(match.group()) if match else None


def score_answer(text: str, answer: int) -> tuple[int | None, bool]:
    """(first integer of ``text``, whether it equals ``answer``); no integer counts as wrong."""
    prediction = first_integer(text)
    return prediction, prediction == answer


def _template_fields(template: str) -> list[str]:
    try:
        return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as e:
        raise ValueError(f"malformed template {template!r}: {e} (write literal braces as '{{{{' and '}}}}')") from e


def check_template(template: str, required: Sequence[str], what: str) -> None:
    """Raise if ``template`` uses a field outside ``required`` or misses one of them."""
    fields = _template_fields(template)
    unknown = sorted({f for f in fields if f not in required})
    missing = [f for f in required if f not in fields]
    if unknown or missing:
        allowed = ", ".join("{" + f + "}" for f in required)
        problem = f"unknown field(s) {unknown}" if unknown else f"missing field(s) {missing}"
        raise ValueError(f"{what} template has {problem}; it must use exactly the named fields {allowed}")


def format_marked(template: str, values: dict[str, Any], mark: str) -> tuple[str, int]:
    """``template.format(**values)`` and the character offset where the first ``{mark}`` field's text begins."""
    formatter = string.Formatter()
    parts: list[str] = []
    offset = -1
    for literal, field, spec, conversion in formatter.parse(template):
        parts.append(literal)
        if field is None:
            continue
        if field == mark and offset < 0:
            offset = sum(len(p) for p in parts)
        value = formatter.convert_field(values[field], conversion) if conversion else values[field]
        parts.append(formatter.format_field(value, spec or ""))
    return "".join(parts), offset


@dataclass
class RetrievalSample:
    """One prompt of the grid.

    Attributes:
        task: ``passkey`` or ``multikey``.
        length: the requested prompt length in tokens.
        depth: where the asked needle sits, as the fraction of the filler before it.
        trial: index of the prompt within its (length, depth) cell.
        prompt: the prompt text.
        input_ids: its token ids (BOS first when the task adds one).
        answer: the integer the model must produce.
        needle_token: token index at which the asked needle's text begins (±1 token where merges cross the edge).
        filler_chars: the filler character budget found for ``length``.
        name: the asked key (``multikey``), else None.
    """

    task: str
    length: int
    depth: float
    trial: int
    prompt: str
    input_ids: list[int]
    answer: int
    needle_token: int
    filler_chars: int
    name: str | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class RetrievalDocument:
    """A training document: one retrieval prompt followed by its answer (see :meth:`PasskeyTask.document`).

    Attributes:
        input_ids: the prompt's ids (exactly the evaluation prompt's tokenization), then the answer's, then EOS when
            asked for.
        answer_start: index in ``input_ids`` of the first answer token (the answer runs to the end).
        answer: the key.
        length: the requested document length in tokens.
        depth: where the needle sits (fraction of the filler before it).
        needle_token: token index at which the needle's text begins (±1 token).
    """

    input_ids: list[int]
    answer_start: int
    answer: int
    length: int
    depth: float
    needle_token: int


class PasskeyTask:
    """Builds passkey prompts whose token length hits a target (the Landmark Attention prompt by default).

    Args:
        tokenizer: the model's tokenizer; prompt lengths are counted in its tokens.
        template: ``str.format`` template with the fields ``{prefix}``, ``{key}`` and ``{suffix}`` (the filler before
            and after the needle, and the key); default :data:`PASSKEY_TEMPLATE`, the seeds' exact prompt.
        seed: base seed of every random choice.
        key_range: inclusive range the answer is drawn from (the seeds: 1..50000).
        bos: put the tokenizer's BOS first (as HF pipelines do for LLaMA); ignored when it has none.
    """

    name = "passkey"
    fields: tuple[str, ...] = ("prefix", "key", "suffix")

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str | None = None,
        seed: int = 0,
        key_range: tuple[int, int] = (1, 50000),
        bos: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = self.default_template() if template is None else template
        check_template(self.template, self.fields, self.name)
        lo, hi = key_range
        if not 0 <= lo <= hi:
            raise ValueError(f"key_range must be (low, high) with 0 <= low <= high, got {tuple(key_range)}")
        self.seed = seed
        self.key_range = (int(lo), int(hi))
        self.bos = bos and tokenizer.bos_id is not None
        self._chars_per_token: float | None = None

    @staticmethod
    def default_template() -> str:
        return PASSKEY_TEMPLATE

    # -------------------------------------------------------------------------------------------------- tokens
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=self.bos)

    @property
    def chars_per_token(self) -> float:
        """Filler characters per token of this tokenizer (the step size of the length search)."""
        if self._chars_per_token is None:
            sample = filler_text(50 * _PERIOD)
            self._chars_per_token = len(sample) / max(1, len(self.tokenizer.encode(sample)))
        return self._chars_per_token

    # ---------------------------------------------------------------------------------------------- randomness
    def rng(self, length: int, depth: float, trial: int) -> random.Random:
        return random.Random(f"{self.name}|{self.seed}|{length}|{depth!r}|{trial}")

    def draw(self, rng: random.Random) -> dict[str, Any]:
        """Everything random about one prompt, drawn before its length is fitted."""
        return {"key": rng.randint(*self.key_range)}

    def render(self, draw: dict[str, Any], depth: float, n_chars: int) -> tuple[str, int]:
        """(prompt text, character offset of the needle) for a filler budget of ``n_chars`` characters."""
        n_prefix = snap_to_sentence(depth * n_chars, n_chars)
        values = {"prefix": filler_text(n_prefix), "suffix": filler_text(n_chars - n_prefix), "key": draw["key"]}
        text, offset = format_marked(self.template, values, "prefix")
        offset += n_prefix
        while offset < len(text) and text[offset].isspace():
            offset += 1
        return text, offset

    def answer(self, draw: dict[str, Any]) -> int:
        return draw["key"]

    # --------------------------------------------------------------------------------------------------- samples
    def sample(self, length: int, depth: float, trial: int = 0) -> RetrievalSample:
        """The ``trial``-th prompt of cell (``length`` tokens, ``depth``), reproducible from the seed."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must lie in [0, 1] (the fraction of the filler before the needle), got {depth}")
        draw = self.draw(self.rng(length, depth, trial))
        n_chars = self.fit_filler(lambda n: self.render(draw, depth, n)[0], length)
        text, needle_char = self.render(draw, depth, n_chars)
        return RetrievalSample(
            task=self.name,
            length=length,
            depth=float(depth),
            trial=trial,
            prompt=text,
            input_ids=self.encode(text),
            answer=self.answer(draw),
            needle_token=len(self.encode(text[:needle_char])),
            filler_chars=n_chars,
            name=draw.get("name"),
        )

    def document(
        self, length: int, depth: float, trial: int = 0, answer_template: str = ANSWER_TEMPLATE, eos: bool = True
    ) -> RetrievalDocument:
        """A training document of at most ``length`` tokens: the prompt of :meth:`sample` and its answer.

        The prompt is tokenized on its own, exactly as an evaluation prompt, and the answer's ids are those that the
        whole text's tokenization adds after it, so a model trained on documents sees at test time the very tokens it
        saw in training. Answer + EOS count towards ``length``; the filler is fitted so the document is the longest not
        exceeding it (within a token or two).

        Args:
            length: document tokens (BOS, prompt, answer and EOS together).
            depth: needle depth in [0, 1].
            trial: index of the document; with ``length`` and ``depth`` it seeds the key.
            answer_template: ``str.format`` template of the answer with ``{key}`` (default ``" {key}."``).
            eos: end the document with the tokenizer's EOS (ignored when it has none).
        """
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must lie in [0, 1] (the fraction of the filler before the needle), got {depth}")
        check_template(answer_template, ("key",), "answer")
        draw = self.draw(self.rng(length, depth, trial))
        answer_text = answer_template.format(key=self.answer(draw))
        end = [self.tokenizer.eos_id] if eos and self.tokenizer.eos_id is not None else []
        n_chars = self.fit_filler(lambda n: self.render(draw, depth, n)[0] + answer_text, length - len(end))
        prompt, needle_char = self.render(draw, depth, n_chars)
        prompt_ids = self.encode(prompt)
        ids = self.encode(prompt + answer_text)
        if ids[: len(prompt_ids)] != prompt_ids or len(ids) == len(prompt_ids):
            raise ValueError(
                f"the answer {answer_text!r} does not tokenize as tokens after the prompt's own (the tokenizer merges "
                "it with the prompt's last token); start answer_template with a space or punctuation"
            )
        return RetrievalDocument(
            input_ids=ids + end,
            answer_start=len(prompt_ids),
            answer=self.answer(draw),
            length=length,
            depth=float(depth),
            needle_token=len(self.encode(prompt[:needle_char])),
        )

    def fit_filler(self, text_for: Callable[[int], str], length: int) -> int:
        """The filler budget n whose prompt ``text_for(n)`` is the longest not exceeding ``length`` tokens.

        Token count is close to linear in n, so secant steps bracket the target in a few tokenizations and bisection
        finishes the bracket; counts are not strictly monotone (merges, the sentence snap), so the result is the end of
        a bracket f(lo) <= length < f(lo + 1), which is within a token or two of ``length``.
        """
        counts: dict[int, int] = {}

        def f(n: int) -> int:
            if n not in counts:
                counts[n] = len(self.encode(text_for(n)))
            return counts[n]

        if f(0) > length:
            raise ValueError(
                f"{self.name} prompt length {length} is shorter than the prompt without filler ({f(0)} tokens with "
                "this tokenizer and template); ask for longer lengths"
            )
        lo, hi = 0, None
        n = round((length - f(0)) * self.chars_per_token)
        for _ in range(8):
            if n <= lo or (hi is not None and n >= hi) or f(lo) == length:
                break
            if f(n) <= length:
                lo = n
            else:
                hi = n
            n = n + round((length - f(n)) * self.chars_per_token)
        if f(lo) == length:
            return lo
        step = max(1, math.ceil(self.chars_per_token))
        while hi is None:
            if f(lo + step) <= length:
                lo += step
                step *= 2
            else:
                hi = lo + step
        while hi - lo > 1 and f(lo) < length:
            mid = (lo + hi) // 2
            if f(mid) <= length:
                lo = mid
            else:
                hi = mid
        return lo


class MultiKeyTask(PasskeyTask):
    """Several key/value needles in the filler; the prompt asks for one of them (RULER's ``niah_multikey`` in spirit).

    The asked needle sits at ``depth``; the ``n_keys - 1`` distractors sit at random sentence boundaries. Names are
    distinct ``adjective-noun`` pairs from :data:`NAMES`, values are distinct draws from ``key_range``.

    Args:
        tokenizer: the model's tokenizer; prompt lengths are counted in its tokens.
        template: ``str.format`` template with ``{context}`` (filler with the needles) and ``{name}`` (the asked key);
            default :data:`MULTIKEY_TEMPLATE`.
        seed: base seed of every random choice.
        key_range: inclusive range the values are drawn from.
        bos: put the tokenizer's BOS first; ignored when it has none.
        n_keys: number of needles (the asked one included).
        needle_template: ``str.format`` template of one needle with ``{name}`` and ``{value}``; default
            :data:`MULTIKEY_NEEDLE`.
    """

    name = "multikey"
    fields = ("context", "name")

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str | None = None,
        seed: int = 0,
        key_range: tuple[int, int] = (1, 50000),
        bos: bool = True,
        n_keys: int = 4,
        needle_template: str | None = None,
    ) -> None:
        super().__init__(tokenizer, template, seed, key_range, bos)
        self.needle_template = MULTIKEY_NEEDLE if needle_template is None else needle_template
        check_template(self.needle_template, ("name", "value"), "multikey needle")
        if not 1 <= n_keys <= len(NAMES):
            raise ValueError(f"n_keys must be in [1, {len(NAMES)}], got {n_keys}")
        if self.key_range[1] - self.key_range[0] + 1 < n_keys:
            raise ValueError(f"key_range {self.key_range} holds fewer than n_keys={n_keys} distinct values")
        self.n_keys = n_keys

    @staticmethod
    def default_template() -> str:
        return MULTIKEY_TEMPLATE

    def draw(self, rng: random.Random) -> dict[str, Any]:
        names = rng.sample(NAMES, self.n_keys)
        values = rng.sample(range(self.key_range[0], self.key_range[1] + 1), self.n_keys)
        return {"name": names[0], "names": names, "values": values,
                "spots": [rng.random() for _ in range(self.n_keys - 1)]}

    def render(self, draw: dict[str, Any], depth: float, n_chars: int) -> tuple[str, int]:
        filler = filler_text(n_chars)
        # (filler offset, order): the asked needle (order 0) goes first among needles at the same boundary
        spots = [(snap_to_sentence(f * n_chars, n_chars), i) for i, f in enumerate([depth, *draw["spots"]])]
        pieces, prev, target = [], 0, -1
        for offset, i in sorted(spots):
            pieces.append(filler[prev:offset].strip())
            if i == 0:
                target = sum(len(p) + 1 for p in pieces if p)
            pieces.append(self.needle_template.format(name=draw["names"][i], value=draw["values"][i]))
            prev = offset
        pieces.append(filler[prev:].strip())
        context = " ".join(p for p in pieces if p)
        text, start = format_marked(self.template, {"context": context, "name": draw["name"]}, "context")
        return text, start + target

    def answer(self, draw: dict[str, Any]) -> int:
        return draw["values"][0]


def build_task(
    task: str,
    tokenizer: Tokenizer,
    *,
    template: str | None = None,
    seed: int = 0,
    key_range: tuple[int, int] = (1, 50000),
    bos: bool = True,
    n_keys: int = 4,
    needle_template: str | None = None,
) -> PasskeyTask:
    """The task object for ``task`` (``passkey`` | ``multikey``)."""
    if task == "passkey":
        if needle_template is not None:
            raise ValueError("needle_template applies to task='multikey' only; the passkey needle is in the template")
        return PasskeyTask(tokenizer, template, seed, key_range, bos)
    if task == "multikey":
        return MultiKeyTask(tokenizer, template, seed, key_range, bos, n_keys, needle_template)
    raise ValueError(f"unknown retrieval task {task!r}; choose one of {', '.join(TASKS)}")


def retrieval_grid(lengths: Iterable[int], depths: Iterable[float], trials: int) -> list[tuple[int, float, int]]:
    """(length, depth, trial) specs in grid order: by length, then depth, then trial."""
    lengths = list(dict.fromkeys(int(x) for x in lengths))
    depths = list(dict.fromkeys(float(d) for d in depths))
    if not lengths or not depths:
        raise ValueError("give at least one length and one depth")
    bad = [x for x in lengths if x < 1]
    if bad:
        raise ValueError(f"lengths are prompt sizes in tokens and must be >= 1, got {bad}")
    bad_depths = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad_depths:
        raise ValueError(f"depths must lie in [0, 1] (fraction of the filler before the needle), got {bad_depths}")
    if trials < 1:
        raise ValueError(f"trials (prompts per length x depth cell) must be >= 1, got {trials}")
    return [(n, d, t) for n in lengths for d in depths for t in range(trials)]


def sample_batch(
    sample: RetrievalSample, index: int, max_new_tokens: int, session_kwargs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The batch dict of one prompt (what ``PasskeyData`` yields and ``lit_longctx.eval.tasks`` consumes).

    ``session_kwargs`` (if any) go to ``module.inference_session`` (e.g. ``prefill_chunk``, a method's retrieval
    options).
    """
    batch = {
        "task": sample.task,
        "index": index,
        "input_ids": torch.tensor([sample.input_ids], dtype=torch.long),
        "answer": sample.answer,
        "length": sample.length,
        "depth": sample.depth,
        "trial": sample.trial,
        "n_tokens": sample.n_tokens,
        "needle_token": sample.needle_token,
        "max_new_tokens": max_new_tokens,
    }
    if sample.name is not None:
        batch["name"] = sample.name
    if session_kwargs:
        batch["session_kwargs"] = dict(session_kwargs)
    return batch


def summarize_retrieval(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per (length, depth) cell, per length and overall, with measured token counts, from per-prompt records.

    Each record holds ``task, length, depth, trial, answer, prediction, correct, n_tokens`` (see
    ``lit_longctx.eval.tasks``).
    """
    if not records:
        raise ValueError("no retrieval records to summarize")
    records = sorted(records, key=lambda r: (r["length"], r["depth"], r["trial"]))
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})

    def stats(rs: list[dict[str, Any]]) -> dict[str, Any]:
        tokens = [r["n_tokens"] for r in rs]
        correct = sum(r.get("score", float(bool(r["correct"]))) for r in rs)  # RULER tasks give partial credit
        return {"correct": correct, "total": len(rs), "accuracy": correct / len(rs),
                "mean_tokens": sum(tokens) / len(tokens), "min_tokens": min(tokens), "max_tokens": max(tokens)}

    cells = []
    for n in lengths:
        for d in depths:
            rs = [r for r in records if r["length"] == n and r["depth"] == d]
            if rs:
                cells.append({"length": n, "depth": d, **stats(rs)})
    by_length = [{"length": n, **stats([r for r in records if r["length"] == n])} for n in lengths]
    by_depth = [{"depth": d, **stats([r for r in records if r["depth"] == d])} for d in depths]
    keep = ("length", "depth", "trial", "answer", "prediction", "correct", "score", "n_tokens", "needle_token",
            "output")
    return {
        "task": records[0]["task"],
        "lengths": lengths,
        "depths": depths,
        "accuracy": sum(r.get("score", float(bool(r["correct"]))) for r in records) / len(records),
        "total": len(records),
        "cells": cells,
        "by_length": by_length,
        "by_depth": by_depth,
        "samples": [{k: r[k] for k in keep if k in r} for r in records],
    }
