"""Training FLOPs of a LLaMA-family model, and the two utilisation ratios built on them (MFU and MTU).

Formulas (fwd + bwd, per token, T = context length in use):

- ``palm``: F_tok = 6·N' + 12·L·H·Q·T (Chowdhery et al. 2022, "PaLM", appendix B). 6·N' counts the matmuls of every
  weight (2 FLOPs per multiply-add forward, twice that backward); 12·L·H·Q·T the attention scores QKᵀ and the
  weighted sum of V over T keys, counted dense (no causal halving). N' leaves out the input embedding by default,
  because its forward is a gather, not a matmul; ``include_embedding=True`` counts all N parameters, which is exactly
  ALLaMo's ``train_utils.estimate_mfu`` (6·N + 12·L·H·Q·T, N = ``sum(p.numel())``). Attention kinds with another cost
  (linear attention, memory layers) override ``Attention.flops_per_token``; the per-layer sum is used for them.
- ``measured``: what ``torch.utils.flop_counter.FlopCounterMode`` counts for one fwd + bwd of a copy of the model built
  on the meta device (through Lightning's ``measure_flops``; nothing is allocated). On meta, torch 2.13 decomposes
  ``scaled_dot_product_attention`` into its math path (two batched matmuls forward, four backward), so softmax attention
  counts 12·L·H·Q·T²·B, like the eager backend and the PaLM formula (GQA included: the math path repeats K/V to H
  heads). Measured on CUDA with a fused kernel, the counter's SDPA formulas give 4 (forward) + 10 (backward, which
  recomputes the scores) = 14·L·H·Q·T²·B: the FLOPs the hardware executes, not model FLOPs. On the CPU the fused SDPA
  kernel has no formula at all and attention would count 0, so measuring on the CPU with ``attn_backend="sdpa"`` is
  refused. Norms, RoPE, activations, softmax and the embedding gather count 0, and bias additions are not counted, so
  ``measured`` = ``palm`` − 6·(norm weights + biases)·B·T for plain causal models.

Utilisation:

- MFU (model FLOPs utilisation) = FLOPs / (seconds · peak FLOP/s of one device).
- MTU (ALLaMo's "model time utilisation") = model time / iteration time.

Glossary: N parameters, L layers, H query heads, Q head dim, T context length, B micro-batch rows, TP tensor-parallel
degree.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.fabric.utilities.throughput import measure_flops

from lit_longctx.nn.attention import Attention, get_attention
from lit_longctx.nn.config import ModelConfig
from lit_longctx.nn.llama import Transformer

Formula = Literal["palm", "measured"]
FORMULAS: tuple[str, ...] = ("palm", "measured")


def palm_flops_per_token(n_params: float, n_layers: int, n_heads: int, head_dim: int, seq_len: int) -> float:
    """6·N + 12·L·H·Q·T: training FLOPs per token of a dense softmax-attention decoder (PaLM appendix B).

    Args:
        n_params: N, the parameters whose matmuls are counted.
        n_layers: L.
        n_heads: H, query heads.
        head_dim: Q.
        seq_len: T, keys each query attends to.
    """
    _check_positive(seq_len=seq_len)
    return 6.0 * n_params + 12.0 * n_layers * n_heads * head_dim * seq_len


def flops_per_token(
    model: ModelConfig | Transformer,
    seq_len: int,
    formula: Formula = "palm",
    include_embedding: bool = False,
) -> float:
    """Training (fwd + bwd) FLOPs per token at context length ``seq_len``.

    Args:
        model: a ``ModelConfig``, or a built ``Transformer`` whose layers give their own attention cost. Pass the
            config for sharded models (FSDP flat parameters and ZeRO-3 hide the full parameter counts).
        seq_len: context length T in use.
        formula: ``palm`` (6·N' + Σ_layers attention, analytic) or ``measured`` (FlopCounterMode on a meta copy).
        include_embedding: count the input embedding in N' (ALLaMo's convention); ``palm`` only.
    """
    _check_formula(formula, include_embedding)
    _check_positive(seq_len=seq_len)
    if formula == "measured":
        return measured_flops_per_batch(_config_of(model), 1, seq_len) / seq_len
    if isinstance(model, Transformer):
        return model.flops_per_token(seq_len, include_embedding=include_embedding)
    config = model
    if any(_has_own_cost(config.attention_kind(i)) for i in range(config.n_layers)):
        # a kind with its own cost may also own extra weights: count both on a free meta copy
        with torch.device("meta"):
            meta = Transformer(config)
        return meta.flops_per_token(seq_len, include_embedding=include_embedding)
    n = config.num_params(include_embedding=include_embedding)
    return palm_flops_per_token(n, config.n_layers, config.n_heads, config.head_dim, seq_len)


def flops_per_batch(
    model: ModelConfig | Transformer,
    batch_size: int,
    seq_len: int,
    formula: Formula = "palm",
    include_embedding: bool = False,
    tensor_parallel: int = 1,
) -> float:
    """Training FLOPs of one (micro-)batch on one device: ``flops_per_token · B · T / TP``.

    This is the ``flops_per_batch`` Lightning's throughput machinery expects from a LightningModule.

    Args:
        model: a ``ModelConfig`` or a built ``Transformer`` (see :func:`flops_per_token`).
        batch_size: B, rows per micro-batch on one device.
        seq_len: T, tokens per row.
        formula: ``palm`` or ``measured`` (see the module docstring).
        include_embedding: count the input embedding (ALLaMo's convention); ``palm`` only.
        tensor_parallel: tensor-parallel degree; the ranks of one group share the work of a batch.
    """
    _check_formula(formula, include_embedding)
    _check_positive(batch_size=batch_size, seq_len=seq_len, tensor_parallel=tensor_parallel)
    if formula == "measured":
        total = float(measured_flops_per_batch(_config_of(model), batch_size, seq_len))
    else:
        total = flops_per_token(model, seq_len, "palm", include_embedding) * batch_size * seq_len
    return total / tensor_parallel


def measured_flops_per_batch(
    config: ModelConfig, batch_size: int, seq_len: int, device: str | torch.device = "meta"
) -> int:
    """FLOPs that ``FlopCounterMode`` counts for one fwd + bwd of a (B, T) batch, via Lightning's ``measure_flops``.

    The loss is ``logits.sum()``, not the model's fused chunked cross-entropy: that autograd Function computes its
    gradients inside the forward with in-place ``addmm_``, which the counter does not see, so the lm_head matmul would
    be under-counted by 2·V·d per token. Through the logits the lm_head counts like every other linear layer.

    Args:
        config: the model to measure.
        batch_size: B.
        seq_len: T.
        device: ``meta`` (default: model FLOPs, nothing allocated) or a real device (``cuda``: what the fused kernels
            execute, see the module docstring). ``cpu`` with ``attn_backend="sdpa"`` is refused: its fused kernel
            has no FLOP formula and attention would count 0. Attention kinds that read tensor values in their
            forward (block retrieval) cannot run on ``meta``: that gives an error naming the alternatives.
    """
    _check_positive(batch_size=batch_size, seq_len=seq_len)
    device = torch.device(device)
    if device.type == "cpu" and config.attn_backend == "sdpa":
        raise ValueError(
            "measuring FLOPs on the CPU with attn_backend='sdpa' counts attention as 0 (torch's flop counter has no "
            "formula for the CPU fused SDPA kernel); measure on device='meta' (the default) or use attn_backend='eager'"
        )
    with device:
        model = Transformer(config)
        input_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    try:
        return measure_flops(model, lambda: model(input_ids).logits, loss_fn=torch.Tensor.sum)
    except RuntimeError as e:
        if device.type != "meta" or "meta" not in str(e):
            raise
        kinds = sorted({config.attention_kind(i) for i in range(config.n_layers)})
        raise ValueError(
            f"the model (attention kinds {kinds}) reads tensor values in its forward, which the meta device cannot "
            f"provide ({e}); use formula='palm', or measure on a real device (device='cuda', or device='cpu' with "
            "attn_backend='eager')"
        ) from e


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: ``flops / (seconds · peak_flops)``.

    Args:
        flops: FLOPs done by one device in ``seconds``.
        seconds: the time they took (ALLaMo: model time; Lightning: wall-clock time).
        peak_flops: peak FLOP/s of one device for the precision in use.
    """
    _check_positive(seconds=seconds, peak_flops=peak_flops)
    return flops / (seconds * peak_flops)


def mtu(model_time: float, iteration_time: float) -> float:
    """Model time utilisation (ALLaMo): the fraction of an iteration spent in forward, backward and optimizer step.

    Args:
        model_time: seconds of model work in the iteration.
        iteration_time: wall-clock seconds of the iteration.
    """
    _check_positive(iteration_time=iteration_time)
    if model_time < 0:
        raise ValueError(f"model_time must be >= 0, got {model_time}")
    return model_time / iteration_time


def _has_own_cost(kind: str) -> bool:
    return get_attention(kind).flops_per_token is not Attention.flops_per_token


def _config_of(model: ModelConfig | Transformer) -> ModelConfig:
    return model.config if isinstance(model, Transformer) else model


def _check_formula(formula: str, include_embedding: bool) -> None:
    if formula not in FORMULAS:
        raise ValueError(f"unknown FLOP formula {formula!r}; use one of {', '.join(FORMULAS)}")
    if formula == "measured" and include_embedding:
        raise ValueError(
            "include_embedding=True only applies to formula='palm' (the flop counter sees the embedding as a "
            "gather costing 0); use formula='palm' to reproduce ALLaMo's count"
        )


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
