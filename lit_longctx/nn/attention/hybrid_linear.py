"""LoLCATs hybrid sliding-window + linear attention (Zhang et al., "LoLCATs: On Low-Rank Linearizing of Large
Language Models", arXiv 2410.10254; feature maps after Hedgehog, Zhang et al., arXiv 2402.04347).

Feature map (LoLCATs §3.1, Hedgehog §4): per layer and per *query* head h, two untied maps φ_q, φ_k with
W_h ∈ R^{d×F}, applied after RoPE and after GQA expansion of the keys, without 1/√d:

    φ(x)_h = clamp_min([softmax_F(x W_h), softmax_F(−x W_h)], 1e-12) ∈ R^{2F}

Hybrid attention (LoLCATs §3.2, Eq. 7), one shared normaliser. For query i the causal keys split into the window
W(i) and the linear set Λ(i); with s_ij = q_i·k_j/√d, ψ_ij = φ_q(q_i)·φ_k(k_j), c_i = max_{j∈W(i)} s_ij:

    y_i = [γ Σ_{W(i)} e^{s_ij − c_i} v_j + α Σ_{Λ(i)} ψ_ij v_j] / [γ Σ_{W(i)} e^{s_ij − c_i} + α Σ_{Λ(i)} ψ_ij]

γ = σ(θ_h) with a trainable per-head θ (init logit(0.1)); α = 1, or 1 − γ with ``affine_attention_factors``. c_i is
taken over the window scores only and the linear terms are *not* scaled by e^{−c_i} — exactly as the reference
(``hybrid_attention_quadratic``), so the window/linear balance depends on c_i. Window kinds:

- ``sw`` (sliding): W(i) = {i−w+1, …, i}.
- ``tk`` (terrace, ThunderKittens layout): blocks of w positions, block(j) = ⌊(j + o)/w⌋; W(i) is i's own block
  (causal part) plus the previous block. ``start`` alignment (o = 0) is prefix-consistent and kernel-consistent;
  ``end`` alignment (o = (−L) mod w) reproduces the PyTorch reference. (The reference's ``block_diag + roll``
  mask also switches the linear term on for every causal key when L ≤ w, a single block, since the rolled block
  lands on itself; that quirk is not reproduced: here L ≤ 2w is exactly softmax attention.)
- ``none``: pure linear attention y_i = φ_q(q_i)ᵀS_i / (φ_q(q_i)ᵀz_i + 1e-12) (the Hedgehog baseline).

Computation paths (they agree; see the tests):

- (a) :func:`hybrid_attention_quadratic`: both L×L matrices, the reference; also yields the normalised weights Â
  needed by the stage-1 cross-entropy.
- (b) :func:`sliding_hybrid_prefix_sum` (``sw``): the linear part as a causal prefix sum over φ_k(k), v shifted right
  by w (so position i sees Σ_{j≤i−w}), the window part as banded tiles of C queries × (C+w−1) keys.
- (c) :func:`terrace_hybrid_scan` (``tk``): for block t the tile is (block t) × (blocks t−1, t); the linear part uses
  the state over blocks ≤ t−2; block t−1 enters the state after block t is done (LoLCATs App. C.2, Alg. 1).
- pure linear: :func:`causal_linear_sums`, a chunked prefix sum.

Generation state (:class:`HybridLinearCache`, spec "Generation state"): the raw keys/values of the last position's
window (≤ w keys for ``sliding``, ≤ 2w for ``terrace``) plus S = Σ φ_k(k)vᵀ and z = Σ φ_k(k) over every key that left
it — constant memory per layer-head. ``decode_window: sliding`` decodes with an exact w-key sliding window, which is
what the reference does even for ``tk`` models; ``terrace`` keeps the previous full block plus the current partial one
and folds a block into S when a new block starts, reproducing the start-aligned ``tk`` forward. ``prefill`` decides
the prompt: ``forward`` (default, the reference's semantics) computes the first multi-token chunk fed to an empty
cache with the layer's own forward (``tk`` with its alignment, over the prompt's length), then keeps the decode window
of its last position; later tokens use the decode window. ``decode_window`` applies the decode window to *every*
position (prompt included), so a session equals one full-sequence forward of that window kind exactly, whatever the
prefill chunking. For ``sw``, pure linear, or ``tk`` with terrace decoding the two agree. A left-padded batch
(``attention_mask``) is decoded row by row on each row's own positions (:mod:`.hybrid_linear_decode`): its prompt gets
each row's own forward (blocks aligned to its own tokens), and each row's sliding or terrace window follows its own
positions (a row folds its oldest terrace block into (S, z) when it crosses its own boundary), so every row equals
the row alone, a prompt split over prefill chunks included (:class:`HybridLinearSession` tells the caches each row's
first-chunk length, which its forward blocks depend on; a cache fed by hand without it refuses a split padded prompt
under ``prefill=forward`` with the fix).

Terrace alignment: ``end`` (o = (−L) mod w, the reference's ``get_masks``; what its checkpoints were trained and
evaluated with, so the default of the LoLCATs recipes and of imported seed checkpoints) and ``start`` (o = 0, the
ThunderKittens kernel; prefix-consistent). They agree when L % w = 0 or L ≤ 2w; otherwise the last position's window
and the linear set differ, and with ``end`` the outputs for a prefix change when a token is appended.

Distillation (LoLCATs §3.1 Eq. 6, App. C Listing 4), switched per batch by ``distill=True`` in
``Transformer.forward(**extras)``: the teacher causal softmax attention is computed under no_grad from the same q, k, v
and returned as ``o_proj(teacher y)`` (teacher forcing: the logits equal the softmax model's); the student runs on
detached q, k, v, so only φ_q, φ_k and θ receive gradients, and each layer's loss depends on its own tensors only.
Per-layer ``{"mse": …, ("xent": …)}`` land in ``output.extras["distill_losses"][layer_idx]``; ``distill_xent=True``
adds the soft-target cross-entropy CE(A, log clamp(Â, 1e-12)), averaged over (b, h, query) rows.

Layers to keep as softmax are a ``ModelConfig`` matter: ``layer_attention={7: "causal", 15: "causal", ...}``.
Arithmetic is in float32 (float64 for float64 inputs); outputs are cast back to the input dtype.

Shapes: B batch, H query heads, Hkv key/value heads, T queries, S keys, D head dim, F feature dim (maps give 2F).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lit_longctx.nn.attention.base import Attention, AttentionContext, register_attention
from lit_longctx.nn.attention.causal import attend as softmax_attend
from lit_longctx.nn.attention.causal import causal_doc_mask, repeat_kv
from lit_longctx.nn.attention.hybrid_linear_decode import HybridLinearSession, cached_rows
from lit_longctx.nn.attention.hybrid_linear_paths import (
    FEATURE_EPS,
    LINEAR_CHUNK,
    LINEAR_EPS,
    LinearState,
    WindowKind,
    _window_plus_linear,
    causal_linear_sums,
    compute_dtype,
    hybrid_attention_quadratic,
    linear_attention,
    sliding_hybrid_prefix_sum,
    terrace_hybrid_scan,
    window_masks,
)
from lit_longctx.nn.config import ConfigError, ModelConfig

__all__ = [
    "DISTILL", "DISTILL_LOSSES", "DISTILL_XENT", "FEATURE_EPS", "FEATURE_MAP_INITS", "LINEAR_CHUNK", "LINEAR_EPS",
    "FeatureMap", "HeadProjection", "HybridLinearAttention", "HybridLinearCache", "HybridLinearSession", "LinearState",
    "WindowKind", "causal_linear_sums", "compute_dtype", "distill_losses", "hybrid_attention_quadratic",
    "init_feature_map", "linear_attention", "sliding_hybrid_prefix_sum", "softmax_features", "terrace_hybrid_scan",
    "window_masks",
]

#: ``Transformer.forward(..., distill=True)``: stage-1 attention-transfer mode for this batch.
DISTILL = "distill"
#: ``Transformer.forward(..., distill_xent=True)``: also record the attention-weight cross-entropy.
DISTILL_XENT = "distill_xent"
#: ``output.extras[DISTILL_LOSSES][layer_idx] -> {"mse": tensor, "xent": tensor}`` after a distill forward.
DISTILL_LOSSES = "distill_losses"


# ------------------------------------------------------------------------------------------------------ feature map
def softmax_features(xw: torch.Tensor, eps: float = FEATURE_EPS) -> torch.Tensor:
    """(…, F) projections xW -> (…, 2F) features [softmax(xW), softmax(−xW)], clamped below at ``eps``."""
    return torch.cat([torch.softmax(xw, dim=-1), torch.softmax(-xw, dim=-1)], dim=-1).clamp_min_(eps)


class HeadProjection(nn.Module):
    """One untied d×F matrix per head, ``layer`` (H, D, F), applied by einsum (the reference's ``mlp``)."""

    def __init__(self, n_heads: int, head_dim: int, feature_dim: int) -> None:
        super().__init__()
        self.layer = nn.Parameter(torch.empty(n_heads, head_dim, feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) -> (B, H, T, F), in x's dtype."""
        return torch.einsum("bhtd,hdf->bhtf", x, self.layer.to(x.dtype))


class FeatureMap(nn.Module):
    """Learnable softmax-over-features map φ (LoLCATs §3.1). Parameter path ``mlp.layer`` as in the published
    stage-1 checkpoints (``model.layers.N.self_attn.feature_map_q.mlp.layer``), so those load unchanged."""

    def __init__(self, n_heads: int, head_dim: int, feature_dim: int) -> None:
        super().__init__()
        self.mlp = HeadProjection(n_heads, head_dim, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) -> (B, H, T, 2F), in x's dtype."""
        return softmax_features(self.mlp(x))


FEATURE_MAP_INITS = ("identity", "kaiming_uniform", "normal")


def init_feature_map(weight: torch.Tensor, init: str) -> None:
    """Initialise a (H, D, F) feature-map tensor in place.

    ``identity``: every W_h is the rectangular identity (the seed's ``--lk_zero_init`` without skip connection), so
    φ(x) = [softmax(x[:F]), softmax(−x[:F])]. ``kaiming_uniform``: ``nn.init.kaiming_uniform_`` on the (H, D, F)
    tensor (fan_in = D·F), the reference default. ``normal``: N(0, 1) (``--lk_normal_init``).
    """
    with torch.no_grad():
        if init == "identity":
            eye = torch.eye(weight.shape[1], weight.shape[2], device=weight.device, dtype=weight.dtype)
            eye = eye.expand(weight.shape).contiguous()
            if hasattr(weight, "device_mesh"):  # a DTensor sharded by FSDP2: copy from an identically sharded one
                from torch.distributed.tensor import distribute_tensor

                eye = distribute_tensor(eye, weight.device_mesh, weight.placements)
            weight.copy_(eye)
        elif init == "kaiming_uniform":
            nn.init.kaiming_uniform_(weight)
        elif init == "normal":
            nn.init.normal_(weight)
        else:
            raise ConfigError(f"feature_map_init={init!r} is unknown; use one of {', '.join(FEATURE_MAP_INITS)}")


# ---------------------------------------------------------------------------------------------- generation state
class HybridLinearCache:
    """Recurrent generation state of one ``hybrid_linear`` layer.

    Attributes:
        k, v: (B, Hkv, n, D) keys (after RoPE) and values of the window of the last processed position, in the
            model dtype (n ≤ w for a sliding decode window, ≤ 2w for terrace, 0 for pure linear attention).
        kv_state: (B, H, 2F, D) S = Σ φ_k(k)vᵀ over every key that left the window, in the compute dtype.
        k_state: (B, H, 2F) z = Σ φ_k(k) over the same keys.
        length: ids fed so far (the absolute position of the next token, in an unpadded batch).
        mask: (B, n) bool, True where ``k, v`` hold a key still in that row's window buffer (False = a pad or a key
            already folded into the row's (S, z)); None while no ``attention_mask`` was fed (rows in lockstep).
        pos: (B, n) each buffered key's position in its own row (pads not counted); with ``mask``.
        seen: (B,) each row's tokens so far (the row position of its next token); with ``mask``.
        forward_len: (B,) tokens of each row's prompt that ``prefill=forward`` computes with the forward (set by
            :class:`~lit_longctx.nn.attention.hybrid_linear_decode.HybridLinearSession`), or None.
        in_prompt: whether that session is prefilling the prompt now.
        padded: whether a pad was ever fed (a padded batch).
    """

    def __init__(
        self,
        batch_size: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        feature_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        acc = compute_dtype(dtype)
        self.k = torch.zeros(batch_size, n_kv_heads, 0, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.kv_state = torch.zeros(batch_size, n_heads, 2 * feature_dim, head_dim, device=device, dtype=acc)
        self.k_state = torch.zeros(batch_size, n_heads, 2 * feature_dim, device=device, dtype=acc)
        self.length = 0
        self.mask: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self.forward_len: torch.Tensor | None = None
        self.in_prompt = False
        self.padded = False

    def num_bytes(self) -> int:
        """Bytes held by the state tensors."""
        return sum(x.numel() * x.element_size() for x in (self.k, self.v, self.kv_state, self.k_state))


def check_left_padded(mask: torch.Tensor) -> None:
    """Hybrid windows are counted in fed ids, so pads may only precede a row's tokens (left padding)."""
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError(
            "hybrid_linear attention needs left padding: pads (attention_mask 0) may only come before a row's tokens"
        )


# --------------------------------------------------------------------------------------------------- the module
WINDOWS = ("tk", "sw", "none")
ALIGNMENTS = ("start", "end")
PATHS = ("scan", "quadratic")
DECODE_WINDOWS = ("sliding", "terrace")
PREFILLS = ("forward", "decode_window")


@register_attention("hybrid_linear")
class HybridLinearAttention(Attention):
    """LoLCATs attention: learnable feature maps, sliding-window/terrace + linear hybrid, recurrent decoding.

    Options (``ModelConfig.attention_options["hybrid_linear"]``):
        feature_dim: F, features per half (the map outputs 2F); 64 in every published config.
        window_size: w, the softmax window / terrace block (64).
        window: ``tk`` terrace (default, the headline results), ``sw`` sliding, ``none`` pure linear.
        block_alignment: ``start`` (default; prefix-consistent) or ``end`` (the PyTorch reference) for ``tk``.
        affine_attention_factors: α = 1 − γ instead of 1.
        init_window_factor: initial θ (γ = σ(θ)); default logit(0.1).
        feature_map_init: ``identity`` (default, the published ``--lk_zero_init``), ``kaiming_uniform``, ``normal``.
        path: ``scan`` (linear-time: prefix sum for sw, block scan for tk) or ``quadratic`` (reference). Distill
            mode with ``distill_xent`` always uses the quadratic form, which yields the attention weights.
        decode_window: ``sliding`` (exact w-key window, the reference's decode) or ``terrace`` (tk with start
            alignment only; reproduces the tk forward). Both decode left-padded batches, each row on its own blocks.
        prefill: ``forward`` (the first chunk fed to an empty cache runs the layer's forward, the reference's
            prompt; later tokens use the decode window) or ``decode_window`` (every cached position uses it).
    """

    forward_extras: ClassVar[tuple[str, ...]] = (DISTILL, DISTILL_XENT)
    session_class: ClassVar[type | None] = HybridLinearSession

    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        *,
        feature_dim: int = 64,
        window_size: int = 64,
        window: WindowKind = "tk",
        block_alignment: Literal["start", "end"] = "start",
        affine_attention_factors: bool = False,
        init_window_factor: float = math.log(0.1 / 0.9),
        feature_map_init: Literal["identity", "kaiming_uniform", "normal"] = "identity",
        path: Literal["scan", "quadratic"] = "scan",
        decode_window: Literal["sliding", "terrace"] = "sliding",
        prefill: Literal["forward", "decode_window"] = "forward",
    ) -> None:
        super().__init__(config, layer_idx)
        prefix = f"attention_options['hybrid_linear'] (layer {layer_idx}):"
        if window not in WINDOWS:
            raise ConfigError(f"{prefix} window={window!r} is unknown; use tk (terrace), sw (sliding) or none (linear)")
        if block_alignment not in ALIGNMENTS:
            raise ConfigError(f"{prefix} block_alignment={block_alignment!r} is unknown; use start or end")
        if path not in PATHS:
            raise ConfigError(f"{prefix} path={path!r} is unknown; use scan (linear time) or quadratic (reference)")
        if decode_window not in DECODE_WINDOWS:
            raise ConfigError(f"{prefix} decode_window={decode_window!r} is unknown; use sliding or terrace")
        if prefill not in PREFILLS:
            raise ConfigError(f"{prefix} prefill={prefill!r} is unknown; use forward (the reference's prompt) or "
                              "decode_window")
        if feature_map_init not in FEATURE_MAP_INITS:
            raise ConfigError(
                f"{prefix} feature_map_init={feature_map_init!r} is unknown; use one of {', '.join(FEATURE_MAP_INITS)}"
            )
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ConfigError(f"{prefix} feature_dim must be a positive integer, got {feature_dim!r}")
        if not isinstance(window_size, int) or window_size < 1:
            raise ConfigError(f"{prefix} window_size must be a positive integer (e.g. 64), got {window_size!r}")
        if feature_map_init == "identity" and feature_dim > self.head_dim:
            raise ConfigError(
                f"{prefix} feature_map_init=identity needs feature_dim <= head_dim={self.head_dim}, got "
                f"feature_dim={feature_dim}; lower feature_dim or use feature_map_init=kaiming_uniform"
            )
        if decode_window == "terrace" and (window != "tk" or block_alignment != "start"):
            raise ConfigError(
                f"{prefix} decode_window=terrace needs window=tk with block_alignment=start (a decoding cache cannot "
                "know the final length that end-aligned blocks depend on); use decode_window=sliding"
            )
        if not math.isfinite(init_window_factor):
            raise ConfigError(f"{prefix} init_window_factor must be a finite logit, got {init_window_factor!r}")
        self.feature_dim = feature_dim
        self.window_size = window_size
        self.window = window
        self.block_alignment = block_alignment
        self.affine_attention_factors = affine_attention_factors
        self.init_window_factor = float(init_window_factor)
        self.feature_map_init = feature_map_init
        self.path = path
        self.decode_window = decode_window
        self.prefill = prefill
        self.feature_map_q = FeatureMap(self.n_heads, self.head_dim, feature_dim)
        self.feature_map_k = FeatureMap(self.n_heads, self.head_dim, feature_dim)
        # reference name and shape; pure linear attention has no window, hence no factor
        self.window_factors = nn.Parameter(torch.empty(1, self.n_heads, 1, 1)) if window != "none" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """φ per ``feature_map_init``, θ = ``init_window_factor``; ``Transformer.init_weights`` calls this."""
        init_feature_map(self.feature_map_q.mlp.layer, self.feature_map_init)
        init_feature_map(self.feature_map_k.mlp.layer, self.feature_map_init)
        if self.window_factors is not None:
            nn.init.constant_(self.window_factors, self.init_window_factor)

    def new_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> HybridLinearCache:
        return HybridLinearCache(
            batch_size, self.n_heads, self.n_kv_heads, self.head_dim, self.feature_dim, device, dtype
        )

    def flops_per_token(self, context_len: int) -> float:
        """Fwd+bwd attention FLOPs per token (PaLM convention, as the causal kind): 12·H·D per window key
        (at most w for sw, 2w for tk) + 24·H·F·D for the linear state update and read-out (2F·D MACs each).
        The feature-map projections are parameters, so ``Transformer.flops_per_token`` counts them in 6·N."""
        max_keys = {"sw": self.window_size, "tk": 2 * self.window_size, "none": 0}[self.window]
        keys = min(context_len, max_keys)
        return 12.0 * self.n_heads * self.head_dim * keys + 24.0 * self.n_heads * self.feature_dim * self.head_dim

    # -------------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: HybridLinearCache | None = None) -> torch.Tensor:
        if ctx.doc_ids is not None:
            raise ValueError(
                "hybrid_linear attention has no per-document reset for packed rows (position_ids restarting inside "
                "a row), like the LoLCATs reference; pass contiguous position_ids (one 0..T-1 run per row)"
            )
        q, k, v = self.project(x)
        q = self.rotate(q, ctx.cos, ctx.sin).transpose(1, 2)  # (B, H, T, D)
        k = self.rotate(k, ctx.cos, ctx.sin).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.transpose(1, 2)  # (B, Hkv, T, D)
        mask = ctx.attention_mask
        if mask is not None:
            check_left_padded(mask)
        if ctx.extras.get(DISTILL):
            if cache is not None:
                raise ValueError("distill mode (attention transfer) runs on whole sequences; do not pass a cache")
            if mask is not None:
                raise ValueError("distill mode (attention transfer) trains on full windows; pass no attention_mask")
            return self._distill(q, k, v, ctx)
        y = self._cached(q, k, v, cache, mask) if cache is not None else self._full(q, k, v, mask)
        return self.output(y.to(x.dtype))

    def _full(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The layer's forward over whole (left-padded when ``mask`` is given) rows; (B, H, T, D) compute dtype."""
        if mask is None:
            return self.attend(q, k, v, window=self.window, block_offset=self._block_offset(q.shape[2]))[0]
        # each row's terrace blocks start at its first token (start) / end at its last (end)
        counts = mask.sum(1).tolist()
        offset = torch.tensor([(self._block_offset(n) - (q.shape[2] - n)) % self.window_size for n in counts],
                              device=q.device)
        return self.attend(q, k, v, window=self.window, block_offset=offset, key_mask=mask, query_mask=mask)[0]

    def _expand_kv(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, Hkv, S, D) keys or values -> (B, H, S, D) in ``dtype`` (each KV head repeated for its query group)."""
        return repeat_kv(x, self.n_heads // self.n_kv_heads).to(dtype)

    def _block_offset(self, length: int) -> int:
        end = self.window == "tk" and self.block_alignment == "end"
        return (-length) % self.window_size if end else 0

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(γ, α), each (1, H, 1, 1) in ``dtype``."""
        if self.window_factors is None:
            one = torch.ones(1, self.n_heads, 1, 1, dtype=dtype, device=self.o_proj.weight.device)
            return one, one
        gamma = torch.sigmoid(self.window_factors.to(dtype))
        return gamma, (1 - gamma if self.affine_attention_factors else torch.ones_like(gamma))

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        window: str,
        block_offset: int | torch.Tensor = 0,
        state: LinearState | None = None,
        return_weights: bool = False,
        key_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hybrid attention of q (B, H, T, D), the last T of the S positions of k, v (B, Hkv, S, D).

        ``key_mask`` (B, S) / ``query_mask`` (B, T) (padded batches, per-row ``block_offset``) take the quadratic
        path, which masks pads out of both sets. Returns y (B, H, T, D) in the compute dtype, and Â (B, H, T, S) when
        ``return_weights``.
        """
        acc = compute_dtype(q.dtype)
        q, k, v = q.to(acc), self._expand_kv(k, acc), self._expand_kv(v, acc)
        fq, fk = self.feature_map_q(q), self.feature_map_k(k)
        gamma, alpha = self.factors(acc)
        if return_weights or self.path == "quadratic" or key_mask is not None:
            return hybrid_attention_quadratic(
                q, k, v, fq, fk, gamma, alpha, window=window, window_size=self.window_size, scale=self.scale,
                block_offset=block_offset, state=state, return_weights=return_weights, key_mask=key_mask,
                query_mask=query_mask,
            )
        pad = k.shape[2] - q.shape[2]  # the fast paths want a query per key; padded rows are dropped
        if pad:
            q, fq = F.pad(q, (0, 0, pad, 0)), F.pad(fq, (0, 0, pad, 0))
        if window == "none":
            y, _ = linear_attention(fq, fk, v, state=state)
        elif window == "sw":
            y = sliding_hybrid_prefix_sum(
                q, k, v, fq, fk, gamma, alpha, window_size=self.window_size, scale=self.scale, state=state
            )
        else:
            y = terrace_hybrid_scan(
                q, k, v, fq, fk, gamma, alpha, window_size=self.window_size, scale=self.scale,
                block_offset=block_offset, state=state,
            )
        return y[:, :, pad:], None

    # ------------------------------------------------------------------------------------------------ decoding
    def _window_start(self, position: int) -> int:
        """First key position in the decode window of the query at ``position``."""
        if self.decode_window == "terrace":
            return max(0, (position // self.window_size - 1) * self.window_size)
        return max(0, position - self.window_size + 1)

    def _fold(self, cache: HybridLinearCache, upto: int) -> None:
        """Move cached keys at positions < ``upto`` from the window buffer into (S, z)."""
        n_drop = upto - (cache.length - cache.k.shape[2])
        if n_drop <= 0:
            return
        acc = cache.kv_state.dtype
        k_old = self._expand_kv(cache.k[:, :, :n_drop], acc)  # (B, H, n_drop, D)
        v_old = self._expand_kv(cache.v[:, :, :n_drop], acc)
        fk = self.feature_map_k(k_old)  # (B, H, n_drop, 2F)
        cache.kv_state = cache.kv_state + fk.transpose(-1, -2) @ v_old
        cache.k_state = cache.k_state + fk.sum(dim=2)
        cache.k, cache.v = cache.k[:, :, n_drop:], cache.v[:, :, n_drop:]

    def _cached(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: HybridLinearCache, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attend T new tokens through the recurrent state; returns (B, H, T, D) in the compute dtype.

        ``mask`` (B, T) marks the tokens of a left-padded chunk: from the first one on, every row is decoded on its
        own positions (:func:`~lit_longctx.nn.attention.hybrid_linear_decode.cached_rows`); without one the rows
        move in lockstep and share the absolute positions used here.
        """
        if mask is not None or cache.mask is not None:
            return cached_rows(self, q, k, v, cache, mask)
        t = q.shape[2]
        if self.window == "none":
            acc = cache.kv_state.dtype
            q, k, v = q.to(acc), self._expand_kv(k, acc), self._expand_kv(v, acc)
            y, (cache.kv_state, cache.k_state) = linear_attention(
                self.feature_map_q(q), self.feature_map_k(k), v, state=(cache.kv_state, cache.k_state)
            )
            cache.length += t
            return y
        if self.prefill == "forward" and cache.length == 0 and t > 1:  # the prompt: the layer's own forward
            y = self._full(q, k, v, None)
            cache.k, cache.v, cache.length = k.to(cache.k.dtype), v.to(cache.v.dtype), t
            self._fold(cache, self._window_start(t - 1))  # S, z over the keys left of the last decode window
            return y
        first, last = cache.length, cache.length + t - 1
        self._fold(cache, self._window_start(first))  # the buffer now starts at the window of the first query
        start = cache.length - cache.k.shape[2]
        cache.k, cache.v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
        cache.length += t
        state = (cache.kv_state, cache.k_state)
        if t == 1:  # every buffered key is in this query's window: no ψ over the buffer is needed
            y = self._decode_step(q, cache.k, cache.v, state)
        else:
            window = "tk" if self.decode_window == "terrace" else "sw"
            y, _ = self.attend(q, cache.k, cache.v, window=window, block_offset=start % self.window_size, state=state)
        self._fold(cache, self._window_start(last))  # keep only the window of the last query
        return y

    def _decode_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LinearState) -> torch.Tensor:
        """One query (B, H, 1, D) over its whole window k, v (B, Hkv, n, D) plus the linear state (spec §2 decode)."""
        kv_state, k_state = state
        acc = kv_state.dtype
        q, k, v = q.to(acc), self._expand_kv(k, acc), self._expand_kv(v, acc)
        fq = self.feature_map_q(q)  # (B, H, 1, 2F)
        gamma, alpha = self.factors(acc)
        scores = (q @ k.transpose(-1, -2)) * self.scale  # (B, H, 1, n)
        return _window_plus_linear(scores, v, gamma, alpha, fq @ kv_state, fq @ k_state.unsqueeze(-1))

    # ------------------------------------------------------------------------------------------- distillation
    def _distill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Stage-1 attention transfer: record the student's losses, return the teacher's output (teacher forcing)."""
        with torch.no_grad():
            y_teacher = softmax_attend(q, k, v, backend=self.config.attn_backend, scale=self.scale)  # (B, H, T, D)
            out = self.output(y_teacher)
        xent = bool(ctx.extras.get(DISTILL_XENT))
        block_offset = self._block_offset(q.shape[2])
        y, weights = self.attend(
            q.detach(), k.detach(), v.detach(), window=self.window, block_offset=block_offset, return_weights=xent
        )
        losses: dict[str, torch.Tensor] = {"mse": F.mse_loss(y, y_teacher.to(y.dtype))}
        if xent:
            with torch.no_grad():
                probs = self._teacher_probs(q, k)
            losses["xent"] = -(probs * weights.clamp_min(FEATURE_EPS).log()).sum(dim=-1).mean()
        ctx.extras.setdefault(DISTILL_LOSSES, {})[self.layer_idx] = losses
        return out

    def _teacher_probs(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Causal softmax weights A (B, H, T, T) in the compute dtype."""
        acc = compute_dtype(q.dtype)
        k = self._expand_kv(k, acc)
        scores = (q.to(acc) @ k.transpose(-1, -2)) * self.scale
        mask = causal_doc_mask(q.shape[2], k.shape[2], q.device)
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def distill_losses(extras: dict[str, Any]) -> dict[int, dict[str, torch.Tensor]]:
    """Per-layer stage-1 losses written by a ``distill=True`` forward (``ModelOutput.extras``); {} if none."""
    return extras.get(DISTILL_LOSSES, {})
