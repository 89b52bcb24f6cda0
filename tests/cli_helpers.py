"""Objects that test configs name by class_path (importable by the subprocesses of distributed tests too)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch

from lit_longctx.modules import CausalLM


class ShardReport(L.Callback):
    """Writes, per rank, the fraction of every weight this rank holds (1.0 = replicated; 1/W = fully sharded).

    Args:
        path: directory for ``shards-rank<r>.json``.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before any forward: FSDP2 keeps the root group unsharded after a forward (e.g. the sanity check)
        from torch.distributed.tensor import DTensor

        fractions = {}
        for name, p in pl_module.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            fractions[name] = local.numel() / p.numel()
        Path(self.path).mkdir(parents=True, exist_ok=True)
        (Path(self.path) / f"shards-rank{trainer.global_rank}.json").write_text(json.dumps(fractions))


class LastQuarterLM(CausalLM):
    """A user subclass: also reports the loss of the last quarter of each row (does long context help?).

    Args:
        quarter_weight: extra weight of the last quarter's loss in the objective.
        **kwargs: CausalLM arguments.
    """

    def __init__(self, quarter_weight: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.quarter_weight = quarter_weight
        os.environ["LAST_QUARTER_LM_BUILT"] = "1"

    def compute_loss(self, batch, stage):
        from lit_longctx.nn.loss import linear_cross_entropy

        out = self.model(batch["input_ids"], batch.get("position_ids"), batch["labels"], return_hidden=True)
        t = batch["input_ids"].shape[1]
        tail = linear_cross_entropy(out.hidden[:, 3 * t // 4 :], self.model.lm_head.weight,
                                    batch["labels"][:, 3 * t // 4 :])
        return out.loss + self.quarter_weight * tail, {"last_quarter_loss": tail.detach()}


def final_weights(module: CausalLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}
