"""Tiny checkpoints of every method and a real ``lit-longctx serve`` subprocess on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch

from lit_longctx.checkpoint import save_checkpoint
from lit_longctx.hf import to_hf
from lit_longctx.nn import ModelConfig, Transformer
from lit_longctx.tokenizers import ByteTokenizer

REPO = Path(__file__).resolve().parents[2]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
BASE = dict(vocab_size=259, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """Weights ~N(0, 0.3) instead of the 0.02 init, so greedy text varies instead of repeating one byte; EOS's output
    row is zero (logit 0, below the maximum of the other ~N(0, 1) logits), so greedy runs last as long as asked."""
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    model.lm_head.weight.data[ByteTokenizer.eos_id] = 0
    return model


def causal_hf_dir(path: Path, max_seq_len: int = 256) -> Path:
    """A plain LLaMA as an HF directory with a byte tokenizer and a chat template."""
    model = random_model(ModelConfig(**BASE, max_seq_len=max_seq_len))
    to_hf(model, path, tokenizer=ByteTokenizer())
    config = path / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": CHAT_TEMPLATE}))
    return path


def method_checkpoint(path: Path, method: str) -> Path:
    """A lit-longctx checkpoint of ``method`` (fot, landmark, lolcats_lora) trained to length 16-32."""
    tokenizer = ByteTokenizer()
    if method == "fot":
        config = ModelConfig(**{**BASE, "n_layers": 3}, max_seq_len=16, layer_attention={1: "fot"},
                             attention_options={"fot": {"mem_dtype": "float32", "last_context_length": 6}})
    elif method == "landmark":
        landmark = tokenizer.add_special_token("<landmark>")
        config = ModelConfig(**{**BASE, "vocab_size": tokenizer.vocab_size}, max_seq_len=32, attention="landmark",
                             attention_options={"landmark": {"landmark_id": landmark, "mem_freq": 4}})
    else:
        config = ModelConfig(**BASE, max_seq_len=32, attention="hybrid_linear",
                             attention_options={"hybrid_linear": {"window_size": 8, "feature_dim": 8, "window": "sw"}})
    return save_checkpoint(path, random_model(config), tokenizer=tokenizer, method=method)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running ``lit-longctx serve`` process; ``url`` is its base URL."""

    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc, self.url = proc, url

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def post(self, path: str, body: dict, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=kw.pop("timeout", 120), **kw)


@contextlib.contextmanager
def serving(checkpoint: Path, *args: str, timeout: float = 60) -> Iterator[Server]:
    """Start ``lit-longctx serve --checkpoint CKPT ARGS`` on a free loopback port; stop it afterwards."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lit_longctx.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
           *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Server(proc, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
            try:
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server did not come up")
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def serving_in_thread(checkpoint: Path, **options) -> Iterator[Server]:
    """The same app on a real uvicorn server on loopback, run on a thread of this process (no second interpreter
    start-up): what ``lit-longctx serve`` runs, built by :func:`lit_longctx.serve.server.build_server`."""
    import threading

    import uvicorn

    from lit_longctx.serve.server import build_server

    port = free_port()
    app = build_server(str(checkpoint), port=port, **options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not come up"
        time.sleep(0.02)
    try:
        yield Server(None, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.worker.shutdown(wait=True, cancel_futures=True)


def wait_until(server, done, timeout: float = 30) -> dict:
    """Poll ``server.health()`` until ``done(health)``; the last health (the test fails with it after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not done(h := server.health()):
        assert time.monotonic() < deadline, h
        time.sleep(0.01)
    return h
