"""``Landmark``: fine-tune or train a LLaMA-family model with landmark attention (Mohtashami & Jaggi 2023,
arXiv 2305.16300).

Training (paper §3.1) is ordinary next-token training on rows that carry a landmark token after every ``mem_freq``
regular tokens (:class:`lit_longctx.datamodules.landmark.LandmarkData`), with every layer's attention the grouped
softmax of :mod:`lit_longctx.nn.attention.landmark` (``path``: memory-lean ``blockwise`` tiles or the ``reference``
formula). Inference (paper §3.2) goes through :class:`~lit_longctx.nn.attention.landmark.LandmarkSession`: ordinary
tokens in, landmarks inserted on the fly, top-k block retrieval per layer with the stingy positions of §3.2.1.

Vocabulary (spec §1.1): the ``<landmark>`` id comes from the tokenizer (the module's ``tokenizer``, else the
``init_from`` checkpoint's, else the data module's), where it is added as the next free id when missing. When the
``init_from`` checkpoint has fewer embedding rows, the model is built with the grown vocabulary and the new input and
output rows are set to the mean of the checkpoint's rows, as the seed's LLaMA fine-tune does.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from lit_longctx.checkpoint import register_method, tokenizer_to_files
from lit_longctx.datamodules.landmark import LANDMARK_PIECE, LandmarkData, landmark_token_id
from lit_longctx.hf import CheckpointError
from lit_longctx.modules.causal_lm import CausalLM
from lit_longctx.nn.attention.landmark import KIND, LandmarkOptions, LandmarkSession
from lit_longctx.nn.config import ConfigError, ModelConfig


def grow_rows(state: dict[str, torch.Tensor], vocab_size: int, tied: bool) -> dict[str, torch.Tensor]:
    """``state`` with ``model.embed_tokens.weight`` (and an untied ``lm_head.weight``) grown to ``vocab_size`` rows,
    each new row the mean of the existing rows of its matrix (computed in float32, stored in the matrix's dtype)."""
    out = dict(state)
    names = ["model.embed_tokens.weight"] + ([] if tied or "lm_head.weight" not in state else ["lm_head.weight"])
    for name in names:
        w = out[name]
        if w.shape[0] > vocab_size:
            raise CheckpointError(f"{name} has {w.shape[0]} rows, more than the model's vocab_size={vocab_size}")
        extra = vocab_size - w.shape[0]
        if extra:
            mean = w.float().mean(0, keepdim=True).to(w.dtype)
            out[name] = torch.cat([w, mean.expand(extra, -1)], dim=0)
    return out


#: settings that only concern inference: given to the module, they apply over a restored checkpoint's values
INFERENCE_SETTINGS = ("top_k", "selection", "chunk_length", "offload_to_cpu", "mem_cache_size")


class Landmark(CausalLM):
    """Landmark attention in every layer: grouped softmax in training, block retrieval at inference.

    Every landmark setting left null keeps the value of an ``init_from`` landmark checkpoint (e.g. an exported landmark
    model), else takes the default given below.

    Args:
        mem_freq: regular tokens per block (ℓ_block; a block is mem_freq + 1 tokens with its landmark last); default 50
            (the paper's LLaMA fine-tune, the released weights, the PG19 runs). Must equal the data's.
        top_k: blocks retrieved per layer and (token, head) at inference (≥ 1); default 5 (the seed's passkey runs).
        selection: ``per_token_and_head`` (default, the paper's), ``max_over_heads`` or ``max_over_tokens`` (paper
            Table 2).
        path: training attention: ``blockwise`` (default; tiles of one block, never the full score matrix) or
            ``reference`` (the formula over the full score matrix).
        chunk_length: regular tokens per inference chunk (ℓ_local); default derived from ``train_context_length`` and
            ``top_k`` (the seed's maintained code: 200 for 512, ℓ 50, k 5).
        offload_to_cpu: keep cached blocks in CPU memory at inference (only landmark keys stay on the accelerator);
            default false.
        mem_cache_size: most blocks kept per layer at inference (a FIFO ring, oldest evicted; paper Table 1's
            "blocks in memory", the seed's ``--mem_cache_size``); default null (every block).
        include_landmark_in_loss: the label convention of the data (see ``LandmarkData``); at inference it picks which
            output predicts the token after a landmark. Default false. Must equal the data's.
        train_context_length: regular tokens per training row, recorded in the model (and config.json) for the
            default chunk length; default the linked ``seq_len`` (the data's rows).
        landmark_id: id of the landmark token; null takes it from the tokenizer (adding ``landmark_token``): the
            module's ``tokenizer``, else the ``init_from`` checkpoint's, else the data module's.
        landmark_token: the landmark's piece in the tokenizer.
        **kwargs: CausalLM arguments (``model``, ``init_from``, ``tokenizer``, optimiser and schedule, ...).
    """

    method: ClassVar[str] = "landmark"
    allows_vocab_growth: ClassVar[bool] = True

    def __init__(
        self,
        mem_freq: int | None = None,
        top_k: int | None = None,
        selection: Literal["per_token_and_head", "max_over_heads", "max_over_tokens"] | None = None,
        path: Literal["blockwise", "reference"] | None = None,
        chunk_length: int | None = None,
        offload_to_cpu: bool | None = None,
        mem_cache_size: int | None = None,
        include_landmark_in_loss: bool | None = None,
        train_context_length: int | None = None,
        landmark_id: int | None = None,
        landmark_token: str = LANDMARK_PIECE,
        **kwargs: Any,
    ) -> None:
        given = dict(mem_freq=mem_freq, top_k=top_k, selection=selection, path=path, chunk_length=chunk_length,
                     offload_to_cpu=offload_to_cpu, mem_cache_size=mem_cache_size,
                     include_landmark_in_loss=include_landmark_in_loss,
                     train_context_length=train_context_length or kwargs.get("seq_len"))
        self._given = {k: v for k, v in given.items() if v is not None}
        LandmarkOptions(**self._given).check_settings()
        if landmark_id is not None and (not isinstance(landmark_id, int) or landmark_id < 0):
            raise ConfigError(f"landmark_id must be null (from the tokenizer) or an id >= 0, got {landmark_id!r}")
        super().__init__(**kwargs)

    # -------------------------------------------------------------------------------------------------- config
    def _tokenizer_landmark_id(self) -> int | None:
        """The landmark id in the module's tokenizer (added there when missing), or None without a tokenizer."""
        tokenizer = self._tokenizer
        return None if tokenizer is None else landmark_token_id(tokenizer, self.hparams.landmark_token)

    def model_config_overrides(self, config: ModelConfig) -> dict[str, Any]:
        # defaults < a landmark checkpoint's options (init_from) < the settings given to this module
        options = {**vars(LandmarkOptions()), **config.attention_options.get(KIND, {}), **self._given}
        landmark_id = self.hparams.landmark_id
        if landmark_id is None:
            landmark_id = self._tokenizer_landmark_id()
        if landmark_id is not None:
            options["landmark_id"] = landmark_id
        overrides: dict[str, Any] = {"attention": KIND, "layer_attention": {},
                                     "attention_options": {**config.attention_options, KIND: options}}
        if self._init_checkpoint is not None:
            # grow the checkpoint's vocabulary to the data's and to the landmark id (new rows: configure_model)
            needed = [config.vocab_size, self.hparams.vocab_size or 0]
            needed += [options["landmark_id"] + 1] if options["landmark_id"] is not None else []
            overrides["vocab_size"] = max(needed)
        return overrides

    @property
    def landmark_options(self) -> LandmarkOptions:
        """The landmark options of the model config (the checkpoint's when one is restored)."""
        return LandmarkOptions(**self.model_config.attention_options.get(KIND, {}))

    def _complete_options(self) -> None:
        """Fill what only the data knows: a still unknown landmark id from the data module's tokenizer (known once
        the trainer runs), and the training context from its rows."""
        options = dict(self.model_config.attention_options.get(KIND, {}))
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if options.get("train_context_length") is None and isinstance(dm, LandmarkData):
            options["train_context_length"] = dm.seq_len
        if options.get("landmark_id") is None:
            tokenizer = self.tokenizer  # the data module's, when the module has none of its own
            if tokenizer is None:
                raise ConfigError(
                    "the landmark token id is unknown: give the module a tokenizer (model.init_args.tokenizer), train "
                    "with LandmarkData (whose tokenizer has the token), or set model.init_args.landmark_id"
                )
            options["landmark_id"] = landmark_token_id(tokenizer, self.hparams.landmark_token)
        self.model_config = self.model_config.replace(
            attention_options={**self.model_config.attention_options, KIND: options})

    # ---------------------------------------------------------------------------------------------------- model
    def configure_model(self) -> None:
        if self.model is None and not self._resuming():
            self._complete_options()
            self.landmark_options.validate(self.model_config.vocab_size)
            if self._init_checkpoint is not None:
                state = self._init_from_weights()
                self._init_checkpoint.state_dict = grow_rows(
                    state, self.model_config.vocab_size, self.model_config.tie_embeddings)
        super().configure_model()
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if isinstance(dm, LandmarkData):
            self._check_data(dm)

    def _check_data(self, dm: LandmarkData) -> None:
        """The landmark data must use the model's block length, landmark id and label convention."""
        opts = self.landmark_options
        mismatches = [
            f"{name}: data {theirs!r} vs model {ours!r}"
            for name, theirs, ours in (
                ("mem_freq", dm.mem_freq, opts.mem_freq),
                ("landmark id", dm.landmark_id, opts.landmark_id),
                ("include_landmark_in_loss", dm.include_landmark_in_loss, opts.include_landmark_in_loss),
            )
            if theirs != ours
        ]
        if mismatches:
            raise ConfigError(
                f"the landmark data and model disagree ({'; '.join(mismatches)}): set the same values in "
                "data.init_args and model.init_args (a restored checkpoint keeps the values it was trained with)"
            )
        own = self._tokenizer
        if own is not None and own is not dm.tokenizer and tokenizer_to_files(own) != tokenizer_to_files(dm.tokenizer):
            raise ConfigError(
                "the model's tokenizer (from model.init_args.tokenizer or the init_from checkpoint) differs from the "
                "data's, so the data's token ids would mean other tokens to the model: give the data module the "
                "model's tokenizer (e.g. the tokenizer files of the init_from checkpoint)"
            )

    def apply_context_stage(self, seq_len: int, micro_batch: int, rope: Any, max_seq_len: int) -> None:
        """A new stage length is the new training context the default inference chunk length derives from."""
        options = {**self.model_config.attention_options.get(KIND, {}), "train_context_length": seq_len}
        self.model_config = self.model_config.replace(
            attention_options={**self.model_config.attention_options, KIND: options})
        super().apply_context_stage(seq_len, micro_batch, rope, max_seq_len)

    # ------------------------------------------------------------------------------------------------ inference
    def inference_session(self, batch_size: int = 1, **kwargs: Any) -> LandmarkSession:
        """A :class:`LandmarkSession` with the model's retrieval options, replaced by the ones given to this module
        (``top_k``, ``selection``, ``chunk_length`` as the prefill chunk, ``offload_to_cpu``, ``mem_cache_size``) and
        then by ``kwargs``
        (e.g. an evaluation batch's ``session_kwargs``)."""
        # the model's options hold these already, except when a restored checkpoint's config replaced them
        settings = {k: v for k, v in self._given.items() if k in INFERENCE_SETTINGS}
        if "chunk_length" in settings:
            settings["prefill_chunk"] = settings.pop("chunk_length")
        return LandmarkSession(self.model, batch_size=batch_size, **{**settings, **kwargs})

    # --------------------------------------------------------------------------------------------------- export
    @classmethod
    def hf_config_extras(cls, config: ModelConfig) -> dict[str, Any]:
        """The seed's ``LlamaLandmarkConfig`` fields (``mem_id``, ``mem_freq``, ``train_context_length``,
        ``include_landmark_in_loss``) as top-level config.json keys, which transformers' LLaMA ignores."""
        opts = LandmarkOptions(**config.attention_options.get(KIND, {}))
        return {"mem_id": opts.landmark_id, "mem_freq": opts.mem_freq,
                "train_context_length": opts.train_context_length,
                "include_landmark_in_loss": opts.include_landmark_in_loss}


register_method(Landmark.method, "lit_longctx.modules.Landmark")
