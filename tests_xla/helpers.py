"""Shared pieces of the XLA:CPU tests: the accelerator patch (tests only), a callback that records losses and
torch_xla's compilation counters per optimizer step, and runners for the CLI (in-process and in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]


def patch_xla_accelerator(setattr_: Callable[..., Any]) -> None:
    """TESTS ONLY: Lightning's ``XLAAccelerator`` reports itself available only on a TPU; make it accept XLA:CPU
    (``PJRT_DEVICE=CPU``) with ``CPU_NUM_DEVICES`` devices (read from the environment: asking the runtime would start
    it, and ``xmp.spawn`` refuses a started runtime). ``setattr_`` is ``monkeypatch.setattr`` or ``setattr``."""
    from lightning.fabric.accelerators import xla as fabric_xla

    count = staticmethod(lambda: int(os.environ.get("CPU_NUM_DEVICES", "1")))
    setattr_(fabric_xla.XLAAccelerator, "is_available", staticmethod(lambda: True))
    setattr_(fabric_xla.XLAAccelerator, "auto_device_count", count)


def xla_counters() -> dict[str, float]:
    """torch_xla's counters that matter for static graphs: compilations, executions, device->host transfers and
    the sum of every ``aten::`` fallback (an op XLA lowered by running it on the CPU)."""
    import torch_xla.debug.metrics as met

    def count(name: str) -> int:
        data = met.metric_data(name)
        return int(data[0]) if data else 0

    fallbacks = {n: met.counter_value(n) for n in met.counter_names() if n.startswith("aten::")}
    return {
        "compiles": count("CompileTime"),
        "executions": count("ExecuteTime"),
        "transfers": count("TransferFromDeviceTime"),
        "fallbacks": sum(v or 0 for v in fallbacks.values()),
        "fallback_ops": sorted(n for n, v in fallbacks.items() if v),
    }


class StepRecorder(L.Callback):
    """Keeps each step's loss on its device (read once at the end, so recording adds no host sync per step) and the
    XLA counters after each optimizer step; writes ``{"losses": [...], "steps": [counters...]}`` to ``out``."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.losses: list[torch.Tensor] = []
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach())
        on_xla = trainer.strategy.root_device.type == "xla"
        if on_xla:  # executions are asynchronous and counted when they finish: wait (no transfer) before reading
            import torch_xla.core.xla_model as xm

            xm.wait_device_ops()
        self.steps.append(xla_counters() if on_xla else {})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = {
            "losses": [float(x.cpu()) for x in self.losses],
            "steps": self.steps,
            "device": str(trainer.strategy.root_device),
            "strategy": type(trainer.strategy).__name__,
        }
        Path(self.out).write_text(json.dumps(record))


def run_cli(args: list[str]) -> None:
    """``lit-longctx ARGS`` in this process (errors propagate as exceptions through the one-line handler)."""
    from lit_longctx.cli import main

    main(args)


def run_subprocess(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python -m tests_xla.xla_cli ARGS`` (the CLI with the test-only accelerator patch) with this checkout first."""
    full_env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                "PJRT_DEVICE": "CPU", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tests_xla.xla_cli", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


class ShardRecorder(L.Callback):
    """Writes ``{name: [numel, [elements on each device]]}`` for every parameter at the end of training."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lit_longctx.modules.xla import local_shard_numels

        shards = {n: [p.numel(), local_shard_numels(p)] for n, p in pl_module.named_parameters()}
        Path(self.out).write_text(json.dumps(shards))
