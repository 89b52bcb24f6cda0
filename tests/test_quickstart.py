"""The README's quickstart recipe (its data, tokenizer, trainer and optimiser settings) with a smaller model and
fewer steps: it must learn more than token frequencies.

Oracle: the cross-entropy of the validation tokens under the smoothed unigram distribution of the training tokens
(what a model that ignores context can reach at best, up to smoothing), computed from the token files the run wrote.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml

from tests.cli_helpers import REPO, run


def unigram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Mean -log p(val token) in nats with add-one smoothed unigram counts of ``train``."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val].mean())


def test_shortened_quickstart_beats_the_unigram_baseline(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    root = tmp_path / "run"
    trainer = config["trainer"]
    trainer.update(max_steps=120, val_check_interval=120, limit_val_batches=4, default_root_dir=str(root),
                   enable_progress_bar=False, enable_model_summary=False)
    trainer["logger"]["init_args"]["save_dir"] = str(root)
    trainer["callbacks"][0]["init_args"].update(dirpath=str(root / "checkpoints"), every_n_train_steps=120)
    model = config["model"]["init_args"]
    model["model"].update(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176)
    model.update(warmup_steps=12, learning_rate=3e-3)
    config["data"]["init_args"].update(batch_size=8, cache_dir=str(tmp_path / "cache"))
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    cli = run("fit", "--config", str(path))
    val_loss = float(cli.trainer.callback_metrics["val/loss"])

    dm = cli.datamodule
    (token_dir,) = [dm.token_dir(i) for i in range(len(dm.sources))]
    vocab = cli.model.model.config.vocab_size
    dtype = np.uint16 if vocab <= 65536 else np.uint32
    train = np.fromfile(token_dir / "train.bin", dtype=dtype).astype(np.int64)
    val = np.fromfile(token_dir / "val.bin", dtype=dtype).astype(np.int64)
    baseline = unigram_cross_entropy(train, val, vocab)

    assert math.isfinite(val_loss)
    # 120 steps of 8 x 256 tokens (~250k tokens) learn context: the margin is ~1 nat
    print(f"val loss {val_loss:.3f} nats, unigram {baseline:.3f}")
    assert val_loss < baseline - 0.5, (val_loss, baseline)
