"""Runs, checkpoints and data on S3 (a real moto server on loopback): resume after a kill, DCP shards, killed uploads,
remote data, and one clear line for each way remote storage is misconfigured."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import REPO, TINY_CONFIG, run, run_subprocess

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

#: pauses the run at the start of a chosen step (after the previous step's checkpoint was written), so the test can
#: SIGKILL it at a known point
PAUSE_CALLBACK = {"class_path": "tests.storage.helpers.PauseAtStep", "init_args": {"step": 3, "seconds": 120}}


def tiny_config(path: Path, root: str, corpus: Path, cache: Path) -> Path:
    text = TINY_CONFIG.format(root=root, corpus=corpus).replace(f"{root}/cache", str(cache))
    path.write_text(text)
    return path


def s3fs_client():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_fit_killed_then_resumed_from_s3_equals_an_uninterrupted_local_run(bucket, corpus, tmp_path):
    from lit_longctx.storage import newest_last_checkpoint

    local = tiny_config(tmp_path / "local.yaml", str(tmp_path / "run"), corpus, tmp_path / "cache")
    remote = tiny_config(tmp_path / "remote.yaml", f"{bucket}/run", corpus, tmp_path / "cache")
    args = ["--model.init_args.decay_steps=6", "--trainer.val_check_interval=3", "--trainer.max_steps=6",
            "--trainer.callbacks.init_args.every_n_train_steps=3"]
    straight = run("fit", "--config", str(local), *args)

    callbacks = json.dumps([
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": f"{bucket}/run/checkpoints", "save_last": True, "every_n_train_steps": 3}},
        PAUSE_CALLBACK,
    ])
    proc = subprocess.Popen([sys.executable, "-m", "lit_longctx.cli", "fit", "--config", str(remote), *args,
                             f"--trainer.callbacks={callbacks}"], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not s3fs_client().exists(f"{bucket}/run/paused-at-step-3") and proc.poll() is None:
        assert time.monotonic() < deadline, "the run never reached step 3"
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    last = newest_last_checkpoint(f"{bucket}/run")
    assert last == f"{bucket}/run/checkpoints/last.ckpt"
    resumed = run("fit", "--config", str(remote), *args, "--ckpt_path", "last")
    assert resumed.trainer.global_step == 6
    a, b = straight.model.model.state_dict(), resumed.model.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    fs = s3fs_client()
    assert fs.exists(f"{bucket}/run/logs/version_1/config.yaml")  # the resumed run's config and logs on S3 too
    assert any(p.endswith("metrics.csv") for p in fs.find(f"{bucket}/run/logs"))


def test_remote_text_sources_token_files_and_init_from_read_like_local_ones(bucket, corpus, tmp_path):
    from lit_longctx.checkpoint import read_checkpoint, save_checkpoint
    from lit_longctx.datamodules import TokenFiles
    from lit_longctx.datamodules.sources import as_source, load_documents
    from lit_longctx.datamodules.token_files import write_token_files
    from lit_longctx.modules import CausalLM
    from lit_longctx.nn import ModelConfig, Transformer

    fs = s3fs_client()
    fs.put_file(str(corpus), f"{bucket}/text/a.jsonl")
    fs.put_file(str(corpus), f"{bucket}/text/b.jsonl")
    remote_docs = list(load_documents(as_source(f"{bucket}/text/*.jsonl"), cache_dir=tmp_path / "ds"))
    local_docs = list(load_documents(as_source(str(corpus)), cache_dir=tmp_path / "ds"))
    assert remote_docs == local_docs + local_docs

    ids = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0))
    write_token_files(tmp_path / "tokens", {"train": ids, "val": ids[:500]}, vocab_size=256, tokenizer="byte")
    fs.put(str(tmp_path / "tokens") + "/", f"{bucket}/tokens", recursive=True)
    streams = [TokenFiles(data_dir=d, seq_len=32, train_order="shuffled").train_stream()
               for d in (str(tmp_path / "tokens"), f"{bucket}/tokens")]
    for i in range(5):
        assert torch.equal(streams[0].sample_at(0, i)["input_ids"], streams[1].sample_at(0, i)["input_ids"])

    model = Transformer(ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64))
    save_checkpoint(tmp_path / "m.ckpt", model)
    fs.put_file(str(tmp_path / "m.ckpt"), f"{bucket}/models/m.ckpt")
    module = CausalLM(init_from=f"{bucket}/models/m.ckpt")
    module.configure_model()
    for k, v in model.state_dict().items():
        assert torch.equal(module.model.state_dict()[k], v), k
    assert read_checkpoint(f"{bucket}/models/m.ckpt").model_config == model.config


@pytest.mark.slow
def test_fsdp2_sharded_checkpoint_round_trips_through_s3(bucket, corpus, tmp_path):
    from lit_longctx.checkpoint import read_checkpoint

    config = tiny_config(tmp_path / "remote.yaml", f"{bucket}/run", corpus, tmp_path / "cache")
    strategy = str(REPO / "configs/strategy/fsdp2.yaml")
    callbacks = json.dumps([
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": f"{bucket}/run/checkpoints", "save_last": True, "every_n_train_steps": 2}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",  # the final state again, to local disk
         "init_args": {"dirpath": str(tmp_path / "local"), "save_last": True, "every_n_train_steps": 4}},
    ])
    run_subprocess(["fit", "--config", str(config), "--config", strategy, "--trainer.devices=2",
                    f"--trainer.callbacks={callbacks}"], tmp_path)
    fs = s3fs_client()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/run/checkpoints/last.ckpt"))
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]  # one shard object per rank
    remote = read_checkpoint(f"{bucket}/run/checkpoints/last.ckpt")
    local = read_checkpoint(tmp_path / "local" / "last.ckpt")
    assert remote.state_dict.keys() == local.state_dict.keys()
    for k, v in local.state_dict.items():
        assert torch.equal(remote.state_dict[k], v), k

    # and back: both ranks restore their shards from S3; validation then reproduces the loss logged during fit
    proc = run_subprocess(["validate", "--config", str(config), "--config", strategy, "--trainer.devices=2",
                           "--ckpt_path", "last"], tmp_path)
    with fs.open(f"{bucket}/run/logs/version_0/metrics.csv") as f:
        rows = [line.split(",") for line in f.read().decode().splitlines()]
    col = rows[0].index("val/loss")
    logged = [float(r[col]) for r in rows[1:] if r[col]][-1]
    shown = [line for line in proc.stdout.splitlines() if "val/loss" in line][-1]
    assert float(shown.replace("│", " ").split()[-1]) == pytest.approx(logged, rel=1e-5)


@pytest.mark.slow
def test_a_save_killed_during_its_upload_never_breaks_last(bucket, corpus, tmp_path):
    """A ~130 MB checkpoint goes up as a multipart upload (s3fs uses one from 100 MB); SIGKILL while its parts are in
    flight leaves the previous last.ckpt resolvable and loadable, and a resume from it finishes."""
    import boto3

    from lit_longctx.storage import newest_last_checkpoint

    config = tiny_config(tmp_path / "remote.yaml", f"{bucket}/run", corpus, tmp_path / "cache")
    big = ["--model.init_args.model={dim: 512, n_layers: 4, n_heads: 4, n_kv_heads: 4, ffn_dim: 1024}",
           "--trainer.callbacks.init_args.every_n_train_steps=1", "--trainer.callbacks.init_args.save_top_k=0",
           "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1"]
    proc = subprocess.Popen([sys.executable, "-m", "lit_longctx.cli", "fit", "--config", str(config), *big],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = boto3.client("s3")
    name = bucket[len("s3://"):]
    key = "run/checkpoints/last.ckpt"
    fs = s3fs_client()
    deadline = time.monotonic() + 240
    killed_during = None
    while proc.poll() is None and time.monotonic() < deadline:
        uploads = client.list_multipart_uploads(Bucket=name).get("Uploads", [])
        if fs.exists(f"{bucket}/{key}") and any(u["Key"] == key for u in uploads):
            proc.send_signal(signal.SIGKILL)
            killed_during = [u for u in uploads if u["Key"] == key]
            break
        fs.invalidate_cache()
        time.sleep(0.02)
    proc.wait()
    assert killed_during, "the kill did not land inside an upload of last.ckpt: " + proc.stderr.read()[-2000:]
    assert client.list_multipart_uploads(Bucket=name).get("Uploads")  # the interrupted upload never completed

    last = newest_last_checkpoint(f"{bucket}/run")
    assert last == f"{bucket}/{key}"
    with fs.open(last, "rb") as f:
        ckpt = torch.load(f, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1  # the step-2 save was the one killed
    resumed = run("fit", "--config", str(config), *big, "--ckpt_path", "last")
    assert resumed.trainer.global_step == 2


@pytest.mark.parametrize("case", ["unreachable", "no-credentials", "no-bucket"])
def test_misconfigured_remote_storage_is_one_clear_line(case, bucket, corpus, tmp_path, monkeypatch, capsys):
    from lit_longctx.cli import main
    from tests.storage.conftest import _free_port

    config = tiny_config(tmp_path / "remote.yaml", f"{bucket}/run", corpus, tmp_path / "cache")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    args = ["fit", "--config", str(config)]
    if case == "unreachable":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
        expected = "cannot reach the storage endpoint"
    elif case == "no-credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        expected = "no credentials for 's3://"
    else:
        args += ["--trainer.default_root_dir", "s3://no-such-bucket/run"]
        expected = "bucket 'no-such-bucket' of 's3://no-such-bucket/run' does not exist"
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "Traceback" not in err
    line = err.splitlines()[-1]
    assert line.startswith("error: ") and expected in line, line
    monkeypatch.undo()
    assert not s3fs_client().find(f"{bucket}/run")  # nothing half-written
