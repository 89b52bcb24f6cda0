"""RULER subset and the lm-evaluation-harness wrapper on existing checkpoints, one table (docs/results.md).

Each checkpoint is loaded with ``lit_longctx.checkpoint.load_model`` and scored through its method's own session
(``session_for``: KV cache, FoT memory, landmark retrieval, LoLCATs' linear state), exactly as ``lit-longctx test
--config configs/eval/ruler.yaml`` and ``lit-longctx evaluate`` do; the session column names the session class and
the per-layer cache classes it ran with. The harness part runs a small local multiple-choice task (written here) so
that it needs no download, on every checkpoint or on those named by ``--harness``.

    python bench/ruler_eval.py --checkpoints NAME=PATH [NAME=PATH ...] --lengths 256 512 1024 \
        --tasks niah_single niah_multikey vt cwe fwe --trials 4 [--session NAME='{"top_k": 3}'] \
        [--harness NAME ...] --write docs/results.md
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from benchlib import cpu_name, write_section

from lit_longctx.checkpoint import load_model
from lit_longctx.datamodules.ruler import RulerData
from lit_longctx.eval import tasks
from lit_longctx.nn import session_for


class _Module:
    """The module side of the evaluation contract for a loaded model (what a LightningModule provides); ``session``
    are the checkpoint's own session options (e.g. landmark ``top_k``), under any a batch sends."""

    def __init__(self, model, tokenizer, session: dict | None = None) -> None:
        self.model, self.tokenizer, self.session = model.eval(), tokenizer, dict(session or {})

    def inference_session(self, batch_size: int = 1, **kwargs):
        return session_for(self.model, batch_size, **{**self.session, **kwargs})


def session_label(module: _Module) -> str:
    """The session class and the distinct per-layer cache classes it holds, e.g. ``FoTSession(FoTCache, KVCache)``:
    what the prompts actually went through."""
    session = module.inference_session(1)
    caches = sorted({type(c).__name__ for c in getattr(getattr(session, "state", None), "caches", [])})
    return f"{type(session).__name__}({', '.join(caches)})" if caches else type(session).__name__


def reachable_lengths(tokenizer, task: str, lengths: list[int], seed: int) -> list[int]:
    """The lengths a task's prompt can have with this tokenizer: a prompt longer than the length even without filler
    (e.g. cwe's word list at 256 tokens) is an error of the task, and that cell is left out of the table."""
    data = RulerData(tokenizer=tokenizer, tasks=[task], lengths=lengths, trials=1, seed=seed)
    probe = data.build_task(task, tokenizer)
    out = []
    for n in lengths:
        try:
            probe.sample(n, 0.0, 0)
        except ValueError as e:
            if "shorter than the prompt without filler" not in str(e):
                raise
        else:
            out.append(n)
    return out


def ruler_scores(module, lengths, task_names, trials, seed) -> tuple[dict[str, dict[int, float]], list[dict]]:
    """Accuracy by task and length (reachable lengths only), and the per-prompt records (prompt metadata, expected
    answers, output)."""
    records = []
    for task in task_names:
        reachable = reachable_lengths(module.tokenizer, task, lengths, seed)
        if not reachable:
            continue
        dm = RulerData(tokenizer=module.tokenizer, tasks=[task], lengths=reachable, depths=[0.0, 0.5, 1.0],
                       trials=trials, seed=seed, max_new_tokens=32)
        records += [tasks.evaluate_batch(module, b) for b in dm.test_dataloader()]
    summary = tasks.summarize(records)
    return {t: {row["length"]: row["accuracy"] for row in s["by_length"]} for t, s in summary.items()}, records


def mc_task(directory: Path, n: int = 40) -> Path:
    """A 4-way multiple-choice task over a local jsonl: complete a sentence of Python's documentation style."""
    import random

    rng = random.Random(0)
    words = ["statement", "function", "module", "object", "class", "method", "string", "number", "list", "file"]
    docs = []
    for _ in range(n):
        right = rng.choice(words)
        wrong = rng.sample([w for w in words if w != right], 3)
        choices = [right, *wrong]
        rng.shuffle(choices)
        docs.append({"question": f"The {right} is defined in the", "choices": choices, "gold": choices.index(right)})
    (directory / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / "tasks").mkdir(exist_ok=True)
    (directory / "tasks" / "repeat_mc.yaml").write_text(f"""task: repeat_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
""")
    return directory / "tasks"


