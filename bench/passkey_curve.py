"""Passkey retrieval against prompt length after brief training with passkey documents (an experiment, not a test).

Trains a model with a training config (default ``configs/passkey_train.yaml``: the quickstart-style causal model on
text mixed with passkey documents of at most 256 tokens), then evaluates the standard passkey prompt (Landmark
Attention's, ``configs/eval/passkey.yaml``) at several lengths and depths through the normal command path,
``lit-longctx test --config TRAIN --config configs/eval/passkey.yaml --ckpt_path last`` (run in-process here), and
prints a markdown section: accuracy per length, the length x depth grid, training facts, runtimes, hardware and the
exact commands. Plain RoPE attention is expected to retrieve at the trained length and fail beyond it; a long-context
method (FoT, landmark) runs the same experiment with its own training config(s) and should keep retrieving.

Usage:
    python bench/passkey_curve.py                                  # baseline; print the section
    python bench/passkey_curve.py --out docs/results.md            # also replace/append the section in that file
    python bench/passkey_curve.py --train-config configs/X.yaml --label "FoT" \\
        --section "## FoT passkey retrieval" --out docs/results.md  # a method's run
    python bench/passkey_curve.py --skip-fit                       # evaluate the config's existing last checkpoint
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
DEFAULT_SECTION = "## Passkey retrieval baseline"




def config_args(configs: list[str]) -> list[str]:
    return [arg for config in configs for arg in ("--config", config)]


def fit(configs: list[str], extra: list[str]) -> dict[str, Any]:
    """Train with ``lit-longctx fit`` (in-process); facts about the run."""
    from lit_longctx.cli import _make_cli

    start = time.perf_counter()
    cli = _make_cli(["fit", *config_args(configs), *extra])
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    datamodule = cli.datamodule
    return {
        "seconds": seconds,
        "steps": cli.trainer.global_step,
        "params": cli.model.model.num_params(),
        "model": cli.model.model_config.to_dict(),
        "tokens": cli.model.tokens_seen,
        "seq_len": datamodule.seq_len,
        "batch_size": datamodule.batch_size,
        "passkey_fraction": getattr(datamodule, "passkey_fraction", None),
        "metrics": {k: v for k, v in metrics.items() if k.startswith(("train/loss", "val/", "long_eval/"))},
    }


def evaluate(configs: list[str], eval_config: str, args: argparse.Namespace) -> tuple[dict[str, Any], float, Path]:
    """``lit-longctx test`` on the last checkpoint (in-process); (summary with the ``key_range`` of the evaluated
    prompts, seconds, run directory)."""
    from lit_longctx.cli import _make_cli

    grid = [f"--data.lengths={json.dumps(args.lengths)}", f"--data.depths={json.dumps(args.depths)}",
            f"--data.trials={args.trials}"]
    start = time.perf_counter()
    cli = _make_cli(["test", *config_args(configs), "--config", eval_config, "--ckpt_path", "last", *grid,
                     *args.test_arg])
    seconds = time.perf_counter() - start
    run = Path(cli.trainer.log_dir or cli.trainer.default_root_dir)
    results = json.loads((run / "results.json").read_text())
    task = next(k for k in results if k != "global_step")
    return {**results[task], "key_range": list(cli.datamodule.key_range)}, seconds, run


def pct(x: float) -> str:
    return f"{100 * x:.0f}"


def markdown(args: argparse.Namespace, summary: dict[str, Any], facts: dict[str, Any] | None, test_seconds: float,
             run: Path, loads: tuple[float, float]) -> str:
    import torch

    lines = [args.section, ""]
    by_length = {r["length"]: r for r in summary["by_length"]}
    per_length = summary["by_length"][0]["total"]
    lines += [
        f"{summary['task']} accuracy (%) by prompt length in tokens ({per_length} prompts per length: "
        f"{len(summary['depths'])} depths x {args.trials} trials, keys {summary['key_range'][0]}-"
        f"{summary['key_range'][1]}; greedy, 10 new tokens, first integer must equal the key):",
        "",
        "| run | " + " | ".join(str(n) for n in summary["lengths"]) + " |",
        "|---|" + "---:|" * len(summary["lengths"]),
        f"| {args.label} | " + " | ".join(pct(by_length[n]["accuracy"]) for n in summary["lengths"]) + " |",
        "",
        "By needle depth (fraction of the filler before the needle):",
        "",
        "| length | tokens | " + " | ".join(f"d={d:g}" for d in summary["depths"]) + " | all |",
        "|---:|---:|" + "---:|" * (len(summary["depths"]) + 1),
    ]
    cells = {(c["length"], c["depth"]): c for c in summary["cells"]}
    for n in summary["lengths"]:
        accs = [pct(cells[n, d]["accuracy"]) if (n, d) in cells else "-" for d in summary["depths"]]
        lines.append(f"| {n} | {by_length[n]['mean_tokens']:.1f} | " + " | ".join(accs)
                     + f" | {pct(by_length[n]['accuracy'])} |")
    lines.append("")
    if facts is not None:
        m = facts["model"]
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(facts["metrics"].items()))
        lines.append(
            f"Training: {facts['params'] / 1e6:.2f}M parameters (dim {m['dim']}, {m['n_layers']} layers, "
            f"{m['n_heads']} heads, {m['n_kv_heads']} KV heads, attention {m['attention']}, RoPE theta "
            f"{m['rope']['rope_theta']:g}), {facts['steps']} steps of {facts['batch_size']} x {facts['seq_len']} "
            f"tokens ({facts['tokens'] / 1e6:.2f}M tokens), passkey fraction {facts['passkey_fraction']}; at the end: "
            f"{metrics}. Fit {facts['seconds'] / 60:.1f} min, evaluation {test_seconds / 60:.1f} min."
        )
    else:
        lines.append(f"Evaluation of the existing last checkpoint: {test_seconds / 60:.1f} min.")
    lines += [
        "",
        f"Measured {datetime.date.today().isoformat()} on {cpu_name()} ({os.cpu_count()} logical CPUs, "
        f"{torch.get_num_threads()} torch threads), Python {platform.python_version()}, torch {torch.__version__}, "
        f"fp32. The machine was shared with other jobs (1-minute load average {loads[0]:.1f} at the start, "
        f"{loads[1]:.1f} at the end), so runtimes are noisy. Run directory of the evaluation: `{run}`.",
        "",
        "Commands (the script runs the two `lit-longctx` commands in-process):",
        "",
        "```",
        "python bench/passkey_curve.py " + " ".join(shlex.quote(a) for a in args.argv),
    ]
    configs = " ".join(f"--config {c}" for c in args.train_config)
    grid = (f"--data.lengths='{json.dumps(args.lengths)}' --data.depths='{json.dumps(args.depths)}' "
            f"--data.trials={args.trials}")
    if not args.skip_fit:
        lines.append(f"# = lit-longctx fit {configs} " + " ".join(shlex.quote(a) for a in args.fit_arg))
    lines += [f"#   lit-longctx test {configs} --config {args.eval_config} --ckpt_path last {grid} "
              + " ".join(shlex.quote(a) for a in args.test_arg), "```", ""]
    return "\n".join(line.rstrip() for line in lines)




def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train-config", action="append", default=None,
                   help="training config (repeat to compose, left to right); default configs/passkey_train.yaml")
    p.add_argument("--eval-config", default="configs/eval/passkey.yaml", help="evaluation config composed after")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096],
                   help="prompt lengths in tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths")
    p.add_argument("--trials", type=int, default=5, help="prompts per (length, depth) cell")
    p.add_argument("--label", default="causal (RoPE), trained at 256", help="row label of the table")
    p.add_argument("--section", default=DEFAULT_SECTION, help="markdown heading of the section")
    p.add_argument("--out", type=Path, default=None, help="markdown file whose section to replace (or append)")
    p.add_argument("--skip-fit", action="store_true", help="evaluate the config's existing last checkpoint")
    p.add_argument("--fit-arg", action="append", default=[],
                   help="extra argument for fit, e.g. --fit-arg=--trainer.max_steps=100 (repeatable)")
    p.add_argument("--test-arg", action="append", default=[], help="extra argument for test (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    args.train_config = args.train_config or ["configs/passkey_train.yaml"]
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for name in ("lengths", "depths"):
        setattr(args, name, list(dict.fromkeys(getattr(args, name))))
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    loads = [os.getloadavg()[0]]
    facts = None if args.skip_fit else fit(args.train_config, args.fit_arg)
    summary, test_seconds, run = evaluate(args.train_config, args.eval_config, args)
    loads.append(os.getloadavg()[0])
    section = markdown(args, summary, facts, test_seconds, run, (loads[0], loads[1]))
    print(section)
    if args.out is not None:
        write_section(args.out, section, args.section, "# Results")
    return section


if __name__ == "__main__":
    main()
