"""Rotary position embeddings (RoPE) in the half-rotated ("rotate_half") layout of HF / GPT-NeoX.

inv_freq_i = θ^(-2i/Q); angle(p, i) = p·inv_freq_i; x' = x·cos + rotate_half(x)·sin with the angle table
concatenated twice, [a, a] (Su et al. 2021; pretraining spec §2.1).

Precision (the GPT-NeoX fix, gpt-neox PR #1041): the frequencies and angles are computed here from integer positions in
float64 (float32 on backends without float64), never from a tensor a model-wide ``.to(bfloat16)`` can reach; the
cos/sin tables are returned in float32 and the rotation runs in float32, cast back to the activation dtype only at
the end. Tables are computed for the positions asked for, so there is no precomputed table that stops at
``max_seq_len``.

Scaling kinds (transformers ``modeling_rope_utils`` semantics): linear (position interpolation), dynamic NTK, YaRN,
llama3; plus ``freq_scale``, llama.cpp's multiplier on positions.
"""

from __future__ import annotations

import math

import torch

from lit_longctx.nn.config import RopeConfig


def default_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    """θ^(-2i/Q) for i = 0..Q/2-1 in float64, always on the CPU (also inside a ``torch.device("meta")`` block)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))


def dynamic_ntk_theta(theta: float, factor: float, head_dim: int, seq_len: int, max_seq_len: int) -> float:
    """θ' = θ·((f·L/Lmax) − (f−1))^(Q/(Q−2)) with L = max(seq_len, Lmax) (dynamic NTK)."""
    length = max(seq_len, max_seq_len)
    return theta * ((factor * length / max_seq_len) - (factor - 1)) ** (head_dim / (head_dim - 2))


def yarn_inv_freq(rope: RopeConfig, head_dim: int, max_seq_len: int) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): fast pairs keep their frequency, slow pairs are interpolated by f, linear ramp
    between dim(beta_fast) and dim(beta_slow); cos/sin are multiplied by the attention factor 0.1·ln f + 1."""
    theta = rope.rope_theta
    l0 = rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_seq_len / l0
    beta_fast = rope.beta_fast or 32.0
    beta_slow = rope.beta_slow or 1.0

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.attention_factor is not None:
        attention_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(l0 / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate is None or rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    inv = default_inv_freq(theta, head_dim)
    return inv * (1 - ramp) + (inv / factor) * ramp, attention_factor


def llama3_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Llama 3.1: wavelengths below L0/hf are kept, above L0/lf divided by f, smoothly mixed in between."""
    inv = default_inv_freq(rope.rope_theta, head_dim)
    factor, lf, hf = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    l0 = rope.original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    smooth = (l0 / wavelen - lf) / (hf - lf)
    mixed = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > l0 / lf, inv / factor, inv)
    medium = (wavelen >= l0 / hf) & (wavelen <= l0 / lf)
    return torch.where(medium, mixed, out)


def compute_inv_freq(
    rope: RopeConfig, head_dim: int, max_seq_len: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq in float64, attention_factor) for a RoPE config; ``seq_len`` only matters for dynamic NTK."""
    kind = rope.kind
    if kind == "default":
        inv, attn = default_inv_freq(rope.rope_theta, head_dim), 1.0
    elif kind == "linear":
        inv, attn = default_inv_freq(rope.rope_theta, head_dim) / rope.factor, 1.0
    elif kind == "dynamic":
        theta = dynamic_ntk_theta(rope.rope_theta, rope.factor, head_dim, seq_len or max_seq_len, max_seq_len)
        inv, attn = default_inv_freq(theta, head_dim), 1.0
    elif kind == "yarn":
        inv, attn = yarn_inv_freq(rope, head_dim, max_seq_len)
    elif kind == "llama3":
        inv, attn = llama3_inv_freq(rope, head_dim), 1.0
    else:  # validated in RopeConfig; kept for exhaustiveness
        raise ValueError(f"unknown rope type {kind!r}")
    return inv * rope.freq_scale, attn


def angle_dtype(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


class RotaryEmbedding:
    """Computes (cos, sin) in float32 for arbitrary integer positions.

    A plain object, not an ``nn.Module``: it owns no parameters or buffers, so checkpoints never carry its frequencies
    and ``model.to(torch.bfloat16)`` cannot reach them.
    """

    def __init__(self, rope: RopeConfig, head_dim: int, max_seq_len: int) -> None:
        self.rope = rope
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self._inv, self.attention_factor = compute_inv_freq(rope, head_dim, max_seq_len)
        self._per_device: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def inv_freq(self, device: torch.device, seq_len: int | None = None) -> torch.Tensor:
        dtype = angle_dtype(device)
        if self.rope.kind == "dynamic" and seq_len is not None and seq_len > self.max_seq_len:
            inv, _ = compute_inv_freq(self.rope, self.head_dim, self.max_seq_len, seq_len)
            return inv.to(device=device, dtype=dtype)
        key = (device, dtype)
        if key not in self._per_device:
            self._per_device[key] = self._inv.to(device=device, dtype=dtype)
        return self._per_device[key]

    def __call__(self, position_ids: torch.Tensor, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids`` of any shape ``S`` -> (cos, sin) of shape ``S + (head_dim,)`` in float32.

        ``seq_len`` (dynamic NTK only) is the current sequence length; by default max(position_ids) + 1.
        """
        device = position_ids.device
        if self.rope.kind == "dynamic" and seq_len is None:
            seq_len = int(position_ids.max()) + 1 if position_ids.numel() else 0
        inv = self.inv_freq(device, seq_len)
        angles = position_ids.to(inv.dtype).unsqueeze(-1) * inv
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.float(), sin.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., head_dim) by tables broadcastable to it; at least float32 arithmetic, result in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
