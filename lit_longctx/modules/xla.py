"""TPU / XLA training: Lightning's XLA strategies plus a sharded strategy on torch_xla SPMD (FSDPv2).

- ``--trainer.strategy=xla`` (``configs/strategy/xla.yaml``): Lightning's ``XLAStrategy``, one process per device,
  every device holds a full replica and gradients are all-reduced. Lightning spawns the processes, wraps the loaders
  in ``MpDeviceLoader`` and saves checkpoints on CPU; nothing is added here.
- ``configs/strategy/xla_fsdp.yaml``: :class:`XLAFSDPv2Strategy`, for models whose weights and Adam state do not fit
  one core. One process per host drives every local device through SPMD (GSPMD, Xu et al. 2021): each parameter is
  sharded along its largest dimension over the mesh's ``fsdp`` axis and each batch along its batch dimension, which
  is torch_xla's FSDPv2 recipe (``torch_xla.experimental.spmd_fully_sharded_data_parallel``). The recipe is applied
  to the parameters in place rather than through the ``SpmdFullyShardedDataParallel`` wrapper, so parameter names
  (and therefore checkpoints) stay those of the plain model and a checkpoint written on a TPU loads on a CPU.
  The compiler inserts the all-gathers and reduce-scatters.

Lightning has no Trainer strategy for either (its ``XLAFSDPStrategy`` is Fabric-only and wraps torch_xla's older
FSDPv1), hence this file. :func:`tpu_peak_flops` adds the TPU generations Lightning's FLOP table lacks.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from lightning.fabric.utilities.throughput import _TPU_FLOPS
from lightning.pytorch.strategies import SingleDeviceXLAStrategy

from lit_longctx.nn.config import ConfigError

INSTALL_HINT = (
    "torch_xla is not installed: on a TPU VM run `pip install torch==2.9.0 'torch_xla[tpu]==2.9.0'` (torch_xla needs "
    "the torch release of the same version); scripts/xla_env.sh builds such an environment for XLA:CPU"
)

# Peak bf16 matmul FLOP/s per chip for generations missing from Lightning's table (Google Cloud TPU docs:
# v5p 459 TFLOP/s, Trillium/v6e 918 TFLOP/s); Lightning's own entries (v2, v3, v4, v5litepod = v5e) come first.
_EXTRA_TPU_FLOPS = {"v5e": 197e12, "v5lite": 197e12, "v5p": 459e12, "v6e": 918e12, "v6lite": 918e12}


def require_torch_xla() -> None:
    """Raise a one-line :class:`ConfigError` with the install command when torch_xla cannot be imported."""
    try:
        import torch_xla  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"{INSTALL_HINT} ({e})") from None


def _names_xla(value: Any) -> bool:
    name = value.get("class_path", "") if hasattr(value, "get") and not isinstance(value, str) else value
    name = name if isinstance(name, str) else type(name).__name__
    return any(key in name.lower() for key in ("xla", "tpu"))


def check_xla_requested(trainer_config: Any) -> None:
    """Called by the CLI before the Trainer is built: a TPU/XLA accelerator or strategy without torch_xla installed
    is one ``error:`` line with the install command (Lightning's own message is a traceback)."""
    if trainer_config is None:
        return
    if any(_names_xla(trainer_config.get(key)) for key in ("strategy", "accelerator") if trainer_config.get(key)):
        require_torch_xla()


#: distinct batch shapes after which an XLA run warns that it recompiles (a context schedule has a few stages)
MAX_STATIC_SHAPES = 3


def check_static_shape(module: Any, batch: dict[str, Any]) -> None:
    """Warn (once) when an XLA run has seen more than ``MAX_STATIC_SHAPES`` distinct batch shapes: each new shape
    compiles a new graph, so shapes that change every step (dynamic padding) recompile every step."""
    shapes = module.__dict__.setdefault("_xla_batch_shapes", set())
    shapes.add(tuple(batch["input_ids"].shape))
    if len(shapes) == MAX_STATIC_SHAPES + 1:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"XLA: {len(shapes)} distinct batch shapes so far ({sorted(shapes)}); every new shape compiles a new "
            "graph, so a run whose shapes change per step recompiles every step. Pad every batch to a fixed "
            "data.seq_len (and keep data.batch_size fixed; set drop_last for the final partial batch)"
        )


def tpu_peak_flops(accelerator_type: str | None = None) -> float | None:
    """Peak FLOP/s of one TPU chip from its type (``v4``, ``v5litepod-8``, ``v5p-128``, ``v6e-8``, ...).

    Default: the type of the TPU this process runs on (``TYPE`` / ``ACCELERATOR_TYPE`` of the TPU VM environment).
    None when unknown (e.g. XLA on CPU). Lightning's ``_TPU_FLOPS`` first, then v5p and v6e.
    """
    if accelerator_type is None:
        accelerator_type = os.environ.get("TYPE") or os.environ.get("ACCELERATOR_TYPE")
        if accelerator_type is None:
            try:
                import torch_xla.runtime as xr
                from torch_xla._internal import tpu

                if xr.device_type() != "TPU":  # e.g. PJRT_DEVICE=CPU: no TPU metadata to ask for
                    return None
                env = tpu.get_tpu_env()
                accelerator_type = env.get("TYPE") or env.get("ACCELERATOR_TYPE")
            except Exception:  # not on a TPU VM (no metadata server): no peak to report
                return None
    if not accelerator_type:
        return None
    chip = accelerator_type.lower().split("-")[0].replace("_", "")
    for table in (_TPU_FLOPS, _EXTRA_TPU_FLOPS):
        if chip in table:
            return float(table[chip])
    return None


