"""Micro-reproduction of context extension on CPU (an experiment, not a test; issue 12).

A small model trained at 256 tokens on passkey-mixed text (``configs/passkey_train.yaml``, fewer steps) is continued
with the same number of tokens in three ways, each one ``lit-longctx fit`` with a ``ContextSchedule``:

- (a) ``continue-256``: 256-token rows, plain RoPE;
- (b) ``jump-1024``: straight to 1024-token rows with linear RoPE scaling (position interpolation, factor 4);
- (c) ``staged``: 512 (linear, factor 2) for the first half, then 1024 (linear, factor 4).

Tokens per optimizer step are 2048 throughout (8 x 256, 4 x 512, 2 x 1024). Each arm (and the base model) is then
evaluated with ``lit-longctx test`` on the passkey grid (``configs/eval/passkey.yaml``) and on perplexity by position
(``configs/eval/ppl_by_length.yaml``). The wall-clock overhead of a stage switch is the time ``ContextSchedule.apply``
takes (model hooks, RoPE, data module), recorded by the callback.

Usage:
    python bench/context_extension.py --base-steps 1000 --steps 150 --out docs/results.md
    python bench/context_extension.py --base-ckpt runs/ctx_ext/base/checkpoints/last.ckpt ...   # reuse a base run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import cpu_name, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Context extension micro-reproduction"
TRAIN = str(REPO / "configs" / "passkey_train.yaml")


def arms(steps: int) -> dict[str, list[dict[str, Any]]]:
    half = steps // 2
    return {
        "continue-256": [{"step": 0, "seq_len": 256, "micro_batch": 8}],
        "jump-1024": [{"step": 0, "seq_len": 1024, "micro_batch": 2, "rope": {"type": "linear", "factor": 4.0}}],
        "staged": [{"step": 0, "seq_len": 512, "micro_batch": 4, "rope": {"type": "linear", "factor": 2.0}},
                   {"step": half, "seq_len": 1024, "micro_batch": 2, "rope": {"factor": 4.0}}],
    }


def checkpoints(root: Path, every: int) -> dict[str, Any]:
    return {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True, "every_n_train_steps": every}}


def common(root: Path, cache: Path) -> list[str]:
    return [f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
            "--trainer.enable_progress_bar=false", f"--data.cache_dir={cache}"]


def fit(args: list[str]) -> tuple[Any, float]:
    from lit_longctx.cli import _make_cli

    start = time.perf_counter()
    cli = _make_cli(["fit", "--config", TRAIN, *args])
    return cli, time.perf_counter() - start


def train_base(out: Path, steps: int, cache: Path) -> tuple[Path, float]:
    root = out / "base"
    _, seconds = fit([*common(root, cache), f"--trainer.max_steps={steps}",
                      f"--trainer.callbacks={json.dumps([checkpoints(root, steps)])}"])
    return root / "checkpoints" / "last.ckpt", seconds


def train_arm(out: Path, name: str, stages: list[dict[str, Any]], base: Path, steps: int, cache: Path,
              lr: float) -> dict[str, Any]:
    from lit_longctx.callbacks.context_schedule import ContextSchedule

    root = out / name
    schedule = {"class_path": "lit_longctx.callbacks.ContextSchedule", "init_args": {"stages": stages}}
    cli, seconds = fit([*common(root, cache), f"--trainer.max_steps={steps}", "--data.shuffle=false",
                        f"--model.init_from={base}", f"--model.learning_rate={lr}", "--model.warmup_steps=10",
                        f"--trainer.callbacks={json.dumps([schedule, checkpoints(root, steps)])}"])
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, ContextSchedule))
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    return {"ckpt": root / "checkpoints" / "last.ckpt", "seconds": seconds, "tokens": cli.model.tokens_seen,
            "switch_seconds": list(cb.switch_seconds), "val_loss": metrics.get("val/loss"),
            "steps": cli.trainer.global_step}


def evaluate(ckpt: Path, root: Path, eval_config: str, grid: list[str]) -> dict[str, Any]:
    """``lit-longctx test`` of a checkpoint (in-process); the task's summary from results.json."""
    from lit_longctx.cli import _make_cli

    cli = _make_cli(["test", "--config", str(REPO / "configs" / "eval" / eval_config), f"--model.init_from={ckpt}",
                     f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
                     "--trainer.logger=false", *grid])
    run = Path(cli.trainer.log_dir or cli.trainer.default_root_dir)
    results = json.loads((run / "results.json").read_text())
    return results[next(k for k in results if k != "global_step")]


