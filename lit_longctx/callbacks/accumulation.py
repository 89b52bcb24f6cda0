"""Gradient accumulation keyed by optimizer step (batch-size ramp-up as in Megatron / GPT-NeoX).

Lightning's ``GradientAccumulationScheduler`` is keyed by epoch, and its epoch loop decides "this micro-batch ends an
optimizer step" with ``batch_idx % accumulate_grad_batches`` inside an epoch, which is only right while G never
changes mid-epoch. Here G is a function of the optimizer step: with stages starting at steps S_0 = 0 < S_1 < ... and
G_s micro-batches per step in stage s, stage s starts at micro-batch M_s = Σ_{t<s} (S_{t+1} − S_t)·G_t, and micro-batch
m (0-based, counted over the whole run) is the last of its step iff (m − M_s + 1) mod G_s = 0 (pretraining spec §3.4:
tokens per step T·B·G·DP).

:class:`AccumulationPlan` is that arithmetic; :func:`install` points the Trainer's loop at it (which micro-batch
zeroes the gradients, which steps, and ``trainer.accumulate_grad_batches`` for the loss normalisation). Because
Lightning's gradient-sync blocking (DDP ``no_sync``) asks the same question, DDP reduces gradients only on the last
micro-batch of a step; FSDP2 gets the equivalent ``set_requires_gradient_sync``. Strategies that fix G at start-up
(DeepSpeed: ``gradient_accumulation_steps`` is baked into its engine) are refused when G changes.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from lit_longctx.nn.config import ConfigError


class AccumulationPlan:
    """Micro-batches per optimizer step as a step-keyed schedule ``{first_step: G}`` (must contain step 0)."""

    def __init__(self, schedule: Mapping[int, int]) -> None:
        items = sorted((int(k), int(v)) for k, v in schedule.items())
        if not items or items[0][0] != 0:
            raise ConfigError("the accumulation schedule must start at optimizer step 0 (e.g. {0: 1, 1000: 4})")
        for step, g in items:
            if step < 0 or g < 1:
                raise ConfigError(f"accumulation schedule entry {step}: {g} must have step >= 0 and accumulate >= 1")
        self.steps = [s for s, _ in items]
        self.accumulate = [g for _, g in items]
        self.first_micro = [0]
        for i in range(1, len(items)):
            self.first_micro.append(self.first_micro[-1] + (self.steps[i] - self.steps[i - 1]) * self.accumulate[i - 1])

    def stage_of_step(self, step: int) -> int:
        return bisect.bisect_right(self.steps, step) - 1

    def stage_of_micro(self, micro: int) -> int:
        return bisect.bisect_right(self.first_micro, micro) - 1

    def accumulate_at_step(self, step: int) -> int:
        return self.accumulate[self.stage_of_step(step)]

    def is_first(self, micro: int) -> bool:
        """Whether 0-based micro-batch ``micro`` starts an optimizer step."""
        s = self.stage_of_micro(micro)
        return (micro - self.first_micro[s]) % self.accumulate[s] == 0

    def is_last(self, micro: int) -> bool:
        """Whether 0-based micro-batch ``micro`` ends an optimizer step."""
        s = self.stage_of_micro(micro)
        return (micro - self.first_micro[s] + 1) % self.accumulate[s] == 0

    def micro_batches_before(self, step: int) -> int:
        """Micro-batches consumed by the first ``step`` optimizer steps."""
        s = self.stage_of_step(step)
        return self.first_micro[s] + (step - self.steps[s]) * self.accumulate[s]

    @property
    def changes(self) -> bool:
        return len(set(self.accumulate)) > 1


def check_strategy(trainer: Trainer, plan: AccumulationPlan) -> None:
    """Refuse strategies that cannot change G after start-up, and a Trainer-level G that would conflict."""
    strategy = trainer.strategy
    if plan.changes and getattr(strategy, "handles_gradient_accumulation", False):
        raise ConfigError(
            f"{type(strategy).__name__} fixes gradient accumulation when its engine is built (DeepSpeed's "
            "gradient_accumulation_steps), so a schedule that changes accumulate cannot run under it; keep accumulate "
            "constant across stages (change micro_batch with allow_token_change, or seq_len) or use "
            "--trainer.strategy=ddp / lit_longctx.modules.parallel.FSDP2Strategy"
        )
    if trainer.accumulate_grad_batches not in (1, plan.accumulate[0]):
        raise ConfigError(
            f"--trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} conflicts with the accumulation "
            "schedule; leave it at 1 and set accumulate in the schedule"
        )


def install(trainer: Trainer, plan: AccumulationPlan) -> None:
    """Make the Trainer's loop step, zero gradients and normalise the loss by ``plan`` (idempotent).

    The micro-batch count is ``batch_progress.total.ready``: it spans epochs and is restored from checkpoints, so a
    resumed run keeps the same step boundaries.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    progress = epoch_loop.batch_progress
    epoch_loop._accumulated_batches_reached = lambda: plan.is_last(progress.total.ready - 1)
    auto = epoch_loop.automatic_optimization
    original = getattr(auto, "_lit_longctx_zero_grad", None) or auto._make_zero_grad_fn
    auto._lit_longctx_zero_grad = original

    def make_zero_grad_fn(batch_idx: int, optimizer: Any) -> Any:
        # Lightning zeroes when batch_idx % G == 0; hand it an index that answers "first micro-batch of a step"
        trainer.accumulate_grad_batches = plan.accumulate[plan.stage_of_micro(progress.total.ready - 1)]
        first = plan.is_first(progress.total.ready - 1)
        return original(0 if first else 1, optimizer)

    auto._make_zero_grad_fn = make_zero_grad_fn


def uninstall(trainer: Trainer) -> None:
    """Undo :func:`install` (the Trainer may be reused for another ``fit``)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    epoch_loop.__dict__.pop("_accumulated_batches_reached", None)
    auto = epoch_loop.automatic_optimization
    auto.__dict__.pop("_make_zero_grad_fn", None)
    auto.__dict__.pop("_lit_longctx_zero_grad", None)


def before_micro_batch(trainer: Trainer, pl_module: LightningModule, plan: AccumulationPlan) -> None:
    """Per micro-batch: the stage's G for the loss normalisation, and FSDP2's gradient sync only on the last one."""
    micro = trainer.fit_loop.epoch_loop.batch_progress.total.ready - 1
    trainer.accumulate_grad_batches = plan.accumulate[plan.stage_of_micro(micro)]
    model = getattr(pl_module, "model", None)
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 (fully_shard): reduce-scatter once per step
        model.set_requires_gradient_sync(plan.is_last(micro))


class StepAccumulationScheduler(Callback):
    """Change ``accumulate_grad_batches`` at given optimizer steps (Lightning's scheduler is keyed by epoch).

    Args:
        scheduling: ``{first_optimizer_step: micro-batches per step}``, e.g. ``{0: 1, 100: 2, 300: 4}``; step 0 is
            required. Works with single-device training, DDP (gradients reduced on the last micro-batch only) and
            FSDP2; refused under DeepSpeed.
    """

    def __init__(self, scheduling: dict[int, int]) -> None:
        self.plan = AccumulationPlan(scheduling)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            check_strategy(trainer, self.plan)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        install(trainer, self.plan)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        uninstall(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        before_micro_batch(trainer, pl_module, self.plan)
