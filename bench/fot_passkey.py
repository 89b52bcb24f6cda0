"""FoT micro-reproduction: passkey retrieval far beyond the local length through the memory (an experiment, not a test).

FoT's claim (Tworkowski et al. 2023, §4.3 and Fig. 1: LongLLaMA retrieves the passkey far beyond its 2K local length,
OpenLLaMA fails past 2K), at CPU scale: ``configs/fot_passkey.yaml`` trains the passkey baseline's model (the
quickstart-style 1.3M-parameter LLaMA of ``configs/passkey_train.yaml``, T = 256) with FoT (memory layer 2 of 4,
``doc_aware_k4``, r = 3, passkey documents up to 4T mixed with text), then the standard passkey prompt is evaluated
at 256 ... 4096 tokens (up to 16x T) through the normal command path,
``lit-longctx test --config configs/fot_passkey.yaml --config configs/eval/passkey.yaml --ckpt_path last``
(in-process, with ``bench/passkey_curve.py``'s helpers), in two ways:

- ``memory``: :class:`~lit_longctx.nn.attention.fot.FoTSession` as configured: the prompt's prefix enters the memory
  in windows of W = 256 tokens, the last ``last_context_length`` = 128 stay local;
- ``no memory`` (ablation, the same weights): ``session_kwargs {context_window: 65536, last_context_length: 65536}``
  keeps the whole prompt in the local window, so memory layers are ordinary causal RoPE layers over positions up to N
  (what a plain model does beyond its training length).

With ``--baseline-config`` the plain baseline (``configs/passkey_train.yaml``) is trained and evaluated on the same grid
too. Prints a markdown section (tables, training facts, runtimes, hardware, exact commands) and with ``--out`` replaces
the ``## FoT`` section of that file.

Usage:
    python bench/fot_passkey.py --out docs/results.md
    python bench/fot_passkey.py --skip-fit                      # evaluate the existing last checkpoint
    python bench/fot_passkey.py --baseline-config configs/passkey_train.yaml
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import passkey_curve  # noqa: E402  (bench/ is not a package)
from benchlib import cpu_name, write_section  # noqa: E402

SECTION = "## FoT"
NO_MEMORY = {"context_window": 65536, "last_context_length": 65536}


def last_checkpoint(run: Path) -> Path:
    """The newest last.ckpt of the run whose evaluation directory is ``run`` (``<root>/logs/version_N``)."""
    found = list(run.parents[1].rglob("last*.ckpt"))
    if not found:
        raise FileNotFoundError(f"no last.ckpt under {run.parents[1]}")
    return max(found, key=lambda p: p.stat().st_mtime)


def run_eval(configs: list[str], args: argparse.Namespace, extra: list[str]) -> tuple[dict[str, Any], float, Path]:
    """``lit-longctx test`` of the configs' last checkpoint on the passkey grid (passkey_curve.evaluate)."""
    ns = argparse.Namespace(lengths=args.lengths, depths=args.depths, trials=args.trials, test_arg=extra)
    return passkey_curve.evaluate(configs, args.eval_config, ns)


def teacher_forced(checkpoint: str, seq_len: int, key_range: tuple[int, int] = (1, 999), n_docs: int = 24,
                   seed: int = 777) -> dict[str, str]:
    """Why retrieval works or not: the share of passkey documents whose answer tokens are all predicted (argmax,
    teacher-forced) by the checkpoint, in four settings:

    - ``local``: documents of T tokens (needle and question in one window), plain attention;
    - ``cross-batch pack``: documents of 4T tokens laid out as a ``doc_aware_k4`` pack (rows = windows; a second copy of
      the pack supplies the negatives), cross-batch r = 3 as in training; only documents whose needle lies in an
      earlier window than the question count;
    - ``memory`` and ``no memory``: the same 4T documents through FoTSession as configured / with the whole document
      local.
    """
    import torch

    from lit_longctx.checkpoint import load_model
    from lit_longctx.eval.passkey import build_task
    from lit_longctx.nn.attention.fot import FoTSession

    model, tokenizer, _ = load_model(checkpoint)
    model.eval()
    task = build_task("passkey", tokenizer, seed=seed, bos=True, key_range=key_range)
    hits = {"local": [0, 0], "cross-batch pack": [0, 0], "memory": [0, 0], "no memory": [0, 0]}

    def solved(logits: torch.Tensor, ids: list[int], start: int) -> bool:
        answer = list(range(start - 1, len(ids) - 2))  # positions predicting the answer tokens (EOS excluded)
        return bool((logits[answer].argmax(-1) == torch.tensor(ids[1:])[answer]).all())

    with torch.no_grad():
        for trial in range(n_docs):
            depth = trial / max(n_docs - 1, 1)
            doc = task.document(seq_len, depth, trial)
            logits = model(torch.tensor([doc.input_ids[:-1]]), cross_batch_range=0).logits[0]
            hits["local"][0] += solved(logits, doc.input_ids, doc.answer_start)
            hits["local"][1] += 1
            doc = task.document(4 * seq_len, 0.75 * depth, trial)  # needle in the first three quarters
            ids = doc.input_ids + [tokenizer.eos_id] * (4 * seq_len + 1 - len(doc.input_ids))
            if doc.needle_token // seq_len < (doc.answer_start - 1) // seq_len:
                pack = torch.tensor(ids[: 4 * seq_len]).reshape(4, seq_len).repeat(2, 1)
                out = model(pack, cross_batch_range=3, dataset_packing=4).logits[4:].reshape(4 * seq_len, -1)
                hits["cross-batch pack"][0] += solved(out, doc.input_ids, doc.answer_start)
                hits["cross-batch pack"][1] += 1
            prompt = torch.tensor([doc.input_ids[:-1]])
            for name, kwargs in (("memory", {}), ("no memory", NO_MEMORY)):
                out = FoTSession(model, 1, **kwargs).forward_logits(prompt)[0]
                hits[name][0] += solved(out, doc.input_ids, doc.answer_start)
                hits[name][1] += 1
    return {name: f"{ok}/{n}" for name, (ok, n) in hits.items()}


