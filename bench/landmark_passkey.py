"""Landmark attention micro-reproduction: passkey retrieval far beyond the trained length (an experiment, not a test).

Fine-tunes the plain passkey baseline (a ``configs/passkey_train.yaml`` checkpoint, ``--baseline-ckpt``) with landmark
attention at its own length of 256 regular tokens (``configs/landmark_passkey.yaml``, as the paper fine-tunes LLaMA),
then evaluates the standard passkey prompt through block retrieval (``LandmarkSession``) with ``lit-longctx test
--config configs/landmark_passkey.yaml --config configs/eval/passkey.yaml --ckpt_path last`` (in-process), once per
retrieval setting (``--top-k``, ``--selection``); then the control (the same continuation with plain attention,
``configs/landmark_passkey_control.yaml``) and the baseline checkpoint itself, both through a KV cache, on the same
prompts (same seed, grid and key range), so the rows of the table compare like with like. Prints a markdown section.

Usage:
    python bench/landmark_passkey.py                              # fit, evaluate, print
    python bench/landmark_passkey.py --skip-fit --out docs/results.md
    python bench/landmark_passkey.py --skip-fit --top-k 1 3 --selection per_token_and_head max_over_tokens
    # on the keys-1-999 baseline (runs/landmark_passkey_base999/, see configs/landmark_passkey_keys999.yaml):
    python bench/landmark_passkey.py --config configs/landmark_passkey.yaml \
        --config configs/landmark_passkey_keys999.yaml --control-config configs/landmark_passkey_control.yaml \
        --control-config configs/landmark_passkey_control_keys999.yaml \
        --baseline-ckpt runs/landmark_passkey_base999/last.ckpt --key-range 1 999 --top-k 3 1
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
SECTION = "## Landmark attention"




def config_args(configs: list[str]) -> list[str]:
    return [arg for config in configs for arg in ("--config", config)]


def fit(configs: list[str], extra: list[str]) -> dict[str, Any]:
    """``lit-longctx fit`` in-process; facts about the run."""
    from lit_longctx.cli import _make_cli

    start, cpu = time.perf_counter(), time.process_time()
    cli = _make_cli(["fit", *config_args(configs), *extra])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "steps": cli.trainer.global_step, "params": cli.model.model.num_params(), "tokens": cli.model.tokens_seen,
            "metrics": {k: v for k, v in metrics.items() if k.startswith(("train/loss", "val/loss", "long_eval/"))}}


def evaluate(configs: list[str], args: argparse.Namespace, session: dict[str, Any] | None, ckpt: str = "last",
             run_dir: str | None = None) -> dict[str, Any]:
    """``lit-longctx test`` with the passkey config on a checkpoint of the config; the passkey summary + timing.

    The grid and the key range are passed explicitly, so every model sees the same prompts."""
    from lit_longctx.cli import _make_cli

    grid = [f"--data.lengths={json.dumps(args.lengths)}", f"--data.depths={json.dumps(args.depths)}",
            f"--data.trials={args.trials}", f"--data.key_range={json.dumps(args.key_range)}"]
    if run_dir is not None:
        grid += [f"--trainer.default_root_dir={run_dir}", f"--trainer.logger.init_args.save_dir={run_dir}"]
    if session:
        grid.append(f"--data.session_kwargs={json.dumps(session)}")
    start, cpu = time.perf_counter(), time.process_time()
    cli = _make_cli(["test", *config_args(configs), "--config", args.eval_config, "--ckpt_path", ckpt, *grid])
    run = Path(cli.trainer.log_dir or cli.trainer.default_root_dir)
    results = json.loads((run / "results.json").read_text())
    return {"summary": results["passkey"], "seconds": time.perf_counter() - start, "configs": configs,
            "cpu_seconds": time.process_time() - cpu, "command": ["--ckpt_path", ckpt, *grid]}


def last_checkpoint(configs: list[str]) -> Path | None:
    """The newest last.ckpt under the run directory the (composed) configs name."""
    import yaml

    roots = [yaml.safe_load((REPO / c).read_text()).get("trainer", {}).get("default_root_dir") for c in configs]
    root = Path([r for r in roots if r][-1])
    found = list(root.rglob("last*.ckpt")) if root.exists() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def markdown(args: argparse.Namespace, rows: list[tuple[str, dict[str, Any]]], facts: dict[str, dict[str, Any]],
             loads: tuple[float, float]) -> str:
    import torch

    first = rows[0][1]["summary"]
    lengths, depths = first["lengths"], first["depths"]
    per_length = first["by_length"][0]["total"]
    lines = [SECTION, "", f"### {args.title}", "",
             f"Accuracy (%) by prompt length in tokens; {per_length} prompts per length ({len(depths)} depths x "
             f"{args.trials} trials, the same prompts in every row); greedy, 10 new tokens, the first integer must "
             "equal the key. Both models were trained on rows of 256 regular tokens.", "",
             "| model (inference) | " + " | ".join(str(n) for n in lengths) + " | eval CPU min |",
             "|---|" + "---:|" * (len(lengths) + 1)]
    for label, result in rows:
        by_length = {r["length"]: r for r in result["summary"]["by_length"]}
        cells = " | ".join(f"{100 * by_length[n]['accuracy']:.0f}" for n in lengths)
        lines.append(f"| {label} | {cells} | {result['cpu_seconds'] / 60:.1f} |")
    lines += ["", "Mean prompt tokens per length: " + ", ".join(
        f"{r['length']}: {r['mean_tokens']:.0f}" for r in first["by_length"]) + ".", ""]
    for label, result in rows:
        summary = result["summary"]
        cells = {(c["length"], c["depth"]): c for c in summary["cells"]}
        lines += [f"By needle depth, {label}:", "",
                  "| length | " + " | ".join(f"d={d:g}" for d in depths) + " |", "|---:|" + "---:|" * len(depths)]
        for n in lengths:
            lines.append(f"| {n} | " + " | ".join(
                f"{100 * cells[n, d]['accuracy']:.0f}" if (n, d) in cells else "-" for d in depths) + " |")
        lines.append("")
    for config, fact in facts.items():
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(fact["metrics"].items()))
        lines += [f"Fit of `{config}`: {fact['params'] / 1e6:.2f}M parameters, {fact['steps']} steps, "
                  f"{fact['tokens'] / 1e6:.2f}M tokens; at the end: {metrics}. {fact['seconds'] / 60:.1f} min wall, "
                  f"{fact['cpu_seconds'] / 60:.1f} min CPU.", ""]
    lines += [f"Measured {datetime.date.today().isoformat()} on {cpu_name()} ({os.cpu_count()} logical CPUs, "
              f"{torch.get_num_threads()} torch threads), Python {platform.python_version()}, torch "
              f"{torch.__version__}, fp32. The machine was shared with other jobs (1-minute load average "
              f"{loads[0]:.1f} at the start, {loads[1]:.1f} at the end), so wall times are inflated.", "",
              "Commands:", "", "```", "python bench/landmark_passkey.py " + " ".join(
                  shlex.quote(a) for a in args.argv), f"# = lit-longctx fit {' '.join(config_args(args.config))}"]
    if args.control_config:
        lines.append(f"#   lit-longctx fit {' '.join(config_args(args.control_config))}")
    for label, result in rows:
        lines.append(f"#   lit-longctx test {' '.join(config_args(result['configs']))} --config {args.eval_config} "
                     + " ".join(shlex.quote(a) for a in result["command"]) + f"   # {label}")
    lines += ["```", ""]
    return "\n".join(lines)




def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", default=None,
                   help="landmark training config (repeat to compose); default configs/landmark_passkey.yaml")
    p.add_argument("--title", default="Passkey retrieval beyond the trained length (micro-reproduction of Fig. 3)",
                   help="heading of the table's subsection")
    p.add_argument("--baseline-config", default="configs/passkey_train.yaml",
                   help="plain baseline's training config (evaluated when it has a checkpoint)")
    p.add_argument("--baseline-ckpt", default="runs/landmark_passkey_base/last.ckpt",
                   help="the baseline's checkpoint (the one the landmark model was fine-tuned from); if missing, the "
                        "newest last.ckpt under the baseline config's run directory")
    p.add_argument("--control-config", action="append", default=None,
                   help="the same continuation with plain attention (repeat to compose; fit unless --skip-fit; "
                        "evaluated when it has a checkpoint); default configs/landmark_passkey_control.yaml; empty: "
                        "none")
    p.add_argument("--eval-config", default="configs/eval/passkey.yaml")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--key-range", type=int, nargs=2, default=[1, 50000], help="inclusive range of the keys")
    p.add_argument("--top-k", type=int, nargs="+", default=[3], help="retrieval top-k values to evaluate")
    p.add_argument("--selection", nargs="+", default=["per_token_and_head"], help="retrieval selection methods")
    p.add_argument("--skip-fit", action="store_true", help="evaluate the existing last checkpoint")
    p.add_argument("--fit-arg", action="append", default=[], help="extra argument for fit (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="markdown file whose section to replace (or append)")
    args = p.parse_args(argv)
    args.config = args.config or ["configs/landmark_passkey.yaml"]
    args.control_config = [c for c in (args.control_config or ["configs/landmark_passkey_control.yaml"]) if c]
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(REPO)
    loads = [os.getloadavg()[0]]
    facts, rows = {}, []
    # each model is evaluated right after its fit, so a run cut short still leaves the landmark model's results.json
    if not args.skip_fit:
        facts[" + ".join(args.config)] = fit(args.config, args.fit_arg)
    for selection in args.selection:
        for k in args.top_k:
            rows.append((f"landmark (top-{k}, {selection})",
                         evaluate(args.config, args, {"top_k": k, "selection": selection})))
    if args.control_config and not args.skip_fit:
        facts[" + ".join(args.control_config)] = fit(args.control_config, args.fit_arg)
    if args.control_config and last_checkpoint(args.control_config) is not None:
        rows.append(("control: causal RoPE, same continuation (KV cache)",
                     evaluate(args.control_config, args, None)))
    baseline = args.baseline_ckpt if Path(args.baseline_ckpt).exists() else last_checkpoint([args.baseline_config])
    if baseline is not None:
        rows.append(("baseline: causal RoPE (KV cache)", evaluate([args.baseline_config], args, None, str(baseline),
                                                                   str(Path(baseline).parent / "eval"))))
    loads.append(os.getloadavg()[0])
    section = markdown(args, rows, facts, (loads[0], loads[1]))
    print(section)
    if args.out is not None:
        write_section(args.out, section, SECTION, "# Results")
    return section


if __name__ == "__main__":
    main()
