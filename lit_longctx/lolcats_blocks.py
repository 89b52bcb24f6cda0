"""Layer-block ("trenchcoat") attention transfer: LoLCATs stage 1 one block of k layers at a time (Zhang et al.,
arXiv 2410.10254, §3.3.2 Eq. 8; App. A.3; spec §5), for models whose joint transfer does not fit one device.

Attention transfer is teacher-forced: every converted layer returns its softmax teacher's output, so the hidden
state entering layer m is the original model's, whatever the feature maps are, and layer m's loss depends on its
own φ_q, φ_k, θ only. A block of layers [s, s+k) therefore needs only the residual stream entering layer s:

1. ``save``: run the softmax model once over the data and store, for every block start s (s % k = 0), the raw
   residual stream entering layer s — *before* its ``input_layernorm``. (The reference stores normalised states
   and skips the first layer's norm, which makes that layer's residual the normalised state, so the block's later
   layers see slightly different inputs from the full model; raw states reproduce the full model exactly.) Files:
   ``<output>/block-<s>/<split>-<shard>.safetensors`` with ``hidden`` (R, T, d) and ``input_ids`` (R, T), plus
   ``meta.json``. Shards already written are skipped, so an interrupted save resumes; ``--rank/--world_size``
   split the shards among processes. The training rows of ``epochs`` epochs are stored in the data module's
   order, so training a block sees the batches a joint run would.
2. ``train``: one process per block, through the ordinary CLI with :class:`BlockTransfer` (a stage-1 module whose
   network is only the block's layers, :class:`LayerSlice`) and :class:`BlockInputs` (the saved states)::

       lit-longctx fit --config STAGE1.yaml --model lit_longctx.lolcats_blocks.BlockTransfer \\
           --model.block_start 8 --model.block_size 8 \\
           --data lit_longctx.lolcats_blocks.BlockInputs --data.directory DIR --data.block_start 8

   A block's loss is mse_factor · Σ_{m in block} MSE_m / n (n = converted layers of the whole model), so the block
   losses sum to the joint loss and every tensor gets exactly the gradient of joint training; with the same data
   order and a per-step optimizer (AdamW is element-wise), block-wise training reproduces joint training for any
   k. (ReduceLROnPlateau and gradient clipping look at a block's loss/norm only, so they can differ.)
3. ``stitch``: gather every block's φ and θ (their names carry the global layer index, so nothing is shifted) and
   the base weights into one stage-1 checkpoint (method ``lolcats_transfer``), which
   :class:`~lit_longctx.modules.LinearizedLoRA` starts from.

Commands::

    python -m lit_longctx.lolcats_blocks save --init_from BASE --block_size 8 --output DIR \\
        --data lit_longctx.datamodules.InstructData --data.path hf:yahma/alpaca-cleaned --data.tokenizer BASE \\
        --data.seq_len 1024
    python -m lit_longctx.lolcats_blocks stitch --init_from BASE --blocks [RUN0, RUN8, ...] --output stage1.ckpt

Disk: 2 bytes (bf16) × tokens × d_model per block start, e.g. 70B, k = 5, 20M tokens ≈ 5.2 TB (spec §5).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from lit_longctx.checkpoint import read_checkpoint, save_checkpoint
from lit_longctx.datamodules.base import LongCtxDataModule, SampleStream
from lit_longctx.hf import CheckpointError, load_weights
from lit_longctx.modules.lolcats import AttentionTransfer, hybrid_layers, is_transfer_tensor
from lit_longctx.modules.parallel import is_deepspeed, is_fsdp1, is_fsdp2
from lit_longctx.nn.attention import AttentionContext, get_attention
from lit_longctx.nn.attention.hybrid_linear import distill_losses
from lit_longctx.nn.config import ConfigError, ModelConfig, parse_dtype
from lit_longctx.nn.llama import Block, Transformer
from lit_longctx.nn.rope import RotaryEmbedding

FORMAT = "lit-longctx-block-inputs/1"


def block_starts(n_layers: int, block_size: int) -> list[int]:
    """First layer of every block of ``block_size`` layers."""
    if not isinstance(block_size, int) or block_size < 1:
        raise ConfigError(f"block_size must be a positive integer, got {block_size!r}")
    return list(range(0, n_layers, block_size))


def block_dir(directory: str | Path, start: int) -> Path:
    return Path(directory) / f"block-{start:04d}"


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:05d}.safetensors"


def read_block_meta(directory: str | Path) -> dict[str, Any]:
    """``meta.json`` of a directory written by :func:`save_block_inputs`."""
    path = Path(directory).expanduser() / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{str(directory)!r} holds no saved block inputs (no meta.json): run "
                                "`python -m lit_longctx.lolcats_blocks save` first")
    return json.loads(path.read_text())


def plain_config(config: ModelConfig) -> ModelConfig:
    """The softmax model of ``config`` (every layer ``causal``)."""
    return config.replace(attention="causal", layer_attention={}, attention_options={})


# ------------------------------------------------------------------------------------------------------ the network
class LayerSlice(nn.Module):
    """Layers [start, start + count) of a :class:`Transformer`, fed the residual stream entering layer ``start``.

    Parameter names are those of the full model (``model.layers.<global index>.…``), so a slice loads from a full
    checkpoint by name and its trained tensors drop back into a full model unchanged.

    Args:
        config: the full model's config.
        start: first layer.
        count: number of layers.
    """

    def __init__(self, config: ModelConfig, start: int, count: int) -> None:
        super().__init__()
        self.config, self.start, self.count = config, start, count
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict({str(i): Block(config, i) for i in range(start, start + count)})
        self.rope = RotaryEmbedding(config.rope, config.head_dim, config.max_seq_len)
        self.kinds = sorted({config.attention_kind(i) for i in range(start, start + count)})

    def forward(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, **extras: Any
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """hidden (B, T, d) at positions 0..T-1 -> (hidden after the slice, the attention kinds' extras)."""
        b, t, _ = hidden.shape
        position_ids = torch.arange(t, device=hidden.device).expand(b, t)
        cos, sin = self.rope(position_ids)
        ctx = AttentionContext(position_ids, cos, sin, self.rope, None, dict(extras))
        for kind in self.kinds:
            get_attention(kind).prepare_context(ctx, input_ids, self.config)
        h = hidden.to(next(self.parameters()).dtype)
        for layer in self.model.layers.values():
            h = layer(h, ctx)
        return h, ctx.extras


# ---------------------------------------------------------------------------------------------------------- save
def _teacher(init_from: str, device: str, dtype: torch.dtype | None) -> Transformer:
    """The softmax model of ``init_from`` (a hybrid checkpoint's φ and θ are dropped)."""
    loaded = read_checkpoint(init_from)
    with torch.device("meta"):
        model = Transformer(plain_config(loaded.model_config))
    state = {k: v for k, v in loaded.state_dict.items() if not is_transfer_tensor(k)}
    load_weights(model, state, source=loaded.source)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


@torch.no_grad()
def save_block_inputs(
    init_from: str,
    data: LongCtxDataModule,
    output: str,
    block_size: int,
    epochs: int = 1,
    shard_rows: int = 32,
    max_rows: int | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Path:
    """Store the raw residual stream entering every block's first layer, for the training and validation rows.

    Args:
        init_from: the softmax model (HF directory, lit-longctx checkpoint, .ckpt or run directory).
        data: the data module whose rows are saved (e.g. InstructData); its batch_size is the micro-batch here.
        output: directory for ``meta.json`` and ``block-<s>/`` shard files.
        block_size: k, layers per block; blocks start at 0, k, 2k, ...
        epochs: training epochs whose rows are stored in the data module's order (BlockInputs replays them).
        shard_rows: rows per shard file.
        max_rows: store at most this many training rows per epoch (default all).
        device: where the model runs (cpu, cuda, ...).
        dtype: float32, bfloat16 or float16 for the model and the stored states (default: the checkpoint's).
        rank: this process's index when several processes share the shards (shard i goes to rank i % world_size).
        world_size: number of processes sharing the shards.
    """
    torch_dtype = parse_dtype(dtype)
    if epochs < 1 or shard_rows < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need epochs >= 1, shard_rows >= 1 and 0 <= rank < world_size, got {epochs}, "
                          f"{shard_rows}, {rank}, {world_size}")
    if shard_rows % data.batch_size:
        # rows are computed in the micro-batches training uses, so the saved states are bit-identical to a joint run's
        raise ConfigError(f"shard_rows={shard_rows} must be a multiple of the data's batch_size={data.batch_size}")
    model = _teacher(init_from, device, torch_dtype)
    starts = block_starts(model.config.n_layers, block_size)
    data.prepare_data()
    data.setup("fit")
    stream, val = data.train_stream(), data.val_dataset()
    n_train = stream.num_samples if max_rows is None else min(max_rows, stream.num_samples)
    splits = {f"train-e{e}": (lambda k, e=e: stream.sample_at(e, k), n_train) for e in range(epochs)}
    if val is not None:
        splits["val"] = (val.__getitem__, len(val))
    meta = {"format": FORMAT, "init_from": str(init_from), "model_config": model.config.to_dict(),
            "block_size": block_size, "block_starts": starts, "seq_len": data.seq_len, "shard_rows": shard_rows,
            "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."), "epochs": epochs,
            "splits": {name: rows for name, (_, rows) in splits.items()}}
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    meta_file = out / "meta.json"
    if meta_file.exists():
        old = json.loads(meta_file.read_text())
        if old != json.loads(json.dumps(meta)):
            raise ValueError(f"{out} holds block inputs of another model, data or layout (its meta.json differs); "
                             "use a new output directory")
    else:
        tmp = out / f".meta.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, meta_file)
    for s in starts:
        block_dir(out, s).mkdir(exist_ok=True)

    captured: dict[int, torch.Tensor] = {}
    hooks = [model.layers[s].register_forward_pre_hook(lambda _m, args, s=s: captured.__setitem__(s, args[0]))
             for s in starts]
    try:
        for split, (get_row, rows) in splits.items():
            for shard in range(rank, -(-rows // shard_rows), world_size):
                files = {s: block_dir(out, s) / shard_name(split, shard) for s in starts}
                if all(f.exists() for f in files.values()):
                    continue  # written by an earlier (interrupted) run
                lo, hi = shard * shard_rows, min(rows, (shard + 1) * shard_rows)
                ids = torch.stack([get_row(k)["input_ids"] for k in range(lo, hi)])
                states: dict[int, list[torch.Tensor]] = {s: [] for s in starts}
                for a in range(0, len(ids), data.batch_size):
                    model(ids[a: a + data.batch_size].to(device), return_logits=False)
                    for s in starts:
                        states[s].append(captured[s].cpu())
                for s in starts:
                    _write_atomic(files[s], {"hidden": torch.cat(states[s]), "input_ids": ids})
    finally:
        for hook in hooks:
            hook.remove()
    return out


# ----------------------------------------------------------------------------------------------------------- data
class BlockShards:
    """Rows of one split of one block: ``row(i)`` reads row i (one slice of one shard file, memory-mapped)."""

    def __init__(self, directory: Path, split: str, rows: int, shard_rows: int) -> None:
        self.directory, self.split, self.rows, self.shard_rows = directory, split, rows, shard_rows
        self._open: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.rows

    def row(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        shard, i = divmod(index, self.shard_rows)
        if shard not in self._open:
            path = self.directory / shard_name(self.split, shard)
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: the block inputs were not saved completely; rerun "
                                        "`python -m lit_longctx.lolcats_blocks save` with the same arguments")
            self._open = {shard: safe_open(str(path), framework="pt")}
        f = self._open[shard]
        return {"hidden": f.get_slice("hidden")[i: i + 1][0], "input_ids": f.get_slice("input_ids")[i: i + 1][0]}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}


class BlockStream(SampleStream):
    """Saved training rows; epoch e replays the rows saved for epoch e mod (saved epochs), in saved order unless
    ``shuffle``."""

    def __init__(self, epochs: list[BlockShards], seed: int = 1234, shuffle: bool = False) -> None:
        super().__init__(seed=seed, shuffle=shuffle)
        self.epochs = epochs

    @property
    def num_samples(self) -> int:
        return len(self.epochs[0])

    def get_sample(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        return self.epochs[epoch % len(self.epochs)].row(index)


class BlockRows(Dataset):
    """Saved validation rows of one block."""

    def __init__(self, shards: BlockShards) -> None:
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self.shards):
            raise IndexError(index)
        return self.shards.row(index)


class BlockInputs(LongCtxDataModule):
    """The residual states saved by :func:`save_block_inputs` for one block: batches ``{hidden (B, T, d),
    input_ids (B, T)}`` for :class:`BlockTransfer`.

    Args:
        directory: the ``output`` of ``save``.
        block_start: the block's first layer (one of the saved block starts).
        seq_len: must equal the saved sequence length (default: the saved one).
        batch_size: rows per batch.
        num_workers: DataLoader worker processes.
        seed: seeds the order when ``shuffle``.
        shuffle: visit the saved rows in a seeded random order per epoch instead of the saved (data module) order.
    """

    def __init__(
        self,
        directory: str,
        block_start: int = 0,
        seq_len: int | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 1234,
        shuffle: bool = False,
    ) -> None:
        meta = read_block_meta(directory)
        if seq_len is not None and seq_len != meta["seq_len"]:
            raise ValueError(f"seq_len={seq_len} but the block inputs in {directory} were saved with seq_len="
                             f"{meta['seq_len']}; leave seq_len unset")
        if block_start not in meta["block_starts"]:
            raise ValueError(f"block_start={block_start} has no saved inputs; {directory} holds block starts "
                             f"{meta['block_starts']}")
        super().__init__(None, meta["seq_len"], batch_size, num_workers, seed)
        self.directory = Path(directory).expanduser()
        self.block_start, self.shuffle, self.meta = block_start, shuffle, meta

    @property
    def vocab_size(self) -> int:
        return self.meta["model_config"]["vocab_size"]

    @property
    def model_config(self) -> ModelConfig:
        """The (softmax) config of the model the states came from."""
        return ModelConfig.from_dict(self.meta["model_config"])

    def _shards(self, split: str) -> BlockShards:
        return BlockShards(block_dir(self.directory, self.block_start), split, self.meta["splits"][split],
                           self.meta["shard_rows"])

    def train_stream(self) -> BlockStream:
        return BlockStream([self._shards(f"train-e{e}") for e in range(self.meta["epochs"])], self.seed, self.shuffle)

    def val_dataset(self) -> BlockRows | None:
        return BlockRows(self._shards("val")) if self.meta["splits"].get("val") else None


# ----------------------------------------------------------------------------------------------------------- train
class BlockTransfer(AttentionTransfer):
    """Stage-1 attention transfer of one block of layers, on saved block inputs (:class:`BlockInputs`).

    Everything is as in :class:`~lit_longctx.modules.AttentionTransfer` (same arguments, which must match those of
    the other blocks), but the network is :class:`LayerSlice` and the objective is this block's share of the joint
    one (normalised by the converted layers of the whole model). One block per process: single device or DDP.

    Args:
        block_start: the block's first layer.
        block_size: layers in the block (default: to the last layer).
        **kwargs: AttentionTransfer arguments (``init_from``: the softmax model the inputs were saved from).
    """

    method: ClassVar[str] = "lolcats_block"

    def __init__(self, block_start: int = 0, block_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        n = self.model_config.n_layers
        if not 0 <= block_start < n or (block_size is not None and block_size < 1):
            raise ConfigError(f"block_start={block_start}, block_size={block_size} is not a block of the model's {n} "
                              "layers")
        self.block_start = block_start
        self.block_end = n if block_size is None else min(n, block_start + block_size)
        if not [i for i in hybrid_layers(self.model_config) if self.block_start <= i < self.block_end]:
            raise ConfigError(f"layers {self.block_start}..{self.block_end - 1} are all kept as softmax: nothing to "
                              "train in this block")

    def build_model(self) -> LayerSlice:
        return self.freeze(LayerSlice(self.model_config, self.block_start, self.block_end - self.block_start))

    def configure_model(self) -> None:
        if self.model is not None:
            return
        restoring = self._restore_path()
        if restoring is not None:
            self._adopt_checkpoint_config(restoring)
        strategy = self._trainer.strategy if self._trainer is not None else None
        if strategy is not None and (is_fsdp1(strategy) or is_fsdp2(strategy) or is_deepspeed(strategy)):
            raise ConfigError("BlockTransfer trains one block per process: use a single device (or DDP), and one "
                              "process per block for parallelism")
        if self._init_checkpoint is None or self._resuming():
            self.model = self.build_model()
            return
        state = self._init_from_weights()
        with torch.device("meta"):
            model = self.build_model()
        state = self.complete_state(state, model)
        wanted = model.state_dict()
        missing = [k for k in wanted if k not in state]
        if missing:
            raise CheckpointError(f"{self._init_checkpoint.source} lacks {missing[:8]} for layers {self.block_start}.."
                                  f"{self.block_end - 1}: init_from must be the model the block inputs came from")
        dtype = state[next(iter(wanted))].dtype
        model.load_state_dict({k: state[k].to(dtype) for k in wanted}, strict=True, assign=True)
        self.model = self.freeze(model)
        self._init_checkpoint = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None)
        if isinstance(dm, BlockInputs):
            if dm.block_start != self.block_start:
                raise ConfigError(f"the data holds the inputs of the block starting at layer {dm.block_start} but "
                                  f"the model trains the block starting at {self.block_start}; set data.block_start "
                                  "and model.block_start to the same layer")
            if dm.model_config != plain_config(self.model_config):
                raise ConfigError(f"the block inputs in {dm.directory} were saved from another model than init_from "
                                  f"{self.hparams.init_from}")

    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, Any]]:
        _, extras = self.model(batch["hidden"], batch["input_ids"], **self.on_batch_layout(batch, stage))
        return self.distill_objective(distill_losses(extras))


