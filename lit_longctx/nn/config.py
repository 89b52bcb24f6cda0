"""Typed model configuration: :class:`ModelConfig`, :class:`RopeConfig`, validation and named presets.

Field names follow the LLaMA vocabulary (dim, n_layers, n_heads, ...); :mod:`lit_longctx.hf` maps them to and from
Hugging Face ``LlamaConfig`` keys. RoPE scaling keys are those of transformers' ``rope_scaling`` /
``rope_parameters`` dicts so a value can be copied between the two unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

RopeType = Literal["none", "default", "linear", "dynamic", "yarn", "llama3"]


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which and how to fix it.

    Each message is also kept in :attr:`raised`: jsonargparse reports an error raised while it tries the alternatives
    of a ``Union`` (``str | ModelConfig``, ``str | TextSource``) as text only, dropping the exception, so the CLI finds
    the user's problem in that text by these messages (and never mistakes a bug's message for one).
    """

    raised: ClassVar[deque[str]] = deque(maxlen=64)

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        ConfigError.raised.append(str(self))


_DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32",
                "float64": "float64", "fp64": "float64"}


def parse_dtype(value: Any, what: str = "dtype") -> Any:
    """A torch floating dtype from a config value: its name (``bfloat16``/``bf16``, ``float16``/``fp16``/``half``,
    ``float32``/``fp32``/``float``, ``float64``/``fp64``, optionally ``torch.``-prefixed) or a ``torch.dtype``;
    None stays None. ``what`` names the setting in the error."""
    import torch

    if value is None or isinstance(value, torch.dtype):
        return value
    name = _DTYPE_NAMES.get(str(value).removeprefix("torch."))
    if name is None:
        raise ConfigError(f"{what}={value!r} is not a floating dtype; use one of {', '.join(_DTYPE_NAMES)}")
    return getattr(torch, name)


