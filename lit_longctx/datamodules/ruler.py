"""RULER's synthetic tasks as an evaluation DataModule (see :mod:`lit_longctx.eval.ruler`), on the passkey grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lit_longctx.datamodules.passkey import LockstepItems, _EvalData
from lit_longctx.eval.passkey import retrieval_grid, sample_batch
from lit_longctx.eval.ruler import RULER_TASKS, RulerTask, build_ruler_task
from lit_longctx.tokenizers import ByteTokenizer, Tokenizer


class RulerData(_EvalData):
    """RULER-style prompts (NIAH variants, variable tracking, common/frequent words, QA) on lengths x depths.

    Each batch is one prompt, as :class:`~lit_longctx.datamodules.passkey.PasskeyData` yields, with ``answer`` the list
    of expected strings. Tasks without a depth (``cwe``, ``fwe``) run at depth 0 only.

    Args:
        tokenizer: the model's tokenizer; null: the LightningModule's (e.g. the checkpoint's), or bytes.
        tasks: RULER task names (``niah_single``, ``niah_multikey``, ``niah_multivalue``, ``niah_multiquery``, ``vt``,
            ``cwe``, ``fwe``, ``qa``).
        lengths: prompt lengths in tokens.
        depths: depths in [0, 1] of the first asked needle (niah, vt, qa).
        trials: prompts per (task, length, depth) cell.
        seed: seed of every random choice (per cell, independent of the rest of the grid).
        filler: a text file whose text is the filler (from its start); null: the built-in sentences.
        qa_file: the ``qa`` task's jsonl of ``context``, ``question``, ``answer``.
        options: per-task options, e.g. ``{vt: {num_hops: 8}, cwe: {freq_cw: 30, num_cw: 10}}``.
        max_new_tokens: greedy tokens per prompt; null: each task's default.
        bos: start prompts with the tokenizer's BOS.
        session_kwargs: keyword arguments for the module's ``inference_session``, sent with every batch.
        seq_len: not used to build prompts; kept so configs compose with training data modules.
        batch_size: must be 1.
        num_workers: DataLoader workers building prompts.
    """

    def __init__(
        self,
        tokenizer: str | Tokenizer | None = None,
        tasks: Sequence[str] = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe",
                                "fwe"),
        lengths: Sequence[int] = (1024, 2048, 4096),
        depths: Sequence[float] = (0.0, 0.5, 1.0),
        trials: int = 4,
        seed: int = 1234,
        filler: str | None = None,
        qa_file: str | None = None,
        options: dict[str, dict[str, Any]] | None = None,
        max_new_tokens: int | None = None,
        bos: bool = True,
        session_kwargs: dict[str, Any] | None = None,
        seq_len: int | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        specs = retrieval_grid(lengths, depths, trials)
        super().__init__(tokenizer, seq_len, batch_size, num_workers, seed, session_kwargs,
                         longest=max(n for n, _, _ in specs))
        tasks = list(dict.fromkeys(tasks))
        unknown = [t for t in tasks if t not in RULER_TASKS]
        if unknown or not tasks:
            raise ValueError(f"unknown RULER task(s) {unknown or tasks}; choose from {', '.join(RULER_TASKS)}")
        options = dict(options or {})
        stray = sorted(set(options) - set(tasks))
        if stray:
            raise ValueError(f"options given for task(s) {stray} that are not in tasks {tasks}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if filler is not None and not Path(filler).is_file():
            raise FileNotFoundError(f"filler text file {filler!r} does not exist")
        self.tasks, self.specs, self.options = tasks, specs, options
        self.lengths = list(dict.fromkeys(n for n, _, _ in specs))
        self.filler, self.qa_file = filler, qa_file
        self.max_new_tokens, self.bos = max_new_tokens, bos
        for task in tasks:  # fail at init on bad options or a bad qa file, before the model's tokenizer is known
            self.build_task(task, ByteTokenizer())

    def build_task(self, task: str, tokenizer: Tokenizer) -> RulerTask:
        filler = Path(self.filler).read_text(encoding="utf-8") if self.filler else None
        extra = {"qa_file": self.qa_file} if task == "qa" else {}
        return build_ruler_task(task, tokenizer, seed=self.seed, bos=self.bos, filler=filler,
                                **{**extra, **self.options.get(task, {})})

    def build_dataset(self) -> LockstepItems:
        items: list[tuple[RulerTask, tuple[int, float, int]]] = []
        for name in self.tasks:
            task = self.build_task(name, self.tokenizer)
            specs = self.specs if task.uses_depth else [s for s in self.specs if s[1] == self.specs[0][1]]
            items += [(task, (n, d if task.uses_depth else 0.0, t)) for n, d, t in specs]

        def build(index: int) -> dict[str, Any]:
            task, spec = items[index]
            budget = self.max_new_tokens or task.default_max_new_tokens
            return sample_batch(task.sample(*spec), index, budget, self.session_kwargs)

        groups = [[i for i, (_, s) in enumerate(items) if s[0] == n] for n in self.lengths]
        return LockstepItems(groups, build)