def accuracy_row(label: str, summary: dict[str, Any]) -> str:
    by_length = {r["length"]: r for r in summary["by_length"]}
    return f"| {label} | " + " | ".join(passkey_curve.pct(by_length[n]["accuracy"]) for n in summary["lengths"]) + " |"


def depth_table(summary: dict[str, Any]) -> list[str]:
    cells = {(c["length"], c["depth"]): c for c in summary["cells"]}
    by_length = {r["length"]: r for r in summary["by_length"]}
    lines = ["| length | tokens | " + " | ".join(f"d={d:g}" for d in summary["depths"]) + " | all |",
             "|---:|---:|" + "---:|" * (len(summary["depths"]) + 1)]
    for n in summary["lengths"]:
        accs = [passkey_curve.pct(cells[n, d]["accuracy"]) if (n, d) in cells else "-" for d in summary["depths"]]
        lines.append(f"| {n} | {by_length[n]['mean_tokens']:.1f} | " + " | ".join(accs)
                     + f" | {passkey_curve.pct(by_length[n]['accuracy'])} |")
    return lines


def facts_line(facts: dict[str, Any]) -> str:
    m = facts["model"]
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(facts["metrics"].items()))
    fot = m["attention_options"].get("fot", {})
    layers = sorted(int(i) for i, kind in m["layer_attention"].items() if kind == "fot")
    memory = (f"memory layers {layers}, cross_batch_range {fot.get('cross_batch_range')}, dataset_packing "
              f"{fot.get('dataset_packing')}, last_context_length {fot.get('last_context_length')}, "
              if layers else "plain causal attention, ")
    return (f"{facts['params'] / 1e6:.2f}M parameters (dim {m['dim']}, {m['n_layers']} layers, {m['n_heads']} heads), "
            f"{memory}{facts['steps']} steps of {facts['batch_size']} x {facts['seq_len']} tokens "
            f"({facts['tokens'] / 1e6:.2f}M tokens); at the end: {metrics}; fit {facts['seconds'] / 60:.1f} min")


