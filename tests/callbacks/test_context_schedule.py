"""ContextSchedule: stages of length, micro-batch, accumulation and RoPE keyed by optimizer step (issue 12)."""

from __future__ import annotations

import csv
import json
import math

import lightning as L
import numpy as np
import pytest
import torch

from lit_longctx.callbacks.accumulation import AccumulationPlan, StepAccumulationScheduler
from lit_longctx.callbacks.context_schedule import ContextSchedule, parse_stages
from lit_longctx.datamodules import TokenFiles, write_token_files
from lit_longctx.flops import flops_per_batch
from lit_longctx.modules import CausalLM
from lit_longctx.nn.config import ConfigError, RopeConfig

VOCAB = 97
TINY = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16)

#: 3 stages, 64 tokens per optimizer step throughout: (T=16, B=4, G=1) -> (32, 1, 2) -> (64, 1, 1) with RoPE changes
STAGES = [
    {"step": 0, "seq_len": 16, "micro_batch": 4, "accumulate": 1},
    {"step": 2, "seq_len": 32, "micro_batch": 1, "accumulate": 2, "rope": {"type": "linear", "factor": 2.0}},
    {"step": 4, "seq_len": 64, "micro_batch": 1, "accumulate": 1, "rope": {"theta": 40000.0, "factor": 4.0}},
]


def token_dir(tmp_path, n: int = 5000, seed: int = 0):
    tokens = np.random.default_rng(seed).integers(0, VOCAB, n)
    write_token_files(tmp_path / "tokens", {"train": tokens}, vocab_size=VOCAB)
    return tmp_path / "tokens", tokens


class Recorder(CausalLM):
    """Records what each micro-batch looks like from inside the module."""

    def __init__(self, **kw):
        super().__init__(model=dict(TINY), learning_rate=1e-3, lr_schedule="constant", **kw)
        self.seen: list[dict] = []

    def training_step(self, batch, batch_idx):
        rope = self.model.rope
        pos = torch.arange(4)
        self.seen.append({
            "step": self.trainer.global_step, "shape": tuple(batch["input_ids"].shape),
            "accumulate": self.trainer.accumulate_grad_batches, "rope": rope.rope, "cos": rope(pos)[0],
            "tokens": torch.cat([batch["input_ids"], batch["labels"][:, -1:]], 1), "flops": self.flops_per_batch,
            "lr": self.trainer.optimizers[0].param_groups[0]["lr"],
        })
        return super().training_step(batch, batch_idx)


def fit(tmp_path, stages=STAGES, max_steps=6, module=None, **trainer_kw):
    data_dir, tokens = token_dir(tmp_path)
    module = module or Recorder()
    dm = TokenFiles(str(data_dir), tokenizer="byte", seq_len=16, batch_size=4, train_order="sequential")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_steps=max_steps,
                        default_root_dir=tmp_path, limit_val_batches=0,
                        callbacks=[ContextSchedule(stages)], **trainer_kw)
    trainer.fit(module, datamodule=dm)
    return module, trainer, tokens


