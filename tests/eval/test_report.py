"""End to end through ``lightning.Trainer.test``: printed tables, results.json, PNGs, logged metrics, all ranks."""

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from lit_longctx.datamodules.passkey import LongDocData, PasskeyData
from lit_longctx.eval.report import RESULTS_FILE
from lit_longctx.tokenizers import ByteTokenizer
from tests.eval import EvalLM, read_key


def even_key_reply(prompt: str) -> str:
    """Right exactly when the key is even: accuracy then varies from cell to cell."""
    key = read_key(prompt)
    return f" {key}" if key % 2 == 0 else " 0"


def expected_accuracy(dm):
    """Per (length, depth) cell and per length, from the batches' answers (what even_key_reply must score)."""
    cells, lengths = {}, {}
    for b in dm.test_dataloader():
        hit = b["answer"] % 2 == 0
        cells.setdefault((b["length"], b["depth"]), []).append(hit)
        lengths.setdefault(b["length"], []).append(hit)
    mean = lambda xs: sum(xs) / len(xs)
    return {k: mean(v) for k, v in cells.items()}, {k: mean(v) for k, v in lengths.items()}


def trainer(tmp_path, **kwargs):
    kwargs.setdefault("logger", CSVLogger(tmp_path))
    return L.Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, **kwargs)


