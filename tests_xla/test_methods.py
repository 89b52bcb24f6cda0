"""Every method's training step under XLA (XLA:CPU): 3 optimizer steps whose losses equal the same steps in eager
CPU mode, with no graph compilation and no host sync inside the step after warm-up (torch_xla's metrics).

Oracle: the same config, seed, data and initial weights trained eagerly on CPU (fp32). Tolerance: rtol 1e-4 on each
step's loss (XLA fuses and reorders fp32 reductions, and RoPE angles are formed in float32 on XLA instead of
float64, so bitwise equality is not expected; 1e-4 is ~50x the differences seen, far below a wrong-step difference).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests_xla.helpers import REPO, run_cli

RTOL = 1e-4
WARMUP_STEPS = 2  # step 1 builds the forward/backward graph, step 2 the one with AdamW's state in place

METHODS = {
    "causal": ["--config", str(REPO / "tests_xla/configs/causal.yaml")],
    "fot": ["--config", str(REPO / "configs/fot_debug.yaml")],
    "landmark": ["--config", str(REPO / "configs/landmark_debug.yaml")],
    "lolcats_distill": ["--config", str(REPO / "configs/lolcats_debug_distill.yaml")],
    "lolcats_lora": ["--config", str(REPO / "configs/lolcats_debug_lora.yaml")],
}


def _overrides(root: Path, out: Path, max_steps: int = 3, checkpoint: bool = False) -> Path:
    ckpt = (f"    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
            f"      init_args: {{dirpath: {root}/checkpoints, save_last: true}}\n") if checkpoint else ""
    path = root / "overrides.yaml"
    path.write_text(f"""
trainer:
  max_steps: {max_steps}
  limit_val_batches: 0
  num_sanity_val_steps: 0
  logger: false
  enable_checkpointing: {str(checkpoint).lower()}
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  callbacks:
{ckpt}    - class_path: tests_xla.helpers.StepRecorder
      init_args: {{out: {out}}}
""")
    return path


def _cache_arg(method: str, cache: Path) -> str:
    key = "--data.init_args.data.init_args.cache_dir" if method == "landmark" else "--data.init_args.cache_dir"
    return f"{key}={cache}"


def train(method: str, root: Path, cache: Path, device: str, extra: list[str] = (), **kw) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    out = root / "record.json"
    accel = ["--trainer.accelerator=tpu", "--trainer.devices=1"] if device == "xla" else ["--trainer.accelerator=cpu"]
    run_cli(["fit", *METHODS[method], "--config", str(_overrides(root, out, **kw)), _cache_arg(method, cache),
             *accel, *extra])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def stage1_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoLCATs attention-transfer checkpoint (1 eager CPU step) for stage 2 to start from."""
    root = tmp_path_factory.mktemp("stage1")
    train("lolcats_distill", root, root / "cache", "cpu", max_steps=1, checkpoint=True)
    return root / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("method", list(METHODS))
def test_xla_step_matches_eager_and_compiles_once(method, tmp_path, request, xla_cpu, build_on_cpu):
    extra = []
    if method == "lolcats_lora":
        extra = [f"--model.init_args.init_from={request.getfixturevalue('stage1_checkpoint')}"]
    cache = tmp_path / "cache"
    eager = train(method, tmp_path / "cpu", cache, "cpu", extra)
    xla = train(method, tmp_path / "xla", cache, "xla", extra)
    assert xla["device"].startswith("xla") and eager["device"] == "cpu"
    assert len(xla["losses"]) == len(eager["losses"]) == 3
    assert xla["losses"] == pytest.approx(eager["losses"], rel=RTOL), (xla["losses"], eager["losses"])
    # a wrong step would not be within tolerance: the losses really move over the 3 steps
    assert abs(eager["losses"][0] - eager["losses"][-1]) > 10 * RTOL * abs(eager["losses"][0])
    steps = xla["steps"]
    for before, after in zip(steps[WARMUP_STEPS - 1:], steps[WARMUP_STEPS:]):
        assert after["compiles"] == before["compiles"], f"{method}: a step after warm-up recompiled: {steps}"
        assert after["executions"] - before["executions"] == 1, f"{method}: the step ran as several graphs: {steps}"
    print(f"\n{method}: losses eager {eager['losses']} xla {xla['losses']}; xla counters {steps}")



def _xla_subprocess_fit(root: Path, precision: str) -> dict:
    from tests_xla.helpers import run_subprocess

    root.mkdir(parents=True)
    out = root / "record.json"
    proc = run_subprocess(["fit", *METHODS["causal"], "--config", str(_overrides(root, out)),
                           _cache_arg("causal", root / "cache"), "--trainer.accelerator=tpu", "--trainer.devices=1",
                           f"--trainer.precision={precision}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bf16_true_under_xla_trains_in_bfloat16_close_to_fp32(tmp_path):
    """``precision: bf16-true`` (the TPU strategy configs' setting) through Lightning's XLA precision plugin, which
    sets ``XLA_USE_BF16`` and so must run before the XLA runtime starts: a fresh process, against an fp32 XLA run of
    the same seed (the same initial weights: both are built on the XLA device)."""
    import torch

    fp32 = _xla_subprocess_fit(tmp_path / "fp32", "32-true")
    bf16 = _xla_subprocess_fit(tmp_path / "bf16", "bf16-true")

    def representable(x: float) -> bool:
        return torch.tensor(x).bfloat16().float().item() == x

    # the losses are bfloat16 numbers (the model ran in bf16), within bf16's resolution of the fp32 losses
    assert all(representable(x) for x in bf16["losses"]) and not all(representable(x) for x in fp32["losses"])
    assert bf16["losses"] == pytest.approx(fp32["losses"], rel=2e-2)
    assert bf16["steps"][-1]["compiles"] == bf16["steps"][WARMUP_STEPS - 1]["compiles"]
