"""``CausalLM``: the LightningModule every method extends.

It owns loss, optimisation and logging; the network is a plain :class:`lit_longctx.nn.Transformer` built in
``configure_model`` (so FSDP/DeepSpeed can build it sharded or on the meta device). Methods override the smallest
hook that works (docs/CONTRACTS.md):

- ``model_config_overrides()``: change the ModelConfig before the model is built (e.g. FoT's memory layers);
- ``build_model()``: build the Transformer (default: from the config);
- ``on_batch_layout(batch, stage)``: per-batch keyword arguments for the model forward (e.g. cross-batch ranges);
- ``compute_loss(batch, stage)``: the training/eval objective;
- ``inference_session(...)``: the decoding driver used by evaluation and ``predict``;
- ``hf_config_extras(config)``: method settings written into an exported HF ``config.json``.

Optimisation follows Llemma / ALLaMo: AdamW (fused where supported), no weight decay on norms and biases, linear
warm-up then cosine to ``min_lr_ratio``·lr (GPT-NeoX ``AnnealingLR`` with ``decay_lr_to``, pretraining spec §4).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from torchmetrics import MeanMetric

from lit_longctx.checkpoint import (
    METHODS,
    check_method,
    read_checkpoint,
    register_method,
    tokenizer_from_files,
    tokenizer_to_files,
)
from lit_longctx.hf import CheckpointError, load_weights
from lit_longctx.modules.parallel import apply_parallelism, is_deepspeed, is_fsdp1, is_fsdp2
from lit_longctx.nn.config import ConfigError, ModelConfig, resolve_model_config
from lit_longctx.nn.generate import DecodingSession, generate, session_for
from lit_longctx.nn.llama import Transformer
from lit_longctx.tokenizers import Tokenizer, load_tokenizer


def lr_factor(
    step: int,
    warmup_steps: int,
    decay_steps: int,
    min_lr_ratio: float = 0.1,
    schedule: str = "cosine",
    cosine_cycles: float = 0.5,
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step``.

    Warm-up: step/W (starting at 0). Then, with progress p = (step − W)/(D − W) clipped to [0, 1]:
    ``cosine``: r + (1 − r)·½(1 + cos(2π·c·p)) (c = 0.5 is the half cosine; c = 0.4 with r = 0 is the HF
    ``num_cycles=0.4`` schedule of the landmark recipe); ``linear``: r + (1 − r)(1 − p); ``constant``: 1.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    if schedule == "linear":
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(2 * math.pi * cosine_cycles * progress))


def check_optimizer_args(
    *, learning_rate: float, weight_decay: float, betas: tuple[float, float], eps: float, warmup_steps: float,
    min_lr_ratio: float, cosine_cycles: float, decay_steps: int | None, lr_schedule: str,
) -> None:
    """Refuse optimizer and schedule settings AdamW or the schedule cannot use, before anything is built (torch would
    raise only at the first step, and a NaN learning rate would train silently)."""
    key = "model.init_args."

    def finite(name: str, value: float) -> None:
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}{name}={value!r} must be a finite number")

    for name, value in (("learning_rate", learning_rate), ("weight_decay", weight_decay), ("eps", eps),
                        ("warmup_steps", warmup_steps), ("min_lr_ratio", min_lr_ratio),
                        ("cosine_cycles", cosine_cycles)):
        finite(name, value)
    if learning_rate < 0:
        raise ConfigError(f"{key}learning_rate={learning_rate} is negative; give the peak learning rate, e.g. 3e-4")
    if weight_decay < 0:
        raise ConfigError(f"{key}weight_decay={weight_decay} is negative; use 0 for none or e.g. 0.1")
    if eps < 0:
        raise ConfigError(f"{key}eps={eps} is negative; AdamW's epsilon is small and positive, e.g. 1e-8")
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"{key}betas={list(betas)} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if warmup_steps < 0:
        raise ConfigError(f"{key}warmup_steps={warmup_steps} is negative; use 0 for no warm-up")
    if not 0 <= min_lr_ratio <= 1:
        raise ConfigError(f"{key}min_lr_ratio={min_lr_ratio} must be in [0, 1] (the final fraction of the peak "
                          "learning rate)")
    if cosine_cycles <= 0 and lr_schedule == "cosine":
        raise ConfigError(f"{key}cosine_cycles={cosine_cycles} must be positive (0.5 is the half cosine)")
    if decay_steps is not None and decay_steps < 1:
        raise ConfigError(f"{key}decay_steps={decay_steps} must be a positive number of steps, or null for "
                          "trainer.max_steps")


class CausalLM(L.LightningModule):
    """Next-token training of a LLaMA-family model.

    Args:
        model: a preset name (``debug``, ``llama2-7b``, ``openllama-3b``, ... see ``lit_longctx.nn.PRESETS``) or a
            full ModelConfig (its fields: vocab_size, dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim,
            norm_eps, tie_embeddings, max_seq_len, rope, attention, layer_attention, attention_options,
            attn_backend). Ignored for the architecture when ``init_from`` is given (the checkpoint's config wins).
        model_overrides: ModelConfig fields replacing those of ``model`` or of the ``init_from`` checkpoint (e.g.
            ``{max_seq_len: 8192, rope: {rope_type: linear, factor: 2.0}}`` or ``{rope_theta: 10000}``).
        init_from: weights to start from: an HF LLaMA directory (or hub id), a lit-longctx checkpoint, a ``.ckpt``
            of an earlier run, or a run directory. Ignored when resuming with ``--ckpt_path``.
        vocab_size: vocabulary the data needs (linked from the data module); the model gets exactly this many rows
            when built from a preset, and a checkpoint with fewer rows is an error.
        seq_len: training sequence length (linked from the data module); used for FLOP counts.
        tokenizer: tokenizer for generation and evaluation (path, ``byte``); default: the checkpoint's, else the
            data module's.
        learning_rate: peak learning rate.
        weight_decay: AdamW decoupled weight decay, applied to matrices only (not norms or biases).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: linear warm-up length in optimizer steps (a value < 1 is a fraction of the decay steps).
        lr_schedule: ``cosine``, ``linear`` or ``constant`` after warm-up.
        min_lr_ratio: final learning rate as a fraction of the peak (Llemma: 0.033).
        cosine_cycles: cosine period parameter c (0.5 = half cosine ending at the floor).
        decay_steps: steps over which the schedule decays; default ``trainer.max_steps`` (or the estimated steps).
        activation_checkpointing: recompute each Block in backward to save memory.
        compile: ``torch.compile`` each Block.
        flops_formula: how ``flops_per_batch`` is counted: ``palm`` (6·N' + attention FLOPs of each layer's kind,
            analytic) or ``measured`` (torch's FLOP counter on a meta-device copy); see ``lit_longctx.flops``.
        generation: settings for ``predict``: prompt_tokens (the prompt is the first this many tokens of each row),
            max_new_tokens, temperature, top_k, top_p.
        lora: train LoRA adapters instead of the full model (``lit_longctx.modules.lora.LoraSettings``: r, alpha,
            dropout, targets, trainable extras such as [embeddings, norms] for LongLoRA); merged on every checkpoint
            read and export.
    """

    #: checkpoint tag; subclasses set their own so a checkpoint of one method is not silently loaded by another
    method: ClassVar[str] = "causal"

    def __init__(
        self,
        model: str | ModelConfig = "debug",
        model_overrides: dict[str, Any] | None = None,
        init_from: str | None = None,
        vocab_size: int | None = None,
        seq_len: int | None = None,
        tokenizer: str | None = None,
        learning_rate: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        warmup_steps: float = 0,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        min_lr_ratio: float = 0.1,
        cosine_cycles: float = 0.5,
        decay_steps: int | None = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
        flops_formula: Literal["palm", "measured"] = "palm",
        generation: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_optimizer_args(learning_rate=learning_rate, weight_decay=weight_decay, betas=betas, eps=eps,
                             warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, cosine_cycles=cosine_cycles,
                             decay_steps=decay_steps, lr_schedule=lr_schedule)
        self.save_hyperparameters()
        from lit_longctx.modules.lora import LoraSettings

        self.lora = LoraSettings.parse(lora) if lora else None
        if isinstance(model, ModelConfig):  # keep checkpoints free of custom classes (weights_only loading)
            self.hparams["model"] = model.to_dict()
        self.model: Transformer | None = None
        self._tokenizer: Tokenizer | None = load_tokenizer(tokenizer) if tokenizer else None
        self._init_checkpoint = None
        if init_from:
            self._init_checkpoint = read_checkpoint(init_from, with_weights=False)
            check_method(self._init_checkpoint, self.method)
            if self._tokenizer is None:
                self._tokenizer = self._init_checkpoint.tokenizer()
        self.model_config = self._resolve_config()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.tokens_seen = 0
        self.flops_per_batch: float | None = None
        #: the checkpoint a run will restore (set by the CLI before the run; Lightning sets trainer.ckpt_path later)
        self.ckpt_path_hint: str | None = None

    # -------------------------------------------------------------------------------------------------- config
    def _resolve_config(self, restored: ModelConfig | None = None) -> ModelConfig:
        """The model config: the ``init_from`` checkpoint's (or ``model``), with this module's overrides on top.

        ``restored`` is the config of a checkpoint being resumed or evaluated: it fixes the architecture (and the
        vocabulary), while the options given in the config or on the command line (``model_overrides``, a method's
        inference settings such as FoT's ``last_context_length``) still win over the values saved in it.
        """
        hp = self.hparams
        if restored is not None:
            config = restored
        elif self._init_checkpoint is not None:
            config = self._init_checkpoint.model_config
        else:
            model = hp.model
            config = resolve_model_config(ModelConfig.from_dict(model) if isinstance(model, dict) else model)
        overrides = dict(hp.model_overrides or {})
        if "rope_theta" in overrides:
            overrides["rope"] = {**(overrides.get("rope") or {}), "rope_theta": overrides.pop("rope_theta")}
        if isinstance(overrides.get("rope"), dict):
            overrides["rope"] = type(config.rope)(**{**config.rope.__dict__, **overrides["rope"]})
        overrides.update(self.model_config_overrides(config))
        if restored is not None:  # the restored weights fix the vocabulary
            overrides.pop("vocab_size", None)
        if hp.vocab_size is not None and restored is None:
            if self._init_checkpoint is not None and hp.vocab_size > config.vocab_size and not self.allows_vocab_growth:
                raise ConfigError(
                    f"the data's tokenizer has {hp.vocab_size} tokens but the checkpoint {hp.init_from!r} has only "
                    f"{config.vocab_size} embedding rows; use the checkpoint's own tokenizer"
                )
            if self._init_checkpoint is None:
                overrides.setdefault("vocab_size", hp.vocab_size)
        try:
            return config.replace(**overrides) if overrides else config
        except TypeError as e:
            raise ConfigError(f"model_overrides: {e}; valid keys are the ModelConfig fields") from e

    #: a method that adds tokens (landmark) sets this so a larger data vocabulary is allowed
    allows_vocab_growth: ClassVar[bool] = False

    def model_config_overrides(self, config: ModelConfig) -> dict[str, Any]:
        """Hook: ModelConfig fields a method sets (e.g. attention kinds); default none."""
        return {}

    # ---------------------------------------------------------------------------------------------------- model
    @property
    def tokenizer(self) -> Tokenizer | None:
        if self._tokenizer is None and self._trainer is not None:
            dm = getattr(self.trainer, "datamodule", None)
            tok = getattr(dm, "_tokenizer", None) or (getattr(dm, "tokenizer", None) if dm is not None else None)
            if isinstance(tok, Tokenizer):
                self._tokenizer = tok
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Tokenizer | None) -> None:
        self._tokenizer = value

    def build_model(self) -> Transformer:
        """Hook: the network. Called inside ``configure_model``, possibly under a meta-device context."""
        model = Transformer(self.model_config)
        if self.lora is not None:
            from lit_longctx.modules.lora import apply_lora

            apply_lora(model, self.lora)
        return model

    def configure_model(self) -> None:
        if self.model is not None:
            return
        restoring = self._restore_path()
        if restoring is not None:
            self._adopt_checkpoint_config(restoring)
        strategy = self._trainer.strategy if self._trainer is not None else None
        # FSDP1 and DeepSpeed ZeRO-3 shard the model after (or while) it is built here: load init_from weights then
        wraps_later = strategy is not None and (
            is_fsdp1(strategy) or (is_deepspeed(strategy) and getattr(strategy, "zero_stage_3", False))
        )
        load_now = self._init_checkpoint is not None and not wraps_later and not self._resuming()
        if self._init_checkpoint is not None and not self._resuming():
            self._init_from_weights()
        if is_fsdp2(strategy) or load_now:
            with torch.device("meta"):
                model = self.build_model()
        else:
            model = self.build_model()
        if load_now and not is_fsdp2(strategy):
            load_weights(model, self._init_checkpoint.state_dict, source=self._init_checkpoint.source)
            self._init_checkpoint = None
        model = apply_parallelism(
            model, strategy, activation_checkpointing=self.hparams.activation_checkpointing,
            compile=self.hparams.compile,
        )
        if is_fsdp2(strategy):
            model.to_empty(device=strategy.root_device)
            model.init_weights()
            if load_now:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                state = {k: v for k, v in self._init_checkpoint.state_dict.items() if "rotary_emb" not in k}
                set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
                self._init_checkpoint = None
        self.model = model

    def _init_from_weights(self) -> dict[str, torch.Tensor]:
        """The ``init_from`` state dict, read on first use (the constructor reads the config and tokenizer only)."""
        if not self._init_checkpoint.state_dict:
            self._init_checkpoint = read_checkpoint(self.hparams.init_from)
        if self.lora is not None:  # fresh adapters (B = 0) beside the plain weights
            from lit_longctx.modules.lora import complete_state

            self._init_checkpoint.state_dict = complete_state(self._init_checkpoint.state_dict, self.lora)
        return self._init_checkpoint.state_dict

    def _restore_path(self) -> str | None:
        if self.ckpt_path_hint is not None:
            return str(self.ckpt_path_hint)
        if self._trainer is not None and self.trainer.ckpt_path is not None:
            return str(self.trainer.ckpt_path)
        return None

    def _resuming(self) -> bool:
        return self._restore_path() is not None

    def _adopt_checkpoint_config(self, path: str) -> None:
        """The checkpoint being restored defines the architecture (e.g. an eval config composed after a training
        config does not know the trained vocabulary); a checkpoint of another method is refused here."""
        from lit_longctx.checkpoint import checkpoint_config

        found = checkpoint_config(path)
        if found is None:
            return
        config, method = found
        if method != self.method:
            raise CheckpointError(
                f"{path} is a checkpoint of method {method!r} but this module is {self.method!r}; use "
                f"--model.class_path {METHODS.get(method, method)}"
            )
        self.model_config = self._resolve_config(config)

    def _load_init_weights_after_wrap(self) -> None:
        """FSDP1 / DeepSpeed ZeRO-3 shard the model after ``configure_model``: load ``init_from`` weights now."""
        if self._init_checkpoint is None or self._resuming():
            self._init_checkpoint = None
            return
        state = self._init_checkpoint.state_dict
        if is_deepspeed(self.trainer.strategy):
            import deepspeed

            params = dict(self.model.named_parameters())
            for name, param in params.items():
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if self.trainer.is_global_zero:
                        param.data.copy_(state[name])
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))
        self._init_checkpoint = None

    def on_fit_start(self) -> None:
        self._load_init_weights_after_wrap()

    def on_validation_start(self) -> None:
        self._load_init_weights_after_wrap()

    def on_test_start(self) -> None:
        self._load_init_weights_after_wrap()

    def on_predict_start(self) -> None:
        self._load_init_weights_after_wrap()

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        max_id = getattr(dm, "max_token_id", None) if dm is not None else None
        if max_id is not None and max_id >= self.model_config.vocab_size:
            raise ConfigError(
                f"the data contains token id {max_id} but the model has vocab_size={self.model_config.vocab_size}; "
                "the data was tokenized with another tokenizer (re-tokenize it, or use a model with a larger "
                "vocabulary)"
            )

    # ---------------------------------------------------------------------------------------------------- steps
    def on_batch_layout(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, Any]:
        """Hook: keyword arguments for the model forward of this batch (attention-kind options); default none."""
        return {}

    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, Any]]:
        """Hook: (mean next-token loss, extra logs). Default: cross-entropy on ``labels`` (aligned targets)."""
        out = self.model(
            batch["input_ids"], batch.get("position_ids"), batch["labels"], **self.on_batch_layout(batch, stage)
        )
        return out.loss, {}

    def _n_targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"] != -100).sum()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.flops_per_batch is None:
            b, t = batch["input_ids"].shape
            self.flops_per_batch = self.model_flops_per_batch(b, t)
        if batch["input_ids"].device.type == "xla":
            from lit_longctx.modules.xla import check_static_shape

            check_static_shape(self, batch)
        loss, logs = self.compute_loss(batch, "train")
        self.tokens_seen += batch["input_ids"].numel() * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach().clamp(max=20)))
        self.log("train/tokens", float(self.tokens_seen))
        opt = self.optimizers(use_pl_optimizer=False)
        self.log("train/lr", opt.param_groups[0]["lr"], prog_bar=True)
        for k, v in logs.items():
            self.log(f"train/{k}", v)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str, metric: MeanMetric) -> torch.Tensor:
        loss, logs = self.compute_loss(batch, stage)
        metric.update(loss.detach(), weight=self._n_targets(batch))
        for k, v in logs.items():
            self.log(f"{stage}/{k}", v, sync_dist=True)
        return loss

    def _log_eval(self, stage: str, metric: MeanMetric) -> None:
        if metric.update_called:
            loss = metric.compute()
            self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=False)
            self.log(f"{stage}/ppl", torch.exp(loss.clamp(max=20)), prog_bar=True, sync_dist=False)
        metric.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val", self.val_loss)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", self.val_loss)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        if "task" in batch:
            from lit_longctx.eval import tasks

            return tasks.test_step(self, batch)
        return self._eval_step(batch, "test", self.test_loss)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", self.test_loss)
        from lit_longctx.eval import tasks

        tasks.on_test_epoch_end(self)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Continue the first ``generation.prompt_tokens`` tokens of each row with the ``generation`` settings.

        Results are returned and appended to ``predictions-rank<r>.jsonl`` in the run directory.
        """
        gen = {"max_new_tokens": 32, "temperature": 0.0, "prompt_tokens": 32, **(self.hparams.generation or {})}
        prompt_tokens = gen.pop("prompt_tokens")
        results = []
        for row in batch["input_ids"][:, :prompt_tokens]:
            new = generate(self.model, row.unsqueeze(0), session=self.inference_session(1), **gen)[0]
            item: dict[str, Any] = {"prompt_ids": row.tolist(), "completion_ids": new}
            if self.tokenizer is not None:
                item["prompt"] = self.tokenizer.decode(row.tolist())
                item["completion"] = self.tokenizer.decode(new)
            results.append(item)
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / f"predictions-rank{self.global_rank}.jsonl", "a") as f:
            for item in results:
                f.write(json.dumps(item) + "\n")
        return results

    def inference_session(self, batch_size: int = 1, **kwargs: Any) -> DecodingSession:
        """Hook: the decoding driver for generation and evaluation (the model's attention kinds pick it)."""
        return session_for(self.model, batch_size=batch_size, **kwargs)

    # ----------------------------------------------------------------------------------------- context schedules
    def check_context_stage(self, seq_len: int, micro_batch: int) -> None:
        """Hook: raise ``ConfigError`` when this method cannot train rows of ``seq_len`` in micro-batches of
        ``micro_batch`` (``lit_longctx.callbacks.context_schedule`` asks for every stage before training)."""

    def apply_context_stage(self, seq_len: int, micro_batch: int, rope: Any, max_seq_len: int) -> None:
        """Hook: train at a new length: the model's RoPE (a ``RopeConfig``) and ``max_seq_len`` change (also in the
        config saved in checkpoints and HF exports) and FLOPs are counted at (micro_batch, seq_len). RoPE tables are
        computed from the config on every forward, so swapping the table builder is the whole change."""
        from lit_longctx.nn.rope import RotaryEmbedding

        old = self.model_config
        config = old.replace(rope=rope, max_seq_len=max_seq_len)
        self.model_config = config
        if self.model is not None:
            for module in self.model.modules():
                if getattr(module, "config", None) is old or getattr(module, "config", None) is self.model.config:
                    module.config = config
            self.model.rope = RotaryEmbedding(config.rope, config.head_dim, config.max_seq_len)
        self.flops_per_batch = self.model_flops_per_batch(micro_batch, seq_len)

    # ------------------------------------------------------------------------------------------------- optimizer
    @property
    def flops_formula(self) -> str:
        return self.hparams.flops_formula

    def model_flops_per_batch(self, batch_size: int, seq_len: int) -> float:
        """Training FLOPs of one (batch_size, seq_len) micro-batch on this device (``lit_longctx.flops``).

        Counted from the config (a meta-device copy where needed), so it is right when parameters are sharded.
        """
        from lit_longctx.flops import flops_per_batch, measured_flops_per_batch

        if self.flops_formula == "measured":
            return measured_flops_per_batch(self.model_config, batch_size, seq_len)
        return flops_per_batch(self.model_config, batch_size, seq_len, formula="palm")

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: decay on matrices, none on norms/biases (and 1-D params); frozen parameters skipped."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        if not decay and not no_decay:
            raise ConfigError("no trainable parameters: every parameter of the model is frozen")
        return [{"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def _decay_steps(self) -> int:
        if self.hparams.decay_steps:
            return self.hparams.decay_steps
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return self.trainer.max_steps
        return max(1, int(self.trainer.estimated_stepping_batches))

    def lr_lambda(self) -> Callable[[int], float]:
        hp = self.hparams
        decay = self._decay_steps()
        warmup = int(hp.warmup_steps * decay) if 0 < hp.warmup_steps < 1 else int(hp.warmup_steps)
        return lambda step: lr_factor(step, warmup, decay, hp.min_lr_ratio, hp.lr_schedule, hp.cosine_cycles)

    def _adamw(self) -> torch.optim.AdamW:
        """AdamW over :meth:`parameter_groups`, fused where every parameter's device supports it (not DeepSpeed)."""
        hp = self.hparams
        groups = self.parameter_groups()
        kwargs = dict(lr=hp.learning_rate, betas=tuple(hp.betas), eps=hp.eps)
        fused = all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"]) and not is_deepspeed(
            self.trainer.strategy
        )
        try:
            return torch.optim.AdamW(groups, fused=fused, **kwargs)
        except (RuntimeError, TypeError):
            return torch.optim.AdamW(groups, **kwargs)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self._adamw()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lit_longctx"] = {
            "method": self.method,
            "model_config": self.model_config.to_dict(),
            "tokenizer_files": tokenizer_to_files(self.tokenizer),
            "tokens_seen": self.tokens_seen,
        }
        if self.lora is not None:  # readers merge W0 + scaling * B A (lit_longctx.checkpoint)
            checkpoint["lit_longctx"]["extra"] = {"lora": {"scaling": self.lora.scaling, "r": self.lora.r,
                                                           "targets": list(self.lora.targets)}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("lit_longctx")
        if meta is None:
            raise CheckpointError("this checkpoint was not written by lit-longctx (no 'lit_longctx' entry)")
        method = meta.get("method", "causal")
        if method != self.method:
            raise CheckpointError(
                f"the checkpoint is of method {method!r} but this module is {self.method!r}; use --model.class_path "
                f"{METHODS.get(method, method)}"
            )
        config = self._resolve_config(ModelConfig.from_dict(meta["model_config"]))
        if self.model is not None and config != self.model_config:
            if any(type(p).__name__ == "DTensor" for p in self.model.parameters()):
                raise CheckpointError(
                    "the checkpoint's model config differs from this run's and the model is already sharded; run "
                    "through `lit-longctx` (which reads the checkpoint's config first) or pass the same model config"
                )
            device, dtype = self.model.lm_head.weight.device, self.model.lm_head.weight.dtype
            self.model_config, self.model = config, None
            self.configure_model()
            self.model.to(device=device, dtype=dtype)
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        if self._tokenizer is None and meta.get("tokenizer_files"):
            self._tokenizer = tokenizer_from_files(meta["tokenizer_files"])

    # ------------------------------------------------------------------------------------------------------ export
    @classmethod
    def hf_config_extras(cls, config: ModelConfig) -> dict[str, Any]:
        """Hook: top-level config.json keys a method adds on HF export (e.g. FoT's ``mem_layers``); default none.

        Tensors beyond plain LLaMA and the attention layout are exported generically (``lit_longctx.export``).
        """
        return {}


register_method(CausalLM.method, "lit_longctx.modules.CausalLM")
