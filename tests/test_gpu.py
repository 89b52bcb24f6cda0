"""GPU-only paths: bf16, FSDP1, DeepSpeed, flash-attn, MFU from Lightning's peak table (skipped without CUDA)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lit_longctx.nn import ModelConfig, Transformer
from tests.cli_helpers import REPO, run, run_subprocess

pytestmark = pytest.mark.gpu


def test_bf16_mixed_training_tracks_fp32(config):
    fp32 = run("fit", "--config", str(config), "--trainer.accelerator=gpu", "--trainer.max_steps=6")
    bf16 = run("fit", "--config", str(config), "--trainer.accelerator=gpu", "--trainer.max_steps=6",
               "--trainer.precision=bf16-mixed")
    a, b = fp32.trainer.callback_metrics["train/loss"], bf16.trainer.callback_metrics["train/loss"]
    assert torch.isfinite(b) and abs(a - b) < 0.05 * a


def test_bf16_logits_close_to_fp32_and_rope_tables_stay_fp32():
    model = Transformer(ModelConfig.from_preset("debug")).cuda()
    ids = torch.randint(0, 512, (2, 200), device="cuda")
    ref = model(ids).logits
    model16 = model.to(torch.bfloat16)
    cos, _ = model16.rope(torch.arange(70_000, 70_010, device="cuda"))
    assert cos.dtype == torch.float32
    out = model16(ids).logits.float()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attn_backend_matches_sdpa_with_documents_and_cache():
    torch.manual_seed(0)
    base = ModelConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=100, ffn_dim=512)
    sdpa = Transformer(base).cuda().to(torch.bfloat16)
    flash = Transformer(base.replace(attn_backend="flash_attn")).cuda().to(torch.bfloat16)
    flash.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 512, (2, 256), device="cuda")
    pos = torch.cat([torch.arange(100), torch.arange(156)]).expand(2, -1).cuda()  # two packed documents
    for kwargs in ({}, {"position_ids": pos}):
        a, b = sdpa(ids, **kwargs).logits.float(), flash(ids, **kwargs).logits.float()
        assert (a - b).abs().max() < 5e-2
    from lit_longctx.nn import generate

    assert generate(sdpa, ids[:1, :50], 8) == generate(flash, ids[:1, :50], 8)


def test_fsdp1_trains_and_reloads(config, tmp_path):
    run_subprocess(["fit", "--config", str(config), "--config", str(REPO / "configs/strategy/fsdp.yaml"),
                 "--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.max_steps=4"], tmp_path)
    proc = run_subprocess(["test", "--config", str(config), "--config", str(REPO / "configs/strategy/fsdp.yaml"),
                        "--trainer.accelerator=gpu", "--trainer.devices=1", "--ckpt_path", "last"], tmp_path)
    assert "test/ppl" in proc.stdout


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_trains_and_reloads(config, tmp_path, stage):
    pytest.importorskip("deepspeed")
    strategy = REPO / f"configs/strategy/deepspeed_zero{stage}.yaml"
    run_subprocess(["fit", "--config", str(config), "--config", str(strategy), "--trainer.accelerator=gpu",
                 "--trainer.devices=1", "--trainer.max_steps=4"], tmp_path)
    proc = run_subprocess(["test", "--config", str(config), "--config", str(strategy), "--trainer.accelerator=gpu",
                        "--trainer.devices=1", "--ckpt_path", "last"], tmp_path)
    assert "test/ppl" in proc.stdout


def test_mfu_uses_lightnings_peak_table(config):
    cli = run("fit", "--config", str(config), "--trainer.accelerator=gpu", "--trainer.max_steps=12",
              "--trainer.precision=bf16-mixed", "--trainer.callbacks+=lit_longctx.callbacks.ThroughputCallback",
              "--trainer.callbacks.window_size=2", "--trainer.log_every_n_steps=2")
    metrics = cli.trainer.callback_metrics
    assert 0 < float(metrics["train/device/mfu"]) < 1
