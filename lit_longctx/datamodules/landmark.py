"""Landmark tokens in the data (Mohtashami & Jaggi 2023, §3.1; spec §1): insertion, labels, removal, vocabulary.

A landmark closes every block of ``mem_freq`` (ℓ) regular tokens. Two placement rules (spec §1.2):

- ``per_row`` (LLaMA fine-tune, ``llama/train.py``; the default): within each row, a landmark goes before row index
  t for t = ℓ, 2ℓ, … < n, so a row of n tokens gets ⌊(n − 1)/ℓ⌋ landmarks and a trailing partial block none
  (512 tokens, ℓ = 50 → 522; a row of exactly m·ℓ tokens gets m − 1).
- ``global`` (PG19 / arXiv, ``lm_benchmark/data/utils.py``): on the concatenated stream a landmark follows stream index
  t whenever t mod ℓ = ℓ − 1, so n tokens from index 0 get ⌊n/ℓ⌋; ``start`` continues the grid of a longer stream.

Either way landmark i (counting from 0, grid starting at index 0) lands at augmented index i·(ℓ + 1) + ℓ.

For training rows, :class:`LandmarkData` offers a third layout, ``stream`` (the seed's PG19 batches,
``optim/utils.py::get_batch``): the grid is global across rows, as if landmarks had been inserted once on the whole
stream and each window of L = T + ⌊T/ℓ⌋ tokens cut at an arbitrary offset, so a window usually starts mid-block (and
with probability 1/(ℓ + 1) on a landmark). Each row gets a grid phase φ ∈ [0, ℓ] drawn from (seed, epoch, position)
— the position of its first token inside its block (φ = ℓ: the landmark closing the previous block) — which is the
distribution of phases of uniformly random offsets; ``global`` instead starts the grid at every row.

Labels (spec §1.3) follow lit-longctx's convention of *aligned* targets (``labels[t]`` is the token that should follow
``input_ids[t]``, −100 = ignored, no shift in the model). ``include_landmark_in_loss``:

- False (default; PG19 training, the Triton LLaMA path): no target is the landmark; targets at landmark inputs are
  ignored; the token before a landmark targets the token after it.
- True (reproduces the released LLaMA weights): the token before a landmark targets ``<landmark>`` and the landmark
  targets the next regular token.

For LLaMA checkpoints the ``<landmark>`` token is added to the tokenizer and the embedding and output rows grow, new
rows initialised to the mean of the existing rows (``llama/train.py``'s resize, spec §1.1).

:class:`LandmarkData` applies the insertion to any other DataModule's rows (composition, not inheritance): it wraps the
inner module's training :class:`~lit_longctx.datamodules.base.SampleStream` in a :class:`LandmarkStream` that asks the
inner stream for the sample at each position and inserts landmarks into it. The training order, its rank/worker
sharding and the resumable position (one number per epoch, kept by the
:class:`~lit_longctx.datamodules.base.ResumableLoader` that this module builds) are therefore exactly the inner
module's, so any token source (TextData, TokenFiles, the passkey mixture, a user's module) gains landmarks without a
landmark variant of each. The inner source produces rows of T regular tokens; the rows the model sees hold
T + ⌊(T − 1)/ℓ⌋ tokens under the per-row rule (512 → 522 for ℓ = 50) and T + ⌊T/ℓ⌋ under the global rule.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from lit_longctx.datamodules.base import LongCtxDataModule, SampleStream, StreamPlan
from lit_longctx.nn.attention.landmark import insert_on_grid
from lit_longctx.nn.llama import Transformer
from lit_longctx.nn.loss import IGNORE_INDEX
from lit_longctx.tokenizers import Tokenizer

Rule = Literal["per_row", "global", "stream"]
RULES = ("per_row", "global", "stream")
LANDMARK_PIECE = "<landmark>"

TokenLike = torch.Tensor | np.ndarray | Sequence[int] | Sequence[Sequence[int]]


def _as_ids(ids: TokenLike) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(ids) if not isinstance(ids, torch.Tensor) else ids)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"token ids must be integers, got {t.dtype}")
    return t.long()


def _check_freq(mem_freq: int) -> None:
    if not isinstance(mem_freq, int) or mem_freq < 1:
        raise ValueError(f"mem_freq must be an integer >= 1 (regular tokens per block, e.g. 50), got {mem_freq!r}")


def insert_landmarks(
    ids: TokenLike, mem_freq: int, landmark_id: int, rule: Rule = "per_row", start: int = 0
) -> torch.Tensor:
    """Insert ``landmark_id`` every ``mem_freq`` tokens along the last dim of ``ids`` (..., n).

    Args:
        rule: ``per_row`` (no landmark after the last token of a row) or ``global`` (stream grid; ``stream`` is
            the same insertion).
        start: ``global`` only: stream index of the first token, so the grid continues across pieces of a stream.
    """
    _check_freq(mem_freq)
    ids = _as_ids(ids)
    if bool((ids == landmark_id).any()):
        raise ValueError(f"the input already holds landmark id {landmark_id}; remove_landmarks() first")
    if rule in ("global", "stream"):
        if start < 0:
            raise ValueError(f"start must be >= 0 (stream index of the first token), got {start}")
        return insert_on_grid(ids, mem_freq, landmark_id, start % mem_freq)
    if rule != "per_row":
        raise ValueError(f"rule={rule!r} is unknown; use 'per_row' (LLaMA) or 'global' (PG19)")
    if start:
        raise ValueError("start only applies to rule='global'; per-row insertion always starts a row on the grid")
    out = insert_on_grid(ids, mem_freq, landmark_id)
    n = ids.shape[-1]
    return out[..., :-1] if n and n % mem_freq == 0 else out


def remove_landmarks(ids: TokenLike, landmark_id: int) -> torch.Tensor:
    """Drop every landmark (the inverse of :func:`insert_landmarks`); rows of a 2-D input must hold as many."""
    ids = _as_ids(ids)
    keep = ids != landmark_id
    if ids.dim() == 1:
        return ids[keep]
    counts = keep.sum(-1)
    if bool((counts != counts.flatten()[0]).any()):
        raise ValueError("rows hold different numbers of landmarks; remove them row by row")
    return ids[keep].view(*ids.shape[:-1], int(counts.flatten()[0]) if counts.numel() else 0)


def landmark_labels(
    ids: TokenLike,
    landmark_id: int,
    include_landmark_in_loss: bool = False,
    eot_id: int | None = None,
    pad_id: int | None = None,
) -> torch.Tensor:
    """Aligned targets for a landmark-augmented window (..., n), from the tokens that follow inside it.

    ``include_landmark_in_loss=False`` (PG19 ``optim/utils.py``): target = next token, or the one after it when the
    next is a landmark; ignored where the input is a landmark or ``eot_id`` (no loss for a new document's first
    token). ``True``: target = next token, landmarks included. Targets equal to ``pad_id`` are ignored. Positions whose
    target lies past the end are ignored: cut windows one or two tokens longer and crop the result to keep them.
    """
    ids = _as_ids(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    n = ids.shape[-1]
    if n < 2:
        return labels
    nxt = ids[..., 1:]
    if include_landmark_in_loss:
        labels[..., :-1] = nxt
    else:
        after = torch.cat([ids[..., 2:], torch.full_like(ids[..., :1], IGNORE_INDEX)], dim=-1)
        labels[..., :-1] = torch.where(nxt == landmark_id, after, nxt)
        labels[ids == landmark_id] = IGNORE_INDEX
    if eot_id is not None:
        labels[ids == eot_id] = IGNORE_INDEX
    if pad_id is not None:
        labels[labels == pad_id] = IGNORE_INDEX
    return labels


class LandmarkInsertion:
    """Batch transform: ``{input_ids (B, n), labels (B, n), ...}`` of ordinary tokens with aligned targets ->
    the landmark-augmented batch.

    Targets come from the source's own labels (which know the token after each row's end): a regular token keeps its
    target; with ``include_landmark_in_loss`` the token before a landmark targets the landmark and the landmark takes
    the regular token's target, otherwise the landmark's target is ignored. An ignored target stays ignored.
    ``eot_id`` additionally ignores targets at end-of-text inputs (PG19). ``position_ids`` (contiguous rows only)
    are renumbered; other per-token tensors are refused rather than guessed.

    ``rule="stream"``: ``phase`` φ ∈ [0, ℓ] places the row on the global grid (φ regular tokens of the open block
    precede it; φ = ℓ: the row starts with the landmark closing that block), and the result is cropped to
    n + ⌊n/ℓ⌋ tokens, the window length of the seed's PG19 batches.
    """

    def __init__(
        self,
        mem_freq: int,
        landmark_id: int,
        rule: Rule = "per_row",
        include_landmark_in_loss: bool = False,
        eot_id: int | None = None,
    ) -> None:
        _check_freq(mem_freq)
        _check_rule(rule)
        self.mem_freq, self.landmark_id, self.rule = mem_freq, landmark_id, rule
        self.include_landmark_in_loss, self.eot_id = include_landmark_in_loss, eot_id

    def phase(self, seed: int, epoch: int, position: int) -> int:
        """The grid phase of the row at (``epoch``, ``position``) for ``rule="stream"`` (0 for the other rules)."""
        if self.rule != "stream":
            return 0
        return int(np.random.default_rng([seed, epoch + 1, position, 50260]).integers(0, self.mem_freq + 1))

    def __call__(self, batch: dict[str, Any], phase: int = 0) -> dict[str, Any]:
        x = _as_ids(batch["input_ids"])
        b, n = x.shape
        unknown = [key for key, value in batch.items() if key not in ("input_ids", "labels", "position_ids")
                   and isinstance(value, torch.Tensor) and tuple(value.shape[:2]) == (b, n)]
        if unknown:
            raise ValueError(f"batch key {unknown[0]!r} is per-token; LandmarkInsertion does not know how to extend it")
        ell = self.mem_freq
        if not 0 <= phase <= ell or (phase and self.rule != "stream"):
            raise ValueError(f"phase must be 0 (or in [0, mem_freq] with rule='stream'), got {phase}")
        lead = int(phase == ell)  # the window opens on the landmark that closes the previous block
        start = phase % ell  # regular tokens of the open block before the row
        aug = insert_landmarks(x, ell, self.landmark_id, "global" if self.rule == "stream" else self.rule, start)
        if lead:
            aug = torch.cat([torch.full_like(aug[:, :1], self.landmark_id), aug], dim=1)
        t = torch.arange(n)
        index = lead + t + (start + t) // ell  # augmented index of regular token t
        out = dict(batch)
        out["input_ids"] = aug
        if "labels" in batch:
            y = _as_ids(batch["labels"])
            if y.shape != x.shape:
                raise ValueError(f"labels shape {tuple(y.shape)} != input_ids shape {tuple(x.shape)}")
            if self.eot_id is not None:
                y = y.masked_fill(x == self.eot_id, IGNORE_INDEX)
            labels = torch.full_like(aug, IGNORE_INDEX)
            closes = (start + t + 1) % ell == 0
            closes &= index + 1 < aug.shape[1]  # a landmark really follows (per-row: none after the last token)
            if self.include_landmark_in_loss:
                labels[:, index] = torch.where(closes & (y != IGNORE_INDEX), self.landmark_id, y)
                labels[:, index[closes] + 1] = y[:, closes]
                if lead:  # the leading landmark predicts the row's first token
                    labels[:, 0] = x[:, 0]
            else:
                labels[:, index] = y
            out["labels"] = labels
        if "position_ids" in batch:
            pos = torch.as_tensor(batch["position_ids"])
            if bool((pos != pos[:, :1] + torch.arange(n)).any()):
                raise ValueError("landmark insertion needs contiguous position_ids per row (no packed restarts)")
            out["position_ids"] = pos[:, :1] + torch.arange(aug.shape[1])
        if self.rule == "stream":  # windows of a fixed length, whatever the phase
            length = n + n // ell
            out = {k: (v[:, :length] if k in ("input_ids", "labels", "position_ids") else v) for k, v in out.items()}
        return out


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is unknown; use 'per_row' (LLaMA), 'global' (PG19 grid from each row start) "
                         "or 'stream' (PG19 grid global across rows, windows starting mid-block)")


# --------------------------------------------------------------------------------------------------- vocabulary
def landmark_token_id(tokenizer: Tokenizer, piece: str = LANDMARK_PIECE) -> int:
    """The id of ``<landmark>`` in ``tokenizer``, adding it as a special token (next free id) if missing."""
    return tokenizer.add_special_token(piece)


def with_landmark(tokenizer: Tokenizer, piece: str = LANDMARK_PIECE) -> Tokenizer:
    """A copy of ``tokenizer`` that has ``piece`` (added as the next free id when missing); ``tokenizer`` itself is
    left unchanged, so caches keyed by it (tokenized text) are shared with runs without landmarks."""
    out = copy.copy(tokenizer)
    out.added = dict(tokenizer.added)
    landmark_token_id(out, piece)
    return out


# ------------------------------------------------------------------------------------------------- data module
def _insert_into_sample(sample: dict[str, Any], transform: LandmarkInsertion, phase: int = 0) -> dict[str, Any]:
    """One row (dict of 1-D tensors) through ``transform``. ``position_ids`` are dropped: landmark attention runs
    over the whole row (blocks straddle documents, as the paper's PG19 and RedPajama rows do), with positions
    0..L-1."""
    row = {k: (v.unsqueeze(0) if isinstance(v, torch.Tensor) else v) for k, v in sample.items() if k != "position_ids"}
    return {k: (v.squeeze(0) if isinstance(v, torch.Tensor) else v) for k, v in transform(row, phase).items()}


class LandmarkStream(SampleStream):
    """The samples of ``inner`` at the same epochs and positions, with landmarks inserted.

    Order, sharding (:meth:`batch_positions`) and the numbers a resumable loader records (``seed``,
    :attr:`num_samples`) are the inner stream's, so resuming works as for the inner stream.

    Args:
        inner: the stream of ordinary rows (``input_ids``, ``labels`` of T tokens each).
        transform: the insertion.
    """

    def __init__(self, inner: SampleStream, transform: LandmarkInsertion) -> None:
        super().__init__(seed=inner.seed, shuffle=False)
        self.inner = inner
        self.transform = transform

    @property
    def num_samples(self) -> int:
        return self.inner.num_samples

    def sample_at(self, epoch: int, position: int) -> dict[str, Any]:
        phase = self.transform.phase(self.seed, epoch, position)
        return _insert_into_sample(self.inner.sample_at(epoch, position), self.transform, phase)

    def batches_per_epoch(self, world_size: int, batch_size: int) -> int:
        return self.inner.batches_per_epoch(world_size, batch_size)

    def stream_tokens(self, rows: int) -> int:
        return self.inner.stream_tokens(rows)

    def batch_positions(self, batch: int, plan: StreamPlan) -> list[int]:
        return self.inner.batch_positions(batch, plan)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return self.inner.collate(samples)


class LandmarkRows(Dataset):
    """A map-style dataset of ordinary rows (validation) with landmarks inserted into each row.

    Args:
        inner: the rows.
        transform: the insertion.
        seed: draws the grid phase of each row under ``rule="stream"``.
    """

    def __init__(self, inner: Dataset, transform: LandmarkInsertion, seed: int = 0) -> None:
        self.inner = inner
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _insert_into_sample(self.inner[index], self.transform, self.transform.phase(self.seed, -1, index))


class LandmarkData(LongCtxDataModule):
    """Landmark tokens inserted into the rows of any other DataModule (see the module docstring).

    The tokenizer is the inner module's plus ``<landmark>`` (added as the next free id when missing), so
    :attr:`vocab_size` grows by one and the CLI's vocabulary link gives the model the extra embedding row. Batch size,
    workers and seed are the inner module's.

    Args:
        data: the token source: any lit-longctx DataModule (``class_path`` + ``init_args`` in YAML), producing rows of
            T regular tokens with aligned labels (TextData, TokenFiles, PasskeyMixData, ...).
        mem_freq: regular tokens per block (ℓ_block; the paper uses 50). Must equal the model's.
        rule: ``per_row`` (LLaMA fine-tune: no landmark after a row's last block, T + ⌊(T − 1)/ℓ⌋ tokens),
            ``global`` (PG19 grid from the row start: a landmark after every ℓ-th token, T + ⌊T/ℓ⌋ tokens) or
            ``stream`` (the seed's PG19 windows: the grid is global across rows, so windows of T + ⌊T/ℓ⌋ tokens
            start at any phase of a block, landmark included; see the module docstring).
        include_landmark_in_loss: False (default; PG19 and the Triton LLaMA path): landmarks are never targets.
            True (the released LLaMA weights): the token before a landmark predicts it. Must equal the model's.
        ignore_eos_inputs: no loss where the input is the tokenizer's EOS (PG19: the first token of the next document
            is not predicted).
        landmark_token: the landmark's piece in the tokenizer.
        seq_len: T, regular tokens per row; null takes the inner module's (given, it must equal it). The CLI links
            it into the model's ``seq_len``.
    """

    def __init__(
        self,
        data: LongCtxDataModule,
        mem_freq: int = 50,
        rule: Rule = "per_row",
        include_landmark_in_loss: bool = False,
        ignore_eos_inputs: bool = False,
        landmark_token: str = LANDMARK_PIECE,
        seq_len: int | None = None,
    ) -> None:
        if not isinstance(data, LongCtxDataModule):
            raise TypeError(f"data must be a lit-longctx DataModule (e.g. lit_longctx.datamodules.TextData), got "
                            f"{type(data).__name__}")
        if isinstance(data, LandmarkData):
            raise ValueError("data is already a LandmarkData: landmarks would be inserted twice; use its inner module")
        if seq_len is not None and seq_len != data.seq_len:
            raise ValueError(f"seq_len={seq_len} but the inner data module makes rows of {data.seq_len} tokens: set "
                             "seq_len on the inner module (data.init_args.seq_len) and leave this one null")
        _check_freq(mem_freq)
        _check_rule(rule)
        super().__init__(data.tokenizer_spec, data.seq_len, data.batch_size, data.num_workers, data.seed)
        self.data = data
        self.mem_freq = mem_freq
        self.rule = rule
        self.include_landmark_in_loss = include_landmark_in_loss
        self.ignore_eos_inputs = ignore_eos_inputs
        self.landmark_token = landmark_token

    # --- vocabulary
    def build_tokenizer(self) -> Tokenizer:
        return with_landmark(self.data.tokenizer, self.landmark_token)

    @property
    def landmark_id(self) -> int:
        """The id of the landmark token in :attr:`tokenizer`."""
        return self.tokenizer.token_to_id(self.landmark_token)

    @property
    def max_token_id(self) -> int | None:
        inner = self.data.max_token_id
        return None if inner is None else max(inner, self.landmark_id)

    @property
    def augmented_len(self) -> int:
        """Tokens per row the model sees: T plus the landmarks of the rule."""
        t = self.seq_len
        return t + (t - 1) // self.mem_freq if self.rule == "per_row" else t + t // self.mem_freq

    def transform(self) -> LandmarkInsertion:
        """The insertion applied to every row."""
        eot = self.tokenizer.eos_id if self.ignore_eos_inputs else None
        if self.ignore_eos_inputs and eot is None:
            raise ValueError("ignore_eos_inputs=True but the tokenizer has no EOS token; set it to false")
        return LandmarkInsertion(self.mem_freq, self.landmark_id, self.rule, self.include_landmark_in_loss, eot)

    # --- the inner module's life cycle
    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.data.trainer = self.trainer
        self.data.setup(stage)

    def teardown(self, stage: str | None = None) -> None:
        self.data.teardown(stage)

    # --- rows
    def train_stream(self) -> LandmarkStream:
        return LandmarkStream(self.data.train_stream(), self.transform())

    def stage_stream(self, seq_len: int, token_offset: int) -> LandmarkStream:
        """The inner module's re-cut rows with landmarks inserted at the new length (context schedules)."""
        self.data.seq_len = seq_len
        return LandmarkStream(self.data.stage_stream(seq_len, token_offset), self.transform())

    def val_dataset(self) -> Dataset | None:
        rows = self.data.val_dataset()
        return None if rows is None else LandmarkRows(rows, self.transform(), self.seed)


@torch.no_grad()
def mean_init_rows(model: Transformer, start: int) -> None:
    """Set embedding rows (and untied output rows) ``start:`` to the mean of rows ``:start`` (spec §1.1)."""
    if not 0 < start <= model.config.vocab_size:
        raise ValueError(f"start must be in [1, vocab_size={model.config.vocab_size}], got {start}")
    mats = [model.model.embed_tokens.weight]
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        mats.append(model.lm_head.weight)
    for w in mats:
        w[start:] = w[:start].float().mean(0).to(w.dtype)


@torch.no_grad()
def resize_token_embeddings(model: Transformer, new_vocab: int) -> None:
    """Grow the input embedding and ``lm_head`` to ``new_vocab`` rows, new rows mean-initialised, and update
    ``model.config.vocab_size``. Existing rows are kept; tied embeddings stay tied. Build optimizers afterwards
    (the parameters are new tensors)."""
    old = model.config.vocab_size
    if new_vocab < old:
        raise ValueError(f"new_vocab={new_vocab} is smaller than the model's vocab_size={old}; shrinking would drop "
                         "trained rows")
    if new_vocab == old:
        return
    emb = model.model.embed_tokens
    w = emb.weight
    new_emb = nn.Embedding(new_vocab, w.shape[1], device=w.device, dtype=w.dtype)
    new_emb.weight[:old] = w
    model.model.embed_tokens = new_emb
    if model.config.tie_embeddings:
        model.lm_head = nn.Linear(w.shape[1], new_vocab, bias=False, device=w.device, dtype=w.dtype)
        model.lm_head.weight = new_emb.weight
    else:
        hw = model.lm_head.weight
        head = nn.Linear(hw.shape[1], new_vocab, bias=False, device=hw.device, dtype=hw.dtype)
        head.weight[:old] = hw
        model.lm_head = head
    model.config.vocab_size = new_vocab
    mean_init_rows(model, old)
