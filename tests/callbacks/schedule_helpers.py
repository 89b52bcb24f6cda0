"""Callbacks that the subprocess tests of context schedules name by class_path."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L


class KillAtMicroBatch(L.Callback):
    """SIGKILLs its own process when micro-batch ``micro`` (0-based, whole run) is about to train: no clean-up, no
    checkpoint of its own, as a preempted job dies.

    Args:
        micro: the micro-batch index.
    """

    def __init__(self, micro: int) -> None:
        self.micro = micro

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.total.ready - 1 == self.micro:
            os.kill(os.getpid(), signal.SIGKILL)


class ShapeLog(L.Callback):
    """Appends (global step, batch shape, accumulate, rope) of every micro-batch to ``<path>/shapes-rank<r>.jsonl``.

    Args:
        path: a directory.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        self.path.mkdir(parents=True, exist_ok=True)
        rope = pl_module.model.rope.rope
        record = {"step": trainer.global_step, "shape": list(batch["input_ids"].shape),
                  "accumulate": trainer.accumulate_grad_batches, "rope_type": rope.rope_type, "factor": rope.factor}
        with open(self.path / f"shapes-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
