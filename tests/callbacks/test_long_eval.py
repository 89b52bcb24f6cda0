"""LongEvalCallback during fit: when it runs, what it logs, the heatmaps, train mode afterwards."""

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from lit_longctx.callbacks.long_eval import LongEvalCallback
from tests.eval import EvalLM, oracle_reply, read_key, zero_reply


def even_key_reply(prompt: str) -> str:
    key = read_key(prompt)
    return f" {key}" if key % 2 == 0 else " 0"


def fit(tmp_path, module, callback, max_steps=4, accumulate=1):
    data = DataLoader(TensorDataset(torch.randint(0, 256, (64, 33))), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=CSVLogger(tmp_path),
                        callbacks=[callback], accumulate_grad_batches=accumulate, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1)
    trainer.fit(module, data)
    run = Path(trainer.log_dir)
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("long_eval/passkey/acc")]
    return run, rows


@pytest.mark.parametrize(("reply", "expected"), [(oracle_reply, 1.0), (zero_reply, 0.0)])
def test_runs_every_n_steps_logs_accuracy_and_restores_train_mode(tmp_path, reply, expected):
    module = EvalLM(reply)
    callback = LongEvalCallback(every_n_steps=2, lengths=[300, 400], depths=[0.0, 1.0], trials=1)
    run, rows = fit(tmp_path, module, callback)
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(float(r["long_eval/passkey/acc"]) == expected for r in rows)
    assert all(float(r["long_eval/passkey/acc@400"]) == expected for r in rows)
    assert module.train_modes == [True] * 4  # every training step after an evaluation ran in train mode
    assert module.model.training
    for step in (2, 4):
        with Image.open(run / "long_eval" / f"passkey_step{step:07d}.png") as image:
            image.verify()


def test_accuracy_matches_the_prompts_and_accumulation_runs_once_per_step(tmp_path):
    module = EvalLM(even_key_reply)
    callback = LongEvalCallback(every_n_steps=1, lengths=[300, 350], depths=[0.0, 0.5, 1.0], trials=3,
                                save_heatmap=False)
    run, rows = fit(tmp_path, module, callback, max_steps=2, accumulate=2)
    assert [int(r["step"]) for r in rows] == [1, 2]  # 4 batches, 2 optimizer steps, one evaluation per step
    answers = [b["answer"] for b in callback.batches(module)]
    assert float(rows[0]["long_eval/passkey/acc"]) == pytest.approx(sum(a % 2 == 0 for a in answers) / 18)
    assert not (run / "long_eval").exists()


def test_multikey_grid(tmp_path):
    module = EvalLM(oracle_reply)
    callback = LongEvalCallback(every_n_steps=1, lengths=[700], depths=[0.5], trials=2, task="multikey", n_keys=3,
                                session_kwargs={"prefill_chunk": 64})
    summary = callback.evaluate(L.Trainer(logger=False, default_root_dir=tmp_path), module)
    assert summary["task"] == "multikey" and summary["accuracy"] == 1.0 and summary["total"] == 2
    assert module.session_kwargs_seen == [{"prefill_chunk": 64}] * 2


def test_errors():
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        LongEvalCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="unknown retrieval task"):
        LongEvalCallback(task="niah")
    module = EvalLM(oracle_reply)
    module.tokenizer = None
    with pytest.raises(ValueError, match="pl_module.tokenizer is None"):
        LongEvalCallback(lengths=[300]).batches(module)


def test_keys_follow_the_training_data_unless_given():
    from types import SimpleNamespace

    module = EvalLM(oracle_reply)
    small = SimpleNamespace(key_range=(1, 9))  # a training data module with a key range (PasskeyMixData)
    followed = LongEvalCallback(lengths=[300], depths=[0.0, 1.0], trials=5).batches(module, small)
    assert {b["answer"] for b in followed} <= set(range(1, 10))
    given = LongEvalCallback(lengths=[300], depths=[0.0, 1.0], trials=5, key_range=(20, 29)).batches(module, small)
    assert {b["answer"] for b in given} <= set(range(20, 30))
    seeds = LongEvalCallback(lengths=[300], depths=[0.0, 1.0], trials=5).batches(module, SimpleNamespace())
    assert max(b["answer"] for b in seeds) > 1000  # the seeds' 1..50000 (10 draws)
    with pytest.raises(ValueError, match="key_range"):
        LongEvalCallback(key_range=(5, 1))


class KeyedData(L.LightningDataModule):
    """Random training rows, and the key range a passkey training mixture would declare."""

    key_range = (1, 9)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randint(0, 256, (8, 33))), batch_size=4)


def test_during_fit_keys_come_from_the_trainers_data_module(tmp_path):
    module = EvalLM(oracle_reply)
    callback = LongEvalCallback(every_n_steps=1, lengths=[300], depths=[0.5], trials=4, save_heatmap=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[callback])
    trainer.fit(module, datamodule=KeyedData())
    assert callback._last_step == 1  # the grid ran (and built its prompts) during fit
    assert {b["answer"] for b in callback.batches(module)} <= set(range(1, 10))
