"""CausalLM: schedule, optimizer groups, init_from, checkpoints, export (spec pretraining §4, §7 oracle 15)."""

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lit_longctx.checkpoint import read_checkpoint, save_checkpoint
from lit_longctx.export import export_model
from lit_longctx.hf import CheckpointError, from_hf, load_hf_state_dict, to_hf
from lit_longctx.modules import CausalLM
from lit_longctx.modules.causal_lm import lr_factor
from lit_longctx.nn import ModelConfig, Transformer
from lit_longctx.nn.config import ConfigError

TINY = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


class RandomTokens(Dataset):
    def __init__(self, n: int = 64, t: int = 16, vocab: int = 97, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, t + 1), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.data[i]
        return {"input_ids": row[:-1], "labels": row[1:]}


def loader() -> DataLoader:
    return DataLoader(RandomTokens(), batch_size=4)


def trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kw)


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.0), (250, 5e-5), (500, 1e-4), (24_250, 5.165e-5), (42_000, 7.057e-6), (48_000, 3.3e-6)],
)
def test_llemma_7b_learning_rate(step, expected):
    # spec oracle 15: peak 1e-4, warm-up 500, cosine to 0.033·peak over 48 000 iterations
    lr = 1e-4 * lr_factor(step, 500, 48_000, min_lr_ratio=0.033)
    assert lr == pytest.approx(expected, rel=1e-3, abs=1e-9)


@pytest.mark.parametrize(("step", "expected"), [(6_250, 2.5825e-5), (12_000, 1.65e-6)])
def test_llemma_34b_learning_rate(step, expected):
    assert 5e-5 * lr_factor(step, 500, 12_000, min_lr_ratio=0.033) == pytest.approx(expected, rel=1e-3)


def test_landmark_cosine_cycles_end_value():
    # HF cosine with num_cycles=0.4 ends at ½(1 + cos(0.8π)) ≈ 0.0955 of the peak (landmark recipe)
    assert lr_factor(15_000, 450, 15_000, min_lr_ratio=0.0, cosine_cycles=0.4) == pytest.approx(0.09549, abs=1e-5)
    assert lr_factor(100, 10, 1000, schedule="constant") == 1.0


def test_no_weight_decay_on_norms_and_frozen_parameters_skipped(tmp_path):
    module = CausalLM(model=ModelConfig(**TINY), weight_decay=0.1)
    module.configure_model()
    module.model.model.embed_tokens.weight.requires_grad_(False)
    decay, no_decay = module.parameter_groups()
    decay_ids = {id(p) for p in decay["params"]}
    norms = [m.weight for m in module.model.modules() if type(m).__name__ == "RMSNorm"]
    assert all(id(w) not in decay_ids for w in norms)
    assert {id(w) for w in norms} <= {id(p) for p in no_decay["params"]}
    assert id(module.model.model.embed_tokens.weight) not in decay_ids | {id(p) for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_fit_lowers_loss_and_logs(tmp_path):
    module = CausalLM(model=ModelConfig(**TINY), learning_rate=3e-3, warmup_steps=2)
    t = trainer(tmp_path, max_steps=30)
    t.fit(module, loader(), loader())
    metrics = t.callback_metrics
    assert metrics["train/loss"] < torch.log(torch.tensor(97.0))
    assert {"val/loss", "val/ppl", "train/lr", "train/tokens"} <= set(metrics)
    assert metrics["val/ppl"] == pytest.approx(torch.exp(metrics["val/loss"]).item(), rel=1e-5)
    assert module.tokens_seen == 30 * 4 * 16
    assert module.flops_per_batch == pytest.approx(module.model.flops_per_token(16) * 4 * 16)


def test_vocab_size_from_data_sets_the_preset_vocab():
    module = CausalLM(model="debug", vocab_size=300)
    assert module.model_config.vocab_size == 300


def test_init_from_hf_directory_loads_the_weights(tmp_path):
    source = Transformer(ModelConfig(**TINY))
    to_hf(source, tmp_path / "hf")
    module = CausalLM(init_from=str(tmp_path / "hf"), model="debug")
    module.configure_model()
    assert module.model_config.dim == TINY["dim"]
    for (k, a), (_, b) in zip(source.state_dict().items(), module.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_init_from_checkpoint_with_too_small_vocab_is_an_error(tmp_path):
    save_checkpoint(tmp_path / "m.ckpt", Transformer(ModelConfig(**TINY)))
    with pytest.raises(ConfigError, match="has only 97 embedding rows"):
        CausalLM(init_from=str(tmp_path / "m.ckpt"), vocab_size=500)


def test_lightning_checkpoint_carries_config_tokenizer_and_loads_weights_only(tmp_path):
    from lit_longctx.tokenizers import ByteTokenizer

    module = CausalLM(model=ModelConfig(**{**TINY, "vocab_size": 259}), tokenizer="byte")
    t = trainer(tmp_path, max_steps=2)

    class Bytes(RandomTokens):
        def __init__(self):
            super().__init__(vocab=259)

    t.fit(module, DataLoader(Bytes(), batch_size=4))
    t.save_checkpoint(tmp_path / "last.ckpt")
    raw = torch.load(tmp_path / "last.ckpt", weights_only=True)  # must not need unpickling of custom classes
    assert raw["lit_longctx"]["method"] == "causal"
    loaded = read_checkpoint(tmp_path)  # a run directory: newest last.ckpt below it
    assert isinstance(loaded.tokenizer(), ByteTokenizer)
    model = Transformer(loaded.model_config)
    model.load_state_dict(loaded.state_dict)
    for k, v in module.model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])


def test_checkpoint_of_another_method_is_refused(tmp_path):
    class FakeMethod(CausalLM):
        method = "fot"

    module = FakeMethod(model=ModelConfig(**TINY))
    t = trainer(tmp_path, max_steps=1)
    t.fit(module, loader())
    t.save_checkpoint(tmp_path / "fot.ckpt")
    with pytest.raises(CheckpointError, match="method 'fot'.*lit_longctx.modules.FoT"):
        CausalLM(model=ModelConfig(**TINY)).on_load_checkpoint(torch.load(tmp_path / "fot.ckpt", weights_only=True))


def test_export_keeps_method_layout_and_extra_tensors(tmp_path):
    model = Transformer(ModelConfig(**TINY))
    model.register_parameter("extra_scale", torch.nn.Parameter(torch.full((3,), 2.0)))
    out = export_model(model, tmp_path / "hf", method="causal")
    config = json.loads((out / "config.json").read_text())
    assert config["lit_longctx"]["method"] == "causal"
    assert (out / "lit_longctx_extras.safetensors").exists()
    plain = load_hf_state_dict(out)  # the weights transformers reads hold no extras
    assert "extra_scale" not in plain and torch.equal(plain["lm_head.weight"], model.lm_head.weight)
    # from_hf is the one HF-directory reader (as init_from): extras that the recorded layout cannot hold are an error
    with pytest.raises(CheckpointError, match=r"unexpected \['extra_scale'\]"):
        from_hf(out)
    loaded = read_checkpoint(out)
    assert torch.equal(loaded.state_dict["extra_scale"], torch.full((3,), 2.0))
