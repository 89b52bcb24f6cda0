"""Long-context evaluation: retrieval grids (passkey, multi-key), perplexity by position, reports.

The LightningModule side of the contract lives in :mod:`lit_longctx.eval.tasks`; the data side in
:mod:`lit_longctx.datamodules.passkey`.
"""

from lit_longctx.eval.passkey import (
    MultiKeyTask,
    PasskeyTask,
    RetrievalDocument,
    RetrievalSample,
    build_task,
    first_integer,
    retrieval_grid,
    score_answer,
    summarize_retrieval,
)
from lit_longctx.eval.perplexity import bucket_sums, document_tokens, per_token_nll, position_edges, summarize_ppl
from lit_longctx.eval.report import write_report

__all__ = [
    "MultiKeyTask",
    "PasskeyTask",
    "RetrievalDocument",
    "RetrievalSample",
    "bucket_sums",
    "build_task",
    "document_tokens",
    "first_integer",
    "per_token_nll",
    "position_edges",
    "retrieval_grid",
    "score_answer",
    "summarize_ppl",
    "summarize_retrieval",
    "write_report",
]
