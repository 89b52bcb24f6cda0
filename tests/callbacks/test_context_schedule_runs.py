"""Context schedules through the real command: kill and resume across a stage boundary, DDP and FSDP2 against one
process with the same global batch, the debug recipe (issue 12)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from lit_longctx.checkpoint import read_checkpoint
from tests.cli_helpers import REPO, run_subprocess

DEBUG = REPO / "configs" / "extend" / "debug.yaml"


CHECKPOINTS = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
               "init_args": {"save_last": True, "every_n_train_steps": 1}}


def fit_args(root, *extra: str, callbacks: list | None = None) -> list[str]:
    """The debug recipe (which checkpoints every step into ROOT/checkpoints) plus extra arguments and callbacks."""
    args = ["fit", "--config", str(DEBUG), f"--trainer.default_root_dir={root}", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
            f"--data.cache_dir={root.parent / 'cache'}"]
    return args + list(extra) + [f"--trainer.callbacks+={json.dumps(c)}" for c in callbacks or []]


def weights(path) -> dict[str, torch.Tensor]:
    return read_checkpoint(str(path)).state_dict


@pytest.mark.slow
def test_sigkill_inside_stage_two_then_resume_is_bit_equal(tmp_path):
    full = tmp_path / "full"
    run_subprocess(fit_args(full), tmp_path)
    # micro-batches: steps 0-1 one each, steps 2-3 two each (stage 2, G=2): micro 5 is step 3's second micro-batch
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    kill = {"class_path": "tests.callbacks.schedule_helpers.KillAtMicroBatch", "init_args": {"micro": 5}}
    proc = subprocess.run([sys.executable, "-m", "lit_longctx.cli", *fit_args(killed, callbacks=[kill])],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    last = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3  # inside stage 2 (steps 2-3)
    assert last["lit_longctx"]["model_config"]["rope"]["rope_type"] == "linear"
    shapes = tmp_path / "shapes"
    log = {"class_path": "tests.callbacks.schedule_helpers.ShapeLog", "init_args": {"path": str(shapes)}}
    run_subprocess(fit_args(killed, "--ckpt_path", "last", callbacks=[log]), killed)
    seen = [json.loads(line) for line in (shapes / "shapes-rank0.jsonl").read_text().splitlines()]
    # resumed in stage 2 (step 3: 2 micro-batches of 1 x 64, linear RoPE), then stage 3 (1 x 128, yarn)
    assert [(s["step"], s["shape"], s["rope_type"]) for s in seen] == [
        (3, [1, 64], "linear"), (4, [1, 64], "linear"), (5, [1, 128], "yarn"), (6, [1, 128], "yarn")]
    a, b = weights(full / "checkpoints" / "last.ckpt"), weights(killed / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


DISTRIBUTED_STAGES = [  # per rank, 2 ranks: 128 tokens per optimizer step; accumulation 1 -> 1 -> 2
    {"step": 0, "seq_len": 32, "micro_batch": 2, "accumulate": 1},
    {"step": 2, "seq_len": 64, "micro_batch": 1, "accumulate": 1, "rope": {"type": "linear", "factor": 2.0}},
    {"step": 4, "seq_len": 32, "micro_batch": 1, "accumulate": 2},
]
SINGLE_STAGES = [  # the same global batches in one process
    {"step": 0, "seq_len": 32, "micro_batch": 4, "accumulate": 1},
    {"step": 2, "seq_len": 64, "micro_batch": 2, "accumulate": 1, "rope": {"type": "linear", "factor": 2.0}},
    {"step": 4, "seq_len": 32, "micro_batch": 2, "accumulate": 2},
]


def schedule_args(stages) -> list[str]:
    schedule = {"class_path": "lit_longctx.callbacks.ContextSchedule", "init_args": {"stages": stages}}
    return [f"--trainer.callbacks={json.dumps([schedule, CHECKPOINTS])}"]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """The debug recipe's architecture as an HF directory: every run starts from the same weights (FSDP2 builds on
    the meta device and initialises after sharding, which draws other random numbers than a plain build)."""
    from lit_longctx.hf import to_hf
    from lit_longctx.nn import ModelConfig, Transformer
    from lit_longctx.tokenizers import load_tokenizer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=load_tokenizer("byte").vocab_size, dim=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2, ffn_dim=64, max_seq_len=32))
    return to_hf(model, tmp_path_factory.mktemp("base") / "hf")


@pytest.fixture(scope="module")
def single_process_weights(tmp_path_factory, base_model):
    root = tmp_path_factory.mktemp("single") / "run"
    run_subprocess(fit_args(root, *schedule_args(SINGLE_STAGES), f"--model.init_from={base_model}"), root.parent)
    return weights(root / "checkpoints" / "last.ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_with_changing_accumulation_equal_one_process(tmp_path, strategy, base_model,
                                                                    single_process_weights):
    root = tmp_path / "run"
    run_subprocess(fit_args(root, *schedule_args(DISTRIBUTED_STAGES), f"--model.init_from={base_model}", "--config",
                            str(REPO / "configs" / "strategy" / f"{strategy}.yaml"), "--trainer.devices=2"), tmp_path)
    got = weights(root / "checkpoints" / "last.ckpt")
    assert got.keys() == single_process_weights.keys()
    for k, v in single_process_weights.items():
        torch.testing.assert_close(got[k], v, atol=2e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
