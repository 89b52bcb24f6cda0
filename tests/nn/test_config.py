"""ModelConfig / RopeConfig: presets (parameter counts against transformers on the meta device), derived fields,
HF rope dict conversion, and validation messages."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_longctx.hf import config_to_hf
from lit_longctx.nn import PRESETS, ConfigError, ModelConfig, RopeConfig, Transformer, resolve_model_config
from lit_longctx.nn.attention import build_attention
from lit_longctx.nn.config import llama_ffn_dim

# Published parameter counts (HF model cards / config arithmetic); transformers on the meta device is the oracle below.
KNOWN_PARAMS = {
    "openllama-3b": 3_426_473_600,
    "llama2-7b": 6_738_415_616,
    "codellama-7b": 6_738_546_688,
    "llama3-8b": 8_030_261_248,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llemma-7b": 6_738_546_688,
    "llemma-34b": 33_743_970_304,
}

# Published config.json values that the presets must carry.
PUBLISHED = {
    "openllama-3b": dict(head_dim=100, n_heads=32, n_kv_heads=32, norm_eps=1e-6, max_seq_len=2048),
    "codellama-7b": dict(vocab_size=32016, max_seq_len=16384, rope_theta=1e6),
    "llemma-7b": dict(vocab_size=32016, max_seq_len=4096, rope_theta=1e4),  # θ contracted from 1e6 (Llemma §2.2)
    "llemma-34b": dict(vocab_size=32000, n_kv_heads=8, ffn_dim=22016, rope_theta=1e6),
    "llama3.1-8b": dict(rope_type="llama3", factor=8.0, max_seq_len=131072, rope_theta=5e5),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_on_meta_and_matches_transformers_param_count(name):
    config = ModelConfig.from_preset(name)
    with torch.device("meta"):
        ours = Transformer(config)
        theirs = LlamaForCausalLM(LlamaConfig(**config_to_hf(config)))
    n_hf = sum(p.numel() for p in theirs.parameters())
    assert all(p.is_meta for p in ours.parameters())
    assert ours.num_params() == n_hf == config.num_params()
    if name in KNOWN_PARAMS:
        assert n_hf == KNOWN_PARAMS[name]
    # same tensor names and shapes as transformers
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()
    }


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_carry_published_values(name):
    config = ModelConfig.from_preset(name)
    for key, value in PUBLISHED[name].items():
        holder = config.rope if key in ("rope_theta", "rope_type", "factor") else config
        assert getattr(holder, key) == value, key


def test_preset_overrides_merge_rope_fields():
    config = ModelConfig.from_preset("llama2-7b", max_seq_len=8192, rope={"rope_type": "linear", "factor": 2.0})
    assert config.max_seq_len == 8192
    assert (config.rope.rope_theta, config.rope.rope_type, config.rope.factor) == (1e4, "linear", 2.0)
    assert PRESETS["llama2-7b"]["max_seq_len"] == 4096  # the preset table itself is untouched


def test_derived_fields():
    c = ModelConfig(vocab_size=10, dim=64, n_layers=1, n_heads=4)
    assert (c.n_kv_heads, c.head_dim, c.q_dim, c.kv_dim) == (4, 16, 64, 64)
    c = ModelConfig(vocab_size=10, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=100)
    assert (c.q_dim, c.kv_dim) == (200, 100)
    # Meta's FFN rule (spec §5.3): 4096 -> 11008, 8192 -> 22016; Llama 3: multiplier 1.3, multiple_of 1024 -> 14336
    assert llama_ffn_dim(4096) == 11008
    assert llama_ffn_dim(8192) == 22016
    assert llama_ffn_dim(4096, multiple_of=1024, ffn_dim_multiplier=1.3) == 14336
    assert ModelConfig(vocab_size=10, dim=4096, n_layers=1, n_heads=32).ffn_dim == 11008


def test_to_dict_from_dict_round_trip():
    c = ModelConfig.from_preset("llama3.1-8b", layer_attention={3: "causal"})
    d = c.to_dict()
    assert isinstance(d["rope"], dict)
    assert ModelConfig.from_dict(d) == c


def test_resolve_model_config():
    assert resolve_model_config("debug") == ModelConfig.from_preset("debug")
    assert resolve_model_config({"preset": "debug", "n_layers": 3}).n_layers == 3
    c = ModelConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2)
    assert resolve_model_config(c) is c
    assert resolve_model_config(c.to_dict()) == c
    with pytest.raises(ConfigError, match="preset name, a dict or a ModelConfig"):
        resolve_model_config(3)


# --------------------------------------------------------------------------------------------------- rope dicts
def test_rope_from_hf_reads_v4_and_v5_layouts():
    v4 = RopeConfig.from_hf(5e5, {"type": "linear", "factor": 2.0})
    assert (v4.rope_theta, v4.rope_type, v4.factor) == (5e5, "linear", 2.0)
    v5 = RopeConfig.from_hf(1e4, {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                  "original_max_position_embeddings": 4096, "partial_rotary_factor": 1.0})
    assert (v5.rope_theta, v5.rope_type, v5.factor, v5.original_max_position_embeddings) == (1e6, "yarn", 4.0, 4096)
    assert RopeConfig.from_hf(1e4, None) == RopeConfig()
    assert RopeConfig.from_hf(1e4, {"rope_type": "default", "rope_theta": 1e4}) == RopeConfig()


@pytest.mark.parametrize(
    "rope",
    [
        RopeConfig(rope_type="linear", factor=2.0),
        RopeConfig(rope_type="dynamic", factor=4.0),
        RopeConfig(rope_type="yarn", factor=8.0, original_max_position_embeddings=4096, beta_fast=16.0),
        RopeConfig(rope_theta=5e5, rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192),
    ],
    ids=lambda r: r.rope_type,
)
def test_rope_hf_dict_round_trip(rope):
    d = rope.to_hf()
    assert d["rope_type"] == rope.rope_type
    assert RopeConfig.from_hf(rope.rope_theta, d) == rope


def test_freq_scale_exports_as_linear_factor():
    assert RopeConfig(freq_scale=0.25).to_hf() == {"rope_type": "linear", "factor": 4.0}
    assert RopeConfig().to_hf() is None
    with pytest.raises(ConfigError, match="freq_scale cannot be combined"):
        RopeConfig(rope_type="linear", factor=2.0, freq_scale=0.5).to_hf()


# --------------------------------------------------------------------------------------------------- bad input
def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 32, "dim": 64, "n_layers": 2, "n_heads": 4, **kw})


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"unknown model preset 'llama9-1b'; available presets: .*llama2-7b"):
        ModelConfig.from_preset("llama9-1b")


def test_heads_not_dividing_dim():
    with pytest.raises(ConfigError, match=r"n_heads=5 does not divide dim=64.*set head_dim explicitly"):
        tiny(n_heads=5)
    assert tiny(n_heads=5, n_kv_heads=5, head_dim=16).q_dim == 80  # the suggested fix works


def test_kv_heads_not_dividing_heads():
    with pytest.raises(ConfigError, match=r"n_kv_heads=3 does not divide n_heads=4.*multiple of n_kv_heads"):
        tiny(n_kv_heads=3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
        ({"head_dim": 15}, "head_dim=15 must be even for rotary embeddings"),
        ({"norm_eps": 0.0}, "norm_eps must be positive"),
        ({"attn_backend": "xformers"}, "attn_backend='xformers' is unknown; use sdpa, eager or flash_attn"),
        ({"layer_attention": {5: "causal"}}, r"layer_attention names layers \[5\] but the model has n_layers=2"),
    ],
)
def test_model_field_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**fields)


@pytest.mark.parametrize(
    ("rope", "message"),
    [
        ({"rope_type": "ntk"}, r"rope_type='ntk' is not supported; use one of none, linear, dynamic, yarn, llama3"),
        ({"rope_type": "linear"}, r"rope_type=linear needs a positive rope.factor"),
        ({"rope_type": "dynamic", "factor": -1.0}, r"rope_type=dynamic needs a positive rope.factor"),
        ({"rope_type": "yarn", "factor": 4.0}, r"rope_type=yarn needs rope.original_max_position_embeddings"),
        ({"rope_type": "llama3", "factor": 8.0}, r"rope_type=llama3 needs rope.original_max_position_embeddings"),
        ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
         r"needs rope.low_freq_factor < rope.high_freq_factor"),
        ({"rope_theta": 0.0}, "rope.rope_theta must be positive"),
        ({"freq_scale": 0.0}, "rope.freq_scale must be positive"),
    ],
)


def test_rope_errors(rope, message):
    with pytest.raises(ConfigError, match=message):
        tiny(rope=rope)


def test_rope_from_hf_errors():
    with pytest.raises(ConfigError, match=r"rope_type='longrope' is not supported by lit-longctx"):
        RopeConfig.from_hf(1e4, {"rope_type": "longrope", "short_factor": [1.0]})
    with pytest.raises(ConfigError, match=r"unsupported rope scaling keys \['alpha'\]"):
        RopeConfig.from_hf(1e4, {"rope_type": "linear", "factor": 2.0, "alpha": 1.0})


def test_unknown_keys_and_attention_kinds():
    with pytest.raises(ConfigError, match=r"unknown ModelConfig keys \['hidden_size'\]"):
        ModelConfig.from_dict({"hidden_size": 64})
    with pytest.raises(ConfigError, match=r"unknown attention kind 'nope'; available kinds: .*causal"):
        build_attention(tiny(attention="nope"), 0)
    with pytest.raises(ConfigError, match=r"bad attention_options for kind 'causal'"):
        build_attention(tiny(attention_options={"causal": {"window": 4}}), 0)


def test_dtype_names_parse_to_torch_dtypes_and_others_are_refused():
    import torch

    from lit_longctx.nn.config import parse_dtype

    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("torch.float16") is torch.float16
    assert parse_dtype("float") is torch.float32 and parse_dtype(torch.float64) is torch.float64
    assert parse_dtype(None) is None
    with pytest.raises(ConfigError, match=r"mem_dtype='int8' is not a floating dtype; use one of bfloat16, bf16"):
        parse_dtype("int8", "mem_dtype")
