"""Helpers for CLI tests: a tiny config, runners (in-process and subprocess), and objects that test configs name by
class_path (importable by the subprocesses of distributed tests too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lit_longctx.modules import CausalLM

REPO = Path(__file__).resolve().parents[1]

#: a ~30k-parameter model on byte-level text, 4 steps: every subcommand in seconds (format with root=, corpus=)
TINY_CONFIG = """
seed_everything: 7
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 4
  limit_val_batches: 2
  val_check_interval: 2
  check_val_every_n_epoch: null
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {root}, name: logs}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root}/checkpoints, save_last: true, every_n_train_steps: 2, save_top_k: -1}}
model:
  class_path: lit_longctx.modules.CausalLM
  init_args:
    model: {{dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_dim: 64, max_seq_len: 64}}
    learning_rate: 1.0e-3
    generation: {{prompt_tokens: 8, max_new_tokens: 4}}
data:
  class_path: lit_longctx.datamodules.TextData
  init_args:
    sources: [{corpus}]
    tokenizer: byte
    seq_len: 32
    batch_size: 4
    cache_dir: {root}/cache
    val_fraction: 0.2
"""


def write_corpus(path: Path, n_docs: int = 12, chars: int = 3000) -> Path:
    """A jsonl of real English documents (Python's pydoc topics)."""
    from pydoc_data.topics import topics

    with open(path, "w") as f:
        for text in list(topics.values())[:n_docs]:
            f.write(json.dumps({"text": text[:chars]}) + "\n")
    return path


def run(*args: str) -> Any:
    """``lit-longctx ARGS`` in this process; returns the LightningCLI (trainer, model, datamodule)."""
    from lit_longctx.cli import _make_cli

    return _make_cli(list(args))


def run_subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``lit-longctx ARGS`` in a fresh process (needed for multi-process strategies); asserts success."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lit_longctx.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def one_line_error(*args: str) -> str:
    """Run the real command; it must exit with status 2 and end with one ``error:`` line and no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "lit_longctx.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2, err[-3000:]
    last = err.splitlines()[-1]  # Lightning's INFO lines may come first
    assert last.startswith("error: ") and "Traceback" not in err, err[-3000:]
    return last


def in_process_error(capsys, *args: str) -> str:
    """``lit-longctx ARGS`` through the real entry point in this process: exit status 2 and one ``error:`` line."""
    from lit_longctx.cli import main

    with pytest.raises(SystemExit) as info:
        main(list(args))
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "Traceback" not in err and err.splitlines()[-1].startswith("error: "), err
    return err.splitlines()[-1]


class ShardReport(L.Callback):
    """Writes, per rank, the fraction of every weight this rank holds (1.0 = replicated; 1/W = fully sharded).

    Args:
        path: directory for ``shards-rank<r>.json``.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before any forward: FSDP2 keeps the root group unsharded after a forward (e.g. the sanity check)
        from torch.distributed.tensor import DTensor

        fractions = {}
        for name, p in pl_module.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            fractions[name] = local.numel() / p.numel()
        Path(self.path).mkdir(parents=True, exist_ok=True)
        (Path(self.path) / f"shards-rank{trainer.global_rank}.json").write_text(json.dumps(fractions))


class LastQuarterLM(CausalLM):
    """A user subclass: also reports the loss of the last quarter of each row (does long context help?).

    Args:
        quarter_weight: extra weight of the last quarter's loss in the objective.
        **kwargs: CausalLM arguments.
    """

    def __init__(self, quarter_weight: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.quarter_weight = quarter_weight
        os.environ["LAST_QUARTER_LM_BUILT"] = "1"

    def compute_loss(self, batch, stage):
        from lit_longctx.nn.loss import linear_cross_entropy

        out = self.model(batch["input_ids"], batch.get("position_ids"), batch["labels"], return_hidden=True)
        t = batch["input_ids"].shape[1]
        tail = linear_cross_entropy(out.hidden[:, 3 * t // 4 :], self.model.lm_head.weight,
                                    batch["labels"][:, 3 * t // 4 :])
        return out.loss + self.quarter_weight * tail, {"last_quarter_loss": tail.detach()}


def final_weights(module: CausalLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}
