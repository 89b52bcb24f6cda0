"""Context extension as one training run: stages of sequence length, RoPE and batch shape keyed by optimizer step.

EasyContext (32K→64K→256K→512K with a new θ each time), LongLoRA (position interpolation) and Llemma (θ = 1e6
continued pretraining) chain separate runs by hand. Here a list of stages, each from an optimizer step on, changes
together at its first micro-batch:

- the rows the model sees (``seq_len``) and the micro-batch (``micro_batch``): the data module's training loader is
  a :class:`~lit_longctx.datamodules.staged.StagedLoader` whose segments re-cut the same token stream from where the
  previous stage stopped (no token skipped or read twice);
- gradient accumulation (``accumulate``), step-keyed (:mod:`lit_longctx.callbacks.accumulation`);
- RoPE (``rope``: ``type``, ``factor``, ``theta``, ``original_max_position_embeddings`` and any other
  :class:`~lit_longctx.nn.config.RopeConfig` field, applied on top of the previous stage's) and ``max_seq_len``
  (default: the larger of the previous one and ``seq_len``), through ``CausalLM.apply_context_stage``, so the
  checkpoint and the HF export carry the RoPE of the stage that produced them;
- the FLOPs per micro-batch that MFU/MTU read (``flops_per_batch`` at the stage's (B, T));
- optionally the learning rate: ``warmup_steps`` re-warms linearly from the stage's first step (a factor on the
  module's schedule).

Tokens per optimizer step, T·B·G·DP (pretraining spec §3.4), must be equal in every stage unless the stage says
``allow_token_change: true``. Every check runs in ``setup``, before the first step; each method says which lengths
and micro-batches it can train through ``CausalLM.check_context_stage`` (FoT: packs of k rows; landmark: whole
blocks). The current stage is a function of the global step and the data position is the loader's, both in the
checkpoint, so ``--ckpt_path last`` resumes inside a stage at its length, RoPE and batch.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lit_longctx.callbacks import accumulation
from lit_longctx.datamodules.staged import Segment
from lit_longctx.nn.config import ConfigError, RopeConfig

#: short names accepted in a stage's ``rope`` (EasyContext / HF spellings) -> RopeConfig fields
ROPE_ALIASES = {"type": "rope_type", "theta": "rope_theta"}
ROPE_FIELDS = {f.name for f in dataclasses.fields(RopeConfig)}


@dataclass
class Stage:
    """One stage of a context schedule (see the module docstring)."""

    step: int
    seq_len: int
    micro_batch: int
    accumulate: int = 1
    rope: dict[str, Any] = field(default_factory=dict)
    max_seq_len: int | None = None
    warmup_steps: int = 0
    allow_token_change: bool = False

    @classmethod
    def parse(cls, index: int, raw: dict[str, Any]) -> Stage:
        if not isinstance(raw, dict):
            raise ConfigError(f"stage {index} must be a mapping like {{step: 0, seq_len: 2048, micro_batch: 8}}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"stage {index}: unknown keys {unknown}; a stage has {sorted(known)}")
        missing = [k for k in ("step", "seq_len", "micro_batch") if k not in raw]
        if missing:
            raise ConfigError(f"stage {index} needs {missing}")
        stage = cls(**raw)
        for name in ("seq_len", "micro_batch", "accumulate"):
            value = getattr(stage, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"stage {index}: {name} must be an integer >= 1, got {value!r}")
        if stage.step < 0 or stage.warmup_steps < 0:
            raise ConfigError(f"stage {index}: step and warmup_steps must be >= 0")
        rope = {ROPE_ALIASES.get(k, k): v for k, v in (stage.rope or {}).items()}
        bad = sorted(set(rope) - ROPE_FIELDS)
        if bad:
            raise ConfigError(f"stage {index}: unknown rope keys {bad}; use type, factor, theta, "
                              "original_max_position_embeddings or another RopeConfig field")
        if rope.get("rope_type") == "default":
            rope["rope_type"] = "none"
        stage.rope = rope
        return stage


def parse_stages(stages: list[dict[str, Any]]) -> list[Stage]:
    """Stages from config dicts: the first at step 0, steps strictly increasing."""
    if not stages:
        raise ConfigError("a context schedule needs at least one stage")
    parsed = [Stage.parse(i, s) for i, s in enumerate(stages)]
    if parsed[0].step != 0:
        raise ConfigError(f"the first stage must start at step 0, got step {parsed[0].step}")
    for i in range(1, len(parsed)):
        if parsed[i].step <= parsed[i - 1].step:
            raise ConfigError(
                f"stage steps must increase: stage {i} starts at step {parsed[i].step}, not after stage {i - 1} "
                f"(step {parsed[i - 1].step}); order the stages by their first optimizer step"
            )
    return parsed


def stage_ropes(stages: list[Stage], base: RopeConfig) -> list[RopeConfig]:
    """Each stage's RoPE: the previous stage's with this stage's fields replaced (stage 0 starts from ``base``)."""
    out, current = [], base
    for i, stage in enumerate(stages):
        if stage.rope:
            try:
                current = RopeConfig(**{**current.__dict__, **stage.rope})
                current.validate()
            except (TypeError, ConfigError) as err:
                raise ConfigError(f"stage {i} (step {stage.step}) rope: {err}") from err
        out.append(current)
    return out


