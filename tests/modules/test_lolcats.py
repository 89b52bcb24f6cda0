"""LoLCATs stages as LightningModules (spec §3, §4, §7 oracles 9-11): AttentionTransfer, LinearizedLoRA, the
configs, and the two-stage pipeline through the CLI."""

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Dataset

from lit_longctx.checkpoint import load_model, read_checkpoint, save_checkpoint
from lit_longctx.hf import CheckpointError, config_to_hf
from lit_longctx.modules import AttentionTransfer, CausalLM, LinearizedLoRA
from lit_longctx.modules.lolcats import merge_lora_state
from lit_longctx.nn import ModelConfig, Transformer
from lit_longctx.nn.attention.hybrid_linear import distill_losses
from lit_longctx.nn.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "alpaca_tiny.jsonl"
TINY = dict(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64, init_std=0.2)
HYBRID = dict(feature_dim=8, window_size=4)  # head_dim 8; rows of 24 tokens have a linear part
T = 24


class Rows(Dataset):
    """Random token rows; labels are the next tokens, -100 on the first half of each row (a 'prompt')."""

    def __init__(self, n: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, TINY["vocab_size"], (n, T + 1), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.data[i]
        labels = row[1:].clone()
        labels[: T // 2] = -100
        return {"input_ids": row[:-1], "labels": labels}


def loader(n: int = 16, seed: int = 0) -> DataLoader:
    return DataLoader(Rows(n, seed), batch_size=4)


def trainer(tmp_path, **kw) -> L.Trainer:
    kw = {"logger": False, "enable_checkpointing": False, **kw}
    return L.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, **kw)


@pytest.fixture
def base(tmp_path) -> tuple[Transformer, Path]:
    """A random softmax model saved as a plain (``causal``) checkpoint."""
    model = Transformer(ModelConfig(**TINY))
    return model, save_checkpoint(tmp_path / "base.ckpt", model)


def stage1_model(seed: int = 0) -> Transformer:
    """A linearized model with non-trivial feature maps and window factors (layer 1 kept as softmax)."""
    torch.manual_seed(seed)
    config = ModelConfig(**TINY, attention="hybrid_linear", layer_attention={1: "causal"},
                         attention_options={"hybrid_linear": {**HYBRID, "feature_map_init": "normal",
                                                              "init_window_factor": 0.3}})
    return Transformer(config)


@pytest.fixture
def stage1(tmp_path) -> tuple[Transformer, Path]:
    model = stage1_model()
    return model, save_checkpoint(tmp_path / "stage1.ckpt", model, method="lolcats_transfer")


def ids(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (b, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------- stage 1
def test_transfer_converts_layers_initialises_maps_and_keeps_the_teachers_logits(base):
    teacher, path = base
    module = AttentionTransfer(init_from=str(path), softmax_layers=[1], **HYBRID)
    module.configure_model()
    kinds = [type(layer.self_attn).__name__ for layer in module.model.layers]
    assert kinds == ["HybridLinearAttention", "CausalAttention", "HybridLinearAttention"]
    attn = module.model.layers[0].self_attn
    eye = torch.eye(8).expand(4, 8, 8)  # identity init (--lk_zero_init), γ = 0.1
    assert torch.equal(attn.feature_map_q.mlp.layer, eye) and torch.equal(attn.feature_map_k.mlp.layer, eye)
    torch.testing.assert_close(torch.sigmoid(attn.window_factors), torch.full((1, 4, 1, 1), 0.1))
    x = ids()
    out = module.model(x, distill=True)
    assert torch.equal(out.logits, teacher(x).logits)  # teacher forcing: the original model's logits, bit for bit
    assert not torch.allclose(module.model(x).logits, out.logits, atol=1e-3)  # the hybrid model itself differs


def test_only_feature_maps_and_window_factors_train(base, tmp_path):
    teacher, path = base
    module = AttentionTransfer(init_from=str(path), softmax_layers=[1], lr_scheduler="schedule",
                               lr_schedule="constant", **HYBRID)
    module.configure_model()
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{t}" for i in (0, 2)
                         for t in ("feature_map_q.mlp.layer", "feature_map_k.mlp.layer", "window_factors")}
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer(tmp_path, max_steps=3).fit(module, loader())
    after = module.model.state_dict()
    for k, v in teacher.state_dict().items():
        assert torch.equal(after[k], v), k  # frozen base weights untouched
    assert all(not torch.equal(after[k], before[k]) for k in trainable)


def test_objective_is_the_weighted_mean_over_converted_layers(base):
    _, path = base
    module = AttentionTransfer(init_from=str(path), mse_factor=1000.0, xent_factor=0.5, **HYBRID)
    module.configure_model()
    x = ids()
    loss, logs = module.compute_loss({"input_ids": x, "labels": x}, "train")
    terms = distill_losses(module.model(x, distill=True, distill_xent=True).extras)
    assert sorted(terms) == [0, 1, 2]
    mse = sum(float(t["mse"]) for t in terms.values()) / 3
    xent = sum(float(t["xent"]) for t in terms.values()) / 3
    assert float(loss) == pytest.approx(1000 * mse + 0.5 * xent, rel=1e-5)
    assert {f"mse/layer_{i}" for i in range(3)} <= set(logs)
    assert float(logs["mse/layer_2"]) == pytest.approx(float(terms[2]["mse"]), rel=1e-6)


def test_validation_reports_the_objective_and_per_layer_mse(base, tmp_path):
    _, path = base
    module = AttentionTransfer(init_from=str(path), softmax_layers=[1], **HYBRID)
    t = trainer(tmp_path, max_steps=2, val_check_interval=2, limit_val_batches=2, num_sanity_val_steps=0)
    t.fit(module, loader(), loader(8, seed=5))
    metrics = t.callback_metrics
    assert {"train/mse/layer_0", "train/mse/layer_2", "val/mse/layer_0", "val/mse/layer_2"} <= set(metrics)
    assert "train/mse/layer_1" not in metrics and "val/ppl" not in metrics  # softmax layer; no perplexity
    # val/loss is the token-weighted mean of the objective over the validation rows (equal-sized batches here)
    module.eval()
    with torch.no_grad():
        expected = sum(float(module.compute_loss(b, "val")[0]) for b in list(loader(8, seed=5))[:2]) / 2
    assert float(metrics["val/loss"]) == pytest.approx(expected, rel=1e-5)
    # the objective's MSE term is the mean over the two converted layers
    assert float(metrics["val/mse"]) == pytest.approx(
        (float(metrics["val/mse/layer_0"]) + float(metrics["val/mse/layer_2"])) / 2, rel=1e-5)


class LrAtValidation(L.Callback):
    def __init__(self) -> None:
        self.seen = []

    def on_validation_end(self, trainer, pl_module) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.seen.append((trainer.sanity_checking, float(trainer.callback_metrics.get("val/loss", math.nan)), lr))


def test_reduce_lr_on_plateau_steps_on_the_validation_loss_and_resumes(base, tmp_path):
    _, path = base
    # a learning rate so small that the validation loss cannot improve by the plateau threshold (1e-4 relative)
    kw = dict(init_from=str(path), learning_rate=1e-6, plateau_factor=0.5, plateau_patience=0, min_lr=0.0, **HYBRID)
    module = AttentionTransfer(**kw)
    record = LrAtValidation()
    t = trainer(tmp_path, max_steps=4, val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=1,
                callbacks=[record])
    t.fit(module, loader(), loader(4, seed=5))
    assert record.seen[0][0] and record.seen[1][2] == 1e-6  # the sanity check does not step the scheduler
    runs = [(loss, lr) for sanity, loss, lr in record.seen if not sanity]
    oracle = torch.optim.lr_scheduler.ReduceLROnPlateau(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-6), factor=0.5, patience=0, min_lr=0.0)
    expected = []
    for loss, _ in runs:
        oracle.step(loss)
        expected.append(oracle.optimizer.param_groups[0]["lr"])
    assert [lr for _, lr in runs] == pytest.approx(expected, rel=1e-9)
    assert len(runs) == 4 and expected[-1] < 1e-6  # it did cut the rate
    t.save_checkpoint(tmp_path / "plateau.ckpt")
    saved = torch.load(tmp_path / "plateau.ckpt", weights_only=True)["lolcats_plateau"]
    resumed = AttentionTransfer(**kw)
    trainer(tmp_path, max_steps=4).fit(resumed, loader(), ckpt_path=tmp_path / "plateau.ckpt")
    assert resumed._plateau.state_dict() == saved
    assert resumed.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected[-1])


