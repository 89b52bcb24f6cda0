"""Landmark attention (Mohtashami & Jaggi 2023, arXiv 2305.16300): grouped softmax for training, block retrieval for
inference.

The input carries a landmark token after every ``mem_freq`` regular tokens; a landmark closes its block, so a block is
B = mem_freq + 1 tokens with the landmark last. For query i let blk(j) be the number of landmarks strictly before j and
c = blk(i). Paper §3.1 (spec §2.1), over the causally visible keys:

    main group  M_i = {landmarks l with blk(l) < c} ∪ {regular j with blk(j) = c}      (own landmark excluded)
    p_i         = softmax of s_i. over M_i
    w_ij        = p_i(j)                                        regular j in the own block
                = p_i(l_b) · exp(s_ij) / Σ_{t ∈ R_b} exp(s_it)   regular j of an earlier block b (R_b: its regulars)
                = 0                                             every landmark j (landmark values are never read)
    y_i         = Σ_j w_ij v_j

Two training paths compute it:

- ``reference`` (:func:`grouped_softmax_weights`): the formula written out over the full ``(B, H, T, T)`` score
  matrix; the gate table has one column per landmark present in the input (sized from the input, never a fixed G, so
  any number of landmarks is exact — the repo's fixed G silently merges groups, spec §2.2). The degenerate rows of
  spec §2.3 are reproduced: a block without regular tokens keeps its gate mass (row sums to 1 − p(l_b)), and a query
  with an empty main group (a window that starts on a landmark) gets a zero row.
- ``blockwise`` (:func:`blockwise_landmark_attention`): the tiling of the authors' Triton kernel (spec §2.4) in plain
  PyTorch. Tiles are blocks; every earlier key tile enters an online softmax as one *virtual key* whose score is its
  landmark's score and whose value is the within-tile softmax average of its regular values; the diagonal tile is
  ordinary causal softmax without the tile's landmark key. Rows are padded per row so that landmarks sit last in
  their tile (windows may start and end mid-block, as PG19 windows do). Query tiles are processed under activation
  checkpointing, so no ``[T, T]`` score matrix exists for all heads at once, in the forward or the backward.

Inference (paper §3.2, spec §3): :class:`LandmarkCache` keeps complete blocks of keys *before* RoPE (landmark last) and
the trailing incomplete block apart. A chunk attends, through the same grouped softmax, to
``[k retrieved blocks | incomplete block | chunk]``: per layer and per (token, head) (or max over heads / over tokens,
softmax before the max) the landmark keys of all cached blocks are scored at their stingy positions (paper §3.2.1,
:func:`scoring_slots`), the top-k blocks are taken in chronological order and placed at their slots
(:func:`selection_slots`), and RoPE is applied at those positions. :class:`LandmarkSession` inserts landmarks into
ordinary token streams on the fly (grid aligned to the prompt start) and returns next-token logits.

Shapes: B batch, H query heads, Hkv key/value heads, T queries, S keys, D head dim, Bk = mem_freq + 1 block length,
n cached blocks, k' = min(top_k, n).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

from lit_longctx.nn.attention.base import Attention, AttentionContext, register_attention
from lit_longctx.nn.attention.landmark_cache import (
    SELECTIONS,
    LandmarkCache,
    Selection,
    attend_with_cache,
    check_mem_cache_size,
    check_selection,
    check_top_k,
    scoring_slots,
    select_blocks,
    selection_slots,
    slot_start,
)
from lit_longctx.nn.attention.landmark_softmax import (
    blockwise_landmark_attention,
    grouped_softmax_weights,
    reference_landmark_attention,
)
from lit_longctx.nn.config import ConfigError, ModelConfig
from lit_longctx.nn.session import DecodingSession, check_attention_mask

KIND = "landmark"
LAYOUT_KEY = "landmark"
__all__ = [
    "KIND", "LAYOUT_KEY", "SELECTIONS", "LandmarkAttention", "LandmarkCache", "LandmarkLayout", "LandmarkOptions",
    "LandmarkSession", "Selection", "attend_with_cache", "blockwise_landmark_attention", "check_mem_cache_size",
    "check_selection", "check_top_k", "default_chunk_length", "grid_offsets", "grouped_softmax_weights",
    "insert_on_grid", "reference_landmark_attention", "scoring_slots", "select_blocks", "selection_slots", "slot_start",
]


# --------------------------------------------------------------------------------------------------------- options
@dataclass
class LandmarkOptions:
    """Options of the ``landmark`` attention kind (``ModelConfig.attention_options["landmark"]``).

    Args:
        landmark_id: token id of ``<landmark>`` (required; must be < vocab_size).
        mem_freq: regular tokens per block (ℓ_block); a block is mem_freq + 1 tokens with the landmark last.
            The paper's LLaMA fine-tune and PG19 runs use 50, the maintained LLaMA code 63.
        path: training attention: ``blockwise`` (memory-lean tiles, landmarks on a regular grid) or ``reference``
            (full score matrix, any landmark placement).
        top_k: blocks retrieved per (token, head) at inference (≥ 1; fewer when fewer blocks are cached).
        selection: ``per_token_and_head`` (paper default), ``max_over_heads`` (same blocks for all heads of a token)
            or ``max_over_tokens`` (same blocks for all tokens of a chunk, per head; used with CPU offload).
        chunk_length: regular tokens per prefill chunk (ℓ_local); default derived from train_context_length (else
            max_seq_len) and top_k as in the maintained LLaMA code (:func:`default_chunk_length`).
        offload_to_cpu: keep complete cached blocks in CPU memory; only landmark keys stay on the compute device.
        mem_cache_size: most blocks kept per layer at inference (a FIFO ring, oldest evicted first, as
            ``lm_benchmark``'s ``--mem_cache_size``; paper Table 1's "blocks in memory"); None keeps every block.
        train_context_length: regular tokens per training row (the seed's ``train_context_length``, 512); the
            default chunk length is derived from it (else from max_seq_len), so retrieved blocks and the chunk stay
            within the distances seen in training.
        include_landmark_in_loss: the training label convention (spec §1.3): True when the token before a landmark
            learnt to predict ``<landmark>`` (the released LLaMA weights); :class:`LandmarkSession` then reads the
            next ordinary token from the landmark's output.
    """

    landmark_id: int | None = None
    mem_freq: int = 50
    path: Literal["blockwise", "reference"] = "blockwise"
    top_k: int = 5
    selection: Selection = "per_token_and_head"
    chunk_length: int | None = None
    offload_to_cpu: bool = False
    mem_cache_size: int | None = None
    train_context_length: int | None = None
    include_landmark_in_loss: bool = False

    @property
    def block(self) -> int:
        return self.mem_freq + 1

    def check_settings(self) -> LandmarkOptions:
        """Validate everything but the landmark id (which needs the vocabulary)."""
        where = "attention_options['landmark']"
        if not isinstance(self.mem_freq, int) or isinstance(self.mem_freq, bool) or self.mem_freq < 1:
            raise ConfigError(f"{where}['mem_freq'] must be an integer >= 1 (e.g. 50), got {self.mem_freq!r}")
        if self.path not in ("blockwise", "reference"):
            raise ConfigError(f"{where}['path']={self.path!r} is unknown; use 'blockwise' or 'reference'")
        check_top_k(self.top_k)
        check_selection(self.selection)
        check_mem_cache_size(self.mem_cache_size)
        for name in ("chunk_length", "train_context_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{where}['{name}'] must be None or an integer >= 1, got {value!r}")
        return self

    def validate(self, vocab_size: int) -> LandmarkOptions:
        where = "attention_options['landmark']"
        self.check_settings()
        if self.landmark_id is None:
            raise ConfigError(
                f"landmark attention needs {where}['landmark_id']: the id of the <landmark> token (add it with "
                "lit_longctx.datamodules.landmark.landmark_token_id(tokenizer) and resize the embeddings)"
            )
        if not isinstance(self.landmark_id, int) or not 0 <= self.landmark_id < vocab_size:
            raise ConfigError(
                f"{where}['landmark_id']={self.landmark_id!r} is outside the vocabulary [0, {vocab_size}); add the "
                "token to the tokenizer and grow the embeddings first (resize_token_embeddings), or set vocab_size "
                "to include it"
            )
        return self

    @classmethod
    def from_config(cls, config: ModelConfig) -> LandmarkOptions:
        raw = dict(config.attention_options.get(KIND, {}))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown attention_options['landmark'] keys {unknown}; valid keys: {sorted(known)}")
        return cls(**raw).validate(config.vocab_size)


def default_chunk_length(context: int, mem_freq: int, top_k: int) -> int:
    """Regular tokens per prefill chunk for a model trained on ``context`` tokens: the maintained LLaMA code's window
    L − (L mod Bk) − (k+1)·Bk (204 for L = 512, Bk = 51, k = 5), in whole blocks, at least one block."""
    block = mem_freq + 1
    window = context - context % block - (top_k + 1) * block
    return max(1, window // block) * mem_freq


# ---------------------------------------------------------------------------------------------------- batch layout
@dataclass
class LandmarkLayout:
    """Landmark flags of one batch, derived once per forward from ``input_ids == landmark_id``."""

    is_mem: torch.Tensor  # (B, T) bool
    block: int

    @functools.cached_property
    def grid_offsets(self) -> torch.Tensor | None:
        """(B,) index of the first landmark slot of each row when landmarks sit exactly every ``block`` positions
        (row r: at o_r, o_r + Bk, …, with o_r < Bk), else None. A row without landmarks shorter than Bk is regular."""
        return grid_offsets(self.is_mem, self.block)


def grid_offsets(is_mem: torch.Tensor, block: int) -> torch.Tensor | None:
    """See :attr:`LandmarkLayout.grid_offsets`."""
    _, t = is_mem.shape
    pos = torch.arange(t, device=is_mem.device)
    none = torch.full_like(is_mem[:, 0], block - 1, dtype=torch.long)
    first = torch.where(is_mem.any(1), is_mem.int().argmax(1), none)
    expected = torch.remainder(pos.unsqueeze(0) - first.unsqueeze(1), block) == 0
    if is_mem.device.type == "xla":  # checking the grid is a host sync that splits the compiled step; landmark
        return first  # data modules insert on the grid (insert_landmarks), and other placements use path=reference
    regular = (first < block) & (expected == is_mem).all(1)
    return first if bool(regular.all()) else None


# ------------------------------------------------------------------------------------------------------- the layer
@register_attention(KIND)
class LandmarkAttention(Attention):
    """Landmark attention layer: grouped softmax in training (``path``), block retrieval with a cache at inference."""

    def __init__(self, config: ModelConfig, layer_idx: int, **options: Any) -> None:
        super().__init__(config, layer_idx)
        self.options = LandmarkOptions(**options).validate(config.vocab_size)

    @classmethod
    def prepare_context(cls, ctx: AttentionContext, input_ids: torch.Tensor, config: ModelConfig) -> None:
        opts = LandmarkOptions.from_config(config)
        ctx.extras[LAYOUT_KEY] = LandmarkLayout(input_ids == opts.landmark_id, opts.block)

    def new_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> LandmarkCache:
        o = self.options
        return LandmarkCache(batch_size, self.n_kv_heads, self.head_dim, o.block, device, dtype, o.top_k,
                             o.selection, o.offload_to_cpu, o.mem_cache_size)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: LandmarkCache | None = None) -> torch.Tensor:
        if ctx.doc_ids is not None:
            raise ValueError(
                "landmark attention attends over the whole window (blocks may straddle documents, as in the paper); "
                "give contiguous position_ids (no restarts inside a row) instead of packed-document positions"
            )
        layout: LandmarkLayout = ctx.extras[LAYOUT_KEY]
        q, k, v = self.project(x)  # (B, T, H|Hkv, D)
        q = self.rotate(q, ctx.cos, ctx.sin).transpose(1, 2)  # (B, H, T, D)
        v = v.transpose(1, 2)
        if cache is not None:
            mem = layout.is_mem
            if bool((mem != mem[:1]).any()):
                raise ValueError("with a landmark cache every batch row must have its landmarks at the same places")
            start = ctx.position_ids[:, :1] - cache.tail_len
            padded = ctx.attention_mask is not None or cache.padded
            mask = ctx.attention_mask if ctx.attention_mask is not None else torch.ones_like(mem)
            y = attend_with_cache(q, k.transpose(1, 2), v, mem[0], start, cache, ctx.rope, self.scale,
                                  mask if padded else None, ctx.position_ids if padded else None)
            return self.output(y)
        k = self.rotate(k, ctx.cos, ctx.sin).transpose(1, 2)
        if self.options.path == "reference" or ctx.attention_mask is not None:  # the blockwise tiles have no pads
            return self.output(reference_landmark_attention(q, k, v, layout.is_mem, self.scale, ctx.attention_mask))
        offsets = layout.grid_offsets
        if offsets is None:
            raise ValueError(
                f"the blockwise landmark path needs a landmark exactly every {self.options.block} tokens "
                f"(mem_freq={self.options.mem_freq}) in every row; this batch has another placement. Insert landmarks "
                "with lit_longctx.datamodules.landmark.insert_landmarks using the same mem_freq, or set "
                "attention_options['landmark']['path']='reference'"
            )
        return self.output(blockwise_landmark_attention(q, k, v, offsets, self.options.block, self.scale))


# ----------------------------------------------------------------------------------------------------- the session
def insert_on_grid(ids: torch.Tensor, mem_freq: int, landmark_id: int, start: int = 0) -> torch.Tensor:
    """Insert ``landmark_id`` after every token whose grid count (start + t + 1) is a multiple of ``mem_freq``.

    ``ids`` (..., n); ``start`` = regular tokens already in the open block (0 ≤ start < mem_freq). This is the PG19
    global-grid rule (spec §1.2) for a stream whose first token has stream index ``start``.
    """
    n = ids.shape[-1]
    t = torch.arange(n, device=ids.device)
    n_before = (start + t) // mem_freq - start // mem_freq  # landmarks inserted before regular token t
    closes = (start + t + 1) % mem_freq == 0
    total = n + int(closes.sum())
    out = ids.new_full((*ids.shape[:-1], total), landmark_id)
    out[..., t + n_before] = ids
    return out


class LandmarkSession(DecodingSession):
    """Decoding driver for landmark models: callers feed ordinary token ids, the session inserts landmarks.

    The grid is aligned to the first token fed (the prompt start); a landmark is appended whenever fed or generated
    tokens complete a block of ``mem_freq``. Prompts are prefilled in chunks of ``prefill_chunk`` regular tokens
    (default: ``chunk_length``, else :func:`default_chunk_length` of ``train_context_length`` or max_seq_len).

    Which output predicts the next ordinary token after a regular token that a landmark follows:
    ``include_landmark_in_loss=False`` (landmarks never predicted in training) uses the regular token's own
    output, as the Triton-path model's ``drop_last_logit_if_mem``; ``True`` (the released LLaMA weights, which
    learnt to predict ``<landmark>`` there) uses the landmark's output. Default: the model's option of that name.
    ``suppress_landmark`` sets the landmark logit to −inf so that sampling never emits it.

    Keyword overrides ``top_k``, ``selection``, ``offload_to_cpu``, ``mem_cache_size`` replace the layers' options for
    this session (None keeps the option). ``record_retrieval=True`` keeps which blocks every layer retrieved
    (:meth:`retrieved_blocks`).
    :meth:`forward_logits` returns the logits of every fed ordinary token (perplexity over long inputs).
    """

    def __init__(
        self,
        model: Any,
        batch_size: int = 1,
        prefill_chunk: int | None = None,
        *,
        top_k: int | None = None,
        selection: str | None = None,
        offload_to_cpu: bool | None = None,
        mem_cache_size: int | None = None,
        record_retrieval: bool = False,
        include_landmark_in_loss: bool | None = None,
        suppress_landmark: bool = True,
        **_: Any,
    ) -> None:
        opts = LandmarkOptions.from_config(model.config)
        self.mem_freq, self.landmark_id = opts.mem_freq, opts.landmark_id
        k_eff = check_top_k(top_k) if top_k is not None else opts.top_k
        context = opts.train_context_length or model.config.max_seq_len
        chunk = prefill_chunk or opts.chunk_length or default_chunk_length(context, opts.mem_freq, k_eff)
        if chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 regular tokens, got {chunk}")
        super().__init__(model, batch_size=batch_size, prefill_chunk=chunk)
        for cache in self.state.caches:
            if isinstance(cache, LandmarkCache):
                if top_k is not None:
                    cache.top_k = k_eff
                if selection is not None:
                    cache.selection = check_selection(selection)
                if offload_to_cpu is not None:
                    cache.offload_to_cpu = offload_to_cpu
                if mem_cache_size is not None:
                    cache.mem_cache_size = mem_cache_size
                cache.record_retrieval = record_retrieval
        self.include_landmark_in_loss = (opts.include_landmark_in_loss if include_landmark_in_loss is None
                                         else include_landmark_in_loss)
        self.suppress_landmark = suppress_landmark
        self.filled = 0  # regular tokens in the open block
        self.record_retrieval = record_retrieval
        self._options = dict(top_k=top_k, selection=selection, offload_to_cpu=offload_to_cpu,
                             mem_cache_size=mem_cache_size, include_landmark_in_loss=include_landmark_in_loss,
                             suppress_landmark=suppress_landmark)
        self._groups: list[tuple[torch.Tensor, LandmarkSession]] | None = None  # padded batches: rows per grid

    def _run(self, ids: torch.Tensor, last_only: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ordinary ids (B, n) (``mask``: False = pad): insert landmarks, run the model; float32 logits
        (B, n | 1, V) per fed token."""
        if bool((ids == self.landmark_id).any()):
            raise ValueError(
                f"feed ordinary tokens only: id {self.landmark_id} is the landmark, which the session inserts itself"
            )
        n = ids.shape[1]
        start = self.filled
        aug = insert_on_grid(ids, self.mem_freq, self.landmark_id, start)
        t = torch.arange(n, device=ids.device)
        index = t + (start + t) // self.mem_freq  # augmented index of each fed token
        aug_mask = None
        if mask is not None:  # a landmark is a pad when the block it closes is
            aug_mask = torch.ones_like(aug, dtype=torch.bool)
            aug_mask[:, index] = mask
            closing = index[(start + t + 1) % self.mem_freq == 0] + 1
            aug_mask[:, closing] = aug_mask[:, closing - 1]
        if self.include_landmark_in_loss:
            index = index + ((start + t + 1) % self.mem_freq == 0).long()
        if last_only:
            index = index[-1:]
        hidden = self.model(aug, state=self.state, attention_mask=aug_mask, return_logits=False,
                            return_hidden=True).hidden
        logits = self.model.lm_head(hidden[:, index]).float()
        self.filled = (start + n) % self.mem_freq
        if self.suppress_landmark:
            logits[..., self.landmark_id] = float("-inf")
        return logits

    # --------------------------------------------------------------------------------------------- padded batches
    def _padded_groups(self, ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]]:
        """Rows that can share one landmark grid, each as (rows, ids, mask) laid out so that every row is fed the
        chunks, blocks and positions it would be fed alone.

        A row of n tokens alone is fed k = ⌊(n-1)/C⌋ chunks of C tokens and a last piece of r = n - kC (C =
        ``prefill_chunk``). When C is a multiple of ``mem_freq``, rows with the same n mod ``mem_freq`` share a
        grid: their chunk slots are aligned to the end (rows with fewer chunks get whole chunks of pads first) and
        the last pieces are left-padded, pads being whole blocks. Otherwise only rows of equal length share one.
        """
        c, mf = self.prefill_chunk, self.mem_freq
        counts = mask.sum(1).tolist()
        if min(counts) == 0:
            raise ValueError("every row of a padded batch needs at least one token")
        pad_id = 0 if self.landmark_id != 0 else 1
        keys: dict[int, list[int]] = {}
        for row, n in enumerate(counts):
            keys.setdefault(n % mf if c % mf == 0 else n, []).append(row)
        groups = []
        for rows in keys.values():
            full = [(counts[r] - 1) // c for r in rows]
            last = [counts[r] - k * c for r, k in zip(rows, full)]
            width = max(full) * c + max(last)
            g_ids = ids.new_full((len(rows), width), pad_id)
            g_mask = torch.zeros(len(rows), width, dtype=torch.bool, device=ids.device)
            for i, (r, k, rest) in enumerate(zip(rows, full, last)):
                tokens = ids[r, mask[r]]
                lead = (max(full) - k) * c
                g_ids[i, lead : lead + k * c], g_mask[i, lead : lead + k * c] = tokens[: k * c], True
                g_ids[i, width - rest :], g_mask[i, width - rest :] = tokens[k * c :], True
            groups.append((torch.tensor(rows, device=ids.device), g_ids, g_mask))
        return groups

    def _grouped(self, ids: torch.Tensor, mask: torch.Tensor | None, all_logits: bool) -> torch.Tensor:
        """Run a padded batch (first call: form the groups) or continue the groups; logits in the input's layout."""
        b = ids.shape[0]
        if self._groups is None:
            if self.state.position:
                raise ValueError("a padded batch must be the first input of a landmark session (its rows then keep "
                                 "their own landmark grids); start a new session")
            if self.record_retrieval:  # rows of one group share a stream with pad blocks: no per-row record
                raise ValueError("record_retrieval records one block stream for the batch, which a padded batch "
                                 "does not have; record retrievals with unpadded prompts (one prompt at a time)")
            parts = self._padded_groups(ids, mask)
            self._groups = [(rows, LandmarkSession(self.model, len(rows), self.prefill_chunk, **self._options))
                            for rows, _, _ in parts]
            inputs = [(g_ids, g_mask) for _, g_ids, g_mask in parts]
        else:
            if mask is not None and not bool(mask.all()):
                raise ValueError("only the first input of a landmark session may be padded")
            inputs = [(ids[rows], None) for rows, _ in self._groups]
        out = None
        for (rows, child), (g_ids, g_mask) in zip(self._groups, inputs):
            logits = child._chunked(g_ids, g_mask, all_logits)
            if out is None:
                out = logits.new_zeros((b, ids.shape[1], logits.shape[-1]) if all_logits else (b, logits.shape[-1]))
            if not all_logits:
                out[rows] = logits
                continue
            for i, r in enumerate(rows.tolist()):
                where = mask[r] if mask is not None else torch.ones(ids.shape[1], dtype=torch.bool, device=ids.device)
                out[r, where] = logits[i, g_mask[i]] if g_mask is not None else logits[i]
        return out

    def _chunked(self, ids: torch.Tensor, mask: torch.Tensor | None, all_logits: bool) -> torch.Tensor:
        """Feed (B, n) ids in prefill chunks: logits (B, n, V) of every token, or (B, V) after the last one."""
        parts = []
        for s in range(0, ids.shape[1], self.prefill_chunk):
            m = None if mask is None else mask[:, s : s + self.prefill_chunk]
            parts.append(self._run(ids[:, s : s + self.prefill_chunk], last_only=not all_logits, mask=m))
        return torch.cat(parts, dim=1) if all_logits else parts[-1][:, -1]

    def _needs_groups(self, mask: torch.Tensor | None) -> bool:
        return self._groups is not None or (mask is not None and not bool(mask.all()))

    # ------------------------------------------------------------------------------------------------ the API
    def retrieved_blocks(self) -> dict[int, list[torch.Tensor]]:
        """Per landmark layer index, the blocks retrieved by each chunk fed so far (``record_retrieval=True``): a list
        of (B, H, Tr, k') tensors of block indices in the augmented stream (block b = augmented positions
        [b·Bk, (b+1)·Bk), landmark last); Tr = the chunk's augmented length, or 1 for ``max_over_tokens``."""
        return {i: list(c.retrieved) for i, c in enumerate(self.state.caches) if isinstance(c, LandmarkCache)}

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Ingest (B, N) prompts (left-padded when ``attention_mask`` marks pads); logits (B, V) after each row."""
        mask = check_attention_mask(attention_mask, ids)
        if ids.shape[1] == 0:
            raise ValueError("the prompt is empty: give at least one token (e.g. the tokenizer's BOS)")
        if self._needs_groups(mask):
            return self._grouped(ids, mask, all_logits=False)
        return self._chunked(ids, None, all_logits=False)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        return self._grouped(ids, None, all_logits=False) if self._groups is not None else self.forward(ids)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ordinary ids (B, n); return the next-token logits (B, V) after the last of them."""
        mask = check_attention_mask(attention_mask, ids)
        if self._needs_groups(mask):
            return self._grouped(ids, mask, all_logits=False)
        return self._run(ids, last_only=True)[:, -1]

    def forward_logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ordinary ids (B, n) (in prefill chunks) and return (B, n, V) float32 logits, position t predicting
        the ordinary token after ``ids[:, t]`` (0 at pads). The caches advance as in prefill, so calls can continue a
        stream."""
        if ids.shape[1] == 0:
            raise ValueError("forward_logits needs at least one token")
        mask = check_attention_mask(attention_mask, ids)
        if self._needs_groups(mask):
            return self._grouped(ids, mask, all_logits=True)
        return self._chunked(ids, None, all_logits=True)

    def padded_logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A padded batch goes in one :meth:`forward_logits` call, which feeds every row its own chunks and landmark
        grid (only a session's first input may be padded); an unpadded one in chunks, as the base session does."""
        mask = check_attention_mask(attention_mask, ids)
        if mask is None or bool(mask.all()):
            yield from super().padded_logits(ids, None)
            return
        cols = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).masked_fill(~mask, -1)
        yield self.forward_logits(ids, mask), cols


LandmarkAttention.session_class = LandmarkSession
