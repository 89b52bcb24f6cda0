"""Layer-block ("trenchcoat") attention transfer (LoLCATs spec §5): saved raw block inputs, block-wise training that
reproduces joint training exactly, stitching, resumable saving, and errors."""

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lit_longctx.checkpoint import read_checkpoint, save_checkpoint
from lit_longctx.datamodules import InstructData
from lit_longctx.hf import CheckpointError
from lit_longctx.lolcats_blocks import (
    BlockInputs,
    BlockTransfer,
    main,
    read_block_meta,
    save_block_inputs,
    stitch_blocks,
)
from lit_longctx.modules import AttentionTransfer, LinearizedLoRA
from lit_longctx.nn import ModelConfig, Transformer
from lit_longctx.nn.config import ConfigError

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "alpaca_tiny.jsonl"
CONFIG = dict(vocab_size=259, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64, init_std=0.2)
# layer 2 stays softmax; the maps start random so there is something to learn; constant lr, no clipping
STAGE1 = dict(feature_dim=8, window_size=4, feature_map_init="identity", softmax_layers=[2], learning_rate=1e-2,
              lr_scheduler="schedule", lr_schedule="constant")
STEPS = 4


def instruct(tmp_path: Path) -> InstructData:
    return InstructData(str(FIXTURE), tokenizer="byte", seq_len=48, batch_size=2, val_samples=8,
                        cache_dir=str(tmp_path / "cache"))


