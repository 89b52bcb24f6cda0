"""HF checkpoint directories in and out: exact tensor round trips (single file, sharded, .bin), loading the export
with ``transformers.AutoModelForCausalLM`` (no missing / unexpected keys, rope scaling kept, same logits), config
mapping, and the errors for directories that are not LLaMA checkpoints.

Oracles: the tensors transformers itself wrote (``save_pretrained``), transformers' loading report and logs, and the
logits of transformers' model.
"""

from __future__ import annotations

import json
import logging
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from lit_longctx.hf import (
    CheckpointError,
    config_from_hf,
    config_to_hf,
    from_hf,
    load_hf_state_dict,
    load_weights,
    resolve_hf_path,
    to_hf,
)
from lit_longctx.nn import ConfigError, ModelConfig, RopeConfig, Transformer
from lit_longctx.tokenizers import ByteTokenizer, load_tokenizer

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


def llama_config(*, tie=False, rope=None, kv_heads=2, head_dim=None) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, **(rope or {})},
        **({"head_dim": head_dim} if head_dim else {}),
    )


@torch.no_grad()
def hf_model(config: LlamaConfig) -> LlamaForCausalLM:
    """An HF model whose every tensor holds distinct random values (norms included), so mix-ups cannot hide."""
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 1.0))
    return model


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory's safetensors files, read with safetensors directly (not our loader)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("model*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_with_transformers(path: Path) -> tuple[LlamaForCausalLM, dict, list[str]]:
    """AutoModelForCausalLM.from_pretrained with its loading report, its warning-level logs and Python warnings."""
    handler = _Captured()
    logger = hf_logging.get_logger("transformers")
    old_level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(old_level)
    messages = handler.messages + [str(w.message) for w in caught]
    return model.eval(), info, messages


def loading_problems(info: dict, messages: list[str]) -> list[str]:
    problems = [f"{k}: {v}" for k, v in info.items() if v]
    words = ("missing", "unexpected", "newly initialized", "not used", "mismatch")
    return problems + [m for m in messages if any(w in m.lower() for w in words)]


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize(
    ("name", "kw"),
    [("gqa", {}), ("tied", {"tie": True}), ("mqa_head_dim_100", {"kv_heads": 1, "head_dim": 100}),
     ("yarn", {"rope": YARN})],
)
def test_round_trip_reproduces_every_tensor(tmp_path, name, kw):
    src = tmp_path / "src"
    hf_model(llama_config(**kw)).save_pretrained(src)
    original = read_safetensors_dir(src)
    out = to_hf(from_hf(src), tmp_path / "out")
    assert_same_tensors(read_safetensors_dir(out), original)


def test_round_trip_of_a_sharded_checkpoint(tmp_path):
    src = tmp_path / "src"
    hf_model(llama_config()).save_pretrained(src, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").exists()
    original = read_safetensors_dir(src)
    model = from_hf(src)
    out = to_hf(model, tmp_path / "out", max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(original)
    assert_same_tensors(read_safetensors_dir(out), original)
    assert_same_tensors(load_hf_state_dict(out), original)


def write_bin_checkpoint(path: Path, config: LlamaConfig, state: dict[str, torch.Tensor], shards: int = 1) -> None:
    path.mkdir(parents=True)
    config.save_pretrained(path)
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, path / name)
        weight_map.update(dict.fromkeys(part, name))
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin_checkpoints_load_exactly(tmp_path, shards):
    config = llama_config()
    state = {k: v.clone() for k, v in hf_model(config).state_dict().items()}
    write_bin_checkpoint(tmp_path / "bin", config, state, shards)
    out = to_hf(from_hf(tmp_path / "bin"), tmp_path / "out")
    assert_same_tensors(read_safetensors_dir(out), state)


class _NotATensor:
    pass


def test_bin_files_are_loaded_with_weights_only(tmp_path):
    """A pickle carrying arbitrary objects is refused (weights_only=True), not executed."""
    config = llama_config()
    state = dict(hf_model(config).state_dict())
    state["model.norm.weight"] = _NotATensor()
    write_bin_checkpoint(tmp_path / "bin", config, state)
    with pytest.raises(CheckpointError, match="holds Python objects besides tensors and is refused") as refused:
        from_hf(tmp_path / "bin")
    assert isinstance(refused.value.__cause__, pickle.UnpicklingError)
    assert "Weights only load failed" in str(refused.value.__cause__)


# ---------------------------------------------------------------------------------- export read by transformers
@pytest.mark.parametrize(
    ("name", "kw", "length"),
    [("plain", {}, 48), ("tied", {"tie": True}, 48), ("yarn", {"rope": YARN}, 150),
     ("llama3", {"rope": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16}}, 150),
     ("dynamic", {"rope": {"rope_type": "dynamic", "factor": 2.0}}, 150)],
)


