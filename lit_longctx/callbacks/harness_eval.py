"""lm-evaluation-harness tasks at the end of ``fit`` (or every N steps), through the method's own inference path.

Every rank scores every request in the same order (so a sharded model sees the same forward calls on all ranks);
global rank 0 writes ``<run dir>/harness/results.json`` and ``results.md`` and every rank logs the metrics as
``harness/<task>/<metric>``. Needs ``pip install -e ".[eval]"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

from lit_longctx.eval.report import run_dir


class HarnessEvalCallback(L.Callback):
    """Runs lm-evaluation-harness tasks on the trained module.

    Args:
        tasks: task names (comma-separated or a list): the harness's own, or tasks defined under ``include_path``.
        include_path: a directory of task YAMLs (e.g. tasks over local json files).
        limit: at most this many documents per task.
        num_fewshot: few-shot examples per prompt (default: the task's own).
        every_n_steps: also evaluate when the global step is a positive multiple of this (None: only at the end).
        session_kwargs: keyword arguments for ``pl_module.inference_session`` (e.g. FoT's ``last_context_length``).
        max_gen_toks: default generation length for generation tasks that name none.
        batch_size: requests scored together in one left-padded batch (1: one at a time; each row equals the
            request alone).
    """

    def __init__(
        self,
        tasks: str | list[str],
        include_path: str | None = None,
        limit: float | None = None,
        num_fewshot: int | None = None,
        every_n_steps: int | None = None,
        session_kwargs: dict[str, Any] | None = None,
        max_gen_toks: int = 64,
        batch_size: int = 1,
    ) -> None:
        from lit_longctx.eval.evaluate import _harness, _task_list

        task_manager_cls = _harness()  # a missing lm-eval fails at start-up, not after training
        self.tasks = _task_list(tasks)
        self.include_path, self.limit, self.num_fewshot = include_path, limit, num_fewshot
        self.every_n_steps = every_n_steps
        self.session_kwargs = dict(session_kwargs or {})
        self.max_gen_toks = max_gen_toks
        if batch_size < 1:
            raise ValueError(f"HarnessEvalCallback batch_size must be >= 1 requests, got {batch_size}")
        self.batch_size = batch_size
        self._task_manager_cls = task_manager_cls
        self._last_step = -1
        self.results: dict[str, Any] = {}

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        from lm_eval import simple_evaluate
        from lm_eval.utils import handle_non_serializable, make_table

        from lit_longctx.eval.evaluate import check_tasks
        from lit_longctx.eval.harness import SessionLM
        from lit_longctx.eval.tasks import eval_mode
        from lit_longctx.io import atomic_write_text

        manager = self._task_manager_cls(include_path=self.include_path)
        check_tasks(self.tasks, manager)
        lm = SessionLM(pl_module.model, pl_module.tokenizer, max_gen_toks=self.max_gen_toks,
                       session_factory=lambda b: pl_module.inference_session(batch_size=b, **self.session_kwargs),
                       batch_size=self.batch_size)
        with eval_mode(pl_module.model):
            out = simple_evaluate(model=lm, tasks=self.tasks, limit=self.limit, num_fewshot=self.num_fewshot,
                                  task_manager=manager, log_samples=False)
        results = {k: v for k, v in (out or {}).items() if k != "samples"}
        metrics = {f"harness/{task}/{name.split(',')[0]}": float(value)
                   for task, values in results.get("results", {}).items() for name, value in values.items()
                   if isinstance(value, (int, float)) and not name.startswith("alias") and "stderr" not in name}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:
            directory = Path(run_dir(trainer)) / "harness"
            directory.mkdir(parents=True, exist_ok=True)
            atomic_write_text(directory / "results.json",
                              json.dumps(results, indent=2, default=handle_non_serializable))
            table = make_table(results)
            atomic_write_text(directory / "results.md", table)
            print(table)
        self.results, self._last_step = results, trainer.global_step
        return results

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_step != trainer.global_step:
            self.evaluate(trainer, pl_module)
