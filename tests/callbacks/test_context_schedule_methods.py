"""Each method under a context schedule (issue 12): landmark insertion follows the stage's length, LoLCATs' windows
stay as they are while the rows grow. (FoT: tests/datamodules/test_doc_aware_staged.py.)

Oracles: the insertion rule written out here (a landmark after every ℓ regular tokens, per row), the configured
hybrid window."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from lit_longctx.callbacks.context_schedule import ContextSchedule
from lit_longctx.checkpoint import save_checkpoint
from lit_longctx.datamodules import TextData, TokenFiles, write_token_files
from lit_longctx.datamodules.landmark import LandmarkData
from lit_longctx.modules import AttentionTransfer, Landmark
from lit_longctx.nn import ModelConfig, Transformer

SMALL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
#: 256 regular tokens per step: (T 32, B 8) -> (T 64, B 4, linear RoPE x2)
STAGES = [{"step": 0, "seq_len": 32, "micro_batch": 8},
          {"step": 2, "seq_len": 64, "micro_batch": 4, "rope": {"type": "linear", "factor": 2.0}}]


def trainer(tmp_path, steps: int = 4) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
                     default_root_dir=tmp_path, callbacks=[ContextSchedule(STAGES)])


class LandmarkRecorder(Landmark):
    def training_step(self, batch, batch_idx):
        self.seen = [*getattr(self, "seen", []), (self.trainer.global_step, batch["input_ids"].clone(),
                                                  self.landmark_options.train_context_length)]
        return super().training_step(batch, batch_idx)


def test_landmarks_are_inserted_at_the_new_length(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("".join(f"Paragraph {i} of a text about landmarks and blocks.\n\n" for i in range(400)))
    inner = TextData(sources=[str(path)], tokenizer="byte", seq_len=32, batch_size=8, shuffle=False, val_fraction=0.0,
                     cache_dir=str(tmp_path / "cache"))
    dm = LandmarkData(inner, mem_freq=8)
    module = LandmarkRecorder(model={"vocab_size": 260, **SMALL, "max_seq_len": 36}, tokenizer="byte", mem_freq=8)
    trainer(tmp_path).fit(module, datamodule=dm)
    landmark = module.landmark_options.landmark_id
    for step, ids, context in module.seen:
        t = 32 if step < 2 else 64
        assert context == t  # the default inference chunk follows the training length
        assert ids.shape == (8 if step < 2 else 4, t + (t - 1) // 8)  # per_row: no landmark after the last block
        where = (ids == landmark).nonzero()[:, 1].reshape(ids.shape[0], -1)
        expected = torch.arange(1, (t - 1) // 8 + 1) * 9 - 1  # after every 8 regular tokens
        assert torch.equal(where, expected.expand_as(where))
    assert {step for step, _, _ in module.seen} == {0, 1, 2, 3}


class TransferRecorder(AttentionTransfer):
    def training_step(self, batch, batch_idx):
        options = self.model.config.attention_options["hybrid_linear"]
        self.seen = [*getattr(self, "seen", []), (tuple(batch["input_ids"].shape), options["window_size"],
                                                  float(self.model.rope.rope.factor or 1.0))]
        return super().training_step(batch, batch_idx)


def test_lolcats_windows_stay_while_the_rows_grow(tmp_path):
    torch.manual_seed(0)
    base = Transformer(ModelConfig(vocab_size=97, **SMALL, max_seq_len=32, init_std=0.2))
    path = save_checkpoint(tmp_path / "base.ckpt", base)
    tokens = np.random.default_rng(0).integers(0, 97, 6000)
    write_token_files(tmp_path / "tokens", {"train": tokens}, vocab_size=97)
    dm = TokenFiles(str(tmp_path / "tokens"), tokenizer="byte", seq_len=32, batch_size=8, train_order="sequential")
    module = TransferRecorder(init_from=str(path), feature_dim=8, window_size=4)
    trainer(tmp_path).fit(module, datamodule=dm)
    assert module.seen == [
        ((8, 32), 4, 1.0), ((8, 32), 4, 1.0), ((4, 64), 4, 2.0), ((4, 64), 4, 2.0)]
    assert module.model_config.max_seq_len == 64
