"""``lit-longctx evaluate``: lm-evaluation-harness tasks on any checkpoint, through the method's inference path.

The checkpoint is read by the same loader as ``generate`` (an HF directory, a converted file, a fit ``.ckpt`` or a run
directory); :class:`lit_longctx.eval.harness.SessionLM` scores every request through the model's own decoding session,
``--batch_size`` requests at a time (one left-padded batch, longest requests first; each row equals the request alone).
Results are written as the harness writes them (``results.json``) plus a markdown table (``results.md``).

The harness's standard tasks (``hellaswag``, ``arc_easy``, ``piqa``, ``winogrande``, ``mmlu``, ...) download their
datasets from the Hugging Face hub when they first run, so they need a machine with hub access; custom tasks over local
files (``--include_path DIR`` holding task YAMLs with ``dataset_path: json``) run anywhere.
"""

from __future__ import annotations

import difflib
import json
import time
from pathlib import Path
from typing import Any

from lit_longctx.nn.config import ConfigError

INSTALL_HINT = 'pip install -e ".[eval]"'


def _harness() -> Any:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(f"`lit-longctx evaluate` needs the lm-evaluation-harness: {INSTALL_HINT}") from None
    from lm_eval.tasks import TaskManager

    return TaskManager


def _task_list(tasks: str | list[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ConfigError("--tasks is empty: name at least one task, e.g. --tasks hellaswag,arc_easy")
    return names


def check_tasks(names: list[str], task_manager: Any) -> None:
    """Every name is a task, group or tag the harness knows (with ``include_path``); else one clear error."""
    known = set(task_manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ConfigError(
            f"unknown evaluation task {', '.join(hints)}; list the harness's tasks with `lm-eval ls tasks`, or "
            "point --include_path at a directory of your own task YAMLs"
        )


def default_output_dir(checkpoint: str) -> Path:
    name = Path(str(checkpoint).rstrip("/")).name or "model"
    return Path("runs") / "evaluate" / f"{Path(name).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def evaluate(
    checkpoint: str,
    tasks: str,
    limit: float | None = None,
    batch_size: int = 1,
    num_fewshot: int | None = None,
    include_path: str | None = None,
    output_path: str | None = None,
    max_gen_toks: int = 256,
    device: str = "auto",
    dtype: str | None = None,
    session: dict[str, Any] | None = None,
    seed: int = 1234,
) -> dict[str, Any]:
    """Score a checkpoint on lm-evaluation-harness tasks through its method's inference path.

    Requests go through fresh sessions of the method (KV cache, FoT memory, landmark retrieval, LoLCATs state),
    ``batch_size`` at a time: sorted by length (longest first), left-padded into one batch, each row fed exactly as the
    request alone would be (so scores do not depend on the batch size); generation requests with equal settings share
    batches. A session that refuses a padded batch scores that batch one request at a time.

    Args:
        checkpoint: an HF directory, a lit-longctx checkpoint, a fit .ckpt or a run directory.
        tasks: comma-separated task names (harness tasks, or tasks defined under include_path).
        limit: at most this many documents per task (a fraction < 1 means that share of them).
        batch_size: requests scored together (1: one at a time).
        num_fewshot: few-shot examples per prompt (default: the task's own).
        include_path: a directory of extra task YAMLs (e.g. tasks over local json files).
        output_path: directory for results.json and results.md (default: runs/evaluate/NAME-TIME).
        max_gen_toks: default generation length for generation tasks that name none.
        device: cpu, cuda, or auto.
        dtype: compute dtype (default float32 on CPU, bfloat16 on CUDA).
        session: options for the model's decoding session (e.g. FoT's last_context_length, landmark top_k).
        seed: seed of few-shot sampling and of sampled generation.
    """
    import torch

    from lit_longctx.checkpoint import load_for_inference
    from lit_longctx.io import atomic_write_text, check_writable

    task_manager_cls = _harness()
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1 requests, got {batch_size}")
    names = _task_list(tasks)
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include_path {include_path!r} is not a directory of task YAMLs")
    task_manager = None
    if include_path:  # indexing the harness's own ~10k task YAMLs takes a while: skip it when the local ones suffice
        task_manager = task_manager_cls(include_path=include_path, include_defaults=False)
        if not set(names) <= set(task_manager.all_tasks):
            task_manager = None
    task_manager = task_manager or task_manager_cls(include_path=include_path)
    check_tasks(names, task_manager)
    out_dir = check_writable(output_path or default_output_dir(checkpoint), "evaluation output directory")

    model, tokenizer, _, device = load_for_inference(checkpoint, device, dtype)

    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable, make_table

    from lit_longctx.eval.harness import SessionLM

    lm = SessionLM(model, tokenizer, session_kwargs=session, max_gen_toks=max_gen_toks,
                   generator=torch.Generator(device=device).manual_seed(seed), batch_size=batch_size)
    results = simple_evaluate(
        model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=task_manager, log_samples=False,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    results = {k: v for k, v in (results or {}).items() if k != "samples"}
    results["lit_longctx"] = {"checkpoint": str(checkpoint), "sessions": sorted(lm.session_types)}
    table = make_table(results)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2, default=handle_non_serializable))
    atomic_write_text(out_dir / "results.md", table)
    print(table)
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return results
