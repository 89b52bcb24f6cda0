"""The `lit-longctx` command end to end: subcommands, composition, subclasses, resume, errors, strategies."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from lit_longctx.cli import main
from lit_longctx.hf import from_hf, to_hf
from lit_longctx.nn import ModelConfig, Transformer
from tests.cli_helpers import REPO, one_line_error, run, run_subprocess


def test_help_lists_every_subcommand(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "predict", "convert", "generate"):
        assert f"  {sub} " in out


def test_fit_validate_test_predict_generate(config, tmp_path, capsys):
    cli = run("fit", "--config", str(config))
    assert cli.trainer.global_step == 4
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "last.ckpt").exists()
    fitted = {k: v.clone() for k, v in cli.model.model.state_dict().items()}

    cli = run("validate", "--config", str(config), "--ckpt_path", "last")
    val = cli.trainer.callback_metrics
    cli = run("test", "--config", str(config), "--ckpt_path", "last", "--trainer.limit_test_batches=2")
    test = cli.trainer.callback_metrics
    for k, v in cli.model.model.state_dict().items():  # the checkpoint's weights were evaluated
        assert torch.equal(v, fitted[k]), k
    assert test["test/ppl"] == pytest.approx(torch.exp(test["test/loss"]).item(), rel=1e-5)
    assert test["test/loss"] == pytest.approx(val["val/loss"].item(), rel=1e-5)  # test split = held-out split

    run("predict", "--config", str(config), "--ckpt_path", "last")
    predictions = list((tmp_path / "run").rglob("predictions-rank0.jsonl"))
    rows = [json.loads(line) for line in predictions[0].read_text().splitlines()]
    assert rows and all(len(r["prompt_ids"]) == 8 and len(r["completion_ids"]) <= 4 for r in rows)

    capsys.readouterr()
    main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "The ", "--max_new_tokens", "5"])
    out = capsys.readouterr().out
    assert out.startswith("The ")


def test_two_runs_of_one_config_get_separate_run_directories(config, tmp_path):
    run("fit", "--config", str(config), "--trainer.max_steps=1")
    run("fit", "--config", str(config), "--trainer.max_steps=1")
    versions = sorted(p.name for p in (tmp_path / "run" / "logs").iterdir())
    assert versions == ["version_0", "version_1"]
    assert all((tmp_path / "run" / "logs" / v / "config.yaml").exists() for v in versions)


def test_subclass_named_by_class_path(config):
    cli = run("fit", "--config", str(config), "--trainer.max_steps=2",
              "--model.class_path", "tests.cli_helpers.LastQuarterLM", "--model.init_args.quarter_weight", "0.5")
    assert type(cli.model).__name__ == "LastQuarterLM" and cli.model.quarter_weight == 0.5
    assert "train/last_quarter_loss" in cli.trainer.callback_metrics


def test_composed_configs_override_left_to_right(config, tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("trainer:\n  max_steps: 1\nmodel:\n  init_args:\n    learning_rate: 0.5\n")
    cli = run("fit", "--config", str(config), "--config", str(override))
    assert cli.trainer.global_step == 1 and cli.model.hparams.learning_rate == 0.5
    assert cli.model.model_config.dim == 32  # untouched keys survive


def test_resume_gives_the_weights_of_an_uninterrupted_run(config, tmp_path):
    # decay_steps pins the schedule, so the interrupted run's first half has the same learning rates
    args = ["--config", str(config), "--model.init_args.decay_steps=6", "--trainer.val_check_interval=3"]
    straight = run("fit", *args, "--trainer.max_steps=6", "--trainer.default_root_dir", str(tmp_path / "a"),
                   "--trainer.callbacks.init_args.dirpath", str(tmp_path / "a"))
    half = run("fit", *args, "--trainer.max_steps=3", "--trainer.default_root_dir", str(tmp_path / "b"),
               "--trainer.callbacks.init_args.dirpath", str(tmp_path / "b"))
    assert half.trainer.global_step == 3
    resumed = run("fit", *args, "--trainer.max_steps=6", "--ckpt_path", str(tmp_path / "b" / "last.ckpt"),
                  "--trainer.default_root_dir", str(tmp_path / "b"),
                  "--trainer.callbacks.init_args.dirpath", str(tmp_path / "b"))
    assert resumed.trainer.global_step == 6
    a, b = straight.model.model.state_dict(), resumed.model.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.model.tokens_seen == straight.model.tokens_seen == 6 * 4 * 32


def test_convert_round_trip_and_init_from(tmp_path, capsys):
    model = Transformer(ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64))
    to_hf(model, tmp_path / "hf")
    main(["convert", "from-hf", "--source", str(tmp_path / "hf"), "--output", str(tmp_path / "m.ckpt")])
    main(["convert", "to-hf", "--checkpoint", str(tmp_path / "m.ckpt"), "--output", str(tmp_path / "hf2")])
    back = from_hf(tmp_path / "hf2")
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_console_script_exits_zero_after_a_subcommand_that_returns_a_value(tmp_path, monkeypatch):
    """The installed ``lit-longctx`` wrapper calls ``sys.exit(entry())``: any non-None return would print it and exit
    with status 1, so the entry point must return None even when the subcommand returns a value."""
    from importlib.metadata import entry_points

    (entry,) = entry_points(group="console_scripts", name="lit-longctx")
    model = Transformer(ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64))
    to_hf(model, tmp_path / "hf")
    argv = ["lit-longctx", "convert", "from-hf", "--source", str(tmp_path / "hf"), "--output", str(tmp_path / "m.ckpt")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(entry.load()())
    assert exit_info.value.code is None
    assert (tmp_path / "m.ckpt").exists()


# --------------------------------------------------------------------------------------------------- bad input
def test_unknown_config_key_is_one_line(config):
    err = one_line_error("fit", "--config", str(config), "--model.init_args.learning_rat=1")
    assert "learning_rat" in err


def test_missing_data_file_is_one_line(config, tmp_path):
    err = one_line_error("fit", "--config", str(config),
                         "--data.init_args.sources", f"[{tmp_path / 'nope.jsonl'}]")
    assert "nope.jsonl" in err


def test_dataset_shorter_than_one_sequence_is_one_line(config, tmp_path):
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "also short"}) + "\n")
    err = one_line_error("fit", "--config", str(config), "--data.init_args.sources", f"[{tiny}]",
                         "--data.init_args.seq_len=512")
    assert "512" in err or "shorter" in err


def test_token_ids_beyond_the_model_vocabulary_is_one_line(config, tmp_path):
    # a model with 100 embedding rows cannot train on byte-level data (259 ids)
    small = Transformer(ModelConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64))
    to_hf(small, tmp_path / "small")
    err = one_line_error("fit", "--config", str(config), "--model.init_args.init_from", str(tmp_path / "small"))
    assert "259" in err and "100" in err


def test_test_without_checkpoint_is_one_line(config):
    err = one_line_error("test", "--config", str(config), "--ckpt_path", "last")
    assert "last.ckpt" in err


# --------------------------------------------------------------------------------------------------- loggers
def test_wandb_logger_offline(config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cli = run("fit", "--config", str(config), "--trainer.max_steps=2", "--trainer.logger",
              "lightning.pytorch.loggers.WandbLogger", "--trainer.logger.save_dir", str(tmp_path),
              "--trainer.logger.project", "lit-longctx-test")
    assert cli.trainer.global_step == 2
    assert list(tmp_path.rglob("*.wandb"))


# --------------------------------------------------------------------------------------------------- strategies
@pytest.mark.slow
def test_ddp_two_cpu_processes_train_and_reload(config, tmp_path):
    run_subprocess(["fit", "--config", str(config), "--config", str(REPO / "configs/strategy/ddp.yaml"),
                 "--trainer.devices=2"], tmp_path)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert ckpt["lit_longctx"]["tokens_seen"] == 4 * 4 * 32 * 2  # two ranks
    proc = run_subprocess(["test", "--config", str(config), "--ckpt_path", "last"], tmp_path)
    assert "test/ppl" in proc.stdout


@pytest.mark.slow
def test_fsdp2_two_cpu_processes_shard_train_and_reload(config, tmp_path):
    reports = tmp_path / "shards"
    callbacks = json.dumps([
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "run" / "checkpoints"), "save_last": True}},
        {"class_path": "tests.cli_helpers.ShardReport", "init_args": {"path": str(reports)}},
    ])
    run_subprocess(["fit", "--config", str(config), "--config", str(REPO / "configs/strategy/fsdp2.yaml"),
                 "--trainer.devices=2", f"--trainer.callbacks={callbacks}"], tmp_path)
    for rank in (0, 1):
        fractions = json.loads((reports / f"shards-rank{rank}.json").read_text())
        weights = {k: f for k, f in fractions.items() if "norm" not in k}
        assert all(abs(f - 0.5) < 0.1 for f in weights.values()), weights  # each rank holds about half
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / ".metadata").exists()  # a distributed checkpoint
    main(["convert", "to-hf", "--checkpoint", str(last), "--output", str(tmp_path / "hf")])
    model = from_hf(tmp_path / "hf")
    assert model.config.dim == 32
    proc = run_subprocess(["test", "--config", str(config), "--config", str(REPO / "configs/strategy/fsdp2.yaml"),
                        "--trainer.devices=2", "--ckpt_path", str(last)], tmp_path)
    assert "test/ppl" in proc.stdout


# --------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(("name", "preset_params"), [("allamo_1b", 1_060_456_448), ("llemma_7b", None)])
def test_seed_recipe_configs_parse_and_build_on_meta(name, preset_params, capsys):
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_longctx.hf import config_to_hf
    from lit_longctx.modules import CausalLM

    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(REPO / "configs" / f"{name}.yaml"), "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    init_args = dict(printed["model"]["init_args"])
    init_args.pop("init_from")  # a placeholder path for the user's checkpoint; the preset has the same shapes
    module = CausalLM(**init_args)
    with torch.device("meta"):
        model = module.build_model()
    with torch.device("meta"):  # oracle: transformers' LLaMA of the exported config
        reference = LlamaForCausalLM(LlamaConfig.from_dict(config_to_hf(module.model_config)))
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(p.numel() for p in reference.parameters())
    if preset_params is not None:
        assert n == preset_params
    if name == "llemma_7b":  # θ contracted to 1e4 (paper §2.2) and the Llemma schedule
        assert module.model_config.rope.rope_theta == 10000.0 and module.model_config.vocab_size == 32016
        assert (init_args["min_lr_ratio"], init_args["warmup_steps"], init_args["decay_steps"]) == (0.033, 500, 48000)


# --------------------------------------------------------------------------------------------------- examples
def test_worked_example_subclass(config, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "examples" / "subclass_module"))
    from position_weighted import PositionWeightedLM

    from lit_longctx.modules import CausalLM

    # oracle: with alpha = 0 and no ignored targets the position-weighted loss is the plain mean loss
    torch.manual_seed(0)
    plain = CausalLM(model=ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, ffn_dim=64))
    plain.configure_model()
    weighted = PositionWeightedLM(alpha=0.0, model=plain.model_config)
    weighted.model = plain.model
    ids = torch.randint(0, 50, (3, 12))
    batch = {"input_ids": ids, "labels": torch.randint(0, 50, (3, 12))}
    expected = plain.compute_loss(batch, "train")[0].item()
    assert weighted.compute_loss(batch, "train")[0].item() == pytest.approx(expected, rel=1e-5)
    cli = run("fit", "--config", str(config), "--config", str(REPO / "examples/subclass_module/config.yaml"),
              "--trainer.max_steps=2")
    assert type(cli.model).__name__ == "PositionWeightedLM" and cli.trainer.global_step == 2
    assert "train/last_quarter_loss" in cli.trainer.callback_metrics
