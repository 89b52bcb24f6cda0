"""Global batch arithmetic (Llemma's recipe; pretraining spec §3.4).

The math-lm README gives tokens per optimizer step as
``seq_len * num_gpus * micro_batch * accum / (mp * max(pp, 1))``: every data-parallel replica (``num_gpus / (mp·pp)``
of them) contributes ``micro_batch * accum`` rows of ``seq_len`` tokens. Llemma 7B: 4096·256·(4·2)/2 and 34B:
4096·256·(2·16)/8 both give 4,194,304 tokens ("4M"). On another cluster the same global batch is kept by solving for
``accum``; :func:`accumulation_for` does that and refuses (with the nearest values that work) when it does not divide.
"""

from __future__ import annotations

from lit_longctx.datamodules.base import global_batch_tokens


def tokens_per_step(seq_len: int, num_gpus: int, micro_batch: int, accum: int, tensor_parallel: int = 1,
                    pipeline_parallel: int = 0) -> int:
    """Tokens per optimizer step: ``seq_len * num_gpus * micro_batch * accum / (mp * max(pp, 1))``."""
    if num_gpus < 1 or num_gpus % (tensor_parallel * max(pipeline_parallel, 1)):
        raise ValueError(
            f"{num_gpus} GPUs cannot be split into model-parallel groups of tensor {tensor_parallel} x pipeline "
            f"{max(pipeline_parallel, 1)}: use a GPU count that is a multiple of their product"
        )
    return global_batch_tokens(seq_len, num_gpus, micro_batch, accum, tensor_parallel, pipeline_parallel)


def accumulation_for(global_tokens: int, seq_len: int, num_gpus: int, micro_batch: int, tensor_parallel: int = 1,
                     pipeline_parallel: int = 0) -> int:
    """Gradient-accumulation steps that make one optimizer step ``global_tokens`` tokens.

    Raises:
        ValueError: the target is not a whole number of accumulation steps for this layout; the message names the
            nearest global batches that are.
    """
    per_micro_step = tokens_per_step(seq_len, num_gpus, micro_batch, 1, tensor_parallel, pipeline_parallel)
    accum, rest = divmod(global_tokens, per_micro_step)
    if rest or accum < 1:
        lower, upper = max(accum, 1) * per_micro_step, (accum + 1) * per_micro_step
        raise ValueError(
            f"a global batch of {global_tokens:,} tokens does not divide into micro-steps of {per_micro_step:,} "
            f"tokens (seq_len {seq_len} x {per_micro_step // (seq_len * micro_batch)} data-parallel replicas x "
            f"micro-batch {micro_batch}): use {lower:,} or {upper:,} tokens, or change the micro-batch or GPU count"
        )
    return accum
