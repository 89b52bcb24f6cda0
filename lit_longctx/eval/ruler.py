"""RULER-style synthetic long-context tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"), on the same length x depth grid and report as passkey retrieval.

Tasks (RULER's names; the prompts follow RULER's templates, shortened where noted):

- ``niah_single``, ``niah_multikey``, ``niah_multivalue``, ``niah_multiquery`` — needles ``One of the special magic
  numbers for {key} is: {value}.`` in filler text; one key asked (single, multikey: with distractor keys), one key with
  several values (multivalue: all asked), several keys asked at once (multiquery). The first asked needle sits at the
  cell's depth, the others at random sentence boundaries. Values are 7-digit numbers, keys ``adjective-noun`` names.
- ``vt`` (variable tracking) — a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (``num_hops`` links) in the filler,
  plus ``num_chains - 1`` distractor chains; the model lists every variable holding the asked value. The chain starts
  at the cell's depth and runs forward.
- ``cwe`` (common-words extraction) — a numbered list where ``num_cw`` words appear ``freq_cw`` times each and the rest
  ``freq_ucw`` times; the model names the common words. RULER uses ``freq_cw=30, num_cw=10`` at 4k+ tokens; the
  defaults here (8 and 5) let the task fit from 512 tokens. No depth (the grid uses depth 0).
- ``fwe`` (frequent-words extraction) — coded words drawn with Zipf frequencies (``alpha`` 2); the model names the
  three most frequent. No depth.
- ``qa`` — question answering over user documents (a jsonl of ``context``, ``question``, ``answer`` (string or list)):
  the asked document at the cell's depth among other documents of the file as distractors.

Lengths count the model's tokens; the filler (the extra text that sets a prompt's length) is found by the same search
as passkey prompts. Filler text is the seeds' ``The grass is green...`` sentences by default, or any text (``filler``);
a prompt that cannot reach its length with the filler given is an error, never a silently shorter prompt.

Scoring as RULER's: ``string_match_all`` (niah, vt, cwe, fwe) — the fraction of the expected strings found in the
output (case-insensitive), so partial answers get partial credit; ``string_match_part`` (qa) — 1 if any accepted answer
is found. A prompt counts as correct when its score is 1. Generation budgets are RULER's (niah 128, qa 32 tokens)
or, for vt and fwe (RULER: 30 and 50), 64 tokens so that byte-level tokenizers fit the answer too.
"""

from __future__ import annotations

import bisect
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lit_longctx.eval.passkey import NAMES, PasskeyTask, RetrievalSample, filler_text
from lit_longctx.tokenizers import Tokenizer

NIAH_HEADER = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz "
               "you about the numbers afterwards.\n")
NIAH_NEEDLE = "One of the special magic numbers for {name} is: {value}."
NIAH_ONE = ("What is the special magic number for {query} mentioned in the provided text? The special magic number "
            "for {query} mentioned in the provided text is")
NIAH_ALL = ("What are all the special magic numbers for {query} mentioned in the provided text? The special magic "
            "numbers for {query} mentioned in the provided text are")
VT_HEADER = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = ("Question: Find all variables that are assigned the value {value} in the text above. Answer: According "
               "to the chain(s) of variable assignment in the text above, {n} variables are assigned the value "
               "{value}, they are:")
CWE_HEADER = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
              "ones that appear most often.\n")
CWE_QUESTION = ("Question: What are the {n} most common words in the above list? Answer: The top {n} words that "
                "appear most often in the list are:")
FWE_HEADER = "Read the following coded text and track the frequency of each coded word.\n"
FWE_QUESTION = ("Question: What are the three most frequently appeared coded words in the above coded text? Answer: "
                "According to the coded text above, the three most frequently appeared words are:")
QA_HEADER = ("Answer the question based on the given documents. Only give me the answer and do not output any other "
             "words.\n\nThe following are given documents.\n\n")
QA_QUESTION = ("\n\nAnswer the question based on the given documents. Only give me the answer and do not output any "
               "other words.\n\nQuestion: {question} Answer:")

_BOUNDARY = re.compile(r"[.!?]\s")
_SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")


