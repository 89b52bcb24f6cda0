"""Tables, plots, ``results.json`` and logger output of long-context evaluations.

Summaries come from :func:`lit_longctx.eval.passkey.summarize_retrieval` (accuracy by length x depth) and
:func:`lit_longctx.eval.perplexity.summarize_ppl` (perplexity by position bucket). Figures are built on
``matplotlib.figure.Figure`` directly (no pyplot state, no display backend needed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lit_longctx.eval.perplexity import TASK as PPL_TASK

RESULTS_FILE = "results.json"


def run_dir(trainer: Any) -> Path:
    """The run directory: the first logger's directory, else ``default_root_dir``. Call it on every rank."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return " | ".join(str(c).rjust(w) for c, w in zip(cells, widths))

    return "\n".join([line(header), "-+-".join("-" * w for w in widths), *(line(r) for r in rows)])


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def retrieval_table(summary: dict[str, Any]) -> str:
    """Accuracy (%) per length (rows) and depth (columns), with the mean measured prompt tokens per length."""
    cells = {(c["length"], c["depth"]): c for c in summary["cells"]}
    header = ["length", "tokens", *(f"d={d:g}" for d in summary["depths"]), "all"]
    rows = []
    for row in summary["by_length"]:
        n = row["length"]
        accs = [_pct(cells[n, d]["accuracy"]) if (n, d) in cells else "-" for d in summary["depths"]]
        rows.append([str(n), f"{row['mean_tokens']:.1f}", *accs, _pct(row["accuracy"])])
    rows.append(["all", "", *(_pct(c["accuracy"]) for c in summary["by_depth"]), _pct(summary["accuracy"])])
    title = f"{summary['task']}: accuracy (%) by prompt length (tokens) and needle depth, {summary['total']} prompts"
    return f"{title}\n{_table(header, rows)}"


def ppl_table(summary: dict[str, Any]) -> str:
    """Tokens, mean NLL, perplexity and cumulative perplexity per position bucket."""
    header = ["positions", "tokens", "nll", "ppl", "cum_ppl"]
    rows = [[f"{b['start']}-{b['end']}", str(b["tokens"]), f"{b['nll']:.4f}", f"{b['ppl']:.4f}", f"{b['cum_ppl']:.4f}"]
            for b in summary["buckets"]]
    rows.append(["all", str(summary["tokens"]), f"{summary['nll']:.4f}", f"{summary['ppl']:.4f}", ""])
    title = f"{PPL_TASK}: {summary['windows']} windows of {summary['window_length']} tokens"
    return f"{title}\n{_table(header, rows)}"


def format_table(summary: dict[str, Any]) -> str:
    return ppl_table(summary) if summary["task"] == PPL_TASK else retrieval_table(summary)


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Flat scalar metrics of a summary (keys relative to the task: ``acc``, ``acc@1024``, ``ppl@0-1024``...).

    Per-cell accuracies stay in ``results.json`` and the heatmap, so a large grid does not flood the logger.
    """
    if summary["task"] == PPL_TASK:
        metrics = {"ppl": summary["ppl"]}
        metrics.update({f"ppl@{b['start']}-{b['end']}": b["ppl"] for b in summary["buckets"]})
        return metrics
    metrics = {"acc": summary["accuracy"]}
    for row in summary["by_length"]:
        metrics[f"acc@{row['length']}"] = row["accuracy"]
        metrics[f"tokens@{row['length']}"] = row["mean_tokens"]
    return metrics


def heatmap_figure(summary: dict[str, Any]) -> Figure:
    """Accuracy heatmap: prompt length (rows) x needle depth (columns), red 0% to green 100%."""
    lengths, depths = summary["lengths"], summary["depths"]
    grid = np.full((len(lengths), len(depths)), np.nan)
    for c in summary["cells"]:
        grid[lengths.index(c["length"]), depths.index(c["depth"])] = 100 * c["accuracy"]
    fig = Figure(figsize=(max(4.0, 1.5 + 0.9 * len(depths)), max(3.0, 1.2 + 0.45 * len(lengths))), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", origin="lower")
    for (i, j), value in np.ndenumerate(grid):
        if not math.isnan(value):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("needle depth (fraction of filler before it)")
    ax.set_ylabel("prompt length (tokens)")
    ax.set_title(f"{summary['task']} accuracy (%)")
    fig.colorbar(image, ax=ax)
    return fig


def ppl_figure(summary: dict[str, Any]) -> Figure:
    """Perplexity of each position bucket (and cumulative) against token position, log-2 position axis."""
    buckets = summary["buckets"]
    mids = [(b["start"] + b["end"]) / 2 for b in buckets]
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(mids, [b["ppl"] for b in buckets], marker="o", label="tokens in bucket")
    ax.plot([b["end"] for b in buckets], [b["cum_ppl"] for b in buckets], linestyle="--", marker=".",
            label="all tokens before bucket end")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token position (tokens of context before it)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"perplexity by position ({summary['windows']} windows of {summary['window_length']} tokens)")
    ax.legend()
    return fig


def figure_for(summary: dict[str, Any]) -> tuple[str, Figure]:
    """(file name, figure) of a summary: ``<task>_heatmap.png`` or ``ppl_by_position.png``."""
    if summary["task"] == PPL_TASK:
        return f"{PPL_TASK}.png", ppl_figure(summary)
    return f"{summary['task']}_heatmap.png", heatmap_figure(summary)


def log_figure(loggers: Iterable[Any], tag: str, figure: Figure, path: Path, step: int | None = None) -> None:
    """Send a saved figure to the image-capable loggers (TensorBoard ``add_figure``, wandb ``log_image``)."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(tag, figure, global_step=step, close=False)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[str(path)], step=step)


def write_report(
    results: dict[str, dict[str, Any]],
    directory: str | Path,
    loggers: Iterable[Any] = (),
    step: int | None = None,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Print a table per task, write ``results.json`` and one PNG per task into ``directory``, log the figures.

    Args:
        results: task name -> summary.
        directory: the run directory (created if missing).
        loggers: the trainer's loggers; TensorBoard and wandb get the figures (numbers are logged by the caller).
        step: global step for the loggers.
        print_fn: where tables go.

    Returns: file kind (``results`` or the task name) -> path written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"results": directory / RESULTS_FILE}
    loggers = list(loggers)
    for task, summary in results.items():
        print_fn(format_table(summary))
        name, fig = figure_for(summary)
        paths[task] = directory / name
        fig.savefig(paths[task], dpi=100)
        log_figure(loggers, f"{task}/plot", fig, paths[task], step)
    paths["results"].write_text(json.dumps({"global_step": step, **results}, indent=2))
    return paths
