"""Perplexity by position: does a token far into a long window get predicted better than one near its start?

A window of ``L`` tokens is fed through the model's inference session in chunks (the session's ``prefill_chunk``), so
a window longer than one forward never builds an ``L x L`` score matrix or ``[L, vocab]`` logits, and memory methods
see their own chunked path. The negative log-likelihood of token ``t`` (predicted from tokens ``0..t-1``, so ``t``
tokens of context) goes into the bucket ``[e_i, e_{i+1})`` holding ``t``; bucket perplexity is ``exp`` of the mean NLL
of its tokens over all windows. A curve that falls with position means later tokens use the longer context (FoT §5 /
Table 4 and Landmark Attention §4.1 report perplexity against context length the same way).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lit_longctx.tokenizers import Tokenizer

TASK = "ppl_by_position"
_SIDECARS = ("{stem}.json", "meta.json")


def position_edges(lengths: Sequence[int]) -> list[int]:
    """Bucket edges ``[0, *sorted lengths]``: lengths [1024, 2048, 4096] give buckets 0-1k, 1k-2k, 2k-4k."""
    ends = sorted({int(x) for x in lengths})
    if not ends or ends[0] < 2:
        raise ValueError(f"lengths (bucket ends, in tokens) must be >= 2, got {list(lengths)}")
    return [0, *ends]


def per_token_nll(session: Any, input_ids: torch.Tensor, slice_size: int = 1024) -> torch.Tensor:
    """NLL (float32, shape (N - 1,)) of ``input_ids[0, t]`` given ``input_ids[0, :t]`` for t = 1..N-1.

    See :func:`per_token_scores`, which also says whether each token was the model's greedy choice.
    """
    return per_token_scores(session, input_ids, slice_size)[0]


@torch.no_grad()
def per_token_scores(
    session: Any, input_ids: torch.Tensor, slice_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL, is-greedy), each of shape (N - 1,): the float32 NLL of ``input_ids[0, t]`` given ``input_ids[0, :t]``
    for t = 1..N-1, and whether that token is the argmax of the model's prediction (the harness's ``is_greedy``).

    ``session`` is a fresh ``lit_longctx.nn.DecodingSession`` (batch size 1); the window is fed in chunks of its
    ``prefill_chunk``. A session with ``forward_logits(ids) -> (1, n, V)`` (the logits of every fed token through the
    session's own path, which a method overrides for its memory or landmark insertion) gets each chunk through it;
    otherwise each chunk goes through ``session.model(..., state=session.state)``, the calls a plain ``prefill``
    makes, keeping every position's logits. Whole-model calls keep sharded (FSDP) models correct; the chunk's logits
    stay in the model's dtype and ``slice_size`` positions at a time are upcast to float32 for the cross-entropy.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"per_token_nll scores one window: input_ids must be (1, N), got {tuple(input_ids.shape)}")
    n = input_ids.shape[1]
    if n < 2:
        raise ValueError(f"a window needs at least 2 tokens to score one prediction, got {n}")
    forward_logits = getattr(session, "forward_logits", None)
    chunk = session.prefill_chunk
    out, greedy = [], []
    for start in range(0, n, chunk):
        ids = input_ids[:, start : start + chunk]
        if forward_logits is not None:
            logits = forward_logits(ids)
            if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
                raise ValueError(
                    f"{type(session).__name__}.forward_logits must return the logits of every fed token, shape "
                    f"(1, {ids.shape[1]}, vocab), got {tuple(logits.shape)}"
                )
            logits = logits[0]  # (c, V)
        else:
            logits = session.model(ids, state=session.state, return_logits=True).logits[0]  # (c, V)
        targets = input_ids[0, start + 1 : start + 1 + ids.shape[1]]  # the next token of each position
        for s in range(0, targets.shape[0], slice_size):
            piece = logits[s : min(s + slice_size, targets.shape[0])].float()
            out.append(F.cross_entropy(piece, targets[s : s + slice_size], reduction="none"))
            greedy.append(piece.argmax(-1) == targets[s : s + slice_size])
    return torch.cat(out), torch.cat(greedy)


@torch.no_grad()
def per_token_scores_batch(
    session: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, slice_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`per_token_scores` of every row of a left-padded batch at once: (NLL, is-greedy), each (B, N - 1), where
    ``[b, t]`` scores ``input_ids[b, t + 1]`` given the row's tokens up to ``t``; only where ``attention_mask[b, t]`` is
    1 (and so is ``t + 1``, by left padding) is it a prediction of a real token (elsewhere NLL is 0, is-greedy False).

    ``session`` is a fresh session of batch size B; its ``padded_logits`` feeds each row as the row alone would be fed
    (chunks of ``prefill_chunk`` through ``forward_logits``), so every row equals :func:`per_token_scores` of the row.
    A session that cannot take the padded batch raises ValueError (e.g. landmark ``record_retrieval``).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"per_token_scores_batch scores a batch: input_ids must be (B, N), got "
                         f"{tuple(input_ids.shape)}")
    b, n = input_ids.shape
    if n < 2:
        raise ValueError(f"a window needs at least 2 tokens to score one prediction, got {n}")
    nll = torch.zeros(b, n, dtype=torch.float32, device=input_ids.device)  # column n - 1 (no target) is dropped
    greedy = torch.zeros(b, n, dtype=torch.bool, device=input_ids.device)
    for logits, cols in session.padded_logits(input_ids, attention_mask):
        if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(cols.shape):
            raise ValueError(f"{type(session).__name__}.padded_logits must yield logits (B, c, vocab) with cols "
                             f"(B, c), got {tuple(logits.shape)} and {tuple(cols.shape)}")
        keep = (cols >= 0) & (cols < n - 1)
        rows, pos = keep.nonzero(as_tuple=True)
        src, dst = pos, cols[rows, pos]
        targets = input_ids[rows, dst + 1]
        for s in range(0, rows.shape[0], slice_size):
            part = slice(s, s + slice_size)
            piece = logits[rows[part], src[part]].float()  # (k, V)
            nll[rows[part], dst[part]] = F.cross_entropy(piece, targets[part], reduction="none")
            greedy[rows[part], dst[part]] = piece.argmax(-1) == targets[part]
    return nll[:, :-1], greedy[:, :-1]


def bucket_sums(nll: torch.Tensor, edges: Sequence[int]) -> tuple[list[float], list[int]]:
    """Sum and count of ``nll[t - 1]`` (the prediction of token t) for t in each bucket ``[edges[i], edges[i+1])``."""
    position = torch.arange(1, nll.shape[0] + 1)
    sums, counts = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        keep = (position >= a) & (position < b)
        sums.append(float(nll[keep].double().sum()))
        counts.append(int(keep.sum()))
    return sums, counts


def summarize_ppl(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Perplexity per position bucket (and cumulative up to each bucket's end) over all windows' records.

    Each record holds ``edges``, ``nll_sum`` and ``count`` (per bucket) of one window.
    """
    if not records:
        raise ValueError("no perplexity records to summarize")
    edges = list(records[0]["edges"])
    if any(list(r["edges"]) != edges for r in records):
        raise ValueError("perplexity records disagree on the position buckets; evaluate one bucket layout per run")
    sums = np.sum([r["nll_sum"] for r in records], axis=0, dtype=np.float64)
    counts = np.sum([r["count"] for r in records], axis=0, dtype=np.int64)
    buckets = []
    cum_sum, cum_count = 0.0, 0
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        cum_sum, cum_count = cum_sum + float(sums[i]), cum_count + int(counts[i])
        nll = float(sums[i] / counts[i]) if counts[i] else float("nan")
        buckets.append({
            "start": a, "end": b, "tokens": int(counts[i]), "nll": nll, "ppl": math.exp(nll),
            "cum_ppl": math.exp(cum_sum / cum_count) if cum_count else float("nan"),
        })
    total = int(counts.sum())
    return {
        "task": TASK,
        "windows": len(records),
        "window_length": edges[-1],
        "edges": edges,
        "tokens": total,
        "nll": float(sums.sum() / total),
        "ppl": math.exp(float(sums.sum() / total)),
        "buckets": buckets,
    }


