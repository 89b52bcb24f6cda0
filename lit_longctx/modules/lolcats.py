"""LoLCATs: linearize a softmax LLaMA in two cheap stages (Zhang et al., "LoLCATs: On Low-Rank Linearizing of Large
Language Models", arXiv 2410.10254). The attention kind itself is :mod:`lit_longctx.nn.attention.hybrid_linear`.

Stage 1, :class:`AttentionTransfer` (paper §3.1, Eq. 6; App. C Listing 4): every converted layer becomes the hybrid
sliding-window + linear attention, everything but the feature maps φ_q, φ_k and the window factors θ is frozen, and
the model runs in distill mode: each layer computes the frozen teacher's softmax output y_m and returns it to the
residual stream (teacher forcing), while its student output ŷ_m from the same q, k, v is scored against it. Over the n
converted layers the objective is

    L = mse_factor · (1/n) Σ_m MSE(ŷ_m, y_m) + xent_factor · (1/n) Σ_m CE(A_m, log Â_m)

(no next-token loss; labels are ignored). Validation reports the same objective, so ``ModelCheckpoint(monitor=
"val/loss")`` keeps the best transfer, which is the paper's "early stopping".

Stage 2, :class:`LinearizedLoRA` (paper §3.2, App. A.2): start from the stage-1 tensors, add LoRA adapters (through
``peft``) to the attention projections, freeze everything else (optionally keep φ and θ trainable, the reference's
``fqkvo``), and train with the next-token loss on the response tokens (labels -100 elsewhere). LoRA's B starts at 0, so
training starts from exactly the stage-1 model. Checkpoints record the LoRA scaling; :func:`merge_lora_state` folds
the adapters into the projection weights, which ``lit_longctx.checkpoint.read_checkpoint`` does for every reader, so
``lit-longctx convert to-hf`` writes plain LLaMA weights (+ φ and θ in ``lit_longctx_extras.safetensors``) and
``generate`` decodes the merged model.

Both stages use AdamW without weight decay and, by default, ReduceLROnPlateau on the validation objective (factor
0.1, patience 10 evaluations, min_lr 1e-5), stepped after each validation (spec §3 "Optimiser and schedule").
Packed rows get no per-document attention reset (as in the reference): batches run with positions 0..T-1.

Freezing happens in ``build_model`` (``requires_grad`` survives meta-device building, loading and FSDP2 sharding), so
it holds on every strategy; FSDP2 (``FSDP2Strategy``) shards frozen and trainable tensors of a block per parameter,
while FSDP1 (``FSDPStrategy``) needs ``use_orig_params: true`` to mix them in one wrapped block.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from lit_longctx.checkpoint import register_method
from lit_longctx.hf import CheckpointError
from lit_longctx.modules.causal_lm import CausalLM
from lit_longctx.nn.attention import build_attention
from lit_longctx.nn.attention.hybrid_linear import DISTILL, DISTILL_XENT, HybridLinearAttention, distill_losses
from lit_longctx.nn.config import ConfigError, ModelConfig
from lit_longctx.nn.llama import Transformer
from lit_longctx.nn.lora import merge_lora_state

HYBRID = "hybrid_linear"
#: what ``trainable_extra`` may name -> the parameter-name pieces that select it
EXTRA_TENSORS: dict[str, tuple[str, ...]] = {
    "feature_maps": (".feature_map_q.", ".feature_map_k."),
    "window_factors": (".window_factors",),
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hybrid_layers(config: ModelConfig) -> list[int]:
    """Indices of the layers whose attention kind is ``hybrid_linear``."""
    return [i for i in range(config.n_layers) if config.attention_kind(i) == HYBRID]


def is_transfer_tensor(name: str) -> bool:
    """Whether ``name`` is a stage-1 tensor (a feature map or a window factor)."""
    return any(piece in name for pieces in EXTRA_TENSORS.values() for piece in pieces)


def _lora_init(key: str, shape: torch.Size) -> torch.Tensor:
    """PEFT's default LoRA init (A: Kaiming-uniform with a = √5, B: zeros), seeded by the tensor name so every rank
    draws the same A."""
    tensor = torch.empty(shape)
    if ".lora_B." in key:
        return tensor.zero_()
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


def _fresh_transfer_tensors(skeleton: nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
    """Initial φ and θ (per the layers' ``feature_map_init`` / ``init_window_factor``) for the stage-1 tensors in
    ``keys``, materialised on the CPU from a (meta-device) model."""
    modules = dict(skeleton.named_modules())
    out: dict[str, torch.Tensor] = {}
    owners = sorted({k.rsplit(".feature_map_", 1)[0] if ".feature_map_" in k else k.rsplit(".", 1)[0] for k in keys})
    for owner in owners:
        attn = modules[owner]
        if not isinstance(attn, HybridLinearAttention):
            raise ConfigError(f"{owner} is not a hybrid_linear attention, so it has no feature maps to initialise")
        attn.feature_map_q.to_empty(device="cpu")
        attn.feature_map_k.to_empty(device="cpu")
        if attn.window_factors is not None:
            attn.window_factors = nn.Parameter(torch.empty(attn.window_factors.shape))
        attn.reset_parameters()
        for name, tensor in attn.named_parameters():
            if is_transfer_tensor(f".{name}"):
                out[f"{owner}.{name}"] = tensor.detach()
    return {k: v for k, v in out.items() if k in keys}


class _LinearizedLM(CausalLM):
    """Shared machinery of the LoLCATs stages: fresh tensors for what the start checkpoint lacks, freezing, and
    ReduceLROnPlateau stepped on the validation loss.

    Args:
        lr_scheduler: ``plateau`` (ReduceLROnPlateau on ``val/loss`` after each validation, the reference) or
            ``schedule`` (CausalLM's warm-up + ``lr_schedule`` per optimizer step).
        plateau_factor: learning-rate multiplier when the validation loss stops improving.
        plateau_patience: validations without improvement before the rate is cut.
        min_lr: ReduceLROnPlateau's floor.
        **kwargs: CausalLM arguments.
    """

    def __init__(
        self,
        lr_scheduler: Literal["plateau", "schedule"] = "plateau",
        plateau_factor: float = 0.1,
        plateau_patience: int = 10,
        min_lr: float = 1e-5,
        **kwargs: Any,
    ) -> None:
        if lr_scheduler not in ("plateau", "schedule"):
            raise ConfigError(f"lr_scheduler={lr_scheduler!r} is unknown; use plateau (ReduceLROnPlateau on val/loss) "
                              "or schedule (warm-up + cosine/linear/constant)")
        if not 0 < plateau_factor < 1:
            raise ConfigError(f"plateau_factor must lie in (0, 1), got {plateau_factor}")
        if plateau_patience < 0 or min_lr < 0:
            raise ConfigError(f"plateau_patience and min_lr must be >= 0, got {plateau_patience} and {min_lr}")
        super().__init__(**kwargs)
        self._plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
        self._pending_plateau: dict[str, Any] | None = None

    # -------------------------------------------------------------------------------------------------- weights
    def is_trainable(self, name: str) -> bool:
        """Hook: whether parameter ``name`` trains in this stage."""
        raise NotImplementedError

    def allows_fresh_transfer_tensors(self) -> bool:
        """Hook: whether φ/θ missing from ``init_from`` may be freshly initialised."""
        return True

    def freeze(self, model: nn.Module) -> nn.Module:
        """Set ``requires_grad`` by :meth:`is_trainable` (flags survive meta-device building, ``to_empty``, loading
        with ``assign`` and FSDP2 sharding, so this runs on the freshly built model in every strategy)."""
        for name, p in model.named_parameters():
            p.requires_grad_(self.is_trainable(name))
        return model

    def complete_state(self, state: dict[str, torch.Tensor], skeleton: nn.Module) -> dict[str, torch.Tensor]:
        """``state`` plus what this stage adds to the start checkpoint: fresh φ/θ for newly converted layers, PEFT's
        ``base_layer`` names for wrapped projections, and initial LoRA tensors (B = 0)."""
        expected = skeleton.state_dict()
        out = dict(state)
        for key in expected:
            plain = key.replace(".base_layer.", ".")
            if key not in out and plain != key and plain in out:
                out[key] = out.pop(plain)
        missing = [k for k in expected if k not in out]
        transfer = [k for k in missing if is_transfer_tensor(k)]
        if transfer and not self.allows_fresh_transfer_tensors():
            layers = sorted({int(k.split(".")[2]) for k in transfer})
            raise CheckpointError(
                f"{self.hparams.init_from} has no trained feature maps / window factors for layers {layers}: start "
                "stage 2 from a stage-1 (AttentionTransfer) checkpoint, or set no_transfer: true for the baseline "
                "without attention transfer"
            )
        if transfer:
            out.update(_fresh_transfer_tensors(skeleton, transfer))
        for key in missing:
            if ".lora_A." in key or ".lora_B." in key:
                out[key] = _lora_init(key, expected[key].shape)
        return out

    def configure_model(self) -> None:
        if self.model is None and self._init_checkpoint is not None and not self._resuming():
            state = self._init_from_weights()
            with torch.device("meta"):
                skeleton = self.build_model()
            self._init_checkpoint.state_dict = self.complete_state(state, skeleton)
        super().configure_model()

    # ----------------------------------------------------------------------------------------------------- steps
    def forward_kwargs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Positions 0..T-1 per row: LoLCATs attention has no per-document reset (``position_ids`` are ignored)."""
        return {"position_ids": None}

    # ------------------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        if self.hparams.lr_scheduler == "schedule":
            return super().configure_optimizers()
        hp = self.hparams
        optimizer = self._adamw()
        self._plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=hp.plateau_factor, patience=hp.plateau_patience, min_lr=hp.min_lr
        )
        if self._pending_plateau is not None:
            self._plateau.load_state_dict(self._pending_plateau)
            self._pending_plateau = None
        return {"optimizer": optimizer}

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute() if self.val_loss.update_called else None
        super().on_validation_epoch_end()
        trainer = self._trainer
        if self._plateau is not None and loss is not None and trainer is not None and not trainer.sanity_checking:
            self._plateau.step(float(loss))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._plateau is not None:
            checkpoint["lolcats_plateau"] = self._plateau.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("lolcats_plateau")
        if state is not None and self._plateau is not None:
            self._plateau.load_state_dict(state)
        else:
            self._pending_plateau = state


class AttentionTransfer(_LinearizedLM):
    """LoLCATs stage 1: train feature maps and window factors so each layer's hybrid attention mimics its softmax
    attention (teacher-forced, layer-wise; see the module docstring).

    Args:
        feature_dim: F, features per half of φ (64 in every published config; ≤ head_dim for identity init).
        window_size: w, the softmax window / terrace block (64).
        window: ``tk`` terrace (the headline results), ``sw`` sliding, or ``none`` (pure linear, Hedgehog).
        block_alignment: ``end`` (default: the reference's terrace blocks, aligned to the end of each sequence) or
            ``start`` (prefix-consistent, the ThunderKittens kernel); they differ when L % w != 0 and L > 2w.
        feature_map_init: ``identity`` (the published ``--lk_zero_init``), ``kaiming_uniform`` or ``normal``.
        init_window_factor: initial θ (γ = σ(θ)); default logit(0.1).
        affine_attention_factors: weight the linear part by 1 − γ instead of 1.
        decode_window: ``sliding`` (the reference's decode) or ``terrace`` (tk, start alignment only).
        prefill: ``forward`` (the prompt with the layer's forward, then the decode window: the reference's
            generation) or ``decode_window`` (every cached position with the decode window).
        attention_path: ``scan`` (linear-time) or ``quadratic`` (reference); xent_factor > 0 uses quadratic anyway.
        softmax_layers: layers kept as softmax attention (e.g. [7, 15, 23, 31]); the rest are converted.
        mse_factor: weight of the mean per-layer output MSE.
        xent_factor: weight of the mean per-layer attention-weight cross-entropy (405B recipe: 1).
        learning_rate: AdamW learning rate (1e-2).
        weight_decay: AdamW weight decay (0).
        lr_scheduler: ``plateau`` (ReduceLROnPlateau on val/loss after each validation) or ``schedule`` (CausalLM's
            warm-up + ``lr_schedule`` per step).
        plateau_factor: ReduceLROnPlateau factor.
        plateau_patience: ReduceLROnPlateau patience, in validations.
        min_lr: ReduceLROnPlateau floor.
        **kwargs: CausalLM arguments (``init_from``: the softmax model, ``model``, ``tokenizer``, ...).
    """

    method: ClassVar[str] = "lolcats_transfer"

    def __init__(
        self,
        feature_dim: int = 64,
        window_size: int = 64,
        window: Literal["tk", "sw", "none"] = "tk",
        block_alignment: Literal["start", "end"] = "end",
        feature_map_init: Literal["identity", "kaiming_uniform", "normal"] = "identity",
        init_window_factor: float = math.log(0.1 / 0.9),
        affine_attention_factors: bool = False,
        decode_window: Literal["sliding", "terrace"] = "sliding",
        prefill: Literal["forward", "decode_window"] = "forward",
        attention_path: Literal["scan", "quadratic"] = "scan",
        softmax_layers: list[int] | None = None,
        mse_factor: float = 1000.0,
        xent_factor: float = 0.0,
        learning_rate: float = 1e-2,
        weight_decay: float = 0.0,
        lr_scheduler: Literal["plateau", "schedule"] = "plateau",
        plateau_factor: float = 0.1,
        plateau_patience: int = 10,
        min_lr: float = 1e-5,
        **kwargs: Any,
    ) -> None:
        if mse_factor < 0 or xent_factor < 0 or mse_factor + xent_factor == 0:
            raise ConfigError(f"mse_factor and xent_factor must be >= 0 and not both 0, got {mse_factor} and "
                              f"{xent_factor} (the reference uses 1000 and 0; 405B uses 1000 and 1)")
        super().__init__(lr_scheduler=lr_scheduler, plateau_factor=plateau_factor, plateau_patience=plateau_patience,
                         min_lr=min_lr, learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)
        converted = hybrid_layers(self.model_config)
        with torch.device("meta"):  # validates the hybrid options with the attention kind's own messages
            build_attention(self.model_config, converted[0])

    def hybrid_options(self) -> dict[str, Any]:
        """``attention_options['hybrid_linear']`` from this module's arguments."""
        hp = self.hparams
        return {"feature_dim": hp.feature_dim, "window_size": hp.window_size, "window": hp.window,
                "block_alignment": hp.block_alignment, "feature_map_init": hp.feature_map_init,
                "init_window_factor": float(hp.init_window_factor),
                "affine_attention_factors": hp.affine_attention_factors, "decode_window": hp.decode_window,
                "prefill": hp.prefill, "path": hp.attention_path}

    def model_config_overrides(self, config: ModelConfig) -> dict[str, Any]:
        kept = sorted(set(self.hparams.softmax_layers or []))
        bad = [i for i in kept if not 0 <= i < config.n_layers]
        if bad:
            raise ConfigError(f"softmax_layers names layers {bad} but the model has {config.n_layers} layers "
                              f"(indices 0..{config.n_layers - 1})")
        if len(kept) == config.n_layers:
            raise ConfigError(f"softmax_layers keeps all {config.n_layers} layers as softmax: nothing to linearize")
        return {"attention": HYBRID, "layer_attention": {i: "causal" for i in kept},
                "attention_options": {**config.attention_options, HYBRID: self.hybrid_options()}}

    def build_model(self) -> Transformer:
        return self.freeze(Transformer(self.model_config))

    def is_trainable(self, name: str) -> bool:
        return is_transfer_tensor(name)

    @property
    def converted_layers(self) -> int:
        """n in the objective's mean: the converted layers of this model."""
        return len(hybrid_layers(self.model_config))

    def on_batch_layout(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, Any]:
        layout: dict[str, Any] = {DISTILL: True}
        if self.hparams.xent_factor > 0:
            layout[DISTILL_XENT] = True
        return layout

    def distill_objective(self, losses: dict[int, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, Any]]:
        """(mse_factor · Σ_m MSE_m / n + xent_factor · Σ_m CE_m / n, logs) over the layers in ``losses``."""
        hp = self.hparams
        if not losses:
            raise ConfigError("the model has no hybrid_linear layers, so there is nothing to distill")
        n = self.converted_layers
        mse = torch.stack([t["mse"] for t in losses.values()]).sum() / n
        loss = hp.mse_factor * mse
        logs: dict[str, Any] = {"mse": mse.detach()}
        if hp.xent_factor > 0:
            xent = torch.stack([t["xent"] for t in losses.values()]).sum() / n
            loss = loss + hp.xent_factor * xent
            logs["xent"] = xent.detach()
        for i in sorted(losses):
            logs[f"mse/layer_{i}"] = losses[i]["mse"].detach()
        return loss, logs

    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, Any]]:
        out = self.model(batch["input_ids"], return_logits=False, **self.forward_kwargs(batch),
                         **self.on_batch_layout(batch, stage))
        return self.distill_objective(distill_losses(out.extras))

    def _n_targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # the objective averages over tokens, not over next-token targets
        return torch.tensor(batch["input_ids"].numel())

    def _log_eval(self, stage: str, metric: Any) -> None:
        # the distillation objective has no perplexity
        if metric.update_called:
            self.log(f"{stage}/loss", metric.compute(), prog_bar=True, sync_dist=False)
        metric.reset()


