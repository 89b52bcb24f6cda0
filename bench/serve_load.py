"""Bounded load test of ``lit-longctx serve`` on loopback.

Each run starts the real command (``python -m lit_longctx.cli serve``) in a subprocess on 127.0.0.1, then:
- 1, 4 and 16 concurrent clients, each sending ``POST /completions`` with a 128-token prompt (BOS + 127 bytes) and
  ``max_new_tokens`` 64, greedy, until ``--requests`` requests have completed or ``--duration`` seconds have passed
  (whichever comes first; nothing runs open-ended). Reported: requests/s, p50/p99 latency, generated tokens/s;
- a 16k-token prompt (+ 64 new tokens) on a memory method (FoT, LongLLaMA's schedule) of the same size: latency and
  prompt tokens/s, ``--long-requests`` requests one after another;
- the same 128 + 64 greedy decode with ``transformers``' ``LlamaForCausalLM.generate`` on the exported weights, in this
  process without HTTP (what its text-generation pipeline calls; the pipeline itself needs an HF tokenizer class,
  which the byte-level tokenizer is not), as the single-client baseline.

The model is the quickstart architecture (dim 256, 4 layers, 4 heads / 2 KV heads, ffn 704, max_seq_len 256) with
random weights (N(0, 0.3), EOS logit zeroed so every request generates exactly 64 tokens) and the byte tokenizer
(vocabulary 259 instead of the quickstart's 2,048), so no training is needed; timing does not depend on the values.

Usage:
    python bench/serve_load.py                              # print the markdown section
    python bench/serve_load.py --write docs/benchmarks.md   # also replace the "Serving" section there
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import cpu_name, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lit_longctx.checkpoint import save_checkpoint  # noqa: E402
from lit_longctx.hf import to_hf  # noqa: E402
from lit_longctx.nn import ModelConfig, Transformer  # noqa: E402
from lit_longctx.tokenizers import ByteTokenizer  # noqa: E402

QUICKSTART = dict(vocab_size=259, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704, max_seq_len=256,
                  norm_eps=1e-5)


def random_model(config: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(config).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    model.lm_head.weight.data[ByteTokenizer.eos_id] = 0
    return model


def start_server(checkpoint: Path, threads: int, *options: str) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "lit_longctx.cli", "serve", "--checkpoint", str(checkpoint),
                             "--port", str(port), *options], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.2)


def load(url: str, clients: int, requests: int, duration: float, prompt: str, new: int) -> dict[str, float]:
    """``clients`` threads send requests back to back until ``requests`` completed or ``duration`` s passed."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    start = time.perf_counter()
    stop_at = start + duration

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while time.perf_counter() < stop_at:
                with lock:
                    if len(latencies) + clients_busy[0] >= requests:
                        return
                    clients_busy[0] += 1
                t = time.perf_counter()
                r = http.post(url + "/completions", json={"prompt": prompt, "max_new_tokens": new})
                r.raise_for_status()
                with lock:
                    clients_busy[0] -= 1
                    latencies.append(time.perf_counter() - t)
                    tokens[0] += len(r.json()["completions"][0]["token_ids"])

    clients_busy = [0]
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    stats = httpx.get(url + "/health", timeout=10).json()["stats"]
    return {"clients": clients, "n": len(lat), "wall": wall, "rps": len(lat) / wall,
            "p50": statistics.median(lat), "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "tok_s": tokens[0] / wall, "batch": max(stats["largest_batch"], 1)}


def hf_baseline(model: Transformer, directory: Path, prompt_ids: list[int], new: int, reps: int) -> dict[str, float]:
    from transformers import LlamaForCausalLM

    to_hf(model, directory, tokenizer=ByteTokenizer())
    hf = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    times = []
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)  # warm-up
        for _ in range(reps):
            t = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            times.append(time.perf_counter() - t)
    assert out.shape[1] == len(prompt_ids) + new
    return {"p50": statistics.median(times), "tok_s": new / statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds per concurrency level at most")
    parser.add_argument("--long-tokens", type=int, default=16384)
    parser.add_argument("--long-requests", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--write", type=Path, help="replace the Serving section of this markdown file")
    args = parser.parse_args()

    prompt = "x" * 127  # + BOS = 128 tokens
    new = 64
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    model = random_model(ModelConfig(**QUICKSTART))
    causal = save_checkpoint(work / "quickstart.ckpt", model, tokenizer=ByteTokenizer())
    fot_config = ModelConfig(**QUICKSTART, layer_attention={1: "fot", 3: "fot"},
                             attention_options={"fot": {"mem_dtype": "float32", "last_context_length": 128}})
    fot = save_checkpoint(work / "fot.ckpt", random_model(fot_config), tokenizer=ByteTokenizer(), method="fot")

    load_before = os.getloadavg()[0]
    rows = []
    proc, url = start_server(causal, args.threads)
    try:
        load(url, 1, 2, 60, prompt, new)  # warm-up
        for clients in (1, 4, 16):
            rows.append(load(url, clients, args.requests, args.duration, prompt, new))
            print(rows[-1], file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait()
    proc, url = start_server(causal, args.threads, "--max_batch", "1")  # the same load, one request at a time
    try:
        load(url, 1, 2, 60, prompt, new)  # warm-up
        rows.append({**load(url, 16, args.requests, args.duration, prompt, new), "clients": "16, `--max_batch 1`"})
        print(rows[-1], file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait()

    long_rows = []
    proc, url = start_server(fot, args.threads)
    try:
        long_prompt = "x" * (args.long_tokens - 1)
        for _ in range(args.long_requests):
            t = time.perf_counter()
            r = httpx.post(url + "/completions", json={"prompt": long_prompt, "max_new_tokens": new}, timeout=3600)
            r.raise_for_status()
            long_rows.append(time.perf_counter() - t)
            print("long", long_rows[-1], file=sys.stderr)
        session = httpx.get(url + "/health").json()["stats"]["last_session"]
    finally:
        proc.terminate()
        proc.wait()

    torch.set_num_threads(args.threads)
    base = hf_baseline(model, work / "hf", [ByteTokenizer.bos_id] + list(prompt.encode()), new, 5)

    load_after = os.getloadavg()[0]
    import fastapi
    import transformers
    import uvicorn

    lines = [
        "## Serving",
        "",
        "`bench/serve_load.py`: `lit-longctx serve` started as a subprocess on 127.0.0.1, loaded by 1, 4 and 16 "
        "concurrent HTTP clients (threads with keep-alive `httpx` clients) sending `POST /completions` back to back: "
        f"128-token prompts, {new} new tokens, greedy; each level stops after {args.requests} requests or "
        f"{args.duration:.0f} s. The model is the quickstart architecture (dim 256, 4 layers, 4/2 heads, ffn 704) "
        "with random weights and the byte tokenizer (vocabulary 259; every request generates exactly 64 tokens). "
        "The server's worker decodes the requests queued when it is free as one left-padded batch (up to "
        "`--max_batch`, default 8; requests queue up to `--max_concurrent`); \"largest batch\" is the largest so far "
        "(`/health` stats, cumulative over the levels). One client leaves the worker idle while it reads an answer "
        "and sends the next request. The last row is the 16-client level on a second server started with "
        "`--max_batch 1` (every request alone, as before batching).",
        "",
        f"Command ({datetime.date.today()}):",
        "",
        f"    python bench/serve_load.py --requests {args.requests} --threads {args.threads} "
        "--write docs/benchmarks.md",
        "",
        f"Hardware: {cpu_name()}, {os.cpu_count()} cores ({args.threads} torch thread in the server), no GPU; "
        f"Python {platform.python_version()}, torch {torch.__version__}, fastapi {fastapi.__version__}, uvicorn "
        f"{uvicorn.__version__}, transformers {transformers.__version__}. The machine was shared with other jobs "
        f"(1-minute load average {load_before:.0f} at the start, {load_after:.0f} at the end, on {os.cpu_count()} "
        "cores), so absolute times are inflated and noisy.",
        "",
        "| clients | requests | wall (s) | requests/s | p50 latency (s) | p99 latency (s) | generated tokens/s "
        "| largest batch |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['n']} | {r['wall']:.1f} | {r['rps']:.2f} | {r['p50']:.3f} | "
                     f"{r['p99']:.3f} | {r['tok_s']:.0f} | {r['batch']} |")
    lines += [
        "",
        f"- Baseline without HTTP: `transformers` `LlamaForCausalLM.generate` (sdpa, greedy) on the same weights "
        f"exported by `lit_longctx.hf.to_hf` (what `lit-longctx convert to-hf` writes): {base['p50']:.3f} s per "
        f"128 + {new} request "
        f"({base['tok_s']:.0f} tokens/s), median of 5. The `text-generation` pipeline was not used: it needs an HF "
        "tokenizer class and the byte tokenizer has none. `litgpt serve` was not tried: it needs its own checkpoint "
        "conversion and an HF tokenizer as well.",
        f"- Long prompt on a memory method: the same architecture with FoT memory layers 1 and 3 "
        f"(`last_context_length` 128, window 256), served through `{session}`: a {args.long_tokens:,}-token prompt "
        f"+ {new} new tokens took {', '.join(f'{t:.1f}' for t in long_rows)} s "
        f"({args.long_tokens / min(long_rows):,.0f} prompt tokens/s at best), {args.long_requests} request(s) one "
        "after another. The plain model refuses such a prompt (422: over its max_seq_len of 256).",
    ]
    section = "\n".join(lines)
    print(section)
    if args.write:
        write_section(args.write, section, "## Serving")


if __name__ == "__main__":
    main()