@dataclass
class RopeConfig:
    """Rotary position embedding settings (key names as in transformers' ``rope_scaling``).

    Args:
        rope_theta: RoPE base θ (10 000 for LLaMA-1/2, 1e6 for Code Llama, 5e5 for Llama 3).
        rope_type: scaling kind: ``none`` (plain RoPE), ``linear`` (position interpolation), ``dynamic``
            (dynamic NTK), ``yarn`` or ``llama3``.
        factor: context-extension factor f for linear / dynamic / yarn / llama3.
        original_max_position_embeddings: pre-extension context L0 (required by yarn and llama3).
        low_freq_factor: llama3 only (Llama 3.1 uses 1).
        high_freq_factor: llama3 only (Llama 3.1 uses 4).
        beta_fast: yarn only, extrapolation boundary in rotations (default 32).
        beta_slow: yarn only, interpolation boundary in rotations (default 1).
        attention_factor: yarn only; overrides the 0.1·ln f + 1 cos/sin multiplier.
        mscale: yarn only, used with ``mscale_all_dim`` to derive the attention factor.
        mscale_all_dim: yarn only.
        truncate: yarn only, round the correction range to integers (default true).
        freq_scale: llama.cpp-style multiplier on positions (angle = freq_scale·p·θ^(-2i/Q)); ``1/freq_scale`` is
            the equivalent linear ``factor``. Reproduces ALLaMo's README table; 1.0 disables it.
    """

    rope_theta: float = 10000.0
    rope_type: RopeType = "none"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None
    freq_scale: float = 1.0

    @property
    def kind(self) -> str:
        return "default" if self.rope_type in ("none", "default") else self.rope_type

    def validate(self) -> None:
        if self.rope_type not in ("none", "default", "linear", "dynamic", "yarn", "llama3"):
            raise ConfigError(
                f"rope.rope_type={self.rope_type!r} is not supported; use one of none, linear, dynamic, yarn, llama3"
            )
        if self.rope_theta <= 0:
            raise ConfigError(f"rope.rope_theta must be positive, got {self.rope_theta}")
        if self.freq_scale <= 0:
            raise ConfigError(f"rope.freq_scale must be positive, got {self.freq_scale}")
        if self.kind in ("linear", "dynamic", "llama3") and (self.factor is None or self.factor <= 0):
            raise ConfigError(f"rope.rope_type={self.rope_type} needs a positive rope.factor (e.g. 2.0 or 8.0)")
        if self.kind in ("yarn", "llama3") and not self.original_max_position_embeddings:
            raise ConfigError(
                f"rope.rope_type={self.rope_type} needs rope.original_max_position_embeddings "
                "(the context length the model was pretrained with, e.g. 4096 or 8192)"
            )
        if self.kind == "llama3":
            lf, hf = self.low_freq_factor, self.high_freq_factor
            if lf is None or hf is None or hf <= lf:
                raise ConfigError(
                    "rope.rope_type=llama3 needs rope.low_freq_factor < rope.high_freq_factor (Llama 3.1: 1 and 4)"
                )

    def to_hf(self) -> dict[str, Any] | None:
        """The transformers ``rope_scaling`` dict (None for plain RoPE). ``freq_scale`` is folded into ``linear``."""
        if self.kind == "default":
            if self.freq_scale == 1.0:
                return None
            return {"rope_type": "linear", "factor": 1.0 / self.freq_scale}
        if self.freq_scale != 1.0:
            raise ConfigError(
                "rope.freq_scale cannot be combined with a rope_type when exporting to transformers; "
                "express the scaling as rope.factor instead"
            )
        keys = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "beta_fast",
                "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")
        out: dict[str, Any] = {"rope_type": self.kind}
        out.update({k: getattr(self, k) for k in keys if getattr(self, k) is not None})
        return out

    @classmethod
    def from_hf(cls, rope_theta: float, rope_scaling: dict[str, Any] | None) -> RopeConfig:
        """Build from transformers' ``rope_theta`` + ``rope_scaling`` (v4) or ``rope_parameters`` (v5) values."""
        scaling = dict(rope_scaling or {})
        rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        scaling.pop("type", None)
        rope_theta = scaling.pop("rope_theta", rope_theta)
        scaling.pop("partial_rotary_factor", None)
        if rope_type not in ("default", "linear", "dynamic", "yarn", "llama3"):
            raise ConfigError(
                f"rope_type={rope_type!r} is not supported by lit-longctx (supported: default, linear, dynamic, yarn, "
                "llama3)"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(scaling) - known
        if unknown:
            raise ConfigError(f"unsupported rope scaling keys {sorted(unknown)} for rope_type={rope_type!r}")
        return cls(rope_theta=float(rope_theta), rope_type="none" if rope_type == "default" else rope_type, **scaling)


@dataclass
class ModelConfig:
    """A LLaMA-family decoder.

    Args:
        vocab_size: number of token embeddings (and logits).
        dim: model width (HF ``hidden_size``).
        n_layers: decoder blocks.
        n_heads: query heads.
        n_kv_heads: key/value heads (GQA when < n_heads, MQA when 1); defaults to n_heads.
        head_dim: per-head width; defaults to dim // n_heads. Need not divide dim (OpenLLaMA-3B uses 100).
        ffn_dim: SwiGLU hidden width (HF ``intermediate_size``); defaults to LLaMA's 256-multiple of 8·dim/3.
        norm_eps: RMSNorm (or LayerNorm) epsilon (Llama 2/3: 1e-5, OpenLLaMA: 1e-6).
        tie_embeddings: share the input embedding with the output projection.
        max_seq_len: the context the model was trained for (HF ``max_position_embeddings``). RoPE is computed for
            any position, so this only feeds scaling rules, exports and the length checks of data modules.
        rope: rotary embedding settings.
        attention: attention kind used by every layer unless ``layer_attention`` says otherwise (see
            ``lit_longctx.nn.attention.available_attentions()``).
        layer_attention: per-layer override, layer index -> attention kind (e.g. FoT memory layers).
        attention_options: kind -> keyword options for that kind's module (e.g. ``{"landmark": {"mem_freq": 50}}``).
        attn_backend: kernel for softmax attention: ``sdpa`` (default), ``eager`` (reference) or ``flash_attn``
            (used only when the package is installed and inputs are half precision on CUDA; otherwise sdpa).
        attention_bias: biases on q/k/v/o projections (HF ``attention_bias``).
        mlp_bias: biases on the MLP projections (HF ``mlp_bias``).
        init_std: standard deviation of the normal weight initialisation.
        bos_token_id: recorded for exports; the tokenizer is the source of truth.
        eos_token_id: recorded for exports.
        pad_token_id: recorded for exports.
        norm: ``rmsnorm`` (LLaMA) or ``layernorm`` (GPT-2-style, no bias; the Landmark seed's PG19 model).
        mlp: ``swiglu`` (LLaMA: gate/up/down) or ``gelu`` (GPT-2: up/down with exact GELU).
        fused_qkv: one ``qkv_proj`` (q, k, v rows stacked, GPT-2's ``c_attn``) instead of q/k/v projections.
        rope_pairs: ``half`` (HF/LLaMA: dims i and i + D/2 rotate together) or ``interleaved`` (dims 2i, 2i+1, the
            seed's GPT rotary); same frequencies θ^(−2i/D).
    """

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_dim: int | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    rope: RopeConfig = field(default_factory=RopeConfig)
    attention: str = "causal"
    layer_attention: dict[int, str] = field(default_factory=dict)
    attention_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    attn_backend: Literal["sdpa", "eager", "flash_attn"] = "sdpa"
    attention_bias: bool = False
    mlp_bias: bool = False
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    fused_qkv: bool = False
    rope_pairs: Literal["half", "interleaved"] = "half"

    def __post_init__(self) -> None:
        if isinstance(self.rope, dict):
            self.rope = RopeConfig(**self.rope)
        self.layer_attention = {int(k): v for k, v in self.layer_attention.items()}
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.n_heads > 0 and self.dim % self.n_heads:
                raise ConfigError(
                    f"n_heads={self.n_heads} does not divide dim={self.dim}; choose a head count that divides the "
                    "width, or set head_dim explicitly"
                )
            self.head_dim = self.dim // max(self.n_heads, 1)
        if self.ffn_dim is None:
            self.ffn_dim = llama_ffn_dim(self.dim)
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}; grouped-query attention "
                "needs n_heads to be a multiple of n_kv_heads (use e.g. 1, 2, 4 or 8 KV heads)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.attn_backend not in ("sdpa", "eager", "flash_attn"):
            raise ConfigError(f"attn_backend={self.attn_backend!r} is unknown; use sdpa, eager or flash_attn")
        choices = (("norm", self.norm, ("rmsnorm", "layernorm")), ("mlp", self.mlp, ("swiglu", "gelu")),
                   ("rope_pairs", self.rope_pairs, ("half", "interleaved")))
        for name, value, allowed in choices:
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} is unknown; use {' or '.join(allowed)}")
        bad = [i for i in self.layer_attention if not 0 <= i < self.n_layers]
        if bad:
            raise ConfigError(
                f"layer_attention names layers {bad} but the model has n_layers={self.n_layers} (indices 0.."
                f"{self.n_layers - 1})"
            )
        self.rope.validate()

    def attention_kind(self, layer_idx: int) -> str:
        return self.layer_attention.get(layer_idx, self.attention)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def is_llama(self) -> bool:
        """Whether the blocks are LLaMA's (what HF ``LlamaForCausalLM`` can hold), not the GPT-style options."""
        return (self.norm, self.mlp, self.fused_qkv, self.rope_pairs) == ("rmsnorm", "swiglu", False, "half")

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count computed from the shapes (no model needed).

        ``include_embedding=False`` leaves out the input embedding (a gather, not a matmul, for FLOP counts); a tied
        table is also the output projection, so it stays counted.
        """
        attn = self.dim * (self.q_dim + 2 * self.kv_dim) + self.q_dim * self.dim
        if self.attention_bias:
            attn += self.q_dim + 2 * self.kv_dim + self.dim
        mats = 3 if self.mlp == "swiglu" else 2
        mlp = mats * self.dim * self.ffn_dim + ((mats - 1) * self.ffn_dim + self.dim if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * self.dim
        total = self.n_layers * per_layer + self.dim
        table = self.vocab_size * self.dim
        if self.tie_embeddings:  # one table serves as embedding and output projection: counted once either way
            return total + table
        return total + table + (table if include_embedding else 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown ModelConfig keys {sorted(unknown)}; valid keys: {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("rope"), dict):
            d["rope"] = RopeConfig(**d["rope"])
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; available presets: {', '.join(sorted(PRESETS))}")
        d = dict(PRESETS[name])
        if "rope" in overrides and isinstance(overrides["rope"], dict) and isinstance(d.get("rope"), dict):
            overrides = {**overrides, "rope": {**d["rope"], **overrides["rope"]}}
        d.update(overrides)
        return cls.from_dict(d)


def llama_ffn_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's FFN width rule: multiple_of·ceil(m·int(8·dim/3)/multiple_of) (4096 -> 11008)."""
    hidden = int(8 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def _llama3_rope(factor: float = 8.0) -> dict[str, Any]:
    return {"rope_theta": 500000.0, "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# Values from the published HF config.json files (and for ALLaMo, its config/train_1B.json).
PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=256,
                  norm_eps=1e-5),
    "openllama-3b": dict(vocab_size=32000, dim=3200, n_layers=26, n_heads=32, head_dim=100, ffn_dim=8640,
                         max_seq_len=2048, norm_eps=1e-6, rope={"rope_theta": 10000.0}, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0),
    "llama2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008, max_seq_len=4096,
                      norm_eps=1e-5, rope={"rope_theta": 10000.0}, bos_token_id=1, eos_token_id=2),
    "codellama-7b": dict(vocab_size=32016, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008, max_seq_len=16384,
                         norm_eps=1e-5, rope={"rope_theta": 1000000.0}, bos_token_id=1, eos_token_id=2),
    "llama3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      max_seq_len=8192, norm_eps=1e-5, rope={"rope_theta": 500000.0}, bos_token_id=128000,
                      eos_token_id=128001),
    "llama3.1-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                        max_seq_len=131072, norm_eps=1e-5, rope=_llama3_rope(), bos_token_id=128000,
                        eos_token_id=128001),
    "llama3.1-70b": dict(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                         max_seq_len=131072, norm_eps=1e-5, rope=_llama3_rope(), bos_token_id=128000,
                         eos_token_id=128001),
    "llama3.1-405b": dict(vocab_size=128256, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248,
                          max_seq_len=131072, norm_eps=1e-5, rope=_llama3_rope(), bos_token_id=128000,
                          eos_token_id=128001),
    "llemma-7b": dict(vocab_size=32016, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008, max_seq_len=4096,
                      norm_eps=1e-5, rope={"rope_theta": 10000.0}, bos_token_id=1, eos_token_id=2),
    "llemma-34b": dict(vocab_size=32000, dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, ffn_dim=22016,
                       max_seq_len=4096, norm_eps=1e-5, rope={"rope_theta": 1000000.0}, bos_token_id=1,
                       eos_token_id=2),
    "allamo-1b": dict(vocab_size=8000, dim=2048, n_layers=20, n_heads=16, ffn_dim=5632, max_seq_len=2048,
                      norm_eps=1e-5, rope={"rope_theta": 10000.0}),
}


def resolve_model_config(model: str | ModelConfig | dict[str, Any]) -> ModelConfig:
    """A preset name, a dict of fields (optionally with ``preset`` as the base) or a ModelConfig."""
    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, str):
        return ModelConfig.from_preset(model)
    if isinstance(model, dict):
        d = dict(model)
        preset = d.pop("preset", None)
        return ModelConfig.from_preset(preset, **d) if preset else ModelConfig.from_dict(d)
    raise ConfigError(f"model must be a preset name, a dict or a ModelConfig, got {type(model).__name__}")
