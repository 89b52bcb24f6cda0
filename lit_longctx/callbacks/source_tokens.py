"""Per-source token counts of each training batch (FoT's ``batch_tokens_per_source/<src>``, spec ``specs/fot.md`` §2).

A data module whose training batches carry ``tokens_per_source`` (S,) — input tokens by the mixture component their
document came from, e.g. :class:`~lit_longctx.datamodules.DocAwareData` over several sources — and that names its
components in ``source_names`` gets them logged per optimizer micro-batch, summed over data-parallel ranks.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class SourceTokens(L.Callback):
    """Log ``batch_tokens_per_source/<name>`` (tokens of this step from each source, all ranks together)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        counts = batch.get("tokens_per_source") if isinstance(batch, dict) else None
        if counts is None:
            return
        names = list(getattr(trainer.datamodule, "source_names", None) or [])
        if len(names) != len(counts):
            raise ValueError(f"the batch counts tokens of {len(counts)} sources but the data module names "
                             f"{len(names)} ({names}); its source_names must follow the mixture's components")
        for name, count in zip(names, counts.to(torch.float32)):
            pl_module.log(f"batch_tokens_per_source/{name}", count, on_step=True, on_epoch=False, reduce_fx="sum",
                          sync_dist=trainer.world_size > 1)