# --------------------------------------------------------------------------------------------------------- stage 2
def test_lora_starts_equal_to_stage1_and_only_lora_gets_gradients(stage1):
    model, path = stage1
    module = LinearizedLoRA(init_from=str(path))
    module.configure_model()
    x = ids()
    assert torch.equal(module.model(x).logits, model(x).logits)  # B = 0: exactly the stage-1 model
    names = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert names and all(".lora_A.default." in n or ".lora_B.default." in n for n in names)
    projections = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert len(names) == 3 * 4 * 2  # every layer (the softmax one too), q/k/v/o, A and B
    batch = Rows()[0]
    loss, _ = module.compute_loss({k: v.unsqueeze(0) for k, v in batch.items()}, "train")
    loss.backward()
    graded = {n for n, p in module.model.named_parameters() if p.grad is not None}
    assert graded == names
    assert all(float(p.grad.abs().sum()) > 0 for n, p in module.model.named_parameters() if ".lora_B." in n)


def test_fqkvo_keeps_feature_maps_and_window_factors_trainable(stage1):
    _, path = stage1
    module = LinearizedLoRA(init_from=str(path), trainable_extra=["feature_maps", "window_factors"], lora_r=2)
    module.configure_model()
    names = {n for n, p in module.model.named_parameters() if p.requires_grad}
    extra = {n for n in names if ".lora_" not in n}
    assert extra == {f"model.layers.{i}.self_attn.{t}" for i in (0, 2)
                     for t in ("feature_map_q.mlp.layer", "feature_map_k.mlp.layer", "window_factors")}