def stage_max_seq_lens(stages: list[Stage], base: int) -> list[int]:
    out, current = [], base
    for stage in stages:
        current = stage.max_seq_len if stage.max_seq_len is not None else max(current, stage.seq_len)
        out.append(current)
    return out


def data_parallel_size(trainer: Trainer) -> int:
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None)
    return int(kwargs["num_replicas"]) if kwargs else int(trainer.world_size)


class ContextSchedule(Callback):
    """Step-keyed stages of sequence length, micro-batch, gradient accumulation, RoPE and ``max_seq_len``.

    Args:
        stages: list of mappings, each with ``step`` (first optimizer step), ``seq_len``, ``micro_batch`` and
            optionally ``accumulate`` (default 1), ``rope`` (e.g. ``{type: yarn, factor: 4,
            original_max_position_embeddings: 2048}`` or ``{theta: 5.0e6}``), ``max_seq_len``, ``warmup_steps``
            (learning-rate re-warm-up from the stage's start) and ``allow_token_change``.
        stage_eval: run a passkey grid at the stage's length (``LongEvalCallback`` arguments, ``lengths`` default
            ``[seq_len]``) when a stage starts, ends, or both; None: no per-stage evaluation.
        stage_eval_at: ``start``, ``end`` or ``both``.
        validate_at_stage_length: validation rows follow the stage's length and micro-batch (the loss the stage
            trains); False keeps them at the first stage's, comparable across stages.
    """

    def __init__(
        self,
        stages: list[dict[str, Any]],
        stage_eval: dict[str, Any] | None = None,
        stage_eval_at: Literal["start", "end", "both"] = "end",
        validate_at_stage_length: bool = True,
    ) -> None:
        self.stages = parse_stages(stages)
        self.plan = accumulation.AccumulationPlan({s.step: s.accumulate for s in self.stages})
        self.stage_eval = dict(stage_eval) if stage_eval is not None else None
        self.stage_eval_at = stage_eval_at
        self.validate_at_stage_length = validate_at_stage_length
        self.current: int | None = None
        self.base_rope: RopeConfig | None = None
        self.base_max_seq_len: int | None = None
        self.ropes: list[RopeConfig] = []
        self.max_seq_lens: list[int] = []
        #: seconds each stage switch took (model hooks, RoPE, data module), for the overhead measurement
        self.switch_seconds: list[float] = []
        self._evaluators: dict[int, Any] = {}

    # ------------------------------------------------------------------------------------------------- checks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.max_steps or trainer.max_steps < 0:
            raise ConfigError("a context schedule is keyed by optimizer steps: set --trainer.max_steps")
        for i, s in enumerate(self.stages):
            if s.step >= trainer.max_steps:
                rank_zero_warn(f"context schedule: stage {i} starts at step {s.step}, at or after "
                               f"max_steps={trainer.max_steps}, so it never runs")
        accumulation.check_strategy(trainer, self.plan)
        dp = data_parallel_size(trainer)
        first = self.stages[0]
        tokens0 = first.seq_len * first.micro_batch * first.accumulate * dp
        for i, s in enumerate(self.stages[1:], start=1):
            tokens = s.seq_len * s.micro_batch * s.accumulate * dp
            if tokens != tokens0 and not s.allow_token_change:
                raise ConfigError(
                    f"stage {i} (step {s.step}) trains {tokens} tokens per optimizer step (seq_len {s.seq_len} x "
                    f"micro_batch {s.micro_batch} x accumulate {s.accumulate} x {dp} data-parallel ranks) but stage 0 "
                    f"trains {tokens0}; change micro_batch/accumulate to keep it, or set allow_token_change: true"
                )
        if self.base_rope is None:
            self.base_rope = pl_module.model_config.rope
            self.base_max_seq_len = pl_module.model_config.max_seq_len
        self.ropes = stage_ropes(self.stages, self.base_rope)
        self.max_seq_lens = stage_max_seq_lens(self.stages, self.base_max_seq_len)
        check = getattr(pl_module, "check_context_stage", None)
        for i, s in enumerate(self.stages):
            if check is not None:
                try:
                    check(s.seq_len, s.micro_batch)
                except ConfigError as err:
                    raise ConfigError(f"stage {i} (step {s.step}): {err}") from err
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "set_stages"):
            raise ConfigError("a context schedule changes the data's sequence length: use a lit-longctx data module "
                              "(TokenFiles, TextData, ...)")
        segments = [Segment(self.plan.micro_batches_before(s.step), s.seq_len, s.micro_batch) for s in self.stages]
        dm.set_stages(segments, self.plan.micro_batches_before(trainer.max_steps))
        dm.check_stages()  # a data module that cannot re-cut fails now, before training
        dm.seq_len, dm.batch_size = first.seq_len, first.micro_batch

    # ------------------------------------------------------------------------------------------------ training
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        accumulation.install(trainer, self.plan)
        if any(s.warmup_steps for s in self.stages):
            for config in trainer.lr_scheduler_configs:
                lambdas = getattr(config.scheduler, "lr_lambdas", None)
                if lambdas is None:
                    raise ConfigError("stage warmup_steps needs a LambdaLR schedule (CausalLM's)")
                scheduler = config.scheduler
                scheduler.lr_lambdas = [self._rewarm(f) for f in lambdas]
                # the current step's rate was set with the unwrapped factor when the scheduler was built
                for group, base, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                    group["lr"] = base * f(scheduler.last_epoch)

    def _rewarm(self, base: Any) -> Any:
        def factor(step: int) -> float:
            s = self.stages[self.plan.stage_of_step(step)]
            warm = min(1.0, (step - s.step + 1) / s.warmup_steps) if s.warmup_steps else 1.0
            return base(step) * warm

        return factor

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        accumulation.uninstall(trainer)
        if self.stage_eval is not None and self.stage_eval_at in ("end", "both") and self.current is not None:
            self._evaluate(trainer, pl_module, self.current)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        accumulation.before_micro_batch(trainer, pl_module, self.plan)
        index = self.plan.stage_of_step(trainer.global_step)
        if index != self.current:
            previous, self.current = self.current, index
            if previous is not None and self.stage_eval is not None and self.stage_eval_at in ("end", "both"):
                self._evaluate(trainer, pl_module, previous)
            start = time.perf_counter()
            self.apply(trainer, pl_module, index)
            self.switch_seconds.append(time.perf_counter() - start)
            if self.stage_eval is not None and self.stage_eval_at in ("start", "both"):
                self._evaluate(trainer, pl_module, index)

    def apply(self, trainer: Trainer, pl_module: LightningModule, index: int) -> None:
        """Put the module, the data module and the logs into stage ``index``."""
        s = self.stages[index]
        pl_module.apply_context_stage(s.seq_len, s.micro_batch, self.ropes[index], self.max_seq_lens[index])
        dm = trainer.datamodule
        if self.validate_at_stage_length:
            dm.seq_len, dm.batch_size = s.seq_len, s.micro_batch
            # Lightning keeps the validation loader of the fit's start: drop it, so the next validation asks the data
            # module again (at the new length)
            trainer.fit_loop.epoch_loop.val_loop._combined_loader = None
        rope = self.ropes[index]
        metrics = {"context/stage": float(index), "context/seq_len": float(s.seq_len),
                   "context/micro_batch": float(s.micro_batch), "context/accumulate": float(s.accumulate),
                   "context/rope_theta": float(rope.rope_theta), "context/rope_factor": float(rope.factor or 1.0),
                   "context/max_seq_len": float(self.max_seq_lens[index])}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(f"context schedule: stage {index} from step {trainer.global_step}: seq_len {s.seq_len}, "
                       f"micro_batch {s.micro_batch}, accumulate {s.accumulate}, rope {rope.kind} "
                       f"theta={rope.rope_theta:g} factor={rope.factor}, max_seq_len {self.max_seq_lens[index]}")

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule, index: int) -> None:
        from lit_longctx.callbacks.long_eval import LongEvalCallback

        if index not in self._evaluators:
            args = {"lengths": [self.stages[index].seq_len], **self.stage_eval}
            self._evaluators[index] = LongEvalCallback(**args)
        self._evaluators[index].evaluate(trainer, pl_module)

    def progress(self) -> dict[str, Any]:
        """What the progress bar shows: the stage and its length."""
        if self.current is None:
            return {}
        return {"stage": f"{self.current + 1}/{len(self.stages)}", "seq_len": self.stages[self.current].seq_len}

    # ----------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.current,
            "base_rope": dataclasses.asdict(self.base_rope) if self.base_rope is not None else None,
            "base_max_seq_len": self.base_max_seq_len,
            "stages": [dataclasses.asdict(s) for s in self.stages],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("base_rope") is not None:
            self.base_rope = RopeConfig(**state_dict["base_rope"])
            self.base_max_seq_len = state_dict["base_max_seq_len"]
            self.ropes = stage_ropes(self.stages, self.base_rope)
            self.max_seq_lens = stage_max_seq_lens(self.stages, self.base_max_seq_len)