def string_match_all(output: str, answers: Sequence[str]) -> float:
    """RULER's ``string_match_all``: the fraction of ``answers`` that occur in ``output`` (case-insensitive)."""
    text = output.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def string_match_part(output: str, answers: Sequence[str]) -> float:
    """RULER's ``string_match_part``: 1 if any of ``answers`` occurs in ``output`` (case-insensitive), else 0."""
    text = output.lower()
    return float(any(a.lower() in text for a in answers))


def pseudo_words(rng: random.Random, n: int, syllables: int = 3) -> list[str]:
    """``n`` distinct pronounceable made-up words (``kapido``...), drawn from ``rng``."""
    words: dict[str, None] = {}
    while len(words) < n:
        words["".join(rng.choice(_SYLLABLES) for _ in range(syllables))] = None
    return list(words)


class RulerTask(PasskeyTask):
    """Shared machinery: filler with sentence boundaries, needles at depths, string-match scoring.

    Subclasses implement ``draw(rng)`` (everything random about one prompt, with ``answers``) and ``render(draw, depth,
    n)`` (prompt text and the character offset of the first asked needle for a filler budget ``n``).

    Args:
        tokenizer: the model's tokenizer; lengths are counted in its tokens.
        seed: base seed of every random choice.
        bos: put the tokenizer's BOS first; ignored when it has none.
        filler: the filler text (None: the built-in sentences, repeated as needed; a given text is used once, from its
            start, so it bounds the longest prompt).
    """

    metric = "all"
    uses_depth = True
    default_max_new_tokens = 64

    def __init__(self, tokenizer: Tokenizer, seed: int = 0, bos: bool = True, filler: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = ""
        self.seed = seed
        self.bos = bos and tokenizer.bos_id is not None
        self.key_range = (1_000_000, 9_999_999)
        self.filler = filler
        self._chars_per_token: float | None = None

    # ---------------------------------------------------------------------------------------------- filler
    def filler_chars(self, n: int) -> str:
        """The first ``n`` characters of the filler (at most all of a given filler text)."""
        return filler_text(n) if self.filler is None else self.filler[:n]

    @staticmethod
    def boundaries(text: str) -> list[int]:
        """Offsets where a sentence may start: 0, after each ``. `` / ``! `` / ``? ``, and the end."""
        return [0, *(m.end() for m in _BOUNDARY.finditer(text)), len(text)]

    def insert(self, filler: str, items: Sequence[tuple[float, str]]) -> tuple[str, list[int]]:
        """``filler`` with each ``(fraction, text)`` inserted at the sentence boundary nearest to that fraction (in
        the given order where they share a boundary); returns the text and each item's character offset."""
        cuts = self.boundaries(filler)
        spots = []
        for i, (fraction, _) in enumerate(items):
            target = fraction * len(filler)
            j = bisect.bisect_left(cuts, target)
            best = min((c for c in cuts[max(0, j - 1) : j + 1]), key=lambda c: (abs(c - target), c))
            spots.append((best, i))
        pieces, offsets, prev = [], [0] * len(items), 0
        for cut, i in sorted(spots):
            pieces.append(filler[prev:cut].strip())
            offsets[i] = sum(len(p) + 1 for p in pieces if p)
            pieces.append(items[i][1])
            prev = cut
        pieces.append(filler[prev:].strip())
        return " ".join(p for p in pieces if p), offsets

    # --------------------------------------------------------------------------------------------- samples
    def answer(self, draw: dict[str, Any]) -> list[str]:
        return list(draw["answers"])

    def max_budget(self) -> int | None:
        """The largest filler budget the filler allows (None: unbounded)."""
        return None if self.filler is None else len(self.filler)

    #: what the filler budget counts, for messages
    budget_unit = "characters of filler text"

    def sample(self, length: int, depth: float, trial: int = 0) -> RetrievalSample:
        s = super().sample(length, depth if self.uses_depth else 0.0, trial)
        limit = self.max_budget()
        if limit is not None and s.filler_chars > limit:
            raise ValueError(
                f"{self.name}: a {length}-token prompt cannot be reached with the filler given (all {limit} "
                f"{self.budget_unit} give fewer tokens); give a longer filler text (or more documents) or shorter "
                "lengths"
            )
        return s

    def fit_filler(self, text_for: Any, length: int) -> int:
        limit = self.max_budget()
        if limit is None:
            return super().fit_filler(text_for, length)
        # past the end of the filler, pretend each unit adds a token so that the search ends; sample() then refuses a
        # budget beyond the end instead of returning a prompt shorter than asked for
        return super().fit_filler(lambda n: text_for(n) if n <= limit else text_for(limit) + " ." * (n - limit),
                                  length)


class NeedleTask(RulerTask):
    """NIAH: ``n_keys`` keys with ``n_values`` values each hidden in the filler; ``n_queries`` keys are asked."""

    default_max_new_tokens = 128

    def __init__(self, tokenizer: Tokenizer, seed: int = 0, bos: bool = True, filler: str | None = None,
                 n_keys: int = 1, n_values: int = 1, n_queries: int = 1, name: str = "niah_single") -> None:
        super().__init__(tokenizer, seed, bos, filler)
        if not 1 <= n_queries <= n_keys:
            raise ValueError(f"{name}: n_queries must be in [1, n_keys={n_keys}], got {n_queries}")
        if n_values < 1:
            raise ValueError(f"{name}: n_values must be >= 1, got {n_values}")
        self.name, self.n_keys, self.n_values, self.n_queries = name, n_keys, n_values, n_queries

    def draw(self, rng: random.Random) -> dict[str, Any]:
        names = rng.sample(NAMES, self.n_keys)
        values = [[str(rng.randint(*self.key_range)) for _ in range(self.n_values)] for _ in names]
        spots = [rng.random() for _ in range(self.n_keys * self.n_values - 1)]
        asked = names[: self.n_queries]
        return {"names": names, "values": values, "spots": spots, "asked": asked,
                "answers": [v for vs in values[: self.n_queries] for v in vs]}

    def render(self, draw: dict[str, Any], depth: float, n_chars: int) -> tuple[str, int]:
        needles = [NIAH_NEEDLE.format(name=name, value=v) for name, vs in zip(draw["names"], draw["values"])
                   for v in vs]
        context, offsets = self.insert(self.filler_chars(n_chars), list(zip([depth, *draw["spots"]], needles)))
        asked = draw["asked"]
        query = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + ", and " + asked[-1]
        question = (NIAH_ONE if self.n_values == 1 and self.n_queries == 1 else NIAH_ALL).format(query=query)
        return NIAH_HEADER + context + "\n" + question, len(NIAH_HEADER) + offsets[0]


class VariableTrackingTask(RulerTask):
    """VT: ``num_chains`` chains of ``num_hops`` assignments; list the variables of the asked chain."""

    name = "vt"
    default_max_new_tokens = 64

    def __init__(self, tokenizer: Tokenizer, seed: int = 0, bos: bool = True, filler: str | None = None,
                 num_chains: int = 1, num_hops: int = 4) -> None:
        super().__init__(tokenizer, seed, bos, filler)
        if num_chains < 1 or num_hops < 1:
            raise ValueError(f"vt: num_chains and num_hops must be >= 1, got {num_chains} and {num_hops}")
        self.num_chains, self.num_hops = num_chains, num_hops

    def draw(self, rng: random.Random) -> dict[str, Any]:
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        names: dict[str, None] = {}
        while len(names) < self.num_chains * (self.num_hops + 1):
            names["".join(rng.choice(letters) for _ in range(5))] = None
        pool = list(names)
        values = rng.sample(range(10000, 99999), self.num_chains)
        chains = [pool[i * (self.num_hops + 1) : (i + 1) * (self.num_hops + 1)] for i in range(self.num_chains)]
        # the asked chain's statements run forward from the depth; distractor chains anywhere
        starts = [rng.random() for _ in range(self.num_chains - 1)]
        gaps = [rng.random() for _ in range(self.num_hops)]
        return {"chains": chains, "values": [str(v) for v in values], "starts": starts, "gaps": gaps,
                "answers": list(chains[0])}

    @staticmethod
    def statements(chain: Sequence[str], value: str) -> list[str]:
        return [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]

    def render(self, draw: dict[str, Any], depth: float, n_chars: int) -> tuple[str, int]:
        items = []
        # the asked chain: first statement at `depth`, the next ones at increasing fractions up to the end
        total = sum(draw["gaps"]) or 1.0
        fraction = depth
        for statement, gap in zip(self.statements(draw["chains"][0], draw["values"][0]), [0.0, *draw["gaps"]]):
            fraction += (1.0 - depth) * gap / total
            items.append((min(fraction, 1.0), statement))
        for chain, value, start in zip(draw["chains"][1:], draw["values"][1:], draw["starts"]):
            step = (1.0 - start) / (self.num_hops + 1)
            items += [(start + i * step, s) for i, s in enumerate(self.statements(chain, value))]
        context, offsets = self.insert(self.filler_chars(n_chars), items)
        question = VT_QUESTION.format(value=draw["values"][0], n=self.num_hops + 1)
        return VT_HEADER + context + "\n" + question, len(VT_HEADER) + offsets[0]


class CommonWordsTask(RulerTask):
    """CWE: ``num_cw`` words ``freq_cw`` times each among words seen ``freq_ucw`` times; the budget is the number of
    rare words."""

    name = "cwe"
    uses_depth = False
    default_max_new_tokens = 128

    def __init__(self, tokenizer: Tokenizer, seed: int = 0, bos: bool = True, filler: str | None = None,
                 num_cw: int = 5, freq_cw: int = 8, freq_ucw: int = 2) -> None:
        super().__init__(tokenizer, seed, bos, None)
        if not freq_cw > freq_ucw >= 1 or num_cw < 1:
            raise ValueError(f"cwe: need num_cw >= 1 and freq_cw > freq_ucw >= 1, got {num_cw}, {freq_cw}, {freq_ucw}")
        self.num_cw, self.freq_cw, self.freq_ucw = num_cw, freq_cw, freq_ucw
        self._chars_per_token = 1.0 / 4  # the budget counts words, a few tokens each

    def draw(self, rng: random.Random) -> dict[str, Any]:
        words = pseudo_words(rng, self.num_cw + 4000)
        return {"words": words, "seed": rng.random(), "answers": words[: self.num_cw]}

    def render(self, draw: dict[str, Any], depth: float, n_chars: int) -> tuple[str, int]:
        common, rare = draw["words"][: self.num_cw], draw["words"][self.num_cw : self.num_cw + n_chars]
        items = [w for w in common for _ in range(self.freq_cw)] + [w for w in rare for _ in range(self.freq_ucw)]
        random.Random(draw["seed"]).shuffle(items)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return CWE_HEADER + listing + "\n" + CWE_QUESTION.format(n=self.num_cw), len(CWE_HEADER)

    budget_unit = "rare words"

    def max_budget(self) -> int:
        return 4000


class FrequentWordsTask(RulerTask):
    """FWE: coded words with Zipf(``alpha``) frequencies over a ``vocab``-word vocabulary; name the three most
    frequent. The budget is the number of words; counts are made exact (no ties among the top four)."""

    name = "fwe"
    uses_depth = False
    default_max_new_tokens = 64

    def __init__(self, tokenizer: Tokenizer, seed: int = 0, bos: bool = True, filler: str | None = None,
                 alpha: float = 2.0, vocab: int = 50) -> None:
        super().__init__(tokenizer, seed, bos, None)
        if alpha <= 1.0 or vocab < 4:
            raise ValueError(f"fwe: need alpha > 1 and vocab >= 4, got {alpha} and {vocab}")
        self.alpha, self.vocab = alpha, vocab
        self._chars_per_token = 1.0 / 3

    def draw(self, rng: random.Random) -> dict[str, Any]:
        words = pseudo_words(rng, self.vocab, syllables=2)
        return {"words": words, "seed": rng.random(), "answers": words[:3]}

    def counts(self, n: int) -> list[int]:
        """Word counts for ``n`` words: Zipf shares, the top three strictly above every other count."""
        weights = [1.0 / (r + 1) ** self.alpha for r in range(self.vocab)]
        total = sum(weights)
        counts = [max(1, int(n * w / total)) for w in weights]
        for r in (2, 1, 0):  # make rank 3 > rank 4, rank 2 > rank 3, rank 1 > rank 2
            counts[r] = max(counts[r], counts[r + 1] + 1)
        return counts

    def render(self, draw: dict[str, Any], depth: float, n_chars: int) -> tuple[str, int]:
        items = [w for w, c in zip(draw["words"], self.counts(max(n_chars, 1))) for _ in range(c)]
        random.Random(draw["seed"]).shuffle(items)
        return FWE_HEADER + " ".join(items) + "\n" + FWE_QUESTION, len(FWE_HEADER)


class QATask(RulerTask):
    """QA over user documents: the asked document at the cell's depth among ``n`` other documents of the file."""

    name = "qa"
    metric = "part"
    default_max_new_tokens = 32

    def __init__(self, tokenizer: Tokenizer, seed: int = 0, bos: bool = True, filler: str | None = None,
                 qa_file: str | None = None) -> None:
        super().__init__(tokenizer, seed, bos, None)
        self.items = load_qa(qa_file)
        self._chars_per_token = 1.0 / max(1, sum(len(tokenizer.encode(i["context"])) for i in self.items[:20])
                                           // min(20, len(self.items)))

    def draw(self, rng: random.Random) -> dict[str, Any]:
        asked = rng.randrange(len(self.items))
        others = [i for i in range(len(self.items)) if i != asked]
        rng.shuffle(others)
        return {"asked": asked, "others": others, "answers": self.items[asked]["answers"]}

    budget_unit = "distractor documents"

    def max_budget(self) -> int:
        return len(self.items) - 1

    def render(self, draw: dict[str, Any], depth: float, n_chars: int) -> tuple[str, int]:
        docs = [self.items[i]["context"] for i in draw["others"][:n_chars]]
        at = round(depth * len(docs))
        docs.insert(at, self.items[draw["asked"]]["context"])
        body = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
        text = QA_HEADER + body + QA_QUESTION.format(question=self.items[draw["asked"]]["question"])
        before = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs[:at]))
        return text, len(QA_HEADER) + len(before) + (2 if at else 0)