def parse_table(text, title_start):
    """Rows (lists of cells) of the printed table whose title line starts with ``title_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title_start))
    header = [c.strip() for c in lines[start + 1].split("|")]
    rows = []
    for line in lines[start + 3 :]:
        cells = [c.strip() for c in line.split("|")]
        if len(cells) != len(header):
            break
        rows.append(dict(zip(header, cells)))
    return rows


def assert_valid_png(path):
    assert path.is_file()
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG"
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 100


def test_passkey_test_run_writes_consistent_table_json_png_and_metrics(tmp_path, capsys):
    dm = PasskeyData(tokenizer="byte", lengths=[300, 450], depths=[0.0, 0.5, 1.0], trials=4, seed=3)
    module = EvalLM(even_key_reply)
    logged = trainer(tmp_path).test(module, datamodule=dm, verbose=False)[0]
    run = Path(tmp_path) / "lightning_logs" / "version_0"
    results = json.loads((run / RESULTS_FILE).read_text())["passkey"]

    cells, lengths = expected_accuracy(dm)
    assert {(c["length"], c["depth"]): c["accuracy"] for c in results["cells"]} == pytest.approx(cells)
    assert {r["length"]: r["accuracy"] for r in results["by_length"]} == pytest.approx(lengths)
    assert 0 < results["accuracy"] < 1 and results["total"] == 24 and len(results["samples"]) == 24
    assert all(r["mean_tokens"] == r["length"] for r in results["by_length"])  # byte prompts hit the length exactly

    rows = parse_table(capsys.readouterr().out, "passkey: accuracy")
    assert [row["length"] for row in rows] == ["300", "450", "all"]
    for row, by_length in zip(rows, results["by_length"]):
        assert float(row["all"]) == round(100 * by_length["accuracy"], 1)
        assert float(row["tokens"]) == round(by_length["mean_tokens"], 1)
        for depth in (0.0, 0.5, 1.0):
            cell = next(c for c in results["cells"] if c["length"] == by_length["length"] and c["depth"] == depth)
            assert float(row[f"d={depth:g}"]) == round(100 * cell["accuracy"], 1)
    assert float(rows[-1]["all"]) == round(100 * results["accuracy"], 1)

    assert_valid_png(run / "passkey_heatmap.png")
    assert logged["passkey/acc"] == pytest.approx(results["accuracy"])
    assert logged["passkey/acc@450"] == pytest.approx(lengths[450])
    assert logged["passkey/tokens@300"] == 300
    with open(run / "metrics.csv") as f:
        assert float(next(csv.DictReader(f))["passkey/acc"]) == pytest.approx(results["accuracy"])


def test_ppl_test_run_writes_consistent_table_json_and_plot(tmp_path, capsys):
    (tmp_path / "doc.txt").write_text("".join(f"Sentence {i} of a long and dull document. " for i in range(200)))
    dm = LongDocData(tokenizer="byte", document=str(tmp_path / "doc.txt"), lengths=[32, 64, 128], max_windows=3)
    logged = trainer(tmp_path).test(EvalLM(max_seq_len=64), datamodule=dm, verbose=False)[0]
    run = Path(tmp_path) / "lightning_logs" / "version_0"
    results = json.loads((run / RESULTS_FILE).read_text())["ppl_by_position"]
    assert results["windows"] == 3 and [b["end"] for b in results["buckets"]] == [32, 64, 128]
    assert [b["tokens"] for b in results["buckets"]] == [3 * 31, 3 * 32, 3 * 64]

    rows = parse_table(capsys.readouterr().out, "ppl_by_position:")
    assert [row["positions"] for row in rows] == ["0-32", "32-64", "64-128", "all"]
    for row, bucket in zip(rows, results["buckets"]):
        assert int(row["tokens"]) == bucket["tokens"]
        assert float(row["ppl"]) == round(bucket["ppl"], 4) and float(row["nll"]) == round(bucket["nll"], 4)
        assert float(row["cum_ppl"]) == round(bucket["cum_ppl"], 4)
    assert float(rows[-1]["ppl"]) == round(results["ppl"], 4)
    assert_valid_png(run / "ppl_by_position.png")
    assert logged["ppl_by_position/ppl@32-64"] == pytest.approx(results["buckets"][1]["ppl"])


def test_predict_returns_records_and_data_takes_the_models_tokenizer(tmp_path):
    dm = PasskeyData(lengths=[300], depths=[0.5], trials=3)  # no tokenizer: the module's is used
    module = EvalLM(even_key_reply)
    records = trainer(tmp_path, logger=False).predict(module, datamodule=dm)
    assert dm.tokenizer is module.tokenizer
    assert [r["correct"] for r in records] == [r["answer"] % 2 == 0 for r in records]
    assert [r["prediction"] for r in records] == [r["answer"] if r["answer"] % 2 == 0 else 0 for r in records]


class TokenizerFromCheckpoint(EvalLM):
    """Has no tokenizer until its checkpoint is loaded (as CausalLM restores the one saved with a checkpoint)."""

    def on_load_checkpoint(self, checkpoint):
        self.tokenizer = ByteTokenizer()


def test_data_takes_the_tokenizer_restored_from_ckpt_path(tmp_path):
    module = EvalLM(even_key_reply)
    fitter = trainer(tmp_path, logger=False, max_steps=1)
    fitter.fit(module, DataLoader(TensorDataset(torch.randint(0, 256, (4, 17))), batch_size=4))
    fitter.save_checkpoint(tmp_path / "last.ckpt")
    restored = TokenizerFromCheckpoint(even_key_reply)
    restored.tokenizer = None
    dm = PasskeyData(lengths=[300], depths=[0.5], trials=2)
    trainer(tmp_path, logger=False).test(restored, datamodule=dm, ckpt_path=tmp_path / "last.ckpt", verbose=False)
    assert restored.tokenizer is not None and dm.tokenizer is restored.tokenizer


def test_figures_reach_wandb(tmp_path):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lit-longctx-test")
    dm = PasskeyData(tokenizer="byte", lengths=[300], depths=[0.0, 1.0], trials=1)
    trainer(tmp_path, logger=logger).test(EvalLM(even_key_reply), datamodule=dm, verbose=False)
    logger.experiment.finish()
    images = list(Path(tmp_path).rglob("media/images/passkey/*.png"))
    assert len(images) == 1
    assert_valid_png(images[0])
    assert (Path(tmp_path) / RESULTS_FILE).is_file()  # WandbLogger's save_dir is the run directory


def test_figures_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    dm = PasskeyData(tokenizer="byte", lengths=[300], depths=[0.0, 1.0], trials=1)
    trainer(tmp_path, logger=logger).test(EvalLM(even_key_reply), datamodule=dm, verbose=False)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "passkey/plot" in events.Tags()["images"]


@pytest.mark.slow
def test_two_ranks_gather_every_prompt_once(tmp_path):
    """DDP (forked, gloo): lockstep shards padded with repeats; results.json counts each prompt exactly once."""
    dm = PasskeyData(tokenizer="byte", lengths=[300, 400], depths=[0.0, 0.5, 1.0], trials=1, seed=5)
    tr = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", default_root_dir=tmp_path,
                   logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False)
    tr.test(EvalLM(even_key_reply), datamodule=dm, verbose=False)
    results = json.loads((Path(tmp_path) / "lightning_logs" / "version_0" / RESULTS_FILE).read_text())["passkey"]
    answers = [b["answer"] for b in dm.test_dataloader()]
    assert results["total"] == 6
    assert sorted(s["answer"] for s in results["samples"]) == sorted(answers)
    assert results["accuracy"] == pytest.approx(sum(a % 2 == 0 for a in answers) / 6)