def is_xla_device(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "xla"


def fsdp_partition_spec(shape: torch.Size) -> tuple[str | None, ...]:
    """FSDPv2's choice: shard the largest dimension over ``fsdp``, replicate the others (scalars stay replicated)."""
    spec: list[str | None] = [None] * len(shape)
    if spec:
        spec[list(shape).index(max(shape))] = "fsdp"
    return tuple(spec)


def batch_partition_spec(ndim: int) -> tuple[str | None, ...]:
    """Batch tensors are split along dim 0 (the batch) over ``fsdp``: data parallelism over the same devices."""
    return ("fsdp",) + (None,) * (ndim - 1) if ndim else ()


class XLAFSDPv2Strategy(SingleDeviceXLAStrategy):
    """Fully sharded data parallel on torch_xla SPMD: one process drives every local device of a TPU host.

    Every parameter is split 1/N over the ``fsdp`` mesh axis (N = devices), batches are split along the batch
    dimension, and XLA's partitioner inserts the collectives; gradients and AdamW states follow the parameters'
    sharding. ``trainer.devices`` stays 1 (one SPMD process); the batch size must be divisible by N.
    Multi-host pod slices run one such process per host (``torch_xla`` sets up the global mesh over all hosts).

    Args:
        mesh_shape: (fsdp, model) sizes; default (all devices, 1).
        debug: set ``PT_XLA_DEBUG`` (torch_xla's compilation/execution reports).
    """

    def __init__(self, mesh_shape: tuple[int, int] | None = None, debug: bool = False, **kwargs: Any) -> None:
        require_torch_xla()
        import torch_xla.runtime as xr

        # SPMD must be switched on before the first XLA tensor exists: the runtime then presents one virtual device
        xr.use_spmd()
        super().__init__(device=0, debug=debug, **kwargs)
        self._mesh_shape = tuple(mesh_shape) if mesh_shape is not None else None
        self._mesh: Any = None

    def tensor_init_context(self, empty_init: bool | None = None) -> contextlib.AbstractContextManager:
        """Build the model on the host: it is sharded as it moves to the devices, so no device ever holds all of it."""
        return contextlib.nullcontext()

    @property
    def mesh(self) -> Any:
        """The ``torch_xla.distributed.spmd.Mesh`` with axes (fsdp, model), built on first use."""
        if self._mesh is None:
            import numpy as np
            import torch_xla.distributed.spmd as xs
            import torch_xla.runtime as xr

            n = xr.global_runtime_device_count()
            shape = self._mesh_shape or (n, 1)
            if shape[0] * shape[1] != n:
                raise ConfigError(f"mesh_shape {list(shape)} does not multiply to the {n} XLA devices; use [{n}, 1]")
            self._mesh = xs.Mesh(np.arange(n), shape, ("fsdp", "model"))
            xs.set_global_mesh(self._mesh)
        return self._mesh

    @property
    def num_shards(self) -> int:
        return int(self.mesh.mesh_shape[0])

    def model_to_device(self) -> None:
        """Move the module to the XLA device, then annotate every parameter with its FSDPv2 sharding."""
        import torch_xla.distributed.spmd as xs

        super().model_to_device()
        mesh = self.mesh
        for param in self.model.parameters():
            xs.mark_sharding(param, mesh, fsdp_partition_spec(param.shape))
        # FSDPv2 keeps each block's backward from fusing with its neighbours (bounds the gathered-weight buffers)
        for module in self.model.modules():
            if type(module).__name__ == "Block":
                xs.apply_backward_optimization_barrier(module)

    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        """Upload each CPU tensor of the batch and annotate it as split along its rows (dim 0) over ``fsdp``.

        (Lightning's ``MpDeviceLoader`` wrapping, which overlaps the upload with the step, belongs to its multi-process
        ``XLAStrategy``; this single SPMD process uploads each batch as the step starts.)"""
        import torch_xla.distributed.spmd as xs
        from lightning.fabric.utilities.apply_func import apply_to_collection

        mesh, n = self.mesh, self.num_shards

        def upload(t: torch.Tensor) -> torch.Tensor:
            if t.device.type != "cpu":
                return t
            if t.dim() and t.shape[0] % n:
                raise ConfigError(
                    f"the XLA FSDP strategy splits each batch over {n} devices, but a batch tensor has "
                    f"{t.shape[0]} rows; set data.batch_size to a multiple of {n}"
                )
            t = t.to(self.root_device)
            if t.dim():
                xs.mark_sharding(t, mesh, batch_partition_spec(t.dim()))
            return t

        return apply_to_collection(batch, torch.Tensor, upload)


def local_shard_numels(tensor: torch.Tensor) -> list[int]:
    """Elements each addressable device holds of an SPMD tensor (a replicated tensor: the full numel on each)."""
    import torch_xla

    return [int(shard.numel()) for shard, _ in torch_xla._XLAC._get_local_shards([tensor])[0]]