def test_lora_loss_counts_response_tokens_only(stage1):
    model, path = stage1
    module = LinearizedLoRA(init_from=str(path))
    module.configure_model()
    batch = next(iter(loader()))
    loss, _ = module.compute_loss(batch, "train")
    logits = model(batch["input_ids"]).logits
    keep = batch["labels"] != -100
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], batch["labels"][keep]), rtol=1e-5, atol=1e-6)


def test_lora_training_merges_on_read_and_reloads_for_test(stage1, tmp_path):
    model, path = stage1
    module = LinearizedLoRA(init_from=str(path), learning_rate=1e-2, lr_scheduler="schedule", lr_schedule="constant")
    t = trainer(tmp_path, max_steps=3)
    t.fit(module, loader())
    trained = dict(module.model.named_parameters())
    for k, v in model.state_dict().items():  # everything but LoRA is untouched
        key = k if k in trained else k.replace("_proj.weight", "_proj.base_layer.weight")
        assert torch.equal(trained[key], v), k
    t.save_checkpoint(tmp_path / "lora.ckpt")
    x = ids()
    module.eval()
    with torch.no_grad():
        expected = module.model(x).logits
    loaded = read_checkpoint(tmp_path / "lora.ckpt")  # LoRA merged into W: plain names only
    assert loaded.method == "lolcats_lora" and not any("lora_" in k or "base_layer" in k for k in loaded.state_dict)
    merged, _, _ = load_model(tmp_path / "lora.ckpt")
    torch.testing.assert_close(merged(x).logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.merged_model()(x).logits, expected, rtol=1e-5, atol=1e-5)
    # the checkpoint restores into a fresh module for `test`
    fresh = LinearizedLoRA(init_from=str(path))
    result = trainer(tmp_path).test(fresh, loader(4, seed=9), ckpt_path=tmp_path / "lora.ckpt", verbose=False)
    with torch.no_grad():
        oracle = float(module.compute_loss(next(iter(loader(4, seed=9))), "test")[0])  # one batch
    assert result[0]["test/loss"] == pytest.approx(oracle, rel=1e-5)


def test_merge_lora_state_by_hand():
    a, b, w = torch.randn(2, 5), torch.randn(3, 2), torch.randn(3, 5)
    state = {"x.base_layer.weight": w, "x.lora_A.default.weight": a, "x.lora_B.default.weight": b, "y": torch.ones(1)}
    merged = merge_lora_state(state, 2.0)
    assert set(merged) == {"x.weight", "y"}
    torch.testing.assert_close(merged["x.weight"], w + 2.0 * b @ a)
    with pytest.raises(ValueError, match="incomplete"):
        merge_lora_state({"x.base_layer.weight": w, "x.lora_A.default.weight": a}, 2.0)


def test_no_transfer_baseline_starts_from_identity_maps(base):
    teacher, path = base
    layout = {"attention": "hybrid_linear", "attention_options": {"hybrid_linear": HYBRID}}
    module = LinearizedLoRA(init_from=str(path), no_transfer=True, model_overrides=layout)
    module.configure_model()
    attn = module.model.layers[2].self_attn
    assert torch.equal(attn.feature_map_k.mlp.layer, torch.eye(8).expand(4, 8, 8))
    assert torch.equal(attn.q_proj.base_layer.weight, teacher.layers[2].self_attn.q_proj.weight)


# ------------------------------------------------------------------------------------------------------ bad input
def test_plain_checkpoint_is_refused_by_stage2(base):
    _, path = base
    with pytest.raises(CheckpointError, match="without hybrid_linear layers.*AttentionTransfer.*no_transfer"):
        LinearizedLoRA(init_from=str(path))
    with pytest.raises(ConfigError, match="no_transfer needs model_overrides"):
        LinearizedLoRA(init_from=str(path), no_transfer=True)
    with pytest.raises(ConfigError, match="needs init_from"):
        LinearizedLoRA(model="debug")