def harness_acc(module: _Module, include: Path) -> tuple[float, list[str]]:
    """Accuracy on the local multiple-choice task and the session classes its requests went through."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lit_longctx.eval.harness import SessionLM

    lm = SessionLM(module.model, module.tokenizer, session_kwargs=module.session)
    out = simple_evaluate(model=lm, tasks=["repeat_mc"], log_samples=False,
                          task_manager=TaskManager(include_path=str(include), include_defaults=False))
    return out["results"]["repeat_mc"]["acc,none"], sorted(lm.session_types)


def _pairs(ap: argparse.ArgumentParser, specs: list[str], what: str) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value:
            ap.error(f"{what} {spec!r} is not NAME=VALUE")
        out[name] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", required=True, help="NAME=PATH pairs")
    ap.add_argument("--session", nargs="+", default=[], help="NAME=JSON session options of a checkpoint")
    ap.add_argument("--harness", nargs="*", default=None,
                    help="checkpoints to run the harness task on (default all; none when given empty)")
    ap.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024])
    ap.add_argument("--tasks", nargs="+", default=["niah_single", "niah_multikey", "vt", "cwe", "fwe"])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", type=Path, default=None, help="results file to update (a section of its own)")
    ap.add_argument("--records", type=Path, default=None, help="write every prompt's record here (json)")
    args = ap.parse_args()
    checkpoints = _pairs(ap, args.checkpoints, "--checkpoints")
    sessions = {}
    for name, value in _pairs(ap, args.session, "--session").items():
        try:
            sessions[name] = json.loads(value)
        except json.JSONDecodeError as e:
            ap.error(f"--session {name}={value!r} is not JSON ({e}); e.g. --session {name}='{{\"top_k\": 3}}'")
    harness = set(checkpoints if args.harness is None else args.harness)
    unknown = (set(sessions) | harness) - set(checkpoints)
    if unknown:
        ap.error(f"--session/--harness name(s) {sorted(unknown)} are not in --checkpoints")
    torch.set_num_threads(args.threads)
    rows, start, cpu_start, all_records = [], time.time(), time.process_time(), {}
    with tempfile.TemporaryDirectory() as d:
        include = mc_task(Path(d))
        for name, path in checkpoints.items():
            t0, c0 = time.time(), time.process_time()
            model, tokenizer, loaded = load_model(path)
            module = _Module(model, tokenizer, sessions.get(name))
            scores, all_records[name] = ruler_scores(module, args.lengths, args.tasks, args.trials, args.seed)
            acc, used = harness_acc(module, include) if name in harness else (None, [])
            rows.append((name, loaded.method, session_label(module), scores, acc))
            seconds = (time.time() - t0, time.process_time() - c0)
            print(name, json.dumps(scores), f"harness repeat_mc acc {acc} via {used}",
                  f"{seconds[0]:.0f} s wall, {seconds[1]:.0f} s CPU", flush=True)
    if args.records:
        args.records.write_text(json.dumps(all_records, indent=1, default=str))
    # one column per task, its cell the accuracies at every length ("a/b/c"): a table that still fits a page
    header = "| checkpoint | method | session | " + " | ".join(args.tasks) + " | harness repeat_mc acc |"
    lengths = "/".join(map(str, args.lengths))
    lines = [header, "|" + "---|" * 3 + "---:|" * (len(args.tasks) + 1),
             "| *(lengths)* | | | " + " | ".join(lengths for _ in args.tasks) + " | |"]
    for name, method, session, scores, acc in rows:
        cells = ["/".join(f"{100 * scores[t][n]:.0f}" if n in scores.get(t, {}) else "-" for n in args.lengths)
                 for t in args.tasks]
        harness_cell = "-" if acc is None else f"{100 * acc:.1f}"
        lines.append(f"| {name} | {method} | {session} | " + " | ".join(cells) + f" | {harness_cell} |")
    quoted = {"session": [f"{k}='{json.dumps(v)}'" for k, v in sessions.items()]}
    cmd = "python bench/ruler_eval.py " + " ".join(
        f"--{k} {' '.join(map(str, quoted.get(k, v))) if isinstance(v, list) else v}" for k, v in vars(args).items()
        if k not in ("write", "records") and v is not None and (v or k == "harness"))
    section = "\n".join([
        "## RULER subset and harness pipeline (tiny checkpoints)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {cpu_name()}, Python {platform.python_version()}, torch "
        f"{torch.__version__}, fp32, {args.threads} thread(s), {time.time() - start:.0f} s of wall time and "
        f"{time.process_time() - cpu_start:.0f} s of CPU time in all. Accuracy in % (RULER's string match with "
        f"partial credit), {args.trials} prompts per (length, depth) cell, depths 0, 0.5, 1 (cwe/fwe: no depth), "
        "32 new tokens; - = not run (a prompt of that task does not fit in that length even without filler, or "
        "no harness run); the harness column is a local 4-way multiple-choice task of 40 questions (chance = 25 %).",
        "",
        *lines,
        "",
        "```",
        cmd,
        "```",
    ])
    print(section)
    if args.write:
        write_section(args.write, section, "## RULER subset and harness pipeline (tiny checkpoints)", "# Results")


if __name__ == "__main__":
    main()
