"""What a long run shows: the progress bar counts optimizer steps to ``max_steps`` (not the micro-batches of an
"epoch"), names the context stage and its length, shows learning rates as ``3.00e-05`` (not "0.000") and reports
tokens/s (not "Epoch 6/-2", ``v_num`` and iterations/s, which mean nothing for step-keyed training on a token
stream); the model summary's FLOPs are the analytic training FLOPs of a micro-batch
(``CausalLM.model_flops_per_batch``) instead of Lightning's "0" (it counts only an ``example_input_array`` forward);
Lightning's promotional tip and known deprecation noise are dropped. :func:`install` swaps Lightning's default bar
and summary for these; ones a user configured stay.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary, RichProgressBar, TQDMProgressBar

#: messages that carry no information for lit-longctx users
NOISE = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",
)


class _DropTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


def quiet_lightning() -> None:
    """Silence Lightning's promotional tip and known deprecation warnings (idempotent)."""
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTip) for f in logger.filters):
            logger.addFilter(_DropTip())


def _schedule(trainer: Trainer) -> Any:
    from lit_longctx.callbacks.context_schedule import ContextSchedule

    return next((cb for cb in trainer.callbacks if isinstance(cb, ContextSchedule)), None)


class _LongCtxBar:
    """Mixin for Lightning's progress bars: step and stage description, tokens/s, no ``v_num``."""

    _t0: float | None = None
    _tokens0 = 0

    def describe(self, trainer: Trainer) -> str:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else "?"
        text = f"step {trainer.global_step}/{total}"
        schedule = _schedule(trainer)
        shown = schedule.progress() if schedule is not None else {}
        if shown:
            text += f" stage {shown['stage']} T={shown['seq_len']}"
        return text

    @staticmethod
    def steps_total(trainer: Trainer) -> int | None:
        """The bar counts optimizer steps up to ``max_steps`` (not micro-batches of an epoch), when it is set."""
        return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        items.pop("v_num", None)
        for key, value in items.items():  # a learning rate of 3e-5 is not "0.000"
            if key.rsplit("/", 1)[-1] == "lr" and isinstance(value, (int, float)):
                items[key] = f"{value:.2e}"
        tokens = getattr(pl_module, "tokens_seen", None)
        if tokens is not None and trainer.training:
            now = time.perf_counter()
            if self._t0 is None:
                self._t0, self._tokens0 = now, tokens
            elif now > self._t0:
                items["tok/s"] = f"{(tokens - self._tokens0) / (now - self._t0):,.0f}"
        return items


class LongCtxTQDMBar(_LongCtxBar, TQDMProgressBar):
    """TQDM bar with the step/stage description and tokens/s."""

    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}"

    def init_train_tqdm(self) -> Any:
        bar = super().init_train_tqdm()
        bar.bar_format = self.BAR_FORMAT
        return bar

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        total = self.steps_total(trainer)
        if total is not None:
            self.train_progress_bar.total = total
            self.train_progress_bar.n = self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.set_description(self.describe(trainer), refresh=False)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.steps_total(trainer) is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        elif self.train_progress_bar is not None and self._should_update(trainer.global_step,
                                                                          self.train_progress_bar.total):
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        self.train_progress_bar.set_description(self.describe(trainer))


class LongCtxRichBar(_LongCtxBar, RichProgressBar):
    """Rich bar with the step/stage description and tokens/s, without the iterations/s column."""

    def _get_train_description(self, current_epoch: int) -> str:
        return self.describe(self.trainer)

    def configure_columns(self, trainer: Trainer) -> list:
        from lightning.pytorch.callbacks.progress.rich_progress import ProcessingSpeedColumn

        return [c for c in super().configure_columns(trainer) if not isinstance(c, ProcessingSpeedColumn)]

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        total = self.steps_total(trainer)
        if total is not None and self.train_progress_bar_id is not None and self.progress is not None:
            self.progress.update(self.train_progress_bar_id, total=total, completed=trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.train_progress_bar_id is not None and self.progress is not None:
            self.progress.update(self.train_progress_bar_id, description=self.describe(trainer))
        if self.steps_total(trainer) is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


def training_flops(trainer: Trainer, pl_module: LightningModule) -> int:
    """Analytic training FLOPs (fwd + bwd) of the first micro-batch shape, or 0 when unknown."""
    dm = getattr(trainer, "datamodule", None)
    b, t = getattr(dm, "batch_size", None), getattr(dm, "seq_len", None)
    count = getattr(pl_module, "model_flops_per_batch", None)
    if count is None or not b or not t:
        return 0
    try:
        return int(count(b, t))
    except Exception:  # a summary is informative only; never fail a run over it
        return 0


class _TrainingFlopsSummary:
    """Mixin for Lightning's model summaries: "Total FLOPs" = training FLOPs of one micro-batch (analytic)."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flops = training_flops(trainer, pl_module)
        super().on_fit_start(trainer, pl_module)  # type: ignore[misc]

    def summarize(self, *args: Any, total_flops: int = 0, **kwargs: Any) -> None:
        super().summarize(*args, total_flops=self._flops or total_flops, **kwargs)  # type: ignore[misc]


class LongCtxModelSummary(_TrainingFlopsSummary, ModelSummary):
    """ModelSummary whose FLOPs are the training FLOPs of one micro-batch."""


class LongCtxRichModelSummary(_TrainingFlopsSummary, RichModelSummary):
    """RichModelSummary whose FLOPs are the training FLOPs of one micro-batch."""


_REPLACE = {TQDMProgressBar: LongCtxTQDMBar, RichProgressBar: LongCtxRichBar, ModelSummary: LongCtxModelSummary,
            RichModelSummary: LongCtxRichModelSummary}


def install(trainer: Trainer) -> None:
    """Replace Lightning's default progress bar and model summary (exactly those classes) by the ones above."""
    for i, cb in enumerate(trainer.callbacks):
        new = _REPLACE.get(type(cb))
        if new is None:
            continue
        if isinstance(cb, (TQDMProgressBar, RichProgressBar)) and not cb.is_enabled:
            continue
        if isinstance(cb, (ModelSummary, RichModelSummary)):
            trainer.callbacks[i] = new(max_depth=cb._max_depth, **cb._summarize_kwargs)
        elif isinstance(cb, RichProgressBar):
            trainer.callbacks[i] = new(refresh_rate=cb.refresh_rate, leave=cb._leave, theme=cb.theme)
        else:
            trainer.callbacks[i] = new(refresh_rate=cb.refresh_rate)
