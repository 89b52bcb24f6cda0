"""Objects the subprocesses of tests/test_bad_input.py name by class_path: a loss that turns NaN at a chosen step, a
callback that dies in the middle of a checkpoint save, one that paces training so a test can interrupt it."""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lit_longctx.modules import CausalLM


class LossSpikeLM(CausalLM):
    """CausalLM whose training loss is NaN at optimizer step ``nan_step`` (1-based), as after a bad batch.

    Args:
        nan_step: the step whose loss is NaN.
        **kwargs: CausalLM arguments.
    """

    def __init__(self, nan_step: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_step = nan_step

    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, logs = super().compute_loss(batch, stage)
        if stage == "train" and self.trainer.global_step + 1 == self.nan_step:
            loss = loss * float("nan")
        return loss, logs


class KillDuringSave(L.Callback):
    """At the checkpoint save of step ``step``: write half of the file, then SIGKILL this process (as a power cut or
    the OOM killer would).

    Args:
        step: the global step whose save is cut.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.global_step != self.step:
            return
        real_save = torch.save

        def half_then_die(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = half_then_die


class PaceAfter(L.Callback):
    """From step ``step`` on: touch ``marker`` and sleep ``seconds`` after each step (room for a test's SIGINT).

    Args:
        step: first paced step.
        marker: file created when that step is done.
        seconds: sleep after each paced step.
    """

    def __init__(self, step: int, marker: str, seconds: float = 0.5) -> None:
        self.step, self.marker, self.seconds = step, marker, seconds

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            Path(self.marker).touch()
            time.sleep(self.seconds)


class RecordWeights(L.Callback):
    """Keeps a copy of the weights after every training step (``weights[i]`` = after step i + 1)."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.weights.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


class PoisonWeights(L.Callback):
    """Writes NaN into one weight at the end of step ``step`` (after the loss and gradient checks of that step).

    Args:
        step: the global step after which the weight turns NaN.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.lm_head.weight[0, 0] = float("nan")