@torch.no_grad()
def test_export_loads_in_transformers_without_warnings_and_keeps_rope(tmp_path, name, kw, length):
    ref = hf_model(llama_config(**kw))
    ours = Transformer(config_from_hf(ref.config.to_dict())).eval()
    load_weights(ours, ref.state_dict())
    out = to_hf(ours, tmp_path / "out")
    loaded, info, messages = load_with_transformers(out)
    assert loading_problems(info, messages) == []
    expected_rope = {"rope_theta": 1e4, "rope_type": "default", **kw.get("rope", {})}
    assert {k: v for k, v in loaded.config.rope_parameters.items() if v is not None} == expected_rope
    assert loaded.config.tie_word_embeddings is kw.get("tie", False)
    x = torch.randint(0, 256, (2, length))
    assert (loaded(x).logits - ours(x).logits).abs().max().item() < 1e-4


def test_loading_report_catches_unexpected_keys(tmp_path):
    """The warning capture above can fail: an extra tensor in the export is reported."""
    ours = Transformer(config_from_hf(llama_config().to_dict()))
    out = to_hf(ours, tmp_path / "out")
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _, info, messages = load_with_transformers(out)
    assert any("extra" in p for p in loading_problems(info, messages))


@torch.no_grad()
def test_freq_scale_is_exported_as_linear_scaling(tmp_path):
    config = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=64,
                         rope=RopeConfig(freq_scale=0.25), init_std=0.3)
    ours = Transformer(config).eval()
    loaded, _, _ = load_with_transformers(to_hf(ours, tmp_path / "out"))
    assert loaded.config.rope_parameters["rope_type"] == "linear"
    assert loaded.config.rope_parameters["factor"] == 4.0
    x = torch.randint(0, 256, (1, 100))
    assert (loaded(x).logits - ours(x).logits).abs().max().item() < 1e-4


def test_export_extras_and_tokenizer(tmp_path):
    ours = Transformer(config_from_hf(llama_config().to_dict()))
    extra = {"feature_map.weight": torch.arange(6.0).view(2, 3)}
    out = to_hf(ours, tmp_path / "out", dtype=torch.bfloat16, tokenizer=ByteTokenizer(),
                extra_config={"mem_layers": [1]}, extra_tensors=extra)
    config = json.loads((out / "config.json").read_text())
    assert config["mem_layers"] == [1] and config["dtype"] == "bfloat16"
    assert torch.equal(load_file(str(out / "lit_longctx_extras.safetensors"))["feature_map.weight"],
                       extra["feature_map.weight"])
    assert all(t.dtype == torch.bfloat16 for t in read_safetensors_dir(out).values())
    assert load_tokenizer(out).kind == "byte"
    _, info, messages = load_with_transformers(out)
    assert loading_problems(info, messages) == []


# ------------------------------------------------------------------------------------------------- config mapping
def test_config_mapping_both_ways():
    hf = llama_config(rope=YARN, kv_heads=1, head_dim=100).to_dict()
    config = config_from_hf(hf)
    assert (config.vocab_size, config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim,
            config.ffn_dim, config.norm_eps, config.max_seq_len) == (256, 64, 2, 4, 1, 100, 176, 1e-5, 64)
    assert config.rope == RopeConfig(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)
    back = config_to_hf(config)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
        assert back[key] == hf[key], key
    assert config_from_hf(back) == config


def test_config_from_v4_style_dict_and_overrides():
    hf = {"model_type": "llama", "vocab_size": 32016, "hidden_size": 64, "intermediate_size": 176,
          "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 1e6,
          "rope_scaling": {"type": "linear", "factor": 2.0}, "eos_token_id": [2, 7]}
    config = config_from_hf(hf)
    assert (config.rope.rope_theta, config.rope.rope_type, config.rope.factor) == (1e6, "linear", 2.0)
    assert config.n_kv_heads == 4 and config.eos_token_id == 2 and config.norm_eps == 1e-6
    # Llemma 7B: θ contracted from Code Llama's 1e6 to 1e4
    assert config_from_hf(hf, rope_theta=1e4, max_seq_len=4096).rope.rope_theta == 1e4


