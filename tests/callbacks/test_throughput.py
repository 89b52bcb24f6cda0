"""ThroughputCallback inside a real CPU Trainer, driven by a controlled clock (spec pretraining §1, §7 oracles 1-2).

The module advances a fake clock by exactly MODEL_S in each training_step and DATA_S when each batch arrives, so
every logged number has a closed form. Times are binary fractions, so the arithmetic is exact up to rounding of the
final divisions.
"""

import pytest
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lit_longctx.callbacks.throughput as throughput_module
from lit_longctx.callbacks import ThroughputCallback
from lit_longctx.flops import flops_per_batch
from lit_longctx.nn import ModelConfig, Transformer

MODEL_S, DATA_S = 0.5, 0.125
B, T, G = 4, 16, 2  # rows, tokens per row, accumulation
F_TOK = 7_006_632_960  # spec oracle 1: N=1e9, L=20, H=16, Q=128, T=2048
F_MB = F_TOK * 2048 * 4  # one micro-batch of 4 rows of 2048 tokens, so B·G = 8 per iteration
PEAK = 312e12


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Tokens(Dataset):
    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.zeros(self.lengths[i], dtype=torch.long), "x": torch.ones(2)}


class Timed(LightningModule):
    def __init__(self, clock: Clock, flops: float | None = F_MB, lengths: list[int] | None = None) -> None:
        super().__init__()
        self.clock = clock
        self.layer = nn.Linear(2, 1)
        self.lengths = lengths or [T] * 400
        if flops is not None:
            self.flops_per_batch = flops

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.clock.advance(DATA_S)
        return batch

    def training_step(self, batch, batch_idx):
        self.clock.advance(MODEL_S)
        return self.layer(batch["x"]).sum()

    def validation_step(self, batch, batch_idx):
        self.clock.advance(3.0)

    def on_save_checkpoint(self, checkpoint):
        self.clock.advance(2.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(Tokens(self.lengths), batch_size=B)

    def val_dataloader(self):
        return DataLoader(Tokens([T] * 8), batch_size=B)


class Recorder(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []
        self.hparams: dict = {}

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self.hparams.update(dict(params))

    def logged(self, key: str) -> dict[int, float]:
        """step -> value of ``key`` over the run."""
        return {step: m[key] for step, m in self.rows if key in m}


def fit(module: LightningModule, callback: ThroughputCallback, tmp_path, clock: Clock, *others, **trainer_kwargs):
    """Train 4 optimizer steps of G micro-batches with ``callback`` on ``clock``; return what was logged."""
    callback.clock = clock
    logger = Recorder()
    kwargs = dict(
        accelerator="cpu", devices=1, max_steps=4, accumulate_grad_batches=G, log_every_n_steps=1, logger=logger,
        callbacks=[callback, *others], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp_path,
    )
    kwargs.update(trainer_kwargs)
    logger.trainer = Trainer(**kwargs)
    logger.trainer.fit(module)
    return logger


@pytest.fixture
def clock() -> Clock:
    return Clock()


# ---------------------------------------------------------------------------------------- oracle 2 (Lightning)
def test_lightning_throughput_window_oracle():
    tp = Throughput(available_flops=1e12, window_size=2)
    tp.update(time=1, batches=1, samples=4, flops=1e12)
    assert "device/mfu" not in tp.compute()  # window not full yet
    tp.update(time=2, batches=2, samples=8, flops=1e12)
    m = tp.compute()
    assert (m["device/flops_per_sec"], m["device/mfu"], m["device/samples_per_sec"]) == (1e12, 1.0, 4)
    with pytest.raises(ValueError, match="Expected the value to increase"):
        tp.update(time=2, batches=3, samples=12, flops=1e12)


# ------------------------------------------------------------------------------------------ callback in a Trainer
def test_mfu_mtu_and_tokens_per_second_match_the_formulas(tmp_path, clock):
    log = fit(Timed(clock), ThroughputCallback(peak_flops=PEAK, window_size=2), tmp_path, clock)

    t_model, t_iter = G * MODEL_S, G * (MODEL_S + DATA_S)  # 1.0 s and 1.25 s
    # the first iteration is warm-up (as in ALLaMo); steps 1..3 are iterations 2..4
    assert log.logged("train/mfu_model_time") == {s: pytest.approx(0.367938, abs=5e-7) for s in (1, 2, 3)}
    assert log.logged("train/mfu_model_time")[1] == pytest.approx(F_MB * G / (t_model * PEAK), rel=1e-12)
    assert log.logged("train/mtu") == {s: pytest.approx(0.8, rel=1e-12) for s in (1, 2, 3)}
    assert log.logged("train/model_time") == {s: pytest.approx(t_model, rel=1e-12) for s in (1, 2, 3)}
    assert log.logged("train/iter_time") == {s: pytest.approx(t_iter, rel=1e-12) for s in (1, 2, 3)}
    assert log.logged("train/device/tokens_per_sec") == {s: pytest.approx(G * B * T / t_iter) for s in (1, 2, 3)}
    assert "train/tokens_per_sec" not in log.rows[-1][1]  # global variants only with several devices

    # Lightning's rates over a window of 2 micro-batches of wall-clock time, logged once per completed iteration
    mb = MODEL_S + DATA_S
    assert log.logged("train/device/mfu") == {s: pytest.approx(F_MB / mb / PEAK, rel=1e-12) for s in (0, 1, 2, 3)}
    assert log.logged("train/device/items_per_sec") == {s: pytest.approx(B * T / mb) for s in (0, 1, 2, 3)}
    assert log.logged("train/device/samples_per_sec")[3] == pytest.approx(B / mb)
    assert log.logged("train/time")[3] == pytest.approx(4 * t_iter)
    assert log.logged("train/lengths")[3] == 4 * G * B * T
    # the two bases agree: wall-clock MFU = model-time MFU × MTU
    assert log.logged("train/device/mfu")[2] == pytest.approx(
        log.logged("train/mfu_model_time")[2] * log.logged("train/mtu")[2], rel=1e-12
    )
    assert log.hparams["throughput/peak_flops"] == PEAK
    assert log.hparams["throughput/peak_flops_source"] == "peak_flops argument"


def test_validation_and_checkpoint_time_are_excluded(tmp_path, clock):
    # validation after micro-batches 3 and 6 (inside iterations 2 and 3) costs 3 s each, every checkpoint 2 s
    checkpoints = ModelCheckpoint(tmp_path, every_n_train_steps=1, save_top_k=-1)
    log = fit(
        Timed(clock), ThroughputCallback(peak_flops=PEAK, window_size=2), tmp_path, clock, checkpoints,
        limit_val_batches=1, val_check_interval=3, num_sanity_val_steps=0, enable_checkpointing=True,
    )

    assert len(list(tmp_path.glob("*.ckpt"))) == 4
    assert clock.now - 1000 == pytest.approx(4 * 1.25 + 2 * (3.0 + DATA_S) + 4 * 2.0)  # the exclusions did happen
    assert log.logged("train/mtu") == {s: pytest.approx(0.8, rel=1e-12) for s in (1, 2, 3)}
    assert log.logged("train/iter_time") == {s: pytest.approx(1.25, rel=1e-12) for s in (1, 2, 3)}
    assert log.logged("train/time")[3] == pytest.approx(4 * 1.25)
    assert log.logged("train/device/samples_per_sec")[2] == pytest.approx(B / (MODEL_S + DATA_S))
    assert "save_checkpoint" not in vars(log.trainer)  # the timing wrapper is gone after fit


def test_missing_flops_per_batch_warns_once_and_still_logs_throughput_and_mtu(tmp_path, clock):
    with pytest.warns(UserWarning, match="has no `flops_per_batch`") as caught:
        log = fit(Timed(clock, flops=None), ThroughputCallback(peak_flops=PEAK, window_size=2), tmp_path, clock)
    assert sum("flops_per_batch" in str(w.message) for w in caught) == 1
    keys = set().union(*(m for _, m in log.rows))
    assert {"train/mtu", "train/device/tokens_per_sec", "train/device/items_per_sec"} <= keys
    assert not {k for k in keys if "mfu" in k or "flops" in k}
    assert log.logged("train/mtu")[3] == pytest.approx(0.8, rel=1e-12)


def test_peak_flops_from_lightning_table_for_the_precision_dtype(tmp_path, clock, monkeypatch):
    asked = []

    def table(device, dtype):
        asked.append((device.type, dtype))
        return 2e12

    monkeypatch.setattr(throughput_module, "get_available_flops", table)
    log = fit(Timed(clock), ThroughputCallback(window_size=2), tmp_path, clock, precision="bf16-mixed")
    assert asked == [("cpu", torch.bfloat16)]
    assert log.logged("train/mfu_model_time")[2] == pytest.approx(F_MB * G / (G * MODEL_S * 2e12), rel=1e-12)
    assert log.logged("train/device/mfu")[2] == pytest.approx(F_MB / (MODEL_S + DATA_S) / 2e12, rel=1e-12)
    assert log.hparams["throughput/peak_flops"] == 2e12
    assert log.hparams["throughput/peak_flops_source"] == "lightning get_available_flops(cpu, torch.bfloat16)"


def test_cpu_without_peak_flops_warns_and_logs_no_mfu(tmp_path, clock):
    with pytest.warns(UserWarning, match=r"no peak FLOP/s known for cpu.*Pass ThroughputCallback\(peak_flops=...\)"):
        log = fit(Timed(clock), ThroughputCallback(window_size=2), tmp_path, clock)
    keys = set().union(*(m for _, m in log.rows))
    assert "train/device/flops_per_sec" in keys and "train/mtu" in keys
    assert not {k for k in keys if "mfu" in k}
    assert "throughput/peak_flops" not in log.hparams


def test_own_log_interval_counts_optimizer_steps(tmp_path, clock):
    log = fit(Timed(clock), ThroughputCallback(peak_flops=PEAK, window_size=2, log_every_n_steps=2), tmp_path, clock)
    assert set(log.logged("train/device/mfu")) == {1, 3}  # iterations 2 and 4
    assert log.logged("train/mtu") == {1: pytest.approx(0.8, rel=1e-12), 3: pytest.approx(0.8, rel=1e-12)}


class WithTransformer(Timed):
    def __init__(self, clock: Clock, lengths: list[int]) -> None:
        super().__init__(clock, flops=None, lengths=lengths)
        self.model = Transformer(ModelConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, ffn_dim=32))


@pytest.mark.parametrize("include_embedding", [False, True])
def test_palm_formula_follows_the_context_length_in_use(tmp_path, clock, monkeypatch, include_embedding):
    # micro-batches of T=16 and T=48 rows: iteration 2 has one of each, iteration 3 two of T=48
    lengths = [16] * B + [16] * B + [48] * B + [16] * B + [48] * 8 * B
    module = WithTransformer(clock, lengths)
    counted = []

    def slow_count(*args):  # counting a new shape takes 5 s, which must not land in the iteration time
        counted.append(args[2])
        clock.advance(5.0)
        return flops_per_batch(*args)

    monkeypatch.setattr(throughput_module, "flops_per_batch", slow_count)
    callback = ThroughputCallback(peak_flops=PEAK, window_size=2, formula="palm", include_embedding=include_embedding)
    log = fit(module, callback, tmp_path, clock)

    def f(t):
        return flops_per_batch(module.model.config, B, t, include_embedding=include_embedding)

    t_model = G * MODEL_S
    assert log.logged("train/mfu_model_time")[1] == pytest.approx((f(48) + f(16)) / (t_model * PEAK), rel=1e-12)
    assert log.logged("train/mfu_model_time")[2] == pytest.approx(2 * f(48) / (t_model * PEAK), rel=1e-12)
    assert log.logged("train/device/tokens_per_sec")[1] == pytest.approx(B * (48 + 16) / 1.25, rel=1e-12)
    assert counted == [16, 48]  # once per shape
    assert log.logged("train/mtu") == {s: pytest.approx(0.8, rel=1e-12) for s in (1, 2, 3)}
    expected = "palm+embedding (ALLaMo)" if include_embedding else "palm"
    assert log.hparams["throughput/flops_formula"] == expected


def test_formula_needs_a_transformer(tmp_path, clock):
    with pytest.raises(TypeError, match="must be a lit_longctx Transformer.*formula='module'"):
        fit(Timed(clock), ThroughputCallback(peak_flops=PEAK, formula="palm"), tmp_path, clock)


def test_module_formula_name_is_logged(tmp_path, clock):
    module = Timed(clock)
    module.flops_formula = "palm"
    log = fit(module, ThroughputCallback(peak_flops=PEAK, window_size=2), tmp_path, clock)
    assert log.hparams["throughput/flops_formula"] == "palm"


def test_batches_without_input_ids_are_refused(tmp_path, clock):
    class Plain(Timed):
        def on_after_batch_transfer(self, batch, dataloader_idx):
            return {"x": batch["x"]}

    with pytest.raises(TypeError, match=r"batch\['input_ids'\], a \(B, T\) tensor; got a dict with keys \['x'\]"):
        fit(Plain(clock), ThroughputCallback(peak_flops=PEAK), tmp_path, clock)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(peak_flops=0.0), "peak_flops must be positive"),
        (dict(window_size=1), "window_size must be at least 2"),
        (dict(log_every_n_steps=0), "log_every_n_steps must be >= 1"),
        (dict(formula="megatron"), "formula='megatron' is unknown; use one of module, palm, measured"),
        (dict(include_embedding=True), "include_embedding=True only applies to formula='palm'"),
        (dict(tensor_parallel=2), "only used with formula='palm' or 'measured'"),
        (dict(formula="palm", tensor_parallel=0), "must be >= 1"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ThroughputCallback(**kwargs)


@pytest.mark.slow
def test_two_processes_log_global_rates(tmp_path, clock):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    callback = ThroughputCallback(peak_flops=PEAK, window_size=2)
    callback.clock = clock  # forked with the module: one clock per rank, shared by both
    Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", max_steps=3, accumulate_grad_batches=G,
        log_every_n_steps=1, logger=CSVLogger(tmp_path, name="run", version=0), callbacks=[callback],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
    ).fit(Timed(clock))

    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    last = {k: float(v) for k, v in rows[-1].items() if v}
    mb = MODEL_S + DATA_S
    assert last["train/device/samples_per_sec"] == pytest.approx(B / mb)
    assert last["train/samples_per_sec"] == pytest.approx(2 * B / mb)
    assert last["train/flops_per_sec"] == pytest.approx(2 * F_MB / mb)
    assert last["train/device/mfu"] == pytest.approx(F_MB / mb / PEAK)
    assert last["train/device/tokens_per_sec"] == pytest.approx(G * B * T / 1.25)
    assert last["train/tokens_per_sec"] == pytest.approx(2 * G * B * T / 1.25)
    assert last["train/mtu"] == pytest.approx(0.8)
    assert last["train/mfu_model_time"] == pytest.approx(F_MB * G / (G * MODEL_S * PEAK))


@pytest.mark.gpu
def test_on_cuda_with_the_real_clock_the_two_bases_are_consistent(tmp_path):
    callback = ThroughputCallback(peak_flops=PEAK, window_size=2)
    log = Recorder()
    Trainer(
        accelerator="cuda", devices=1, max_steps=4, accumulate_grad_batches=G, log_every_n_steps=1, logger=log,
        callbacks=[callback], enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        limit_val_batches=0, default_root_dir=tmp_path,
    ).fit(Timed(Clock()))
    for step in (1, 2, 3):
        assert 0 < log.logged("train/model_time")[step] <= log.logged("train/iter_time")[step]
        assert 0 < log.logged("train/mtu")[step] <= 1
        assert log.logged("train/mfu_model_time")[step] == pytest.approx(
            F_MB * G / (log.logged("train/model_time")[step] * PEAK), rel=1e-9
        )
