"""The progress bar and model summary lit-longctx installs, and the silenced Lightning noise (issue 12)."""

from __future__ import annotations

import logging

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary, RichProgressBar, TQDMProgressBar

from lit_longctx.callbacks.context_schedule import ContextSchedule
from lit_longctx.callbacks.progress import (
    LongCtxModelSummary,
    LongCtxRichBar,
    LongCtxRichModelSummary,
    LongCtxTQDMBar,
    install,
    quiet_lightning,
)
from lit_longctx.modules import CausalLM

STAGES = [{"step": 0, "seq_len": 16, "micro_batch": 4}, {"step": 2, "seq_len": 32, "micro_batch": 2}]


def test_default_bar_and_summary_are_replaced_and_show_step_stage_and_length():
    schedule = ContextSchedule(STAGES)
    trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=6, callbacks=[schedule])
    install(trainer)
    bar = trainer.progress_bar_callback
    assert isinstance(bar, (LongCtxTQDMBar, LongCtxRichBar))
    assert sum(isinstance(c, (TQDMProgressBar, RichProgressBar)) for c in trainer.callbacks) == 1
    summaries = [c for c in trainer.callbacks if isinstance(c, (ModelSummary, RichModelSummary))]
    assert len(summaries) == 1 and isinstance(summaries[0], (LongCtxModelSummary, LongCtxRichModelSummary))
    assert bar.describe(trainer) == "step 0/6"
    schedule.current = 1
    assert bar.describe(trainer) == "step 0/6 stage 2/2 T=32"


def test_metrics_drop_v_num_and_add_tokens_per_second(monkeypatch):
    trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=2, callbacks=[TQDMProgressBar()])
    install(trainer)
    bar = trainer.progress_bar_callback
    module = CausalLM(model={"vocab_size": 64, "dim": 16, "n_layers": 1, "n_heads": 2, "ffn_dim": 32})
    monkeypatch.setattr(TQDMProgressBar, "get_metrics", lambda self, t, m: {"v_num": 0, "train/loss": 1.0})
    monkeypatch.setattr(type(trainer), "training", property(lambda self: True))
    clock = iter([10.0, 12.0])
    monkeypatch.setattr("lit_longctx.callbacks.progress.time.perf_counter", lambda: next(clock))
    module.tokens_seen = 100
    assert bar.get_metrics(trainer, module) == {"train/loss": 1.0}
    module.tokens_seen = 2100
    assert bar.get_metrics(trainer, module) == {"train/loss": 1.0, "tok/s": "1,000"}  # 2000 tokens in 2 s


def test_lightning_tip_is_dropped():
    quiet_lightning()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    record = logging.LogRecord(logger.name, logging.INFO, __file__, 1, "💡 Tip: try litlogger", None, None)
    other = logging.LogRecord(logger.name, logging.INFO, __file__, 1, "GPU available: False", None, None)
    assert not logger.filter(record) and logger.filter(other)


def test_bar_counts_optimizer_steps_and_shows_small_learning_rates(tmp_path, monkeypatch):
    """With accumulation 2 in stage 2 there are 8 micro-batches for 6 steps: the bar ends at 6/6 (not 8/8), and a
    learning rate of 3e-5 reads 3.00e-05 (Lightning's bar shows 0.000)."""
    import numpy as np

    from lit_longctx.datamodules import TokenFiles, write_token_files

    write_token_files(tmp_path / "tokens", {"train": np.arange(4000) % 97}, vocab_size=97)
    dm = TokenFiles(str(tmp_path / "tokens"), tokenizer="byte", seq_len=16, batch_size=4, train_order="sequential")
    stages = [{"step": 0, "seq_len": 16, "micro_batch": 4}, {"step": 2, "seq_len": 32, "micro_batch": 1,
                                                            "accumulate": 2}]
    trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=6, enable_checkpointing=False,
                        limit_val_batches=0, callbacks=[TQDMProgressBar(), ContextSchedule(stages)])
    install(trainer)
    bar = trainer.progress_bar_callback
    ends = []

    def on_train_end(self, *args):
        ends.append((self.train_progress_bar.n, self.train_progress_bar.total, self.train_progress_bar.desc))
        self.train_progress_bar.close()

    monkeypatch.setattr(type(bar), "on_train_end", on_train_end)
    module = CausalLM(model={"vocab_size": 97, "dim": 16, "n_layers": 1, "n_heads": 2, "ffn_dim": 32,
                             "max_seq_len": 16}, learning_rate=3e-5, lr_schedule="constant")
    trainer.fit(module, datamodule=dm)
    assert ends == [(6, 6, "step 6/6 stage 2/2 T=32: ")]
    assert trainer.progress_bar_metrics["train/lr"] == pytest.approx(3e-5)
    assert bar.get_metrics(trainer, module)["train/lr"] == "3.00e-05"
