"""Passkey / multi-key retrieval during ``fit``: a small length x depth grid every N optimizer steps.

Every rank runs the whole grid in the same order (generation always runs ``max_new_tokens`` steps), so a sharded
model (FSDP) sees the same forward calls on all ranks and no gathering is needed; the grid is meant to be small. The
prompts come from the module's tokenizer and are built once. Generation goes through
``pl_module.inference_session``, the method's own inference path; the model's train mode is restored afterwards.
Accuracy per length and cell is sent to the loggers as ``long_eval/<task>/acc...`` at the global step, and the
heatmap is saved as ``<run dir>/long_eval/<task>_step<N>.png`` and sent to TensorBoard / wandb.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch

from lit_longctx.eval.passkey import build_task, retrieval_grid, sample_batch, summarize_retrieval
from lit_longctx.eval.report import heatmap_figure, log_figure, run_dir, summary_metrics
from lit_longctx.eval.tasks import retrieval_record
from lit_longctx.tokenizers import ByteTokenizer

DEFAULT_KEY_RANGE = (1, 50000)


class LongEvalCallback(L.Callback):
    """Runs a retrieval grid every ``every_n_steps`` optimizer steps and logs accuracy and the heatmap.

    Args:
        every_n_steps: evaluate when the global step is a positive multiple of this.
        lengths: prompt lengths in tokens.
        depths: needle depths in [0, 1].
        trials: prompts per (length, depth) cell.
        task: ``passkey`` or ``multikey``.
        seed: seed of the keys (the same prompts at every evaluation).
        max_new_tokens: greedy tokens generated per prompt.
        template: prompt template (default: the task's standard one).
        needle_template: multikey only: one needle with ``{name}`` and ``{value}``.
        n_keys: multikey only: needles per prompt.
        key_range: inclusive range of keys / values; None: the training data module's ``key_range`` when it has one
            (``PasskeyMixData``: evaluate the keys it trains on), else the seeds' (1, 50000).
        bos: start prompts with the tokenizer's BOS.
        session_kwargs: keyword arguments for ``pl_module.inference_session`` (e.g. ``prefill_chunk``).
        save_heatmap: save the heatmap PNG and send it to image-capable loggers.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        lengths: Sequence[int] = (256, 512, 1024),
        depths: Sequence[float] = (0.0, 0.5, 1.0),
        trials: int = 2,
        task: Literal["passkey", "multikey"] = "passkey",
        seed: int = 1234,
        max_new_tokens: int = 10,
        template: str | None = None,
        needle_template: str | None = None,
        n_keys: int = 4,
        key_range: tuple[int, int] | None = None,
        bos: bool = True,
        session_kwargs: dict[str, Any] | None = None,
        save_heatmap: bool = True,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.task_args = dict(template=template, seed=seed, bos=bos, n_keys=n_keys, needle_template=needle_template)
        self.key_range = None if key_range is None else tuple(key_range)
        # fail now on bad templates or keys
        build_task(task, ByteTokenizer(), key_range=self.key_range or DEFAULT_KEY_RANGE, **self.task_args)
        self.every_n_steps = every_n_steps
        self.specs = retrieval_grid(lengths, depths, trials)
        self.task = task
        self.max_new_tokens = max_new_tokens
        self.session_kwargs = dict(session_kwargs or {})
        self.save_heatmap = save_heatmap
        self._batches: list[dict[str, Any]] | None = None
        self._last_step = -1

    def batches(self, pl_module: L.LightningModule, datamodule: Any = None) -> list[dict[str, Any]]:
        """The grid's batches, built with the module's tokenizer on first use (keys: see ``key_range``)."""
        if self._batches is None:
            tokenizer = getattr(pl_module, "tokenizer", None)
            if tokenizer is None:
                raise ValueError(
                    "LongEvalCallback builds prompts with the module's tokenizer, but pl_module.tokenizer is None; "
                    "give the module a tokenizer (model.tokenizer in the config)"
                )
            key_range = self.key_range or getattr(datamodule, "key_range", None) or DEFAULT_KEY_RANGE
            task = build_task(self.task, tokenizer, key_range=tuple(key_range), **self.task_args)
            self._batches = [sample_batch(task.sample(*spec), i, self.max_new_tokens, self.session_kwargs)
                             for i, spec in enumerate(self.specs)]
        return self._batches

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step:
            return  # with gradient accumulation several batches end on the same global step
        self._last_step = step
        self.evaluate(trainer, pl_module)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Run the grid now, log it, and return its summary (see ``summarize_retrieval``)."""
        records = []
        for batch in self.batches(pl_module, getattr(trainer, "datamodule", None)):
            batch = dict(batch, input_ids=batch["input_ids"].to(pl_module.device))
            records.append(retrieval_record(pl_module, batch))
        summary = summarize_retrieval(records)
        step = trainer.global_step
        metrics = {f"long_eval/{self.task}/{k}": float(v) for k, v in summary_metrics(summary).items()}
        directory = run_dir(trainer)  # every rank: log_dir broadcasts
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            if self.save_heatmap:
                path = directory / "long_eval" / f"{self.task}_step{step:07d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                fig = heatmap_figure(summary)
                fig.savefig(path, dpi=100)
                log_figure(trainer.loggers, f"long_eval/{self.task}_heatmap", fig, path, step)
        return summary
