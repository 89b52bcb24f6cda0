"""Set ``accumulate_grad_batches`` from a target global batch in tokens (Llemma's 4M; :mod:`lit_longctx.batch`)."""

from __future__ import annotations

import lightning as L

from lit_longctx.batch import accumulation_for


class GlobalBatch(L.Callback):
    """Derive gradient accumulation from the tokens one optimizer step should see, the data's ``seq_len`` and
    ``batch_size`` (the micro-batch) and the Trainer's world size, so one config keeps its global batch on any number
    of nodes.

    Args:
        tokens: target tokens per optimizer step (Llemma: 4194304).
        tensor_parallel: model-parallel degree (ranks that share one batch), as in the seed's formula.
        pipeline_parallel: pipeline degree (0 or 1: none).
    """

    def __init__(self, tokens: int, tensor_parallel: int = 1, pipeline_parallel: int = 0) -> None:
        self.tokens, self.tensor_parallel, self.pipeline_parallel = tokens, tensor_parallel, pipeline_parallel
        self.accumulate: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data = trainer.datamodule
        if data is None or not hasattr(data, "seq_len") or not hasattr(data, "batch_size"):
            raise ValueError("GlobalBatch needs a lit-longctx data module (it reads seq_len and batch_size)")
        accum = accumulation_for(self.tokens, data.seq_len, trainer.world_size, data.batch_size,
                                 self.tensor_parallel, self.pipeline_parallel)
        if trainer.accumulate_grad_batches not in (1, accum):
            raise ValueError(
                f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} but GlobalBatch(tokens="
                f"{self.tokens}) needs {accum}: drop accumulate_grad_batches from the config (GlobalBatch sets it)"
            )
        self.accumulate = trainer.accumulate_grad_batches = accum
