"""XLA pieces that the main environment (no torch_xla) can check: the one-line error for an XLA strategy without
torch_xla, the TPU peak-FLOPs table, and the sharding specs. Training under XLA is tested in tests_xla/ (its own venv,
scripts/ci/xla.sh)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lit_longctx.modules.xla import batch_partition_spec, fsdp_partition_spec, tpu_peak_flops
from tests.cli_helpers import REPO, one_line_error, write_corpus

needs_no_xla = pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="torch_xla is installed")


@needs_no_xla
@pytest.mark.parametrize("flag", ["--trainer.strategy=xla", f"--config={REPO}/configs/strategy/xla_fsdp.yaml"])
def test_xla_strategy_without_torch_xla_is_one_line_with_the_install_command(tmp_path, flag):
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=2, chars=200)
    line = one_line_error("fit", "--config", str(REPO / "tests_xla/configs/causal.yaml"), flag,
                          f"--data.init_args.sources=[{corpus}]", f"--data.init_args.cache_dir={tmp_path}/cache",
                          f"--trainer.default_root_dir={tmp_path}")
    assert "torch_xla is not installed" in line and "pip install torch==2.9.0" in line, line


def test_tpu_peak_flops_uses_lightnings_table_then_v5p_v6e():
    from lightning.fabric.utilities.throughput import _TPU_FLOPS

    assert tpu_peak_flops("v4-8") == _TPU_FLOPS["v4"] == 275e12
    assert tpu_peak_flops("v5litepod-16") == _TPU_FLOPS["v5litepod"]  # v5e
    assert tpu_peak_flops("V5P") == 459e12 and tpu_peak_flops("v5p-128") == 459e12
    assert tpu_peak_flops("v6e-8") == 918e12
    assert tpu_peak_flops("cpu") is None


def test_fsdp_spec_shards_the_largest_dim_and_batches_along_rows():
    assert fsdp_partition_spec(torch.Size([64, 256])) == (None, "fsdp")
    assert fsdp_partition_spec(torch.Size([260, 32])) == ("fsdp", None)
    assert fsdp_partition_spec(torch.Size([32])) == ("fsdp",)
    assert fsdp_partition_spec(torch.Size([])) == ()
    assert batch_partition_spec(2) == ("fsdp", None) and batch_partition_spec(3) == ("fsdp", None, None)