def fit(module, tmp_path, data) -> L.Trainer:
    t = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  default_root_dir=tmp_path)
    t.fit(module, datamodule=data)
    return t


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A base model, its joint stage-1 run, and block inputs saved for k = 2 (two blocks) and k = 4 (one)."""
    tmp = tmp_path_factory.mktemp("blocks")
    torch.manual_seed(0)
    base = save_checkpoint(tmp / "base.ckpt", Transformer(ModelConfig(**CONFIG)))
    joint = AttentionTransfer(init_from=str(base), **STAGE1)
    trainer = fit(joint, tmp, instruct(tmp))
    trainer.save_checkpoint(tmp / "joint.ckpt")
    save_block_inputs(str(base), instruct(tmp), str(tmp / "k4"), block_size=4, shard_rows=4)
    main(["save", "--init_from", str(base), "--output", str(tmp / "k2"), "--block_size", "2", "--shard_rows", "4",
          "--data", "lit_longctx.datamodules.InstructData", "--data.path", str(FIXTURE), "--data.tokenizer", "byte",
          "--data.seq_len", "48", "--data.batch_size", "2", "--data.val_samples", "8",
          "--data.cache_dir", str(tmp / "cache")])
    return tmp, base, joint


def transfer_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if "feature_map" in k or "window_factors" in k}


def train_block(tmp: Path, base: Path, directory: str, start: int, size: int) -> Path:
    module = BlockTransfer(init_from=str(base), block_start=start, block_size=size, **STAGE1)
    trainer = fit(module, tmp, BlockInputs(str(tmp / directory), block_start=start, batch_size=2))
    path = tmp / f"{directory}-block{start}.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_saved_inputs_are_the_raw_residual_stream(setup):
    tmp, base, _ = setup
    meta = read_block_meta(tmp / "k2")
    assert meta["block_starts"] == [0, 2] and meta["splits"]["val"] > 0
    model = Transformer(ModelConfig(**CONFIG))
    model.load_state_dict(read_checkpoint(base).state_dict)
    saved = load_file(str(tmp / "k2" / "block-0002" / "train-e0-00000.safetensors"))
    with torch.no_grad():  # by hand: embeddings, then layers 0 and 1; no input_layernorm of layer 2 applied
        h = model.model.embed_tokens(saved["input_ids"])
        ctx = model.context(saved["input_ids"], torch.arange(48).expand(len(h), 48), None, {})
        for layer in model.layers[:2]:
            h = layer(h, ctx)
    assert torch.equal(saved["hidden"], h)
    block0 = load_file(str(tmp / "k2" / "block-0000" / "train-e0-00000.safetensors"))
    assert torch.equal(block0["hidden"], model.model.embed_tokens(saved["input_ids"]).detach())
    # the rows are the joint run's first training rows, in its order
    stream = instruct(tmp)
    stream.setup("fit")
    rows = stream.train_stream()
    assert all(torch.equal(saved["input_ids"][i], rows.sample_at(0, i)["input_ids"]) for i in range(4))


def test_block_losses_sum_to_the_joint_loss_with_the_same_gradients(setup):
    tmp, base, _ = setup
    joint = AttentionTransfer(init_from=str(base), **STAGE1)
    joint.configure_model()
    data = BlockInputs(str(tmp / "k2"), block_start=0, batch_size=2)
    batch = next(iter(data.train_dataloader()))
    loss, _ = joint.compute_loss({"input_ids": batch["input_ids"]}, "train")
    loss.backward()
    total = 0.0
    for start in (0, 2):
        block = BlockTransfer(init_from=str(base), block_start=start, block_size=2, **STAGE1)
        block.configure_model()
        rows = next(iter(BlockInputs(str(tmp / "k2"), block_start=start, batch_size=2).train_dataloader()))
        part, logs = block.compute_loss(rows, "train")
        part.backward()
        total += float(part)
        grads = {n: p.grad for n, p in block.model.named_parameters() if p.requires_grad}
        assert grads and set(logs) >= {f"mse/layer_{i}" for i in range(start, start + 2) if i != 2}
        joint_params = dict(joint.model.named_parameters())
        for name, grad in grads.items():
            assert torch.equal(grad, joint_params[name].grad), name
    assert total == pytest.approx(float(loss), rel=1e-6)


@pytest.mark.parametrize(("directory", "size"), [("k4", 4), ("k2", 2)])
def test_blockwise_training_reproduces_joint_training(setup, directory, size):
    tmp, base, joint = setup
    blocks = [train_block(tmp, base, directory, s, size) for s in range(0, 4, size)]
    stitched = stitch_blocks(str(base), [str(b) for b in reversed(blocks)], str(tmp / f"{directory}-stage1.ckpt"))
    loaded = read_checkpoint(stitched)
    assert loaded.method == "lolcats_transfer" and loaded.model_config == joint.model_config
    expected = transfer_tensors(joint.model.state_dict())
    got = transfer_tensors(loaded.state_dict)
    assert set(got) == set(expected) and len(got) == 9
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    assert not torch.equal(expected["model.layers.0.self_attn.window_factors"],
                           torch.full((1, 4, 1, 1), -2.1972245773362196))  # training moved the tensors
    for k, v in read_checkpoint(base).state_dict.items():
        assert torch.equal(loaded.state_dict[k], v), k
    stage2 = LinearizedLoRA(init_from=str(stitched))  # stage 2 starts from the stitched checkpoint
    stage2.configure_model()
    ids = torch.randint(0, 259, (1, 40))
    torch.testing.assert_close(stage2.model(ids).logits, joint.model(ids).logits, rtol=0, atol=0)


def test_block_training_through_the_cli(setup):
    from lit_longctx.cli import _make_cli

    tmp, base, joint = setup
    cli = _make_cli(["fit", "--model", "lit_longctx.lolcats_blocks.BlockTransfer", "--model.init_from", str(base),
                     *[f"--model.{k}={v}" for k, v in STAGE1.items()], "--model.block_start=2", "--model.block_size=2",
                     "--data", "lit_longctx.lolcats_blocks.BlockInputs", "--data.directory", str(tmp / "k2"),
                     "--data.block_start=2", "--data.batch_size=2", "--trainer.accelerator=cpu",
                     f"--trainer.max_steps={STEPS}", "--trainer.limit_val_batches=0", "--trainer.logger=false",
                     "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
                     f"--trainer.default_root_dir={tmp / 'cli'}"])
    name = "model.layers.3.self_attn.feature_map_q.mlp.layer"
    assert torch.equal(cli.model.model.state_dict()[name], joint.model.state_dict()[name])


def test_save_resumes_and_skips_finished_shards(setup):
    tmp, base, _ = setup
    target = tmp / "k2" / "block-0002" / "train-e0-00001.safetensors"
    before = target.read_bytes()
    untouched = tmp / "k2" / "block-0000" / "val-00000.safetensors"
    stamp = untouched.stat().st_mtime_ns
    for f in (tmp / "k2").glob("block-*/train-e0-00001.safetensors"):
        f.unlink()  # an interrupted save: this shard is missing in every block
    save_block_inputs(str(base), instruct(tmp), str(tmp / "k2"), block_size=2, shard_rows=4)
    assert target.read_bytes() == before and untouched.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="another model, data or layout"):
        save_block_inputs(str(base), instruct(tmp), str(tmp / "k2"), block_size=3, shard_rows=4)
    with pytest.raises(ConfigError, match="multiple of the data's batch_size=2"):
        save_block_inputs(str(base), instruct(tmp), str(tmp / "k3"), block_size=3, shard_rows=3)


def test_bad_blocks_are_refused(setup):
    tmp, base, _ = setup
    with pytest.raises(ValueError, match=r"block_start=1 has no saved inputs.*\[0, 2\]"):
        BlockInputs(str(tmp / "k2"), block_start=1)
    with pytest.raises(FileNotFoundError, match="no saved block inputs"):
        BlockInputs(str(tmp / "nowhere"))
    with pytest.raises(ConfigError, match="all kept as softmax"):
        BlockTransfer(init_from=str(base), block_start=2, block_size=1, **STAGE1)
    module = BlockTransfer(init_from=str(base), block_start=0, block_size=2, **STAGE1)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp)
    with pytest.raises(ConfigError, match="block starting at layer 2 but the model trains the block starting at 0"):
        trainer.fit(module, datamodule=BlockInputs(str(tmp / "k2"), block_start=2))
    block0 = tmp / "k2-block0.ckpt"
    if not block0.exists():
        block0 = train_block(tmp, base, "k2", 0, 2)
    with pytest.raises(CheckpointError, match=r"no block checkpoint covers layers \[3\]"):
        stitch_blocks(str(base), [str(block0)], str(tmp / "partial.ckpt"))
    with pytest.raises(CheckpointError, match="blocks overlap"):
        stitch_blocks(str(base), [str(block0), str(block0)], str(tmp / "twice.ckpt"))
    with pytest.raises(CheckpointError, match="not a BlockTransfer run"):
        stitch_blocks(str(base), [str(tmp / "joint.ckpt")], str(tmp / "wrong.ckpt"))
    assert not os.path.exists(tmp / "partial.ckpt")


def test_command_line_errors_are_one_line(setup, capsys):
    tmp, base, _ = setup
    with pytest.raises(SystemExit) as info:
        main(["stitch", "--init_from", str(base), "--blocks", f"[{tmp / 'joint.ckpt'}]", "--output", str(tmp / "x")])
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "not a BlockTransfer run" in last
