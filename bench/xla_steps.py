"""XLA:CPU against eager CPU for every method's tiny debug config: step time, compile time and graphs compiled.

A correctness target, not a speed one: XLA:CPU exists here to prove that each training step compiles to one static
graph that computes the eager losses; TPU speed is not predicted by it. Run in the XLA venv (scripts/xla_env.sh):

    PJRT_DEVICE=CPU OMP_NUM_THREADS=1 PYTHONPATH=. .venv-xla/bin/python bench/xla_steps.py --steps 6

Writes the "XLA (XLA:CPU)" section of docs/benchmarks.md (``--no-write`` to only print it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PJRT_DEVICE", "CPU")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch_xla  # noqa: E402
import torch_xla.core.xla_model as xm  # noqa: E402
import torch_xla.debug.metrics as met  # noqa: E402
from benchlib import cpu_name, write_section  # noqa: E402
from lightning.pytorch.strategies import SingleDeviceXLAStrategy  # noqa: E402

from tests_xla.helpers import patch_xla_accelerator  # noqa: E402
from tests_xla.test_methods import METHODS, _cache_arg  # noqa: E402

NOTE = (
    "Two graphs per method: the first step (AdamW state being created) and the steady step; the first method run "
    "(causal) compiles two more, which the later runs of the same process find in torch_xla's graph cache. "
    "XLA:CPU is 2-3x slower than eager at these ~30k-parameter shapes (presumably per-graph dispatch and the "
    "host-side tracing of every step, next to tiny matmuls). Lightning turns logged tensors into Python numbers at "
    "each log step (a device-to-host copy after the step's graph ran, not a split of the step); raise "
    "`log_every_n_steps` on TPUs."
)


class StepTimer(L.Callback):
    """Wall time of each training step (XLA: until the device finished it), and compile counters after it."""

    def __init__(self, out: str) -> None:
        self.out, self.rows, self._t = out, [], 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        xla = trainer.strategy.root_device.type == "xla"
        if xla:
            xm.wait_device_ops()
        row = {"s": time.perf_counter() - self._t}
        if xla:
            count, total_ns, _ = met.metric_data("CompileTime") or (0, 0, None)
            row.update(compiles=int(count), compile_s=total_ns / 1e9, executions=int(met.metric_data("ExecuteTime")[0]))
        self.rows.append(row)

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        Path(self.out).write_text(json.dumps(self.rows))


def run(method: str, device: str, steps: int, root: Path, extra: list[str]) -> list[dict[str, float]]:
    from lit_longctx.cli import main

    root.mkdir(parents=True, exist_ok=True)
    out = root / "timer.json"
    over = root / "over.yaml"
    keep = device == "cpu" and method == "lolcats_distill"  # stage 2 starts from this run's checkpoint
    ckpt = (f"    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
            f"      init_args: {{dirpath: {root}/checkpoints, save_last: true}}\n") if keep else ""
    over.write_text(f"""trainer:
  max_steps: {steps}
  limit_val_batches: 0
  num_sanity_val_steps: 0
  logger: false
  enable_checkpointing: {str(keep).lower()}
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  callbacks:
    - class_path: __main__.StepTimer
      init_args: {{out: {out}}}
{ckpt}""")
    accel = ["--trainer.accelerator=tpu", "--trainer.devices=1"] if device == "xla" else ["--trainer.accelerator=cpu"]
    main(["fit", *METHODS[method], "--config", str(over), _cache_arg(method, root.parent / "cache"), *accel, *extra])
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    patch_xla_accelerator(setattr)  # XLA:CPU is not a TPU: Lightning's availability check is bypassed (bench only)
    # the XLA run builds its model on the CPU like the eager one (Lightning's single-device XLA strategy would build
    # it on the device); the runtime starts before any eager backward (torch's autograd engine needs that)
    SingleDeviceXLAStrategy.tensor_init_context = lambda self, empty_init=None: contextlib.nullcontext()
    torch.zeros(1, device=torch_xla.device())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            extra = []
            if method == "lolcats_lora":
                extra = [f"--model.init_args.init_from={Path(tmp) / 'lolcats_distill-cpu/checkpoints/last.ckpt'}"]
            eager = run(method, "cpu", args.steps, Path(tmp) / f"{method}-cpu", extra)
            before = met.metric_data("CompileTime") or (0, 0, None)
            xla = run(method, "xla", args.steps, Path(tmp) / f"{method}-xla", extra)
            after = xla[-1]
            warm = args.warmup
            rows.append({
                "method": method,
                "eager_ms": 1e3 * statistics.median(r["s"] for r in eager[warm:]),
                "xla_ms": 1e3 * statistics.median(r["s"] for r in xla[warm:]),
                "first_ms": 1e3 * xla[0]["s"],
                "graphs": after["compiles"] - int(before[0]),
                "compile_s": after["compile_s"] - before[1] / 1e9,
                "late": after["compiles"] - xla[warm - 1]["compiles"],
                "exec_per_step": (after["executions"] - xla[warm - 1]["executions"]) / (len(xla) - warm),
            })
    cmd = f"PJRT_DEVICE=CPU OMP_NUM_THREADS=1 PYTHONPATH=. .venv-xla/bin/python bench/xla_steps.py --steps {args.steps}"
    versions = f"torch {torch.__version__}, torch_xla {torch_xla.__version__}, Lightning {L.__version__}"
    lines = [
        "## XLA (XLA:CPU)",
        "",
        "`bench/xla_steps.py`: each method's debug config (the configs of `tests_xla/test_methods.py`) trained for "
        f"{args.steps} steps eagerly on the CPU and under Lightning's single-device XLA strategy on XLA:CPU "
        "(`PJRT_DEVICE=CPU`), fp32, batches and shapes as in the configs. **A correctness target, not a speed one**: "
        "XLA:CPU shows that each step is one static graph that reproduces the eager losses; it predicts nothing "
        f"about TPU speed. Step times: medians after {args.warmup} warm-up steps (XLA: until the device finished the "
        "step). Graphs: all compilations of the run (forward + backward, optimizer, setup); after warm-up: "
        "compilations in the measured steps (must be 0); executions per step: XLA graphs run per step (1 = no host "
        "sync splits the step).",
        "",
        f"Command ({time.strftime('%Y-%m-%d')}):",
        "",
        f"    {cmd}",
        "",
        f"Hardware: {cpu_name()}, {os.cpu_count()} cores (shared with other jobs), {versions}.",
        "",
        "| method | eager step (ms) | XLA:CPU step (ms) | XLA first step, with compiles (ms) | graphs compiled "
        "| compile time (s) | compilations after warm-up | executions per step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['eager_ms']:.1f} | {r['xla_ms']:.1f} | {r['first_ms']:.0f} | "
                     f"{r['graphs']} | {r['compile_s']:.2f} | {r['late']} | {r['exec_per_step']:.1f} |")
    lines += ["", NOTE]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section(REPO / "docs/benchmarks.md", section, "## XLA (XLA:CPU)")


if __name__ == "__main__":
    main()
