"""The contract between evaluation batches (those with a ``task`` key) and the LightningModule.

``CausalLM.test_step(batch, ...)`` calls :func:`test_step` when ``"task" in batch``; ``on_test_epoch_start`` calls
:func:`on_test_epoch_start` and ``on_test_epoch_end`` calls :func:`on_test_epoch_end`, which gathers the per-prompt
records of all ranks, prints a table per task, writes ``results.json`` and the plots into the run directory, and logs
the numbers (``module.log_dict``) and the figures (TensorBoard / wandb). ``predict_step`` may call
:func:`predict_step` to get the per-prompt records.

What the module must provide: ``model`` (a ``lit_longctx.nn.Transformer``), ``tokenizer`` (a
``lit_longctx.tokenizers.Tokenizer``, for decoding answers), ``inference_session(batch_size=1, **kw)`` (a fresh
``DecodingSession`` of the method's own inference path: KV cache, FoT memory, landmark retrieval, ...; ``kw`` are the
batch's ``session_kwargs``, if any), ``trainer``, ``loggers`` and ``log_dict``.

Tasks:
- ``passkey`` / ``multikey``: greedy generation of ``max_new_tokens`` through the session; correct when the first
  integer of the continuation (cut at EOS) equals ``answer``. Exactly ``max_new_tokens`` steps run even after EOS, so
  ranks of a sharded model stay in lockstep.
- RULER's tasks (``niah_*``, ``vt``, ``cwe``, ``fwe``, ``qa``; :mod:`lit_longctx.eval.ruler`): greedy generation as
  above, scored by RULER's string match against the batch's list of answers (partial credit in ``score``).
- ``ppl_by_position``: per-token NLL over the window through the session, summed into position buckets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from lit_longctx.eval.passkey import TASKS as RETRIEVAL_TASKS
from lit_longctx.eval.passkey import score_answer, summarize_retrieval
from lit_longctx.eval.perplexity import TASK as PPL_TASK
from lit_longctx.eval.perplexity import bucket_sums, per_token_nll, summarize_ppl
from lit_longctx.eval.report import run_dir, summary_metrics, write_report
from lit_longctx.eval.ruler import RULER_TASKS, ruler_score
from lit_longctx.nn.generate import generate

EVAL_TASKS = (*RETRIEVAL_TASKS, *RULER_TASKS, PPL_TASK)
_RECORDS = "_long_eval_records"


def _scalar(x: Any) -> Any:
    return x.item() if isinstance(x, torch.Tensor) else x


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def new_session(module: Any, batch: dict[str, Any]) -> Any:
    """A fresh batch-size-1 inference session of the module, with the batch's ``session_kwargs``."""
    return module.inference_session(batch_size=1, **(batch.get("session_kwargs") or {}))


def generated_answer(module: Any, batch: dict[str, Any]) -> str:
    """The greedy continuation of the batch's prompt through the module's session, cut at EOS, as text."""
    tokenizer = module.tokenizer
    if tokenizer is None:
        raise ValueError(
            f"the {batch['task']} task decodes the model's answer and needs module.tokenizer; give the module a "
            "tokenizer (model.tokenizer in the config, or one saved with the checkpoint)"
        )
    new = generate(module.model, batch["input_ids"], int(_scalar(batch["max_new_tokens"])),
                   session=new_session(module, batch))[0]
    if tokenizer.eos_id is not None and tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    return tokenizer.decode(new)


def _grid_record(batch: dict[str, Any]) -> dict[str, Any]:
    return {
        "task": batch["task"],
        "index": int(_scalar(batch["index"])),
        "length": int(_scalar(batch["length"])),
        "depth": float(_scalar(batch["depth"])),
        "trial": int(_scalar(batch["trial"])),
        "n_tokens": int(batch["input_ids"].shape[1]),
        "needle_token": int(_scalar(batch["needle_token"])),
    }


def retrieval_record(module: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """Generate greedily for one retrieval prompt and score it (the first integer must equal the key)."""
    output = generated_answer(module, batch)
    answer = int(_scalar(batch["answer"]))
    prediction, correct = score_answer(output, answer)
    record = {**_grid_record(batch), "answer": answer, "prediction": prediction, "correct": correct, "output": output}
    if "name" in batch:
        record["name"] = batch["name"]
    return record


def ruler_record(module: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """Generate greedily for one RULER prompt and score it by string match (partial credit in ``score``)."""
    output = generated_answer(module, batch)
    answers = list(batch["answer"])
    score = ruler_score(batch["task"], output, answers)
    return {**_grid_record(batch), "answer": answers, "prediction": output, "score": score, "correct": score == 1.0,
            "output": output}


def ppl_record(module: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """Per-token NLL of one window, summed per position bucket."""
    with eval_mode(module.model):
        nll = per_token_nll(new_session(module, batch), batch["input_ids"])
    edges = [int(_scalar(e)) for e in batch["edges"]]
    sums, counts = bucket_sums(nll.cpu(), edges)
    return {"task": PPL_TASK, "index": int(_scalar(batch["index"])), "edges": edges, "nll_sum": sums,
            "count": counts, "offset": int(_scalar(batch.get("offset", 0)))}


def evaluate_batch(module: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The record of one evaluation batch (dispatch on ``batch["task"]``)."""
    task = batch.get("task")
    if task in RETRIEVAL_TASKS:
        return retrieval_record(module, batch)
    if task == PPL_TASK:
        return ppl_record(module, batch)
    if task in RULER_TASKS:
        return ruler_record(module, batch)
    raise ValueError(f"unknown evaluation task {task!r} in the batch; known tasks: {', '.join(EVAL_TASKS)}")


def on_test_epoch_start(module: Any) -> None:
    """Forget records of an earlier (possibly interrupted) test run."""
    setattr(module, _RECORDS, [])


def test_step(module: Any, batch: dict[str, Any]) -> None:
    """Evaluate one batch and keep its record on the module until :func:`on_test_epoch_end`."""
    if not hasattr(module, _RECORDS):
        on_test_epoch_start(module)
    getattr(module, _RECORDS).append(evaluate_batch(module, batch))


def predict_step(module: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The record of one batch (nothing is kept)."""
    return evaluate_batch(module, batch)


def gather_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records of every rank (``all_gather_object`` when a process group is up), each prompt once.

    The datasets pad ranks to equal counts by repeating prompts; the repeats carry the same ``(task, index)``.
    """
    records = list(records)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    unique: dict[tuple[str, int], dict[str, Any]] = {}
    for r in records:
        unique.setdefault((r["task"], r["index"]), r)
    return list(unique.values())


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Task name -> summary (accuracy grid or perplexity buckets)."""
    results = {}
    for task in dict.fromkeys(r["task"] for r in records):
        rs = [r for r in records if r["task"] == task]
        results[task] = summarize_ppl(rs) if task == PPL_TASK else summarize_retrieval(rs)
    return results


def on_test_epoch_end(module: Any) -> dict[str, dict[str, Any]]:
    """Gather, summarize, log, and (on global rank 0) print tables and write ``results.json`` and the plots.

    Call on every rank. Returns the summaries (empty when the epoch had no evaluation batches).
    """
    records = gather_records(getattr(module, _RECORDS, []))
    on_test_epoch_start(module)
    if not records:
        return {}
    results = summarize(records)
    trainer = module.trainer
    directory = run_dir(trainer)
    module.log_dict(
        {f"{task}/{k}": float(v) for task, summary in results.items() for k, v in summary_metrics(summary).items()},
        sync_dist=True,
    )
    if trainer.is_global_zero:
        write_report(results, directory, loggers=trainer.loggers, step=trainer.global_step)
    return results
