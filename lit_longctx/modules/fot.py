"""``FoT``: Focused Transformer training (cross-batch memory layers) and LongLLaMA inference under Lightning.

Tworkowski et al., "Focused Transformer: Contrastive Training for Context Scaling", arXiv 2307.03170: §3 (memory
attention, crossbatch training), App. A.2 (LongLLaMA: ``doc_aware_k4`` packing, r = 3, stepping), §4 / App. A
(continued pretraining of OpenLLaMA). The attention kind is :mod:`lit_longctx.nn.attention.fot`; the data,
:class:`lit_longctx.datamodules.doc_aware.DocAwareData`.

What this module adds to :class:`~lit_longctx.modules.causal_lm.CausalLM` (spec ``specs/fot.md`` §1, §3, §8):

- the memory layers (``mem_layers``) become ``fot`` attention; FoT adds no parameters, so any LLaMA checkpoint
  (OpenLLaMA for LongLLaMA) starts it and its weights stay plain LLaMA;
- per-batch cross-batch settings (``on_batch_layout``): training batches use ``cross_batch_range`` (r) with stepping
  or explicit per-in-pack ``cross_batch_ranges`` and the data's packing k (``dataset_packing``, taken from the data
  module's ``doc_aware_k<k>`` pipeline); validation and test batches use ``eval_cross_batch_range`` (0 in the JAX code:
  plain attention) with the evaluation pipeline's k;
- the layout each row saw is logged: the mean number of positive (earlier windows of its own document stream) and
  negative (other streams) additional contexts, ``train/fot/positives`` and ``train/fot/negatives``;
- inference (evaluation, ``generate``) goes through :class:`~lit_longctx.nn.attention.fot.FoTSession`: the memory
  cache with ``last_context_length``;
- HF export writes LongLLaMA's keys (``mem_layers``, ``last_context_length``, ``mem_dtype``, ...) and the JAX ones
  (``cross_batch_range``, ``cross_batch_stepping``, ``dataset_packing``, ``scan_cross_batch``) into config.json, which
  keeps ``model_type: llama``, so ``transformers`` loads the export as plain LLaMA; a LongLLaMA directory (``model_type:
  longllama``) or such an export loads back with its memory layers (``init_from``).

Errors are raised before training starts: a per-device batch that is not a multiple of k, a range larger than the
micro-batch allows (row b can only see the b rows before it), dropout in a memory layer, a checkpoint of another
method.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from lit_longctx.checkpoint import register_method
from lit_longctx.modules.causal_lm import CausalLM
from lit_longctx.nn.attention.fot import (
    LAYOUT_KEY,
    FoTAttention,
    FoTSession,
    cross_batch_layout,
    longllama_config,
    memory_layers,
)
from lit_longctx.nn.config import ConfigError, ModelConfig

#: FoTAttention options that ``FoT``'s arguments set when given (None: keep the checkpoint's, else the default)
_INHERITED = {"last_context_length": None, "mem_dtype": "bfloat16", "mem_positionals": True,
              "mem_attention_grouping": None, "top_k": None}


class FoT(CausalLM):
    """Focused Transformer: cross-batch training of memory layers, LongLLaMA memory-cache inference.

    Args:
        mem_layers: indices of the memory layers (LongLLaMA-3B: [6, 12, 18] of 26); default: the memory layers of the
            ``init_from`` checkpoint (a LongLLaMA directory or a FoT export).
        cross_batch_range: r in training: the additional contexts (earlier rows of the micro-batch, keys at position 0)
            a row may attend to; 0 trains plain attention.
        eval_cross_batch_range: r for validation and test batches (the JAX code evaluates with 0).
        cross_batch_stepping: ranges that grow with the position inside a pack (trains several ranges at once; with
            k = 4, r = 3 the steady-state packs see ¼(0,0), ¼(1,1), ¼(2,1), ¼(3,0) positives/negatives).
        cross_batch_ranges: explicit range per position inside a pack (e.g. [0, 3, 7, 7]), replacing r and stepping in
            training; needs k = len(cross_batch_ranges).
        dataset_packing: k, consecutive rows holding consecutive windows of one stream; default: the data module's
            (``dataset_packing`` of :class:`~lit_longctx.datamodules.doc_aware.DocAwareData`, else 1).
        cross_batch_mode: ``longllama`` (the released code: rows b-1..b-d, no wrap-around) or ``paper`` (App. B.3's
            C_prev/C_curr variant).
        scan_cross_batch: train through the chunked, memory-lean cross-batch path instead of the dense one.
        last_context_length: tokens of a long input kept in the local window at inference (LongLLaMA: 1024 of 2048);
            default: the checkpoint's, else min(1024, max_seq_len).
        mem_dtype: storage dtype of the inference memory (``bfloat16`` as LongLLaMA, ``float32``); default: the
            checkpoint's, else bfloat16.
        mem_positionals: RoPE in memory layers (memory keys at position 0); False as the paper's small models.
        mem_attention_grouping: (heads, queries) block of the inference memory attention; null: one block.
        top_k: inference only: attend to the top_k memory keys per head and query (the paper's exact kNN); null: all.
        **kwargs: CausalLM arguments (model, init_from, optimizer and schedule, ...).
    """

    method: ClassVar[str] = "fot"

    def __init__(
        self,
        mem_layers: list[int] | None = None,
        cross_batch_range: int = 1,
        eval_cross_batch_range: int = 0,
        cross_batch_stepping: bool = True,
        cross_batch_ranges: list[int] | None = None,
        dataset_packing: int | None = None,
        cross_batch_mode: Literal["longllama", "paper"] = "longllama",
        scan_cross_batch: bool = False,
        last_context_length: int | None = None,
        mem_dtype: str | None = None,
        mem_positionals: bool | None = None,
        mem_attention_grouping: list[int] | None = None,
        top_k: int | None = None,
        **kwargs: Any,
    ) -> None:
        for name, value in (("cross_batch_range", cross_batch_range),
                            ("eval_cross_batch_range", eval_cross_batch_range)):
            if value < 0:
                raise ConfigError(f"{name} must be >= 0 (0 = plain attention), got {value}")
        if dataset_packing is not None and dataset_packing < 1:
            raise ConfigError(f"dataset_packing must be >= 1, got {dataset_packing}")
        if cross_batch_ranges is not None and dataset_packing not in (None, len(cross_batch_ranges)):
            raise ConfigError(f"cross_batch_ranges={cross_batch_ranges} gives one range per position in a pack, so "
                              f"dataset_packing must be {len(cross_batch_ranges)}, got {dataset_packing}")
        super().__init__(**kwargs)
        with torch.device("meta"):  # the layer checks its options (dropout, dtypes, grouping) now, not mid-run
            FoTAttention(self.model_config, self.mem_layers[0], **self.model_config.attention_options["fot"])
        #: k of training and evaluation batches (set from the data module in ``setup``)
        self.train_packing = len(cross_batch_ranges) if cross_batch_ranges is not None else (dataset_packing or 1)
        self.eval_packing = 1

    # -------------------------------------------------------------------------------------------------- config
    def model_config_overrides(self, config: ModelConfig) -> dict[str, Any]:
        """Memory layers become ``fot``; the ``fot`` options carry this module's settings (and the training r, which
        the FLOP count reads)."""
        hp = self.hparams
        user = dict(hp.model_overrides or {})
        layer_attention = {**config.layer_attention, **{int(k): v for k, v in
                                                        (user.get("layer_attention") or {}).items()}}
        attention_options = {**config.attention_options, **(user.get("attention_options") or {})}
        layers = hp.mem_layers if hp.mem_layers is not None else memory_layers(config.replace(
            layer_attention=layer_attention))
        if not layers:
            raise ConfigError(
                "FoT needs memory layers: set mem_layers (e.g. [6, 12, 18] for LongLLaMA-3B) or start from a "
                "LongLLaMA / FoT checkpoint (init_from) that records them"
            )
        bad = [i for i in layers if not 0 <= int(i) < config.n_layers]
        if bad or len(set(layers)) != len(layers):
            raise ConfigError(f"mem_layers={list(layers)} must be distinct layer indices in 0..{config.n_layers - 1}")
        layer_attention = {i: kind for i, kind in layer_attention.items() if kind != "fot"}
        layer_attention.update({int(i): "fot" for i in layers})
        options = dict(attention_options.get("fot", {}))
        for name, default in _INHERITED.items():
            if hp[name] is not None:
                options[name] = hp[name]
            elif name not in options and default is not None:
                options[name] = default
        options.setdefault("last_context_length", min(1024, config.max_seq_len))
        options.update(cross_batch_range=hp.cross_batch_range, cross_batch_stepping=hp.cross_batch_stepping,
                       cross_batch_mode=hp.cross_batch_mode, scan_cross_batch=hp.scan_cross_batch)
        if hp.cross_batch_ranges is not None:
            options.update(cross_batch_ranges=list(hp.cross_batch_ranges), dataset_packing=len(hp.cross_batch_ranges))
        elif hp.dataset_packing is not None:
            options["dataset_packing"] = hp.dataset_packing
        return {"layer_attention": layer_attention, "attention_options": {**attention_options, "fot": options}}

    @property
    def mem_layers(self) -> list[int]:
        """The memory layers of the model config."""
        return memory_layers(self.model_config)

    # --------------------------------------------------------------------------------------------------- checks
    def _data_packing(self, dm: Any, attribute: str) -> int:
        k = getattr(dm, attribute, None) if dm is not None else None
        return 1 if k is None else int(k)

    def _check_layout(self, batch_size: int, stage: str) -> None:
        """Build the layout of a ``batch_size``-row micro-batch now, so bad settings fail before the first step."""
        hp = self.hparams
        train = stage == "train"
        k = self.train_packing if train else self.eval_packing
        r = hp.cross_batch_range if train else hp.eval_cross_batch_range
        ranges = hp.cross_batch_ranges if train else None
        where = "data.batch_size (the per-device micro-batch)"
        if batch_size % k:
            raise ConfigError(
                f"{where}={batch_size} is not divisible by dataset_packing={k}: a pack of k consecutive windows of one "
                f"stream must not straddle devices or micro-batches; use a multiple of {k}"
            )
        try:
            cross_batch_layout(batch_size, r, k, hp.cross_batch_stepping, ranges, hp.cross_batch_mode)
        except ValueError as err:
            raise ConfigError(f"{stage} batches ({where}={batch_size}): {err}") from err

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None)
        if stage == "fit":
            k = self._data_packing(dm, "dataset_packing")
            if self.hparams.cross_batch_ranges is None and self.hparams.dataset_packing is None:
                self.train_packing = k
            elif self.train_packing != k and dm is not None and hasattr(dm, "dataset_packing"):
                raise ConfigError(
                    f"dataset_packing={self.train_packing} (model) differs from the data's k={k} "
                    f"(data_pipeline={getattr(dm, 'data_pipeline', '?')!r}); leave model.dataset_packing unset to "
                    "take the data's, or change the pipeline"
                )
            if self.model is None:  # exported configs record the packing the model was trained with
                options = {**self.model_config.attention_options["fot"], "dataset_packing": self.train_packing}
                self.model_config = self.model_config.replace(
                    attention_options={**self.model_config.attention_options, "fot": options})
        self.eval_packing = self._data_packing(dm, "eval_dataset_packing")
        batch_size = getattr(dm, "batch_size", None) if dm is not None else None
        if batch_size is None:
            return
        if stage == "fit":
            self._check_layout(batch_size, "train")
            self._check_last_context_length()
        if stage in ("fit", "validate", "test") and self.hparams.eval_cross_batch_range > 0:
            self._check_layout(batch_size, "val")

    def _check_last_context_length(self) -> None:
        """Inference keeps the last ``last_context_length`` tokens in the local window of W = max_seq_len tokens
        (FoTSession): a larger value trained into a checkpoint would only fail at evaluation time, so refuse it now."""
        config = self.model_config
        lc = config.attention_options.get("fot", {}).get("last_context_length")
        if lc is not None and int(lc) > config.max_seq_len:
            raise ConfigError(
                f"model.init_args.last_context_length={lc} is larger than the local window W = max_seq_len = "
                f"{config.max_seq_len} it must fit in at inference; lower it to at most {config.max_seq_len}"
            )

    def check_context_stage(self, seq_len: int, micro_batch: int) -> None:
        """A stage's micro-batch must hold whole packs of k consecutive windows (the cross-batch layout)."""
        self._check_layout(micro_batch, "train")

    # ---------------------------------------------------------------------------------------------------- steps
    def on_batch_layout(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, Any]:
        """Cross-batch settings of the stage: training r (or explicit ranges) and k, or the evaluation range."""
        hp = self.hparams
        if stage == "train" and hp.cross_batch_ranges is not None:
            return {"cross_batch_ranges": list(hp.cross_batch_ranges)}
        if stage == "train":
            return {"cross_batch_range": hp.cross_batch_range, "dataset_packing": self.train_packing,
                    "cross_batch_stepping": hp.cross_batch_stepping}
        return {"cross_batch_range": hp.eval_cross_batch_range, "dataset_packing": self.eval_packing,
                "cross_batch_stepping": hp.cross_batch_stepping}

    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, Any]]:
        """Next-token loss, plus the mean number of positive and negative additional contexts of the batch's rows."""
        out = self.model(batch["input_ids"], batch.get("position_ids"), batch["labels"],
                         **self.on_batch_layout(batch, stage))
        layout = out.extras.get(LAYOUT_KEY)
        rows = batch["input_ids"].shape[0]
        positives = sum(layout.positives) / rows if layout is not None else 0.0
        negatives = sum(layout.negatives) / rows if layout is not None else 0.0
        return out.loss, {"fot/positives": positives, "fot/negatives": negatives}

    def inference_session(self, batch_size: int = 1, **kwargs: Any) -> FoTSession:
        """LongLLaMA's memory-cache session; ``kwargs`` (e.g. ``last_context_length``, ``context_window``) override
        the model's settings."""
        return FoTSession(self.model, batch_size, **kwargs)

    # ------------------------------------------------------------------------------------------------------ export
    @classmethod
    def hf_config_extras(cls, config: ModelConfig) -> dict[str, Any]:
        """LongLLaMA's and the JAX code's memory keys (``mem_layers``, ``last_context_length``, ``mem_dtype``, ...)."""
        return longllama_config(config)


register_method(FoT.method, "lit_longctx.modules.FoT")