def load_qa(path: str | None) -> list[dict[str, Any]]:
    """The QA items of a jsonl file: ``context``, ``question`` and ``answer`` (a string or a list of accepted ones)."""
    if path is None:
        raise ValueError("the qa task needs qa_file: a jsonl with one {\"context\", \"question\", \"answer\"} per line")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"qa_file {str(p)!r} does not exist")
    items = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not valid JSON ({e.msg})") from None
        missing = [k for k in ("context", "question", "answer") if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{p}:{n}: missing field(s) {', '.join(missing)}; each line needs context, question and "
                             "answer")
        answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        items.append({"context": str(row["context"]), "question": str(row["question"]),
                      "answers": [str(a) for a in answers]})
    if len(items) < 2:
        raise ValueError(f"{p}: the qa task needs at least 2 items (the others are the distractor documents)")
    return items


#: task name -> (class, fixed options)
RULER_TASKS: dict[str, tuple[type[RulerTask], dict[str, Any]]] = {
    "niah_single": (NeedleTask, {"n_keys": 1, "n_values": 1, "n_queries": 1, "name": "niah_single"}),
    "niah_multikey": (NeedleTask, {"n_keys": 4, "n_values": 1, "n_queries": 1, "name": "niah_multikey"}),
    "niah_multivalue": (NeedleTask, {"n_keys": 1, "n_values": 4, "n_queries": 1, "name": "niah_multivalue"}),
    "niah_multiquery": (NeedleTask, {"n_keys": 4, "n_values": 1, "n_queries": 2, "name": "niah_multiquery"}),
    "vt": (VariableTrackingTask, {}),
    "cwe": (CommonWordsTask, {}),
    "fwe": (FrequentWordsTask, {}),
    "qa": (QATask, {}),
}


def build_ruler_task(task: str, tokenizer: Tokenizer, *, seed: int = 0, bos: bool = True, filler: str | None = None,
                     **options: Any) -> RulerTask:
    """The task object for a RULER task name; ``options`` are the task's own (e.g. ``num_hops`` for vt)."""
    if task not in RULER_TASKS:
        raise ValueError(f"unknown RULER task {task!r}; choose from {', '.join(RULER_TASKS)}")
    cls, fixed = RULER_TASKS[task]
    return cls(tokenizer, seed=seed, bos=bos, filler=filler, **{**fixed, **options})


def ruler_score(task: str, output: str, answers: Sequence[str]) -> float:
    """The RULER score of ``output`` for ``task`` (``string_match_part`` for qa, else ``string_match_all``)."""
    cls, _ = RULER_TASKS[task]
    return (string_match_part if cls.metric == "part" else string_match_all)(output, answers)
