"""Requests/s of the lm-evaluation-harness wrapper's ``loglikelihood`` at several batch sizes (docs/benchmarks.md).

A multiple-choice task's requests (question + " Answer:" as context, each of 4 choices as continuation; questions of
varied length cut from Python's own documentation topics) go through ``SessionLM.loglikelihood`` at each batch size,
one after the other in one run; the scores of every batch size are compared with batch size 1.

    python bench/harness_batch.py --requests 200 --batch_sizes 1 4 16 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from pathlib import Path
from pydoc_data.topics import topics

import torch
from benchlib import cpu_name, write_section
from lm_eval.api.instance import Instance

from lit_longctx.eval.harness import SessionLM
from lit_longctx.nn import ModelConfig, Transformer
from lit_longctx.tokenizers import ByteTokenizer

HEADING = "## Harness evaluation: batched requests"


def mc_requests(n_requests: int, seed: int, low: int, high: int) -> list[Instance]:
    """4 loglikelihood requests per question (the choices), questions ``low``-``high`` bytes long."""
    rng = random.Random(seed)
    text = " ".join(" ".join(topics.values()).split())
    out = []
    for q in range(n_requests // 4):
        start, length = rng.randrange(len(text) - 500), rng.randrange(low, high)
        context = f"Question: {text[start:start + length]} Answer:"
        for choice in ("yes", "no", "maybe", "it depends"):
            out.append(Instance(request_type="loglikelihood", doc={}, arguments=(context, " " + choice), idx=q))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--question_bytes", nargs="+", default=["40:400", "8:60"],
                        help="question length ranges MIN:MAX (bytes), one table block each")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # the quickstart architecture (configs/quickstart.yaml) with random weights and the byte tokenizer
    config = ModelConfig(vocab_size=260, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704, max_seq_len=512)
    model = Transformer(config)
    model.init_weights()
    model.eval()
    load = [os.getloadavg()[0]]
    rows, spans = [], []
    for span in args.question_bytes:
        low, high = (int(x) for x in span.split(":"))
        requests = mc_requests(args.requests, args.seed, low, high)
        lengths = [len(r.args[0]) + len(r.args[1]) + 1 for r in requests]
        spans.append(f"{low}-{high} bytes ({min(lengths)}-{max(lengths)} tokens with BOS)")
        reference, base = None, 0.0
        for b in args.batch_sizes:
            lm = SessionLM(model, ByteTokenizer(), batch_size=b)
            lm.loglikelihood(requests[: 2 * b], disable_tqdm=True)  # warm-up
            t0 = time.perf_counter()
            scores = lm.loglikelihood(requests, disable_tqdm=True)
            wall = time.perf_counter() - t0
            reference = reference or scores
            diff = max(abs(x[0] - r[0]) for x, r in zip(scores, reference))
            same = all(x[1] == r[1] for x, r in zip(scores, reference))
            base = wall if b == args.batch_sizes[0] else base
            rows.append(f"| {low}-{high} | {b} | {wall:.2f} | {len(requests) / wall:.1f} | {base / wall:.2f}x | "
                        f"{diff:.1e} | {'yes' if same else 'no'} |")
            print(rows[-1])
    load.append(os.getloadavg()[0])
    table = ["| question bytes | `batch_size` | wall (s) | requests/s | speed-up | max abs Δ log-prob vs first B | "
             "greedy flags equal |", "|---|---:|---:|---:|---:|---:|---|", *rows]
    section = f"""{HEADING}

`bench/harness_batch.py`: {args.requests} `loglikelihood` requests of a multiple-choice task ({args.requests // 4}
questions cut from Python's documentation topics, 4 choices each; questions of {"; ".join(spans)}) through
`SessionLM.loglikelihood` at each `batch_size` in one run (`lit-longctx evaluate --batch_size B`): sorted longest
first, B requests per left-padded batch through one session. Quickstart architecture (dim 256, 4 layers, 4/2 heads,
ffn 704), random weights, byte tokenizer, fp32, {args.threads} torch thread; one warm-up pass.

Command ({time.strftime('%Y-%m-%d')}):

    python bench/harness_batch.py --requests {args.requests} --batch_sizes {' '.join(map(str, args.batch_sizes))} \
--question_bytes {' '.join(args.question_bytes)} --write docs/benchmarks.md

Hardware: {cpu_name()}, {os.cpu_count()} cores, no GPU; Python {platform.python_version()}, torch {torch.__version__};
1-minute load average {load[0]:.1f} at the start and {load[1]:.1f} at the end (the machine is shared with other jobs,
so absolute times are noisy).

{chr(10).join(table)}

On one CPU thread a forward costs about its FLOPs whatever the batch shape, so batching saves only the per-call
overhead (many small calls for short requests) and adds the pads of the shorter rows; the gain is an accelerator's,
where a batch-1 forward of a few hundred tokens leaves most of the chip idle (not measured here: no GPU). Every batch
size gives the same scores (the last two columns).
"""
    print(section)
    if args.write:
        write_section(args.write, section, HEADING)


if __name__ == "__main__":
    main()
