"""Objects that the storage tests' subprocess configs name by class_path."""

from __future__ import annotations

import time

import lightning as L

from lit_longctx.storage import join, open_file


class PauseAtStep(L.Callback):
    """At the start of step ``step`` (the previous steps' checkpoints are written by then) write the marker
    ``<default_root_dir>/paused-at-step-<step>`` and sleep, so a test can SIGKILL the run at a known point.

    Args:
        step: the global step to pause at.
        seconds: how long to sleep.
    """

    def __init__(self, step: int, seconds: float) -> None:
        self.step, self.seconds = step, seconds

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, i: int) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            with open_file(join(str(trainer.default_root_dir), f"paused-at-step-{self.step}"), "wb") as f:
                f.write(b"paused")
            time.sleep(self.seconds)