def test_stage1_checkpoint_without_feature_maps_is_refused(stage1, tmp_path):
    _, path = stage1
    raw = torch.load(path, weights_only=True)
    raw["state_dict"] = {k: v for k, v in raw["state_dict"].items() if not k.startswith("model.layers.2.self_attn.f")}
    torch.save(raw, tmp_path / "damaged.ckpt")
    module = LinearizedLoRA(init_from=str(tmp_path / "damaged.ckpt"))
    with pytest.raises(CheckpointError, match=r"no trained feature maps / window factors for layers \[2\]"):
        module.configure_model()


def test_causal_checkpoint_with_hybrid_layout_is_accepted_by_stage2(tmp_path):
    model = stage1_model()
    path = save_checkpoint(tmp_path / "hybrid_causal.ckpt", model)  # method causal, but trained feature maps
    module = LinearizedLoRA(init_from=str(path))
    module.configure_model()
    assert torch.equal(module.model(ids()).logits, model(ids()).logits)


def test_stage2_checkpoint_is_refused_by_stage1(stage1, tmp_path):
    _, path = stage1
    module = LinearizedLoRA(init_from=str(path))
    t = trainer(tmp_path, max_steps=1)
    t.fit(module, loader(4))
    t.save_checkpoint(tmp_path / "lora.ckpt")
    with pytest.raises(CheckpointError, match="method 'lolcats_lora'.*LinearizedLoRA"):
        AttentionTransfer(init_from=str(tmp_path / "lora.ckpt"), **HYBRID)
    with pytest.raises(CheckpointError, match="method 'lolcats_lora'"):
        CausalLM(model=ModelConfig(**TINY)).on_load_checkpoint(torch.load(tmp_path / "lora.ckpt", weights_only=True))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"softmax_layers": [3]}, r"softmax_layers names layers \[3\].*3 layers"),
    ({"softmax_layers": [0, 1, 2]}, "nothing to linearize"),
    ({"feature_dim": 16}, "feature_dim <= head_dim=8"),
    ({"window": "wide"}, "window='wide' is unknown"),
    ({"mse_factor": 0.0}, "not both 0"),
    ({"lr_scheduler": "step"}, "lr_scheduler='step' is unknown"),
    ({"plateau_factor": 1.5}, "plateau_factor must lie in"),
])
def test_bad_transfer_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AttentionTransfer(model=ModelConfig(**TINY), **{**HYBRID, **kwargs})


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lora_r": 0}, "lora_r must be a positive integer"),
    ({"lora_targets": ["qkv"]}, r"lora_targets \['qkv'\]"),
    ({"trainable_extra": ["everything"]}, "trainable_extra"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
])
def test_bad_lora_options(stage1, kwargs, match):
    _, path = stage1
    with pytest.raises(ConfigError, match=match):
        LinearizedLoRA(init_from=str(path), **kwargs)


# --------------------------------------------------------------------------------------------------------- configs
CONFIGS = ["lolcats_debug_distill", "lolcats_debug_lora", "lolcats_llama3_8b_distill", "lolcats_llama3_8b_lora",
           "lolcats_llama3_1_70b_distill", "lolcats_llama3_1_70b_lora"]


def printed_config(name: str, capsys) -> dict:
    from lit_longctx.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(REPO / "configs" / f"{name}.yaml"), "--print_config"])
    assert info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_parse(name, capsys):
    config = printed_config(name, capsys)
    stage = "AttentionTransfer" if name.endswith("distill") else "LinearizedLoRA"
    assert config["model"]["class_path"] == f"lit_longctx.modules.{stage}"
    assert config["data"]["class_path"] == "lit_longctx.datamodules.InstructData"


def fake_hf_dir(path: Path, preset: str, method: str = "causal", hybrid: dict | None = None) -> Path:
    """An HF-style directory holding only config.json: enough for a module's __init__ (weights are read later)."""
    path.mkdir(parents=True)
    extra = {}
    if hybrid is not None:
        extra["lit_longctx"] = {"method": method, "attention": "hybrid_linear", "layer_attention": {},
                                "attention_options": {"hybrid_linear": hybrid}}
    (path / "config.json").write_text(json.dumps(config_to_hf(ModelConfig.from_preset(preset), extra)))
    return path


