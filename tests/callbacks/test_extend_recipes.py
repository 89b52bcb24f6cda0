"""configs/extend/*.yaml parse with --print_config, build on the meta device, and their schedules are consistent."""

from __future__ import annotations

import pytest
import torch
import yaml

from lit_longctx.callbacks.context_schedule import ContextSchedule, stage_ropes
from lit_longctx.cli import main
from lit_longctx.modules import CausalLM
from tests.cli_helpers import REPO

RECIPES = {  # name: (rope type of the last stage, its factor, its theta, tokens per optimizer step)
    "llama2_7b_32k_linear": ("linear", 8.0, 1e4, 32768 * 8 * 8),
    "llama3_8b_128k_yarn": ("yarn", 16.0, 5e5, 4 * 2**20),
    "theta_staged": ("none", None, 1.5e7, 2 * 2**20),
    "debug": ("yarn", 4.0, 1e4, 128),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_parses_and_builds_on_meta(name, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(REPO / "configs" / "extend" / f"{name}.yaml"), "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    init_args = dict(printed["model"]["init_args"])
    init_args.pop("init_from", None)  # a placeholder for the user's checkpoint; the preset has the same shapes
    module = CausalLM(**init_args)
    with torch.device("meta"):
        module.configure_model()
    assert module.model.lm_head.weight.is_meta
    trainer = printed["trainer"]
    schedule_args = next(cb["init_args"] for cb in trainer["callbacks"]
                         if cb["class_path"] == "lit_longctx.callbacks.ContextSchedule")
    schedule = ContextSchedule(**schedule_args)
    rope_type, factor, theta, tokens = RECIPES[name]
    last = stage_ropes(schedule.stages, module.model_config.rope)[-1]
    assert (last.rope_type, last.factor, last.rope_theta) == (rope_type, factor, theta)
    dp = trainer["devices"] * (trainer.get("num_nodes") or 1)
    assert {s.seq_len * s.micro_batch * s.accumulate * dp for s in schedule.stages} == {tokens}
    assert all(s.step < trainer["max_steps"] for s in schedule.stages)
    if module.lora is not None:
        trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n or "embed_tokens" in n or "norm" in n for n in trainable)
