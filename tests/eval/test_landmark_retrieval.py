"""The retrieval record of a landmark session as counts and a figure.

Oracle: per (query, block) the number of heads whose recorded top-k holds the block, counted with Python loops.
"""

from __future__ import annotations

import torch

from lit_longctx.eval.landmark_retrieval import retrieval_counts, retrieval_figure, retrieved_blocks
from lit_longctx.nn import Transformer
from tests.nn.test_landmark import ordinary, tiny_config


def test_counts_and_figure_of_a_recorded_prompt(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_config(top_k=2))
    record = retrieved_blocks(model, ordinary(1, 40)[0], prefill_chunk=8)
    assert sorted(record) == [0, 1] and len(record[0]) == 4  # 5 chunks; the first finds an empty cache
    counts = retrieval_counts(record[1])
    chunks = record[1]
    queries = [(c, t) for c in range(len(chunks)) for t in range(chunks[c].shape[2])]
    assert counts.shape == (max(int(c.max()) for c in chunks) + 1, len(queries))
    for q, (c, t) in enumerate(queries):
        for block in range(counts.shape[0]):
            heads = sum(block in chunks[c][0, h, t].tolist() for h in range(chunks[c].shape[1]))
            assert int(counts[block, q]) == heads
    assert int(counts.sum()) == sum(c.numel() for c in chunks)  # every head picks k' blocks per query
    fig = retrieval_figure(counts, marks=[1])
    fig.savefig(tmp_path / "retrieval.png")
    assert (tmp_path / "retrieval.png").stat().st_size > 1000