@pytest.mark.parametrize(("size", "preset", "phi", "gamma", "lora"), [
    ("llama3_8b", "llama3-8b", 16_777_216, 1_024, 6_815_744),
    ("llama3_1_70b", "llama3.1-70b", 80 * 64 * 2 * 128 * 64, 80 * 64, 80 * 8 * (2 * 8192 * 2 + 2 * (8192 + 1024))),
])
def test_big_configs_build_on_meta_with_the_published_sizes(size, preset, phi, gamma, lora, tmp_path, capsys):
    distill = printed_config(f"lolcats_{size}_distill", capsys)["model"]["init_args"]
    base = fake_hf_dir(tmp_path / "base", preset)
    args = {k: v for k, v in distill.items() if k not in ("vocab_size", "seq_len")}
    stage1 = AttentionTransfer(**{**args, "init_from": str(base)})
    assert stage1.model_config.rope == ModelConfig.from_preset(preset).rope  # llama3 RoPE scaling for 3.1
    with torch.device("meta"):
        model = stage1.build_model()
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(v for n, v in trainable.items() if "feature_map" in n) == phi
    assert sum(v for n, v in trainable.items() if "window_factors" in n) == gamma
    assert len(trainable) == 3 * ModelConfig.from_preset(preset).n_layers

    lora_args = printed_config(f"lolcats_{size}_lora", capsys)["model"]["init_args"]
    hybrid = stage1.model_config.attention_options["hybrid_linear"]
    done = fake_hf_dir(tmp_path / "stage1", preset, method="lolcats_transfer", hybrid=hybrid)
    args = {k: v for k, v in lora_args.items() if k not in ("vocab_size", "seq_len")}
    stage2 = LinearizedLoRA(**{**args, "init_from": str(done)})
    with torch.device("meta"):
        model = stage2.build_model()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora


# ------------------------------------------------------------------------------------------------ the CLI pipeline
def cli_overrides(root: Path, cache: Path) -> list[str]:
    callbacks = json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                             "init_args": {"dirpath": str(root / "checkpoints"), "filename": "best",
                                           "monitor": "val/loss", "mode": "min", "save_top_k": 1,
                                           "save_last": True}}])
    return [f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
            f"--trainer.callbacks={callbacks}", "--trainer.max_steps=4", "--trainer.val_check_interval=2",
            f"--data.init_args.path={FIXTURE}", f"--data.init_args.cache_dir={cache}"]


def test_two_stage_pipeline_export_and_generation_through_the_cli(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lit_longctx.cli import _make_cli, main

    distill, lora, hf = tmp_path / "distill", tmp_path / "lora", tmp_path / "hf"
    cli = _make_cli(["fit", "--config", str(REPO / "configs/lolcats_debug_distill.yaml"),
                     *cli_overrides(distill, tmp_path / "cache")])
    assert cli.trainer.global_step == 4 and (distill / "checkpoints" / "best.ckpt").exists()
    stage1 = {k: v.clone() for k, v in cli.model.model.state_dict().items()}
    cli = _make_cli(["fit", "--config", str(REPO / "configs/lolcats_debug_lora.yaml"),
                     *cli_overrides(lora, tmp_path / "cache"), f"--model.init_args.init_from={distill}"])
    assert cli.trainer.global_step == 4
    for k, v in stage1.items():  # stage 2 started from the stage-1 run (its last.ckpt) and kept φ, θ frozen
        if "feature_map" in k or "window_factors" in k:
            assert torch.equal(cli.model.model.state_dict()[k], v), k
    main(["convert", "to-hf", "--checkpoint", str(lora), "--output", str(hf)])
    config = json.loads((hf / "config.json").read_text())
    assert config["lit_longctx"]["method"] == "lolcats_lora"
    assert config["lit_longctx"]["attention"] == "hybrid_linear"
    assert (hf / "lit_longctx_extras.safetensors").exists()

    loaded, info = AutoModelForCausalLM.from_pretrained(hf, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    merged = cli.model.merged_model()
    plain = {k: v for k, v in merged.state_dict().items() if "feature_map" not in k and "window_factors" not in k}
    hf_state = loaded.state_dict()
    for k, v in plain.items():
        assert torch.equal(hf_state[k], v), k  # transformers sees the merged LoRA weights

    back, _, _ = load_model(hf)  # and lit-longctx loads the linearized model back
    x = torch.randint(0, 259, (1, 40))
    torch.testing.assert_close(back(x).logits, merged(x).logits)

    capsys.readouterr()
    texts = main(["generate", "--checkpoint", str(hf), "--prompt", "### Instruction:", "--max_new_tokens", "8"])
    captured = capsys.readouterr()
    assert captured.out.startswith("### Instruction:" + texts[0])
    assert texts[0] and "8 tokens in" in captured.err
