"""MFU and MTU during training: Lightning's ``Throughput`` (wall-clock basis) plus ALLaMo's model-time accounting.

Two views of the same run, logged side by side (ALLaMo README, "MFU and MTU"; spec pretraining §1):

- Lightning (``lightning.fabric.utilities.throughput.Throughput``, updated once per micro-batch, rates over the last
  ``window_size`` micro-batches of training wall-clock time, data loading included): ``train/device/mfu``,
  ``train/device/flops_per_sec``, ``train/device/items_per_sec`` (tokens/s), ``train/device/samples_per_sec``,
  ``train/device/batches_per_sec``, the cumulative ``train/time``, ``train/batches``, ``train/samples``,
  ``train/lengths`` (tokens), and with several devices the global (× world size) rates without ``device/``.
- ALLaMo, per logged iteration (one optimizer step = G micro-batches): model time t_model = Σ over the micro-batches of
  the time from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, optimizer step); iteration time
  t_iter = time between the ends of two optimizer-step-completing micro-batches. Logged: ``train/mfu_model_time`` =
  F_iter / (t_model · peak) with F_iter the device's FLOPs of the iteration, ``train/mtu`` = t_model / t_iter,
  ``train/model_time``, ``train/iter_time``, ``train/device/tokens_per_sec`` = tokens of the iteration / t_iter and,
  with several devices, ``train/tokens_per_sec`` (× world size). Lightning's ``device/mfu`` ≈ ``mfu_model_time`` ×
  ``mtu``: it divides by wall-clock, not model time. Like ALLaMo, the first iteration of a run (compilation,
  allocator and worker warm-up) is not reported.

Validation and checkpoint saving are no part of training time: both are subtracted from t_iter and from Lightning's
time basis (ALLaMo after its PR #26). Checkpoint time is measured by wrapping ``trainer.save_checkpoint`` for the
duration of ``fit``. So is the one-off FLOP count of each new batch shape with ``formula="palm"`` / ``"measured"``.

Timing on CUDA: kernels run asynchronously, so a clock read is only meaningful after ``torch.cuda.synchronize()``.
The callback synchronizes at every timing boundary of the iterations it logs (each micro-batch start and end, and the
end of the iteration before) and around the excluded windows below, and nowhere else, so unlogged iterations keep
their overlap of host and device work.

Batch contract: batches are dicts whose ``input_ids`` is a (B, T) tensor; samples = B, tokens = ``input_ids.numel()``
(padding included).

FLOPs per micro-batch and device come from ``pl_module.flops_per_batch`` (Lightning's contract; name the formula in
``pl_module.flops_formula``), or, with ``formula="palm"`` / ``"measured"``, from ``lit_longctx.flops.flops_per_batch``
on ``pl_module.model.config`` at each batch's actual (B, T), so a changing context length is counted as it is.

Peak FLOP/s: the ``peak_flops`` argument, else Lightning's ``get_available_flops`` table for the device and the
precision plugin's compute dtype (CPUs are not in the table: pass ``peak_flops`` there). Tables disagree (RTX 4090
bf16: Lightning 82.6e12, ALLaMo 165.2e12), so the value, its source and the formula name are logged as
hyperparameters ``throughput/peak_flops``, ``throughput/peak_flops_source``, ``throughput/flops_formula``.

Under tensor parallelism the ranks of one group share a batch: global samples and tokens per second are then
over-stated by the TP degree (as in Lightning's ``Throughput``); device rates and MFU are correct.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn

from lit_longctx.flops import FORMULAS, flops_per_batch, mfu, mtu
from lit_longctx.nn.llama import Transformer


class ThroughputCallback(Callback):
    """Log MFU, MTU and tokens/s of training (Lightning's wall-clock view and ALLaMo's model-time view).

    Args:
        peak_flops: peak FLOP/s of one device for the precision in use (e.g. 312e12 for an A100 in bf16). Default:
            Lightning's table for the device and precision; on CPUs there is none, so MFU is only logged with this.
        window_size: micro-batches in the rolling window of the Lightning-style rates (at least 2).
        log_every_n_steps: log every this many optimizer steps; default: the Trainer's ``log_every_n_steps``.
        formula: where the FLOPs of a micro-batch come from: ``module`` (``pl_module.flops_per_batch``), or
            ``palm`` / ``measured`` computed by ``lit_longctx.flops`` from ``pl_module.model`` (a ``Transformer``) at
            each batch's shape.
        include_embedding: with ``formula="palm"``, count the input embedding as ALLaMo does.
        tensor_parallel: tensor-parallel degree the model is split over (divides the computed per-device FLOPs);
            with ``formula="palm"`` / ``"measured"`` only.
    """

    #: time source, seconds; replaced in tests to drive the timers with a controlled clock
    clock: Callable[[], float] = staticmethod(time.perf_counter)

    def __init__(
        self,
        peak_flops: float | None = None,
        window_size: int = 100,
        log_every_n_steps: int | None = None,
        formula: Literal["module", "palm", "measured"] = "module",
        include_embedding: bool = False,
        tensor_parallel: int = 1,
    ) -> None:
        super().__init__()
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"peak_flops must be positive FLOP/s of one device (e.g. 312e12), got {peak_flops}")
        if window_size < 2:
            raise ValueError(f"window_size must be at least 2 micro-batches (rates need two points), got {window_size}")
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(
                f"log_every_n_steps must be >= 1, got {log_every_n_steps}; leave it unset to follow the Trainer's"
            )
        if formula not in ("module", *FORMULAS):
            raise ValueError(f"formula={formula!r} is unknown; use one of module, {', '.join(FORMULAS)}")
        if include_embedding and formula != "palm":
            raise ValueError("include_embedding=True only applies to formula='palm' (ALLaMo's 6·N + 12·L·H·Q·T)")
        if tensor_parallel < 1 or (tensor_parallel != 1 and formula == "module"):
            raise ValueError(
                f"tensor_parallel={tensor_parallel} must be >= 1 and is only used with formula='palm' or 'measured' "
                "(with formula='module' the LightningModule's flops_per_batch must already be per device)"
            )
        self.peak_flops = peak_flops
        self.window_size = window_size
        self.log_every_n_steps = log_every_n_steps
        self.formula = formula
        self.include_embedding = include_embedding
        self.tensor_parallel = tensor_parallel
        self.available_flops: float | None = None
        self._throughput: Throughput | None = None
        self._flops_cache: dict[tuple[int, int], float] = {}
        self._warned_no_flops = False
        self._save_owner: Trainer | None = None
        self._t0: float | None = None

    # ------------------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.global_rank != 0:
            return
        if self.peak_flops is not None:
            self.available_flops, self._peak_source = self.peak_flops, "peak_flops argument"
        else:
            device, dtype = trainer.strategy.root_device, _plugin_to_compute_dtype(trainer.precision_plugin)
            if device.type == "xla":  # Lightning's TPU table plus v5p / v6e (lit_longctx.modules.xla)
                from lit_longctx.modules.xla import tpu_peak_flops

                self.available_flops, self._peak_source = tpu_peak_flops(), "TPU table (lit_longctx.modules.xla)"
            else:
                self.available_flops = get_available_flops(device, dtype)
                self._peak_source = f"lightning get_available_flops({device.type}, {dtype})"
        self._throughput = Throughput(
            available_flops=self.available_flops, world_size=trainer.world_size, window_size=self.window_size
        )
        self._wrap_save_checkpoint(trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._save_owner is trainer and vars(trainer).get("save_checkpoint") is self._save_wrapper:
            del trainer.save_checkpoint  # the class's method shows through again
        self._save_owner = None

    def _wrap_save_checkpoint(self, trainer: Trainer) -> None:
        if "save_checkpoint" in vars(trainer):  # already wrapped (by us in an earlier fit, or by someone else)
            return
        original = trainer.save_checkpoint

        def save_checkpoint(*args: Any, **kwargs: Any) -> None:
            self._exclude_begin(trainer)
            try:
                original(*args, **kwargs)
            finally:
                self._exclude_end(trainer)

        trainer.save_checkpoint = save_checkpoint  # type: ignore[method-assign]
        self._save_owner, self._save_wrapper = trainer, save_checkpoint

    @rank_zero_only
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.formula != "module" and not isinstance(getattr(pl_module, "model", None), Transformer):
            raise TypeError(
                f"ThroughputCallback(formula={self.formula!r}) counts FLOPs from `pl_module.model`, which must be a "
                f"lit_longctx Transformer; {type(pl_module).__name__}.model is "
                f"{type(getattr(pl_module, 'model', None)).__name__}. Use formula='module' and define "
                "`flops_per_batch` on the LightningModule instead"
            )
        if self.available_flops is None:
            rank_zero_warn(
                f"ThroughputCallback: no peak FLOP/s known for {trainer.strategy.root_device} ({self._peak_source}); "
                "MFU is not logged. Pass ThroughputCallback(peak_flops=...) with the peak of one device "
                "(e.g. 312e12 for an A100 in bf16)"
            )
        hparams: dict[str, Any] = {
            "throughput/flops_formula": self._formula_name(pl_module),
            "throughput/peak_flops_source": self._peak_source,
        }
        if self.available_flops is not None:
            hparams["throughput/peak_flops"] = float(self.available_flops)
        for logger in trainer.loggers:
            logger.log_hyperparams(hparams)

        assert self._throughput is not None
        self._throughput.reset()
        self._flops_cache.clear()
        self._batches = self._samples = self._tokens = 0
        self._first_iteration = True
        self._exclude_depth = 0
        self._excluded_total = 0.0
        self._t0 = self.clock()
        self._start_iteration(self._t0)

    def _start_iteration(self, now: float) -> None:
        self._iter_start = now
        self._model_time = 0.0
        self._excluded = 0.0
        self._iter_flops: float | None = 0.0
        self._iter_tokens = 0

    # --------------------------------------------------------------------------------------------- training batch
    @rank_zero_only
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._shape = _batch_shape(batch)
        if self.formula != "module":  # before the model window opens: a first count of a new shape is excluded time
            self._formula_flops(trainer, pl_module, *self._shape)
        if self._is_log_iteration(trainer, self._iteration(trainer)):
            self._synchronize(trainer)
        self._batch_start = self.clock()

    @rank_zero_only
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        iteration = self._iteration(trainer)
        log_now = self._is_log_iteration(trainer, iteration)
        completes = not trainer.fit_loop._should_accumulate()
        if log_now or (completes and self._is_log_iteration(trainer, iteration + 1)):
            self._synchronize(trainer)
        now = self.clock()
        self._model_time += now - self._batch_start

        rows, seq_len = self._shape
        if self.formula == "module":
            flops = self._module_flops(pl_module)
        else:
            flops = self._formula_flops(trainer, pl_module, rows, seq_len)
        self._batches += 1
        self._samples += rows
        self._tokens += rows * seq_len
        self._iter_tokens += rows * seq_len
        self._iter_flops = None if flops is None or self._iter_flops is None else self._iter_flops + flops
        assert self._throughput is not None and self._t0 is not None
        self._throughput.update(
            time=now - self._t0 - self._excluded_total,
            batches=self._batches,
            samples=self._samples,
            lengths=self._tokens,
            flops=flops,
        )
        if not completes:
            return
        if log_now:
            self._log(trainer, now)
        self._first_iteration = False
        self._start_iteration(now)

    def _log(self, trainer: Trainer, now: float) -> None:
        assert self._throughput is not None
        metrics = {f"train/{k}": v for k, v in self._throughput.compute().items()}
        iter_time = now - self._iter_start - self._excluded
        if not self._first_iteration and iter_time > 0:
            metrics["train/model_time"] = self._model_time
            metrics["train/iter_time"] = iter_time
            metrics["train/mtu"] = mtu(self._model_time, iter_time)
            metrics["train/device/tokens_per_sec"] = self._iter_tokens / iter_time
            if trainer.world_size > 1:
                metrics["train/tokens_per_sec"] = self._iter_tokens * trainer.world_size / iter_time
            if self.available_flops and self._iter_flops is not None and self._model_time > 0:
                metrics["train/mfu_model_time"] = mfu(self._iter_flops, self._model_time, self.available_flops)
        # the route Lightning's ThroughputMonitor takes: logged at the step number of the module's own training logs
        trainer._logger_connector.log_metrics(metrics)

    # --------------------------------------------------------------------------------------- excluded time windows
    @rank_zero_only
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._exclude_begin(trainer)

    @rank_zero_only
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._exclude_end(trainer)

    def _exclude_begin(self, trainer: Trainer) -> None:
        # outside fit's training (sanity check, validate/test runs, after on_train_end) there is nothing to exclude from
        if self._t0 is None:
            return
        if self._exclude_depth == 0:
            self._synchronize(trainer)
            self._exclude_start = self.clock()
        self._exclude_depth += 1

    def _exclude_end(self, trainer: Trainer) -> None:
        if self._t0 is None or self._exclude_depth == 0:
            return
        self._exclude_depth -= 1
        if self._exclude_depth == 0:
            self._synchronize(trainer)
            spent = self.clock() - self._exclude_start
            self._excluded += spent
            self._excluded_total += spent

    @rank_zero_only
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0 = None

    # ---------------------------------------------------------------------------------------------------- helpers
    def _iteration(self, trainer: Trainer) -> int:
        """1-based index of the optimizer step in progress (the step number Lightning's loggers use, plus one)."""
        return trainer.fit_loop.epoch_loop._batches_that_stepped + 1

    def _is_log_iteration(self, trainer: Trainer, iteration: int) -> bool:
        every = self.log_every_n_steps if self.log_every_n_steps is not None else trainer.log_every_n_steps
        return every > 0 and iteration % every == 0

    @staticmethod
    def _synchronize(trainer: Trainer) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "xla":  # XLA executes asynchronously too: time the step, not its dispatch
            import torch_xla.core.xla_model as xm

            xm.wait_device_ops()

    def _formula_flops(self, trainer: Trainer, pl_module: LightningModule, rows: int, seq_len: int) -> float:
        key = (rows, seq_len)
        if key not in self._flops_cache:
            # counted once per shape (a meta-device run for "measured"): bookkeeping, not training time
            self._exclude_begin(trainer)
            self._flops_cache[key] = flops_per_batch(
                pl_module.model.config, rows, seq_len, self.formula, self.include_embedding, self.tensor_parallel
            )
            self._exclude_end(trainer)
        return self._flops_cache[key]

    def _module_flops(self, pl_module: LightningModule) -> float | None:
        # read after the step: modules may set it lazily from their first batch
        value = getattr(pl_module, "flops_per_batch", None)
        if value is None and not self._warned_no_flops:
            self._warned_no_flops = True
            rank_zero_warn(
                f"ThroughputCallback: {type(pl_module).__name__} has no `flops_per_batch` (or it is None), so no FLOPs "
                "or MFU are logged (throughput and MTU are). Set `flops_per_batch` to the FLOPs of one micro-batch on "
                "one device (see lit_longctx.flops.flops_per_batch), or use ThroughputCallback(formula='palm')"
            )
        return None if value is None else float(value)

    def _formula_name(self, pl_module: LightningModule) -> str:
        if self.formula == "module":
            return str(getattr(pl_module, "flops_formula", "module flops_per_batch"))
        return "palm+embedding (ALLaMo)" if self.include_embedding else self.formula


def _batch_shape(batch: Any) -> tuple[int, int]:
    """(rows B, tokens per row T) of a batch dict with a (B, T) ``input_ids`` tensor."""
    ids = batch.get("input_ids") if isinstance(batch, dict) else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        got = f"a dict with keys {sorted(batch)}" if isinstance(batch, dict) else type(batch).__name__
        raise TypeError(
            "ThroughputCallback counts samples and tokens from batch['input_ids'], a (B, T) tensor; got "
            f"{got}. Yield dict batches with 'input_ids' from the DataModule, or remove the callback"
        )
    return ids.shape[0], ids.shape[1]