def markdown(args: argparse.Namespace, rows: list[tuple[str, dict[str, Any]]], fot_memory: dict[str, Any],
             facts: dict[str, dict[str, Any]], seconds: dict[str, float], cpu: tuple[float, float],
             loads: tuple[float, float], diagnosis: dict[str, dict[str, str]]) -> str:
    import torch

    lengths = rows[0][1]["lengths"]
    per_length = rows[0][1]["by_length"][0]["total"]
    lines = [
        SECTION, "",
        "### Passkey retrieval beyond the local length (micro-reproduction of FoT §4.3 / Fig. 1)", "",
        f"Passkey accuracy (%) by prompt length in tokens ({per_length} prompts per length: {len(args.depths)} depths "
        f"x {args.trials} trials; greedy, 10 new tokens, first integer must equal the key). Every model here was "
        "trained on windows of T = 256 tokens.", "",
        "| run | " + " | ".join(str(n) for n in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
        *(accuracy_row(label, summary) for label, summary in rows), "",
        "FoT with memory, by needle depth (fraction of the filler before the needle):", "",
        *depth_table(fot_memory), "",
        "Teacher-forced retrieval (documents whose answer tokens are all the argmax, `teacher_forced` in the script): "
        "local = T-token documents; cross-batch pack = 4T-token documents as a training pack with r = 3, needle in an "
        "earlier window than the question; memory / no memory = the same 4T documents through FoTSession:", "",
        "| checkpoint | " + " | ".join(next(iter(diagnosis.values()))) + " |",
        "|---|" + "---:|" * len(next(iter(diagnosis.values()))),
        *(f"| {label} | " + " | ".join(d.values()) + " |" for label, d in diagnosis.items()), "",
    ]
    for label, f in facts.items():
        lines.append(f"- {label}: {facts_line(f)}.")
    evals = ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
    lines += [
        f"- Evaluation: {evals}. CPU time of the whole script {cpu[1] - cpu[0]:.0f} s.", "",
        f"Measured {datetime.date.today().isoformat()} on {cpu_name()} ({os.cpu_count()} logical CPUs, "
        f"{torch.get_num_threads()} torch threads), Python {platform.python_version()}, torch {torch.__version__}, "
        f"fp32; the machine was shared with other jobs (1-minute load average {loads[0]:.1f} at the start, "
        f"{loads[1]:.1f} at the end), so wall times are noisy.", "",
        "Commands (the script runs the `lit-longctx` commands in-process):", "",
        "```",
        "python bench/fot_passkey.py " + " ".join(shlex.quote(a) for a in args.argv),
    ]
    grid = (f"--data.lengths='{json.dumps(args.lengths)}' --data.depths='{json.dumps(args.depths)}' "
            f"--data.trials={args.trials}")
    configs = " ".join(f"--config {c}" for c in args.config)
    lines += [f"# = lit-longctx fit {configs}",
              f"#   lit-longctx test {configs} --config {args.eval_config} --ckpt_path last {grid}",
              f"#   lit-longctx test {configs} --config {args.eval_config} --ckpt_path last {grid} "
              f"--data.session_kwargs='{json.dumps(NO_MEMORY)}'   # no memory"]
    if args.baseline_config:
        base = " ".join(f"--config {c}" for c in args.baseline_config)
        lines += [f"#   lit-longctx fit {base}",
                  f"#   lit-longctx test {base} --config {args.eval_config} --ckpt_path last {grid}"]
    lines += ["```", ""]
    return "\n".join(line.rstrip() for line in lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", action="append", default=None,
                   help="FoT training config (repeat to compose); default configs/fot_passkey.yaml")
    p.add_argument("--baseline-config", action="append", default=None,
                   help="also train and evaluate this plain baseline config (e.g. configs/passkey_train.yaml)")
    p.add_argument("--eval-config", default="configs/eval/passkey.yaml", help="evaluation config composed after")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096], help="prompt lengths")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths")
    p.add_argument("--trials", type=int, default=5, help="prompts per (length, depth) cell")
    p.add_argument("--skip-fit", action="store_true", help="evaluate the configs' existing last checkpoints")
    p.add_argument("--seq-len", type=int, default=256, help="T of the models (for the teacher-forced diagnosis)")
    p.add_argument("--key-range", type=int, nargs=2, default=[1, 999],
                   help="keys of the teacher-forced diagnosis (the training data's key_range: "
                        "configs/fot_passkey.yaml's 1-999)")
    p.add_argument("--out", type=Path, default=None, help="markdown file whose '## FoT' section to replace")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    args.config = args.config or ["configs/fot_passkey.yaml"]
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    loads, cpu = [os.getloadavg()[0]], [time.process_time()]
    facts: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    rows: list[tuple[str, dict[str, Any]]] = []
    diagnosis: dict[str, dict[str, str]] = {}
    if args.baseline_config:
        if not args.skip_fit:
            facts["baseline"] = passkey_curve.fit(args.baseline_config, [])
        summary, seconds["baseline"], run = run_eval(args.baseline_config, args, [])
        rows.append(("causal baseline (RoPE), trained at 256", summary))
        diagnosis["baseline"] = teacher_forced(str(last_checkpoint(run)), args.seq_len, tuple(args.key_range))
    if not args.skip_fit:
        facts["FoT"] = passkey_curve.fit(args.config, [])
    memory, seconds["FoT memory"], run = run_eval(args.config, args, [])
    no_memory, seconds["FoT no memory"], _ = run_eval(
        args.config, args, [f"--data.session_kwargs={json.dumps(NO_MEMORY)}"])
    rows += [("FoT, memory (W = 256, last_context_length = 128)", memory),
             ("FoT weights, no memory (whole prompt local)", no_memory)]
    diagnosis["FoT"] = teacher_forced(str(last_checkpoint(run)), args.seq_len, tuple(args.key_range))
    loads.append(os.getloadavg()[0])
    cpu.append(time.process_time())
    section = markdown(args, rows, memory, facts, seconds, (cpu[0], cpu[1]), (loads[0], loads[1]), diagnosis)
    print(section)
    if args.out is not None:
        write_section(args.out, section, SECTION, "# Results")
    return section


if __name__ == "__main__":
    main()