def test_three_stages_change_length_batch_accumulation_and_rope_at_their_steps(tmp_path):
    module, trainer, tokens = fit(tmp_path)
    assert trainer.global_step == 6
    got = [(r["step"], r["shape"], r["accumulate"]) for r in module.seen]
    assert got == [(0, (4, 16), 1), (1, (4, 16), 1),
                   (2, (1, 32), 2), (2, (1, 32), 2), (3, (1, 32), 2), (3, (1, 32), 2),
                   (4, (1, 64), 1), (5, (1, 64), 1)]
    # every optimizer step trains T*B*G = 64 tokens
    per_step: dict[int, int] = {}
    for r in module.seen:
        per_step[r["step"]] = per_step.get(r["step"], 0) + r["shape"][0] * r["shape"][1]
    assert set(per_step.values()) == {64}
    # RoPE tables: plain theta 1e4, then linear x2, then theta 4e4 with linear x4 (an independent fp64 reference)
    expected = {0: (1e4, 1.0), 2: (1e4, 2.0), 4: (4e4, 4.0)}
    for r in module.seen:
        theta, factor = expected[max(k for k in expected if k <= r["step"])]
        inv = 1.0 / theta ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8) / factor
        ref = torch.cat([torch.outer(torch.arange(4.0, dtype=torch.float64), inv)] * 2, -1).cos().float()
        torch.testing.assert_close(r["cos"], ref, atol=1e-6, rtol=0)
    assert module.model_config.rope == RopeConfig(rope_theta=4e4, rope_type="linear", factor=4.0)
    assert module.model_config.max_seq_len == 64
    # the data stream continues without gap or repeat: the rows' tokens, in order, are the file's prefix
    stream = torch.cat([r["tokens"].reshape(-1) for r in module.seen])
    assert stream.numel() == 4 * 17 * 2 + 4 * 33 + 2 * 65
    assert torch.equal(stream, torch.from_numpy(tokens[: stream.numel()]).long())
    # FLOPs per micro-batch follow the stage's (B, T) by the analytic formula
    for r in module.seen:
        b, t = r["shape"]
        assert r["flops"] == pytest.approx(flops_per_batch(module.model_config, b, t, formula="palm"))


def test_flops_follow_the_palm_formula_per_stage(tmp_path):
    module, _, _ = fit(tmp_path)
    cfg = module.model_config
    n = module.model.num_params(include_embedding=False)
    for r in module.seen:
        b, t = r["shape"]
        # PaLM appendix B: 6N + 12·L·H·Q·T per token (N without the input embedding)
        per_token = 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * t
        assert r["flops"] == pytest.approx(per_token * b * t, rel=1e-9)


def test_accumulation_plan_boundaries():
    plan = AccumulationPlan({0: 1, 2: 3, 4: 2})
    lasts = [m for m in range(14) if plan.is_last(m)]
    assert lasts == [0, 1, 4, 7, 9, 11, 13]
    assert [m for m in range(14) if plan.is_first(m)] == [0, 1, 2, 5, 8, 10, 12]
    assert plan.micro_batches_before(5) == 1 + 1 + 3 + 3 + 2


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"step": 0, "seq_len": 16, "micro_batch": 4}, {"step": 0, "seq_len": 32, "micro_batch": 2}],
         "stage steps must increase"),
        ([{"step": 1, "seq_len": 16, "micro_batch": 4}], "must start at step 0"),
        ([{"step": 0, "seq_len": 16, "micro_batch": 4, "window": 3}], "unknown keys"),
        ([{"step": 0, "seq_len": 16, "micro_batch": 4, "rope": {"kind": "yarn"}}], "unknown rope keys"),
    ],
)
def test_bad_stage_lists(stages, message):
    with pytest.raises(ConfigError, match=message):
        parse_stages(stages)


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([STAGES[0], {"step": 2, "seq_len": 32, "micro_batch": 1, "accumulate": 1}], "tokens per optimizer step"),
        ([STAGES[0], {"step": 2, "seq_len": 32, "micro_batch": 2, "rope": {"type": "ntk"}}], "rope_type='ntk'"),
        ([STAGES[0], {"step": 2, "seq_len": 32, "micro_batch": 2, "rope": {"type": "yarn", "factor": 2}}],
         "original_max_position_embeddings"),
    ],
)
def test_bad_schedules_fail_before_training(tmp_path, stages, message):
    module = Recorder()
    with pytest.raises(ConfigError, match=message):
        fit(tmp_path, stages=stages, module=module)
    assert module.seen == []


def test_allow_token_change_and_stage_after_max_steps_warns(tmp_path):
    stages = [STAGES[0], {"step": 2, "seq_len": 32, "micro_batch": 1, "allow_token_change": True},
              {"step": 10, "seq_len": 64, "micro_batch": 1, "allow_token_change": True}]
    with pytest.warns(UserWarning, match="stage 2 starts at step 10"):
        module, _, _ = fit(tmp_path, stages=stages, max_steps=3)
    assert [r["shape"] for r in module.seen] == [(4, 16), (4, 16), (1, 32)]