def markdown(args: argparse.Namespace, rows: dict[str, dict[str, Any]], facts: dict[str, Any]) -> str:
    import torch

    lengths = args.lengths
    lines = [SECTION, "",
             f"Passkey accuracy (%) by prompt length ({len(args.depths)} depths x {args.trials} trials per length, "
             "keys 1-999, greedy) and perplexity by position (windows of 4096 tokens of held-out text; ppl of the "
             "tokens in each position bucket), one seed:", "",
             "| run | " + " | ".join(str(n) for n in lengths) + " | " + " | ".join(
                 f"ppl@{b}" for b in facts["buckets"]) + " |",
             "|---|" + "---:|" * (len(lengths) + len(facts["buckets"]))]
    for name, row in rows.items():
        acc = {r["length"]: r["accuracy"] for r in row["passkey"]["by_length"]}
        ppl = row["ppl"]
        lines.append(f"| {name} | " + " | ".join(f"{100 * acc[n]:.0f}" for n in lengths) + " | "
                     + " | ".join(f"{ppl.get(b, float('nan')):.2f}" for b in facts["buckets"]) + " |")
    base = (f"{facts['base_seconds'] / 60:.1f} min" if facts["base_seconds"] == facts["base_seconds"]
            else "the given checkpoint")
    lines += ["", f"Base: {facts['base_steps']} steps at 8 x 256 tokens ({base}). Each arm: "
              f"{args.steps} steps at 2048 tokens per step ({args.steps * 2048 / 1e6:.2f}M tokens), lr {args.lr} "
              "with 10 warm-up steps, passkey fraction 0.8, text read in order (`shuffle: false`). Arm wall-clock: "
              + ", ".join(f"{n} {r['seconds'] / 60:.1f} min" for n, r in rows.items() if "seconds" in r) + ".",
              "",
              "Stage-switch overhead (the time `ContextSchedule.apply` took: RoPE and config swap, FLOP count, data "
              "module): " + "; ".join(f"{n}: " + ", ".join(f"{1e3 * s:.2f} ms" for s in r["switch_seconds"])
                                      for n, r in rows.items() if r.get("switch_seconds")) + ". The new loader "
              "segment is built before training (the whole plan is known), so a switch costs no data-loader restart.",
              "",
              f"Measured {datetime.date.today().isoformat()} on {cpu_name()} ({os.cpu_count()} logical CPUs, "
              f"{torch.get_num_threads()} torch threads), Python {platform.python_version()}, torch "
              f"{torch.__version__}, fp32; shared machine (load average {facts['loads'][0]:.1f} -> "
              f"{facts['loads'][1]:.1f}), so times are noisy.", "", "```",
              "OMP_NUM_THREADS=1 python bench/context_extension.py " + " ".join(shlex.quote(a) for a in args.argv),
              "```", ""]
    return "\n".join(lines)


def ppl_buckets(summary: dict[str, Any]) -> dict[str, float]:
    out = {}
    for bucket in summary.get("buckets", []):
        out[f"{bucket['start']}-{bucket['end']}"] = bucket["ppl"]
    return out


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-steps", type=int, default=1000)
    p.add_argument("--base-ckpt", type=Path, default=None, help="reuse this base checkpoint instead of training")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of each arm")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "ctx_ext")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = args.runs / "cache"
    loads = [os.getloadavg()[0]]
    if args.base_ckpt is None:
        base, base_seconds = train_base(args.runs, args.base_steps, cache)
    else:
        base, base_seconds = args.base_ckpt, float("nan")
    grid = [f"--data.lengths={json.dumps(args.lengths)}", f"--data.depths={json.dumps(args.depths)}",
            f"--data.trials={args.trials}", "--data.key_range=[1, 999]"]
    ppl_grid = ["--data.max_windows=2"]
    rows: dict[str, dict[str, Any]] = {"base (256)": {"ckpt": base}}
    for name, stages in arms(args.steps).items():
        rows[name] = train_arm(args.runs, name, stages, base, args.steps, cache, args.lr)
        print(f"{name}: {rows[name]}", flush=True)
    for name, row in rows.items():
        tag = name.split()[0]
        row["passkey"] = evaluate(row["ckpt"], args.runs / f"eval_{tag}", "passkey.yaml", grid)
        row["ppl"] = ppl_buckets(evaluate(row["ckpt"], args.runs / f"ppl_{tag}", "ppl_by_length.yaml", ppl_grid))
        print(f"{name}: passkey {[r['accuracy'] for r in row['passkey']['by_length']]} ppl {row['ppl']}", flush=True)
    loads.append(os.getloadavg()[0])
    buckets = list(next(iter(rows.values()))["ppl"])
    facts = {"base_steps": args.base_steps, "base_seconds": base_seconds, "loads": loads, "buckets": buckets}
    section = markdown(args, rows, facts)
    (args.runs / "summary.json").write_text(json.dumps(
        {n: {k: v for k, v in r.items() if k != "ckpt"} for n, r in rows.items()}, indent=1, default=str))
    print(section)
    if args.out is not None:
        write_section(args.out, section, SECTION, "# Results")
    return section


if __name__ == "__main__":
    main()