# ---------------------------------------------------------------------------------------------------------- stitch
def stitch_blocks(init_from: str, blocks: list[str], output: str) -> Path:
    """Combine the feature maps and window factors of BlockTransfer runs into one stage-1 checkpoint.

    Args:
        init_from: the softmax model the blocks were trained on (its weights fill everything else).
        blocks: BlockTransfer checkpoints (``.ckpt`` files or run directories), one per block, in any order.
        output: the stage-1 checkpoint file to write (method ``lolcats_transfer``).
    """
    config: ModelConfig | None = None
    tensors: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    for path in blocks:
        loaded = read_checkpoint(path)
        if loaded.method != BlockTransfer.method:
            raise CheckpointError(f"{path} is a {loaded.method!r} checkpoint, not a BlockTransfer run")
        if config is None:
            config = loaded.model_config
        elif loaded.model_config != config:
            raise CheckpointError(f"{path} was trained with another model config or attention layout than "
                                  f"{blocks[0]}; every block must use the same AttentionTransfer arguments")
        for key, value in loaded.state_dict.items():
            if is_transfer_tensor(key):
                if key in tensors:
                    raise CheckpointError(f"{key} is trained by both {owner[key]} and {path}: blocks overlap")
                tensors[key], owner[key] = value, path
    if config is None:
        raise ConfigError("stitch needs at least one block checkpoint")
    with torch.device("meta"):
        model = Transformer(config)
    needed = [k for k in model.state_dict() if is_transfer_tensor(k)]
    uncovered = sorted({int(k.split(".")[2]) for k in needed if k not in tensors})
    if uncovered:
        raise CheckpointError(f"no block checkpoint covers layers {uncovered}; train those blocks first")
    base = read_checkpoint(init_from)
    state = {k: v for k, v in base.state_dict.items() if not is_transfer_tensor(k)}
    load_weights(model, {**state, **tensors}, source=f"{init_from} + {len(blocks)} blocks")
    return save_checkpoint(output, model, tokenizer=base.tokenizer(), method=AttentionTransfer.method)


def main(argv: list[str] | None = None) -> Any:
    """``python -m lit_longctx.lolcats_blocks save|stitch ...`` (training runs through ``lit-longctx fit``).

    Bad input ends with one ``error:`` line (``LIT_LONGCTX_DEBUG=1`` shows the traceback), as in ``lit-longctx``.
    """
    from lit_longctx.cli import _run_jsonargparse, run_with_one_line_errors

    return run_with_one_line_errors(lambda: _run_jsonargparse({"save": save_block_inputs, "stitch": stitch_blocks},
                                                              argv, "python -m lit_longctx.lolcats_blocks"))

if __name__ == "__main__":
    main()
