"""Tokens/s of one multi-sample request (``n`` = 4) in ``lit-longctx serve``'s engine: samples one by one vs batched.

The request goes through the server's model worker (:class:`lit_longctx.serve.engine.Engine`: its queue, ``drain``
and the method's session), in this process without HTTP so that only the decode is timed. ``--max_batch 1`` decodes
the n samples one after another (what every multi-sample request did before they were batched: a prefill and
``max_new_tokens`` steps per sample); the default ``--max_batch 8`` decodes them as the rows of one batch. Greedy
and sampled (temperature 0.8, top-k 50: each row draws from its own generator). The model is the quickstart
architecture (dim 256, 4 layers, 4 heads / 2 KV heads, ffn 704) with random weights (N(0, 0.3), EOS logit zeroed so
every sample runs its full length) and the byte tokenizer; 1 torch thread.

Usage:
    python bench/serve_samples.py                              # print the markdown section
    python bench/serve_samples.py --write docs/benchmarks.md   # also replace its section there
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import cpu_name, write_section  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_longctx.nn import ModelConfig, Transformer  # noqa: E402
from lit_longctx.serve.engine import Engine, Job, SampleParams  # noqa: E402
from lit_longctx.tokenizers import ByteTokenizer  # noqa: E402

QUICKSTART = dict(vocab_size=259, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704, max_seq_len=256,
                  norm_eps=1e-5)
HEADING = "## Serving: the samples of one request"


def random_model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**QUICKSTART)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    model.lm_head.weight.data[ByteTokenizer.eos_id] = 0
    return model


def timed(engine: Engine, ids: list[int], params: SampleParams) -> tuple[float, int]:
    """(seconds, tokens generated) of one request through the engine's queue."""
    count = [0]
    job = Job(threading.Event(), ids=ids, params=params, emit=lambda sample, token: count.__setitem__(0, count[0] + 1))
    start = time.perf_counter()
    engine.enqueue(job)
    engine.drain()
    job.future.result()
    return time.perf_counter() - start, count[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = ByteTokenizer()
    engine = Engine(random_model(), tokenizer, max_batch=8)
    ids = tokenizer.encode("x" * 127, bos=True)  # 128 prompt tokens
    load_before = os.getloadavg()[0]
    rows = []
    for label, sampling in (("greedy", {}), ("temperature 0.8, top-k 50", {"temperature": 0.8, "top_k": 50})):
        params = SampleParams(max_new_tokens=args.new, num_samples=args.samples, seed=0, **sampling)
        for max_batch in (1, 8):
            engine.max_batch = max_batch
            timed(engine, ids, params)  # warm-up
            runs = [timed(engine, ids, params) for _ in range(args.repeats)]
            wall = statistics.median(r[0] for r in runs)
            assert all(r[1] == args.samples * args.new for r in runs)
            rows.append((label, max_batch, wall, args.samples * args.new / wall))
    load_after = os.getloadavg()[0]
    lines = [
        HEADING,
        "",
        f"`bench/serve_samples.py`: one request for n = {args.samples} samples of a 128-token prompt, {args.new} new "
        "tokens each, through the server's model worker (`Engine`: queue, `drain`, the method's session; no HTTP). "
        "`--max_batch 1` decodes the samples one after another (as every multi-sample request did before its "
        "samples were batched); `--max_batch 8` decodes them as the rows of one batch (the prompt repeated, each row "
        "its own generator). Quickstart architecture (dim 256, 4 layers, 4/2 heads, ffn 704), random weights, byte "
        f"tokenizer, 1 torch thread; median of {args.repeats} after a warm-up.",
        "",
        f"Command ({datetime.date.today()}):",
        "",
        "    python bench/serve_samples.py --write docs/benchmarks.md",
        "",
        f"Hardware: {cpu_name()}, {os.cpu_count()} cores, no GPU; Python {platform.python_version()}, torch "
        f"{torch.__version__}; 1-minute load average {load_before:.1f} at the start and {load_after:.1f} at the end "
        "(the machine is shared with other jobs, so absolute times are noisy).",
        "",
        "| sampling | `--max_batch` | wall per request (s) | generated tokens/s | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for i, (label, max_batch, wall, tok_s) in enumerate(rows):
        base = rows[i - i % 2][3]
        lines.append(f"| {label} | {max_batch} | {wall:.3f} | {tok_s:.0f} | {tok_s / base:.2f}x |")
    section = "\n".join(lines)
    print(section)
    if args.write is not None:
        write_section(args.write, section, HEADING)


if __name__ == "__main__":
    main()
