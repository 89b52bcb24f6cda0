"""Checkpoint save/load time and size: local disk vs a local S3 server (moto_server on 127.0.0.1).

The checkpoint is what ``lit-longctx fit`` writes: the model's weights plus AdamW's two moment buffers (after one real
optimizer step), saved and loaded through Lightning's ``TorchCheckpointIO`` (the same code path as ``ModelCheckpoint``
and ``--ckpt_path``: ``torch.save`` into memory, then one write through fsspec; S3 uploads of 100 MB and more are
multipart). Models: the quickstart config (~4M parameters) and a ~110M-parameter LLaMA.

    python bench/storage.py            # starts and stops its own moto_server; prints a markdown table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

MODELS = {
    "quickstart": dict(vocab_size=2048, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704),
    "~110M": dict(vocab_size=16000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048),
}


def _checkpoint(spec: dict) -> tuple[dict, int]:
    from lit_longctx.nn import ModelConfig, Transformer

    model = Transformer(ModelConfig(**spec, max_seq_len=64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, spec["vocab_size"], (1, 16))
    model(ids, labels=ids).loss.backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    return {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "global_step": 1}, n


def _start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many saves and loads")
    args = parser.parse_args()
    proc, endpoint = _start_moto()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_ENDPOINT_URL": endpoint,
                       "AWS_DEFAULT_REGION": "us-east-1"})
    # moto assembles a multipart upload in Python (minutes for 1 GB on a busy CPU): wait for it instead of
    # retrying after botocore's 60 s read timeout (fsspec reads FSSPEC_S3 when it is imported)
    os.environ["FSSPEC_S3"] = json.dumps({"config_kwargs": {"read_timeout": 1800, "retries": {"max_attempts": 1}}})
    try:
        import s3fs
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem().mkdir(bucket)
        io = TorchCheckpointIO()
        rows = []
        with tempfile.TemporaryDirectory() as d:
            for name, spec in MODELS.items():
                ckpt, n = _checkpoint(spec)
                for where, path in (("local disk", str(Path(d) / "last.ckpt")),
                                    ("S3 (moto, loopback)", f"s3://{bucket}/run/last.ckpt")):
                    save = _time(lambda path=path, ckpt=ckpt: io.save_checkpoint(ckpt, path), args.repeats)
                    load = _time(lambda path=path: io.load_checkpoint(path, weights_only=True), args.repeats)
                    size = (Path(path).stat().st_size if not path.startswith("s3://")
                            else s3fs.S3FileSystem().info(path)["size"])
                    rows.append((name, f"{n / 1e6:.1f}M", where, size / 2**20, save, load))
        print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}; best of {args.repeats}\n")
        print("| model | parameters | storage | checkpoint size (MiB) | save (s) | load (s) |")
        print("|---|---|---|---|---|---|")
        for name, n, where, size, save, load in rows:
            print(f"| {name} | {n} | {where} | {size:.1f} | {save:.2f} | {load:.2f} |")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