def test_from_hf_dtype_and_overrides(tmp_path):
    hf_model(llama_config()).save_pretrained(tmp_path / "src")
    model = from_hf(tmp_path / "src", dtype=torch.bfloat16, attn_backend="eager", rope_theta=5e5)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    assert model.config.attn_backend == "eager" and model.config.rope.rope_theta == 5e5


def test_legacy_rotary_buffers_and_compile_prefixes_are_ignored():
    ref = hf_model(llama_config())
    state = {f"_orig_mod.{k}": v for k, v in ref.state_dict().items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    ours = Transformer(config_from_hf(ref.config.to_dict()))
    load_weights(ours, state)
    assert torch.equal(ours.lm_head.weight, ref.lm_head.weight)


# ---------------------------------------------------------------------------------------------------- bad input
def test_gpt2_directory_is_not_llama(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"not a LLaMA checkpoint: config.json has model_type='gpt2'"):
        from_hf(tmp_path)


def test_directory_without_weights(tmp_path):
    llama_config().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"no weights in .*expected model.safetensors.*found \['config.json'\]"):
        from_hf(tmp_path)


def test_directory_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"has no config.json, so it is not an HF checkpoint \(found \['notes"):
        from_hf(tmp_path)


def test_index_with_a_missing_shard(tmp_path):
    hf_model(llama_config()).save_pretrained(tmp_path, max_shard_size="100KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"lists shards that are missing: \['{victim.name}'\]"):
        from_hf(tmp_path)


def test_weights_that_do_not_fit_the_config(tmp_path):
    hf_model(llama_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vocab_size"] = 300
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"shape mismatches .*model.embed_tokens.weight: checkpoint \(256, 64\)"):
        from_hf(tmp_path)
    ours = Transformer(config_from_hf(llama_config().to_dict()))
    with pytest.raises(CheckpointError, match=r"missing \['lm_head.weight'\]"):
        load_weights(ours, {k: v for k, v in ours.state_dict().items() if k != "lm_head.weight"})


def test_missing_path_file_path_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="HF checkpoint directory '.*nowhere' not found"):
        from_hf(tmp_path / "nowhere")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file; an HF checkpoint is a directory with config.json"):
        from_hf(tmp_path / "model.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="'meta-llama/Llama-2-7b-hf' not found .* it is no local directory "
                                                "and HF_HUB_OFFLINE forbids downloading it"):
        from_hf("meta-llama/Llama-2-7b-hf")


def test_unsupported_activation_and_rope_type():
    hf = llama_config().to_dict()
    with pytest.raises(CheckpointError, match="unsupported hidden_act='gelu'"):
        config_from_hf({**hf, "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="rope_type='longrope' is not supported"):
        config_from_hf({**hf, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0],
                                                  "long_factor": [1.0], "original_max_position_embeddings": 16}})


def test_local_looking_paths_never_reach_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append(repo) or tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    for local in ("runs/quickstrt", "./x", "~/nowhere-at-all", "a/b/c", "org/model.safetensors"):
        with pytest.raises(FileNotFoundError, match="not found"):
            resolve_hf_path(local)
    with pytest.raises(FileNotFoundError, match="did you mean 'runs/quickstart'"):
        resolve_hf_path("runs/quickstrt")
    assert asked == []
    assert resolve_hf_path("meta-llama/Llama-2-7b-hf") == tmp_path and asked == ["meta-llama/Llama-2-7b-hf"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE forbids"):
        resolve_hf_path("meta-llama/Llama-2-7b-hf")
    assert asked == ["meta-llama/Llama-2-7b-hf"]


def test_corrupt_weights_config_and_index_are_checkpoint_errors(tmp_path):
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, ffn_dim=64))
    to_hf(model, tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read weights file '.*model.safetensors' .*corrupt, truncated"):
        from_hf(tmp_path / "hf")
    weights.write_bytes(good)
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama",\n "vocab_size": 64,\n')
    with pytest.raises(CheckpointError, match=r"config.json' is not valid JSON \(line 3, column 1"):
        from_hf(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON list, not the object of an HF config"):
        from_hf(tmp_path / "hf")
