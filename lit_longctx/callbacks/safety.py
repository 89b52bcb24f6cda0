"""Callbacks that keep a training run from losing or corrupting its work.

The ``lit-longctx`` CLI adds each of them to every ``fit`` (unless the config already has one of the same class):

- :class:`NonFiniteGuard`: a non-finite loss or gradient norm stops training before the optimizer applies it (or,
  with ``action: skip``, drops that step), and a checkpoint whose weights are not finite is never written, so
  ``last.ckpt`` keeps the last finite weights;
- :class:`FinalCheckpoint`: the end of training is always checkpointed (Lightning's periodic ``ModelCheckpoint`` saves
  only multiples of its interval, so ``max_steps`` = 10 with an interval of 4 would lose steps 9 and 10);
- :class:`InterruptCheckpoint`: Ctrl-C (SIGINT) is deferred to the end of the current step, a checkpoint of that
  step is saved, and training ends with :class:`TrainingInterrupted` (the CLI prints the resume command, exit 130).
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


class NonFiniteError(ValueError):
    """Training produced a non-finite loss, gradient norm or weights (shown to users as one ``error:`` line)."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT after saving ``path`` at ``step`` (the CLI turns it into exit status 130).

    Not a ``KeyboardInterrupt``: Lightning turns those into ``sys.exit(1)`` before the CLI could report the resume
    command.
    """

    def __init__(self, step: int, path: str | None) -> None:
        super().__init__(f"training interrupted at step {step}; checkpoint: {path}")
        self.step, self.path = step, path


def _save_end_checkpoint(trainer: L.Trainer) -> list[str]:
    """Save the current step with every ModelCheckpoint that has not saved it yet; the paths written.

    A callback with ``save_last`` writes its ``last.ckpt`` (what ``--ckpt_path last`` resumes); one without writes
    its usual step-named file, or ``last.ckpt`` in its directory when it ranks by a monitored metric.
    """
    written = []
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint) or cb.dirpath is None:
            continue
        if cb._last_global_step_saved == trainer.global_step and cb._last_checkpoint_saved:
            written.append(cb.last_model_path or cb._last_checkpoint_saved)
            continue
        candidates = cb._monitor_candidates(trainer)
        if cb.save_last:
            cb._save_last_checkpoint(trainer, candidates)
            written.append(cb.last_model_path)
        else:
            path = cb.format_checkpoint_name(candidates, None if cb.monitor is None else cb.CHECKPOINT_NAME_LAST)
            cb._save_checkpoint(trainer, path)
            written.append(path)
    return written


class NonFiniteGuard(L.Callback):
    """Stop (or skip) a training step whose loss or gradient norm is not finite; never checkpoint non-finite weights.

    The check runs before the optimizer step, so the weights are still those of the last finite step. The gradient
    norm costs one fused norm over the gradients per optimizer step; it is skipped under fp16 loss scaling (the
    scaler skips overflowing steps itself). On XLA devices reading the flag before the optimizer step would split the
    compiled step in two, so there the flag is computed in the graph and read after the step: training stops at the
    first non-finite step (``skip`` is not available), and :meth:`on_save_checkpoint` still refuses non-finite weights.

    Args:
        action: ``stop`` ends training with one error line naming the step; ``skip`` drops that step's update (the
            optimizer does not see its gradients) and goes on, as large runs do for rare loss spikes.
        check_grad_norm: also check the total gradient norm (catches an overflow that the loss does not show).
        max_consecutive_skips: with ``skip``, stop after this many non-finite steps in a row (a diverged run).
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", check_grad_norm: bool = True,
                 max_consecutive_skips: int = 10) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"NonFiniteGuard action must be 'stop' or 'skip', got {action!r}")
        self.action = action
        self.check_grad_norm = check_grad_norm
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0
        self._consecutive = 0
        self._losses: list[torch.Tensor] = []
        self._deferred: tuple[torch.Tensor, int] | None = None  # XLA: (finite flag, step), read after the step

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        # kept as tensors (gradient accumulation: every micro-batch of the step); read once per optimizer step
        self._losses.append(loss.detach().float().mean())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        losses, self._losses = self._losses, []
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        checks = [torch.stack(losses)] if losses else []
        if self.check_grad_norm and grads and getattr(trainer.precision_plugin, "scaler", None) is None:
            norm = torch.nn.utils.get_total_norm(grads)
            norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).reshape(1).float()  # FSDP2: DTensor
            checks.append(norm.to(checks[0].device) if checks else norm)
        if checks and checks[0].device.type == "xla":
            self._deferred = (torch.isfinite(torch.cat(checks)).all(), trainer.global_step + 1)
            return
        what = None
        if checks and not torch.isfinite(torch.cat(checks)).all().item():  # the one host sync of the step
            bad_loss = [float(v) for v in losses if not math.isfinite(float(v))]
            what = (f"the training loss is {bad_loss[0]}" if bad_loss
                    else f"the gradient norm is {float(checks[-1])}")
        bad = what is not None
        if trainer.world_size > 1:  # every rank takes the same decision (a loss can be bad on one rank only)
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
            what = what or "a non-finite loss or gradient norm on another rank"
        if not bad:
            self._consecutive = 0
            return
        step = trainer.global_step + 1
        self._consecutive += 1
        if self.action == "skip" and self._consecutive <= self.max_consecutive_skips:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # optimizers skip parameters without gradients: this step changes nothing
            self.skipped_steps += 1
            print(f"lit-longctx: step {step}: {what}; skipped this update ({self.skipped_steps} skipped so far)",
                  file=sys.stderr)
            return
        again = f" ({self._consecutive} steps in a row)" if self.action == "skip" else ""
        raise NonFiniteError(
            f"training stopped at step {step}: {what}{again}; the weights are those after step {step - 1} and no "
            "checkpoint holds non-finite values: lower model.init_args.learning_rate (or enable gradient clipping, "
            "--trainer.gradient_clip_val=1.0), or skip such steps with a NonFiniteGuard callback (action: skip)"
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._deferred is None:
            return
        (finite, step), self._deferred = self._deferred, None
        bad = not bool(finite.item())  # after the compiled step has run: no graph break
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteError(
                f"training stopped at step {step}: a non-finite loss or gradient norm (on XLA the check runs after the "
                "optimizer step, so no checkpoint of this step is written); lower model.init_args.learning_rate or "
                "enable gradient clipping (--trainer.gradient_clip_val=1.0)"
            )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        bad = [k for k, v in checkpoint.get("state_dict", {}).items() if isinstance(v, torch.Tensor)
               and v.is_floating_point() and not torch.isfinite(v.to_local() if hasattr(v, "to_local") else v).all()]
        found = bool(bad)
        if trainer.world_size > 1:  # sharded weights: a shard may be bad on one rank only
            found = trainer.strategy.reduce_boolean_decision(found, all=False)
        if found:
            where = f" ({bad[0]}, ...)" if bad else " (on another rank)"
            raise NonFiniteError(
                f"training stopped at step {trainer.global_step}: the weights are not finite{where}, so this "
                "checkpoint is not written and the previous one is kept: lower model.init_args.learning_rate"
            )


class FinalCheckpoint(L.Callback):
    """Checkpoint the last step of training when no ModelCheckpoint saved it (``max_steps`` not a multiple of the
    interval, or training stopped early)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0:
            _save_end_checkpoint(trainer)


class InterruptCheckpoint(L.Callback):
    """On Ctrl-C (SIGINT) during ``fit``: finish the current step, save it, stop with :class:`TrainingInterrupted`.

    A second Ctrl-C stops at once (Lightning's own handling, no new checkpoint). The checkpoint is written by the
    ModelCheckpoint callbacks (``last.ckpt`` where ``save_last`` is set), else to ``interrupted.ckpt`` in the run
    directory. A step is never cut in half, so resuming from the checkpoint gives the uninterrupted run's weights.
    """

    def __init__(self) -> None:
        self._requested = False
        self._previous: Any = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._requested:  # second Ctrl-C: the user wants out now
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
            raise KeyboardInterrupt
        self._requested = True
        print("\nlit-longctx: interrupt received; saving a checkpoint at the end of this step (Ctrl-C again to stop "
              "without saving)", file=sys.stderr, flush=True)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._requested = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _restore(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        requested = self._requested
        if trainer.world_size > 1:  # all ranks stop at the same step (each may see the signal a little apart)
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        written = _save_end_checkpoint(trainer)
        if not written:
            path = str(Path(trainer.default_root_dir) / "interrupted.ckpt")
            trainer.save_checkpoint(path)
            written = [path]
        raise TrainingInterrupted(trainer.global_step, written[0])
