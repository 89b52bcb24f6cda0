"""A worked example of extending lit-longctx: a LightningModule that up-weights the loss of late positions.

Long-context training cares most about tokens that can use a long prefix. `PositionWeightedLM` overrides only the
`compute_loss` hook of `CausalLM` (the model, optimizer, logging, checkpoints, strategies and evaluation are
inherited): the loss of position t is weighted by 1 + alpha·t/T, normalised so the weights average to one, and the
loss of the last quarter of each row is logged separately.

Use it from YAML by class path (see config.yaml beside this file):

    PYTHONPATH=examples/subclass_module lit-longctx fit --config configs/quickstart.yaml \
        --config examples/subclass_module/config.yaml
"""

from __future__ import annotations

from typing import Any

import torch

from lit_longctx.modules import CausalLM
from lit_longctx.nn.loss import linear_cross_entropy


class PositionWeightedLM(CausalLM):
    """CausalLM with a position-weighted next-token loss.

    Args:
        alpha: extra weight of the last position relative to the first (0 = the plain loss).
        **kwargs: the CausalLM arguments (model, init_from, learning_rate, ...).
    """

    def __init__(self, alpha: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = alpha

    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, Any]]:
        out = self.model(batch["input_ids"], batch.get("position_ids"), return_hidden=True, return_logits=False,
                         **self.on_batch_layout(batch, stage))
        hidden, labels = out.hidden, batch["labels"]
        b, t = labels.shape
        # per-position losses, chunked like the model's own loss so no (B, T, V) logits are formed
        per_pos = torch.stack([
            linear_cross_entropy(hidden[:, i], self.model.lm_head.weight, labels[:, i]) for i in range(t)
        ])  # (T,)
        weights = 1 + self.alpha * torch.arange(t, device=per_pos.device) / max(t - 1, 1)
        loss = (per_pos * weights).sum() / weights.sum()
        return loss, {"last_quarter_loss": per_pos[3 * t // 4 :].mean().detach()}
