"""The sharded path (XLAFSDPv2Strategy on SPMD) with 4 virtual XLA:CPU devices (``CPU_NUM_DEVICES=4``, one process):
each device holds ~1/4 of every weight, the losses and the checkpointed weights equal eager CPU training, the run
resumes from its checkpoint, and the checkpoint loads on CPU (weights_only) and exports to an HF directory that
transformers reads with the same logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests_xla.helpers import REPO, run_subprocess
from tests_xla.test_methods import RTOL, _overrides, train

N_DEVICES = 4
CONFIG = str(REPO / "tests_xla/configs/causal.yaml")


def _spmd_fit(root: Path, cache: Path, max_steps: int, extra: list[str] = ()) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    over = _overrides(root, root / "record.json", max_steps=max_steps, checkpoint=True)
    over.write_text(over.read_text() + f"""    - class_path: tests_xla.helpers.ShardRecorder
      init_args: {{out: {root}/shards.json}}
""")
    proc = run_subprocess(["fit", "--config", CONFIG, "--config", str(REPO / "configs/strategy/xla_fsdp.yaml"),
                           "--config", str(over), "--trainer.precision=32-true", f"--data.init_args.cache_dir={cache}",
                           *extra], env={"CPU_NUM_DEVICES": str(N_DEVICES)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((root / "record.json").read_text())


@pytest.mark.slow
def test_fsdpv2_shards_matches_eager_resumes_and_exports(tmp_path):
    cache = tmp_path / "cache"
    eager2 = train("causal", tmp_path / "cpu2", cache, "cpu", max_steps=2, checkpoint=True)
    eager3 = train("causal", tmp_path / "cpu3", cache, "cpu", max_steps=3)
    spmd = _spmd_fit(tmp_path / "spmd", cache, max_steps=2)
    assert spmd["strategy"] == "XLAFSDPv2Strategy"
    assert spmd["losses"] == pytest.approx(eager2["losses"], rel=RTOL)

    # ~1/N of every weight per device: FSDPv2 splits the largest dim (ceil when it does not divide)
    shards = json.loads((tmp_path / "spmd/shards.json").read_text())
    assert len(shards) > 5
    for name, (numel, local) in shards.items():
        assert len(local) == N_DEVICES, name
        assert sum(local) >= numel and max(local) <= math.ceil(numel / N_DEVICES * 1.1), (name, numel, local)

    # the checkpoint holds plain CPU tensors (weights_only) equal to the eager run's after the same 2 steps
    ckpt = tmp_path / "spmd/checkpoints/last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    ref = torch.load(tmp_path / "cpu2/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert state["state_dict"].keys() == ref["state_dict"].keys()
    for k, v in state["state_dict"].items():
        assert v.device.type == "cpu" and type(v) is torch.Tensor, k
        torch.testing.assert_close(v, ref["state_dict"][k], rtol=1e-4, atol=1e-5, msg=k)
    assert state["optimizer_states"][0]["state"], "AdamW state was saved"

    # resume under SPMD for the 3rd step: its loss equals the uninterrupted eager run's 3rd step
    resumed = _spmd_fit(tmp_path / "spmd", cache, max_steps=3, extra=[f"--ckpt_path={ckpt}"])
    assert resumed["losses"] == pytest.approx(eager3["losses"][2:], rel=RTOL)

    # export to HF: transformers' LLaMA on the exported weights gives lit-longctx's logits
    from transformers import AutoModelForCausalLM

    from lit_longctx.checkpoint import read_checkpoint
    from lit_longctx.cli import convert_to_hf
    from lit_longctx.nn.llama import Transformer

    out = convert_to_hf(str(ckpt), str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    loaded = read_checkpoint(str(ckpt))
    ours = Transformer(loaded.model_config).eval()
    missing, _ = ours.load_state_dict(loaded.state_dict, strict=False)
    assert not missing
    ids = torch.randint(0, loaded.model_config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
