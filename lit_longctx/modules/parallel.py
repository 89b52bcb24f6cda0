"""Parallelism, activation checkpointing and compilation, applied to a :class:`Transformer` in one place.

Called from ``CausalLM.configure_model`` (Lightning's hook for building and sharding a model) according to the
Trainer's strategy:
- ``ModelParallelStrategy`` (FSDP2): ``fully_shard`` every Block over the data-parallel mesh, then the root, so each
  rank holds 1/DP of every weight (torchtitan's recipe);
- ``FSDPStrategy`` (FSDP1): each Block is wrapped with ``torch.distributed.fsdp.wrap.wrap`` inside Lightning's
  ``model_sharded_context`` (which supplies the strategy's FSDP arguments), so ``--trainer.strategy=fsdp`` shards per
  Block without an auto-wrap policy in the config;
- DDP / DeepSpeed / single device: nothing to do here (DeepSpeed ZeRO-3 partitions inside its own init context).
Activation checkpointing recomputes each Block in backward (non-reentrant); ``compile`` compiles each Block.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from lit_longctx.nn.llama import Transformer


def is_fsdp2(strategy: Any) -> bool:
    return isinstance(strategy, ModelParallelStrategy)


def is_fsdp1(strategy: Any) -> bool:
    return isinstance(strategy, FSDPStrategy)


def is_deepspeed(strategy: Any) -> bool:
    return isinstance(strategy, DeepSpeedStrategy)


def fsdp2_mesh(strategy: Any) -> Any:
    mesh = strategy.device_mesh
    if "data_parallel" in mesh.mesh_dim_names:
        return mesh["data_parallel"]
    return mesh


def apply_parallelism(
    model: Transformer,
    strategy: Any | None,
    *,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> Transformer:
    """Prepare ``model`` for ``strategy`` in place; returns it for chaining."""
    model.activation_checkpointing = activation_checkpointing
    if compile:
        for block in model.layers:
            block.compile()
    if strategy is None:
        return model
    if is_fsdp2(strategy):
        from torch.distributed.fsdp import fully_shard

        mesh = fsdp2_mesh(strategy)
        if mesh.size() > 1 or torch.distributed.is_initialized():
            for block in model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
    elif is_fsdp1(strategy):
        from torch.distributed.fsdp.wrap import wrap

        if strategy.kwargs.get("auto_wrap_policy") is None:
            for i, block in enumerate(model.layers):
                model.layers[i] = wrap(block)
    return model



class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for pure FSDP2: ``data_parallel_size="auto"`` means every process.

    (Lightning's own ``auto`` puts the devices of a node on the tensor-parallel axis, which leaves nothing sharded
    for a model that does not apply tensor parallelism.)

    Args:
        data_parallel_size: processes sharing one copy of the weights; ``auto`` = all of them.
        tensor_parallel_size: tensor-parallel degree; lit-longctx models use 1.
        save_distributed_checkpoint: save a sharded distributed checkpoint (else one consolidated file).
        process_group_backend: torch.distributed backend (default: nccl on GPUs, gloo on CPUs).
        timeout: collective timeout.
    """

    def __init__(
        self,
        data_parallel_size: int | Literal["auto"] = "auto",
        tensor_parallel_size: int | Literal["auto"] = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta = default_pg_timeout,
    ) -> None:
        super().__init__(data_parallel_size, tensor_parallel_size, save_distributed_checkpoint, process_group_backend,
                         timeout)

    def setup_environment(self) -> None:
        if self._tensor_parallel_size == "auto":
            self._tensor_parallel_size = 1
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes // int(self._tensor_parallel_size)
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """A sharded checkpoint is complete once ``.metadata`` (DCP writes it after all shards) and then ``meta.pt``
        exist; both are removed before a save replaces a checkpoint, so a save killed half-way never leaves a
        directory that :func:`lit_longctx.storage.newest_last_checkpoint` counts as complete (old metadata over
        half-new shards). To an fsspec URL (``s3://...``) DCP's fsspec writer puts one shard object per rank."""
        from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME

        from lit_longctx.storage import filesystem, is_remote

        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        url = str(self.broadcast(str(filepath))).rstrip("/")
        fs, path = filesystem(url) if is_remote(url) else filesystem(f"file://{Path(url).absolute()}")
        if self.global_rank == 0 and fs.isdir(path):
            for name in (_METADATA_FILENAME, ".metadata"):
                if fs.exists(f"{path}/{name}"):
                    fs.rm(f"{path}/{name}")
        self.barrier("checkpoint_metadata_cleared")
        if not is_remote(url):
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        from torch.distributed.checkpoint import save
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter  # torch exports it nowhere public

        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        save(state, storage_writer=FsspecWriter(url, single_file_per_rank=True))
        if self.global_rank == 0:
            with fs.open(f"{path}/{_METADATA_FILENAME}", "wb") as f:
                torch.save(checkpoint, f)
        self.barrier("remote_checkpoint_saved")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """A remote checkpoint is copied to the local cache first (each file atomically), then read as usual."""
        from lit_longctx.storage import is_remote, localize

        path = self.broadcast(str(checkpoint_path))
        if is_remote(path):
            if self.local_rank == 0:
                localize(path)
            self.barrier("remote_checkpoint_cached")
            checkpoint_path = localize(path)  # already cached: only compares sizes and ETags
        if Path(checkpoint_path).is_dir():
            from lit_longctx.dcp import verify

            verify(checkpoint_path)  # torch unpickles its metadata and values unchecked: prove them plain data first
        return super().load_checkpoint(checkpoint_path, weights_only)