def _sidecar_dtype(path: Path) -> str | None:
    for pattern in _SIDECARS:
        meta = path.parent / pattern.format(stem=path.stem)
        if meta.exists():
            info = json.loads(meta.read_text())
            if "dtype" not in info:
                raise ValueError(f"{meta} has no 'dtype' entry (e.g. \"uint16\"); add it or pass dtype=")
            return str(info["dtype"])
    return None


def document_tokens(document: str | Path | None, tokenizer: Tokenizer, dtype: str | None = None) -> np.ndarray:
    """The token ids of a long document as a 1-D int64 array.

    Args:
        document: a raw token file ``*.bin`` (headerless, little-endian; its dtype from ``dtype`` or a JSON sidecar,
            ``<stem>.json`` or ``meta.json`` beside it, with a ``dtype`` entry), any other file read as UTF-8 text and
            tokenized with ``tokenizer`` (no BOS/EOS), or None for Python's own documentation topics
            (``pydoc_data.topics``, about 465 KB of English that every CPython install has).
        tokenizer: the model's tokenizer (used for text only).
        dtype: numpy dtype of a ``.bin`` file (``uint16`` / ``uint32``); overrides the sidecar.
    """
    if document is None:
        from pydoc_data.topics import topics

        return np.asarray(tokenizer.encode("\n\n".join(topics.values())), dtype=np.int64)
    path = Path(document).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"document {str(path)!r} not found: give a token file (.bin) or a text file")
    if path.suffix == ".bin":
        dtype = dtype or _sidecar_dtype(path)
        if dtype is None:
            raise ValueError(
                f"cannot tell the token dtype of {path}: no {path.stem}.json or meta.json sidecar with a 'dtype' "
                "entry beside it; pass dtype='uint16' (or 'uint32')"
            )
        if np.dtype(dtype).kind not in "ui":
            raise ValueError(f"token file dtype must be an integer type such as uint16 or uint32, got {dtype!r}")
        return np.fromfile(path, dtype=np.dtype(dtype).newbyteorder("<")).astype(np.int64)
    return np.asarray(tokenizer.encode(path.read_text(encoding="utf-8")), dtype=np.int64)