def test_deepspeed_like_strategy_refuses_changing_accumulation(tmp_path, monkeypatch):
    from lightning.pytorch.strategies import SingleDeviceStrategy

    monkeypatch.setattr(SingleDeviceStrategy, "handles_gradient_accumulation", property(lambda self: True),
                        raising=False)
    with pytest.raises(ConfigError, match="DeepSpeed"):
        fit(tmp_path)


def test_fot_micro_batch_must_hold_whole_packs(tmp_path):
    from lit_longctx.modules import FoT

    module = FoT(model=dict(TINY), mem_layers=[1], dataset_packing=2, cross_batch_range=1)
    stages = [{"step": 0, "seq_len": 16, "micro_batch": 4},
              {"step": 2, "seq_len": 64, "micro_batch": 1, "allow_token_change": True}]
    with pytest.raises(ConfigError, match="stage 1 .*not divisible by dataset_packing=2"):
        fit(tmp_path, stages=stages, module=module)


def test_step_accumulation_scheduler_alone_equals_manual_accumulation(tmp_path):
    """G = 1, 1, then 2: the weights equal the same micro-batches stepped by hand (an independent loop)."""
    data_dir, _ = token_dir(tmp_path)
    torch.manual_seed(0)
    module = CausalLM(model=dict(TINY), learning_rate=1e-2, lr_schedule="constant", weight_decay=0.0)
    ref = CausalLM(model=dict(TINY), learning_rate=1e-2, lr_schedule="constant", weight_decay=0.0)
    ref.configure_model()
    dm = TokenFiles(str(data_dir), tokenizer="byte", seq_len=16, batch_size=2, train_order="sequential")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_steps=4, limit_val_batches=0,
                        callbacks=[StepAccumulationScheduler({0: 1, 2: 2})])
    module.configure_model()
    ref.model.load_state_dict(module.model.state_dict())
    trainer.fit(module, datamodule=dm)
    opt = torch.optim.AdamW(ref.parameter_groups(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    rows = dm.train_stream()
    batches = [rows.collate([rows.sample_at(0, 2 * b + i) for i in range(2)]) for b in range(6)]
    for group in ([0], [1], [2, 3], [4, 5]):
        opt.zero_grad()
        for b in group:
            out = ref.model(batches[b]["input_ids"], batches[b]["position_ids"], batches[b]["labels"])
            (out.loss / len(group)).backward()
        opt.step()
    for (name, p), q in zip(module.model.named_parameters(), ref.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_checkpoint_and_hf_export_carry_the_stage_rope(tmp_path):
    """transformers loads the export of a stage-3 checkpoint with yarn RoPE and its logits equal ours."""
    from transformers import LlamaForCausalLM

    from lit_longctx.export import export_hf

    stages = [STAGES[0], {"step": 2, "seq_len": 64, "micro_batch": 1, "accumulate": 1,
                          "rope": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}]
    module, trainer, _ = fit(tmp_path, stages=stages, max_steps=3)
    ckpt = tmp_path / "stage2.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["lit_longctx"]["model_config"]
    assert saved["max_seq_len"] == 64 and saved["rope"]["rope_type"] == "yarn"
    out = export_hf(ckpt, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    assert config["max_position_embeddings"] == 64
    assert scaling["rope_type"] == "yarn" and scaling["factor"] == 4.0
    assert scaling["original_max_position_embeddings"] == 16
    hf = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    module.model.eval()
    with torch.no_grad():
        ours = module.model(ids, return_logits=True).logits
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_stage_evaluation_at_each_stage_length_and_stage_logs(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    from lit_longctx.callbacks.long_eval import LongEvalCallback

    calls = []
    monkeypatch.setattr(LongEvalCallback, "evaluate", lambda self, trainer, module: calls.append(
        (trainer.global_step, sorted({spec[0] for spec in self.specs}))))
    data_dir, _ = token_dir(tmp_path)
    dm = TokenFiles(str(data_dir), tokenizer="byte", seq_len=16, batch_size=4, train_order="sequential")
    schedule = ContextSchedule(STAGES, stage_eval={"depths": [0.5], "trials": 1}, stage_eval_at="both")
    logger = CSVLogger(tmp_path, name="logs")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_steps=6, limit_val_batches=0,
                        log_every_n_steps=1, callbacks=[schedule])
    trainer.fit(Recorder(), datamodule=dm)
    # start and end of every stage, at the stage's own length
    assert calls == [(0, [16]), (2, [16]), (2, [32]), (4, [32]), (4, [64]), (6, [64])]
    logger.save()
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [(int(r["step"]), float(r["context/seq_len"]), float(r["context/rope_factor"]))
              for r in rows if r.get("context/seq_len")]
    assert logged == [(0, 16.0, 1.0), (2, 32.0, 2.0), (4, 64.0, 4.0)]


def test_learning_rate_rewarms_at_a_stage_start(tmp_path):
    stages = [{"step": 0, "seq_len": 16, "micro_batch": 4, "warmup_steps": 2},
              {"step": 2, "seq_len": 32, "micro_batch": 2, "warmup_steps": 3}]
    module, _, _ = fit(tmp_path, stages=stages, max_steps=6)
    lrs = {r["step"]: r["lr"] for r in module.seen}
    expected = {0: 0.5, 1: 1.0, 2: 1 / 3, 3: 2 / 3, 4: 1.0, 5: 1.0}  # x 1e-3, constant schedule otherwise
    assert lrs == pytest.approx({k: v * 1e-3 for k, v in expected.items()})


@pytest.mark.parametrize("follow", [True, False])
def test_validation_rows_follow_the_stage_length(tmp_path, follow):
    """Validation every 2 steps sees the stage's (B, T) windows of the held-out file, stride T (every held-out token
    after the first is a target once), or stays at stage 0's with ``validate_at_stage_length: false``."""
    rng = np.random.default_rng(1)
    train, val = rng.integers(0, VOCAB, 5000), rng.integers(0, VOCAB, 200)
    write_token_files(tmp_path / "tokens", {"train": train, "val": val}, vocab_size=VOCAB)

    class ValRecorder(Recorder):
        def validation_step(self, batch, batch_idx):
            self.seen.append({"val_step": self.trainer.global_step, "shape": tuple(batch["input_ids"].shape),
                              "ids": batch["input_ids"]})
            return super().validation_step(batch, batch_idx)

    module = ValRecorder()
    dm = TokenFiles(str(tmp_path / "tokens"), tokenizer="byte", seq_len=16, batch_size=4, train_order="sequential")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_steps=6, val_check_interval=2,
                        check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=0,
                        callbacks=[ContextSchedule(STAGES, validate_at_stage_length=follow)])
    trainer.fit(module, datamodule=dm)
    got = [(r["val_step"], r["shape"]) for r in module.seen if "val_step" in r]
    # val_check_interval counts micro-batches (2, 4, 6, 8 here: global steps 2, 3, 4, 6); a validation runs before the
    # next stage starts, so it sees the stage that trained the step before it
    shapes = {0: (4, 16), 1: (4, 16), 2: (1, 32), 3: (1, 32), 4: (1, 64), 5: (1, 64)}
    assert [step for step, _ in got] == [2, 3, 4, 6]
    assert [shape for _, shape in got] == [shapes[step - 1] if follow else (4, 16) for step, _ in got]
    for r in module.seen:
        if "val_step" in r:
            t = r["shape"][1]
            assert torch.equal(r["ids"][0], torch.from_numpy(val[:t]).long())


def test_shuffled_text_is_refused_before_training(tmp_path):
    """Shuffled windows of one length cannot be re-cut at another from the same position: a clear error naming the
    setting, before any step."""
    from lit_longctx.datamodules import TextData

    path = tmp_path / "docs.txt"
    path.write_text("some text to train on. " * 400)
    dm = TextData(sources=[str(path)], tokenizer="byte", seq_len=16, batch_size=4, shuffle=True, val_fraction=0.0,
                  cache_dir=str(tmp_path / "cache"))
    module = Recorder()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        max_steps=6, callbacks=[ContextSchedule(STAGES)])
    with pytest.raises(ValueError, match="set data.init_args.shuffle: false"):
        trainer.fit(module, datamodule=dm)
    assert module.seen == []
