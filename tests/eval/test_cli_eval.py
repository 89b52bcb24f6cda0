"""``lit-longctx test`` with a training config composed with configs/eval/*.yaml, on the training run's last checkpoint.

The training config trains its own tokenizer, so the evaluation must take the checkpoint's tokenizer and
architecture (the eval data modules define no vocabulary); the numbers are checked against a model loaded
independently from the checkpoint.
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lit_longctx.checkpoint import load_model
from lit_longctx.cli import _make_cli
from lit_longctx.datamodules.passkey import LongDocData
from lit_longctx.eval.passkey import PasskeyTask
from tests.eval.test_report import assert_valid_png, parse_table

REPO = Path(__file__).resolve().parents[2]

TRAIN = """
seed_everything: 7
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 3
  limit_val_batches: 1
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {root}, name: logs}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root}/checkpoints, save_last: true}}
model:
  class_path: lit_longctx.modules.CausalLM
  init_args:
    model: {{dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_dim: 64, max_seq_len: 256}}
    learning_rate: 1.0e-3
data:
  class_path: lit_longctx.datamodules.passkey.PasskeyMixData
  init_args:
    sources: [builtin:pydoc]
    train_tokenizer: 600
    tokenizer_sample_chars: 200000
    seq_len: 256
    batch_size: 2
    cache_dir: {root}/cache
    val_docs: 2
    passkey_fraction: 0.5
    passkey_lengths: [160, 257]
    key_range: [1, 999]
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(training config, run root) after a 3-step fit that wrote last.ckpt."""
    root = tmp_path_factory.mktemp("run")
    config = root / "train.yaml"
    config.write_text(TRAIN.format(root=root))
    cli = _make_cli(["fit", "--config", str(config)])
    assert cli.trainer.global_step == 3 and (root / "checkpoints" / "last.ckpt").is_file()
    return config, root


@torch.no_grad()
def greedy(model, ids, steps):
    """Greedy continuation by full recomputation (no cache, no session)."""
    ids = torch.tensor([ids])
    start = ids.shape[1]
    for _ in range(steps):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, start:].tolist()


def test_passkey_eval_composed_after_a_training_config(trained, capsys):
    config, root = trained
    capsys.readouterr()
    cli = _make_cli(["test", "--config", str(config), "--config", str(REPO / "configs/eval/passkey.yaml"),
                     "--ckpt_path", "last", "--data.lengths=[200, 300]", "--data.depths=[0.0, 1.0]",
                     "--data.trials=2"])
    run = Path(cli.trainer.log_dir)
    assert run.parent == root / "logs"  # the training config's logger places the run directory
    results = json.loads((run / "results.json").read_text())["passkey"]
    assert_valid_png(run / "passkey_heatmap.png")

    model, tokenizer, _ = load_model(root / "checkpoints" / "last.ckpt")
    model.eval()
    assert cli.model.model_config == model.config and model.config.vocab_size == 600  # the checkpoint's architecture
    # the composed eval data kept the training config's key_range and took the checkpoint's tokenizer
    task = PasskeyTask(tokenizer, seed=1234, key_range=(1, 999))
    assert results["total"] == 8 and len(results["samples"]) == 8
    for s in results["samples"]:
        prompt = task.sample(s["length"], s["depth"], s["trial"])
        assert s["answer"] == prompt.answer <= 999 and s["n_tokens"] == prompt.n_tokens
        assert s["length"] - 2 <= s["n_tokens"] <= s["length"]
        new = greedy(model, prompt.input_ids, 10)
        if tokenizer.eos_id in new:
            new = new[: new.index(tokenizer.eos_id)]
        output = tokenizer.decode(new)
        assert s["output"] == output
        digits = re.search(r"\d+", output)
        assert s["correct"] == (digits is not None and int(digits.group()) == s["answer"])

    rows = parse_table(capsys.readouterr().out, "passkey: accuracy")
    assert [row["length"] for row in rows] == ["200", "300", "all"]
    for row, by_length in zip(rows, results["by_length"]):
        assert float(row["all"]) == round(100 * by_length["accuracy"], 1)
        assert float(row["tokens"]) == round(by_length["mean_tokens"], 1)
    assert float(rows[-1]["all"]) == round(100 * results["accuracy"], 1)


def test_ppl_eval_composed_after_a_training_config(trained, capsys):
    config, root = trained
    capsys.readouterr()
    cli = _make_cli(["test", "--config", str(config), "--config", str(REPO / "configs/eval/ppl_by_length.yaml"),
                     "--ckpt_path", "last", "--data.lengths=[64, 192]", "--data.max_windows=2"])
    run = Path(cli.trainer.log_dir)
    results = json.loads((run / "results.json").read_text())["ppl_by_position"]
    assert_valid_png(run / "ppl_by_position.png")

    model, tokenizer, _ = load_model(root / "checkpoints" / "last.ckpt")
    model.eval()
    windows = LongDocData(tokenizer=tokenizer, lengths=[64, 192], max_windows=2).test_dataloader()
    nll = {(0, 64): [], (64, 192): []}
    with torch.no_grad():
        for batch in windows:  # one full forward per window: token t is predicted from logits[t - 1]
            ids = batch["input_ids"]
            losses = F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
            for t, value in enumerate(losses.tolist(), start=1):
                nll[(0, 64) if t < 64 else (64, 192)].append(value)
    for bucket, values in zip(results["buckets"], nll.values()):
        assert bucket["tokens"] == len(values)
        assert bucket["ppl"] == pytest.approx(math.exp(sum(values) / len(values)), rel=1e-4)

    rows = parse_table(capsys.readouterr().out, "ppl_by_position:")
    assert [row["positions"] for row in rows] == ["0-64", "64-192", "all"]
    assert [float(r["ppl"]) for r in rows[:2]] == [round(b["ppl"], 4) for b in results["buckets"]]
