"""Which blocks a landmark model retrieved (paper §4.1: "the exact tokens attended to by the model can be identified
by looking at the set of retrieved blocks"; App. C counts unique retrieved blocks).

:func:`retrieved_blocks` feeds ordinary token ids (e.g. one passkey prompt) through a :class:`LandmarkSession` with
``record_retrieval=True``; :func:`retrieval_counts` turns one layer's record into a (blocks × queries) matrix of how
many heads retrieved each cached block for each query; :func:`retrieval_figure` draws it (matplotlib ``Figure``, no
pyplot state), so a report can show where in a long prompt the model looked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from matplotlib.figure import Figure

from lit_longctx.nn.attention.landmark import LandmarkSession


@torch.inference_mode()
def retrieved_blocks(model: Any, ids: torch.Tensor | Sequence[int], **session_kwargs: Any) -> dict[int, list]:
    """Feed ``ids`` (one row) through a fresh recording session; per landmark layer, the chunks' (1, H, Tr, k')
    block indices (see :meth:`LandmarkSession.retrieved_blocks`)."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=model.lm_head.weight.device).view(1, -1)
    was_training = model.training
    model.eval()
    try:
        session = LandmarkSession(model, batch_size=1, record_retrieval=True, **session_kwargs)
        session.forward_logits(ids)
        return session.retrieved_blocks()
    finally:
        model.train(was_training)


def retrieval_counts(chunks: Sequence[torch.Tensor], row: int = 0) -> torch.Tensor:
    """(n_blocks, n_queries) int matrix: entry (b, q) = heads that retrieved block b for retrieval query q; queries
    are the chunks' query tokens in order (one per chunk for ``max_over_tokens``)."""
    if not chunks:
        return torch.zeros(0, 0, dtype=torch.long)
    n_blocks = int(max(int(c.max()) for c in chunks)) + 1
    columns = []
    for sel in chunks:  # (B, H, Tr, k')
        picked = sel[row].permute(1, 0, 2).reshape(sel.shape[2], -1)  # (Tr, H·k')
        counts = torch.zeros(sel.shape[2], n_blocks, dtype=torch.long).scatter_add_(
            1, picked.long(), torch.ones_like(picked, dtype=torch.long))
        columns.append(counts.T)
    return torch.cat(columns, dim=1)


def retrieval_figure(counts: torch.Tensor, title: str = "retrieved blocks", marks: Sequence[int] = ()) -> Figure:
    """Heat map of :func:`retrieval_counts`; ``marks`` highlights blocks (e.g. the one holding the pass key)."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(counts.numpy(), aspect="auto", origin="lower", interpolation="nearest", cmap="viridis")
    for block in marks:
        ax.axhline(block, color="red", linewidth=0.8, linestyle="--")
    ax.set_xlabel("query (token of the chunks after the first)")
    ax.set_ylabel("block")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="heads")
    fig.tight_layout()
    return fig