class LinearizedLoRA(_LinearizedLM):
    """LoLCATs stage 2: LoRA on the attention projections of the linearized model, next-token loss on response tokens.

    ``init_from`` is the stage-1 result: an AttentionTransfer ``.ckpt`` (e.g. ``checkpoints/best.ckpt``), its run
    directory (newest ``last.ckpt``), a ``convert to-hf`` export of it, or any checkpoint whose own config has
    hybrid_linear layers. A plain softmax checkpoint is refused unless ``no_transfer`` is set (the paper's baseline
    without attention transfer): then ``model_overrides`` gives the hybrid layout, e.g.
    ``{attention: hybrid_linear, attention_options: {hybrid_linear: {feature_dim: 64, window_size: 64}}}``, and the
    feature maps start from their initialisation.

    Args:
        lora_r: LoRA rank r.
        lora_alpha: LoRA alpha (scaling alpha / r).
        lora_dropout: dropout on the LoRA input.
        lora_targets: projections that get adapters (q_proj, k_proj, v_proj, o_proj; also the MLP's gate_proj,
            up_proj, down_proj), in every layer.
        trainable_extra: stage-1 tensors that keep training: ``feature_maps`` and/or ``window_factors`` (the
            reference's ``fqkvo``); default none (``qkvo``).
        no_transfer: allow a start checkpoint without trained feature maps (baseline without attention transfer).
        learning_rate: AdamW learning rate (1e-4).
        weight_decay: AdamW weight decay (0).
        lr_scheduler: ``plateau`` or ``schedule`` (as in AttentionTransfer).
        plateau_factor: ReduceLROnPlateau factor.
        plateau_patience: ReduceLROnPlateau patience, in validations.
        min_lr: ReduceLROnPlateau floor.
        **kwargs: CausalLM arguments (``init_from``: the stage-1 checkpoint, ``model_overrides``, ...).
    """

    method: ClassVar[str] = "lolcats_lora"
    adapter: ClassVar[str] = "default"

    def __init__(
        self,
        lora_r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_targets: list[str] | None = None,
        trainable_extra: list[Literal["feature_maps", "window_factors"]] | None = None,
        no_transfer: bool = False,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        lr_scheduler: Literal["plateau", "schedule"] = "plateau",
        plateau_factor: float = 0.1,
        plateau_patience: int = 10,
        min_lr: float = 1e-5,
        **kwargs: Any,
    ) -> None:
        if not isinstance(lora_r, int) or lora_r < 1:
            raise ConfigError(f"lora_r must be a positive integer (8 in the 8B recipe), got {lora_r!r}")
        if lora_alpha <= 0 or not 0 <= lora_dropout < 1:
            raise ConfigError(f"lora_alpha must be > 0 and lora_dropout in [0, 1), got {lora_alpha} and {lora_dropout}")
        targets = list(lora_targets) if lora_targets is not None else ["q_proj", "k_proj", "v_proj", "o_proj"]
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets:
            raise ConfigError(f"lora_targets {unknown or targets} are not projections of the model; choose from "
                              f"{', '.join(LORA_TARGETS)}")
        bad_extra = [e for e in trainable_extra or [] if e not in EXTRA_TENSORS]
        if bad_extra:
            raise ConfigError(f"trainable_extra {bad_extra} is unknown; use feature_maps and/or window_factors")
        if kwargs.get("init_from") is None:
            raise ConfigError("LinearizedLoRA needs init_from: the stage-1 checkpoint (an AttentionTransfer .ckpt, its "
                              "run directory or its HF export)")
        super().__init__(lr_scheduler=lr_scheduler, plateau_factor=plateau_factor, plateau_patience=plateau_patience,
                         min_lr=min_lr, learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)
        self.lora_targets = targets
        start = self._init_checkpoint
        if not hybrid_layers(start.model_config) and not no_transfer:
            raise CheckpointError(
                f"{self.hparams.init_from} is a {start.method!r} checkpoint without hybrid_linear layers: run stage 1 "
                "first (lit_longctx.modules.AttentionTransfer) and start from its checkpoint, or set no_transfer: true "
                "with model_overrides giving the hybrid layout for the baseline without attention transfer"
            )
        if not hybrid_layers(self.model_config):
            raise ConfigError(
                "no_transfer needs model_overrides that convert layers, e.g. {attention: hybrid_linear, "
                "attention_options: {hybrid_linear: {feature_dim: 64, window_size: 64}}}"
            )

    def allows_fresh_transfer_tensors(self) -> bool:
        return self.hparams.no_transfer

    @property
    def lora_scaling(self) -> float:
        return self.hparams.lora_alpha / self.hparams.lora_r

    def is_trainable(self, name: str) -> bool:
        if ".lora_A." in name or ".lora_B." in name:
            return True
        return any(piece in name for extra in self.hparams.trainable_extra or [] for piece in EXTRA_TENSORS[extra])

    def build_model(self) -> Transformer:
        """The linearized Transformer with PEFT LoRA layers injected in place (names ``X.base_layer.weight``,
        ``X.lora_A.default.weight``, ``X.lora_B.default.weight``)."""
        from peft import LoraConfig, inject_adapter_in_model  # ~5 s to import: only when a model is built

        hp = self.hparams
        config = LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                            target_modules=self.lora_targets, bias="none")
        model = inject_adapter_in_model(config, Transformer(self.model_config), adapter_name=self.adapter)
        return self.freeze(model)

    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, Any]]:
        out = self.model(batch["input_ids"], labels=batch["labels"], **self.forward_kwargs(batch),
                         **self.on_batch_layout(batch, stage))
        return out.loss, {}

    def merged_model(self) -> Transformer:
        """A plain copy of the linearized model with the LoRA adapters merged (for export or evaluation), from an
        unsharded model (single process or DDP; sharded runs export through their checkpoint instead)."""
        from lit_longctx.hf import load_weights

        state = merge_lora_state({k: v.detach() for k, v in self.model.state_dict().items()}, self.lora_scaling)
        with torch.device("meta"):
            model = Transformer(self.model_config)
        load_weights(model, state, source="the LoRA model")
        return model

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lit_longctx"]["extra"] = {"lora": {"scaling": self.lora_scaling, "r": self.hparams.lora_r,
                                                       "targets": self.lora_targets}}


register_method(AttentionTransfer.method, "lit_longctx.modules.AttentionTransfer")
# stage 2 starts from stage-1 checkpoints
register_method(LinearizedLoRA.method, "lit_longctx.modules.LinearizedLoRA", follows=(AttentionTransfer.method,))
