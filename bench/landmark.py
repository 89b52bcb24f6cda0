"""Landmark attention: training cost of the grouped softmax paths, and decoding cost of block retrieval.

Measures, CPU fp32, batch 1, one small landmark model (mem_freq 50, blocks of 51):

- training step (forward + loss + backward) at several sequence lengths for ``causal`` (plain softmax attention, SDPA),
  the landmark ``reference`` path (full (B, H, T, T) grouped softmax) and the landmark ``blockwise`` path (block tiles
  with an online softmax under activation checkpointing): median seconds per step, and peak memory as the rise of
  ``ru_maxrss`` above a baseline read after the model and batch were built, each (kind, length) in a fresh
  subprocess so that no allocation of another configuration is counted, once with glibc's default allocator
  settings and once with a fixed mmap threshold (live tensors, without heap fragmentation);
- decoding after a prompt of N ordinary tokens (N = 4k / 16k / 32k): median milliseconds per generated token for
  landmark retrieval (top-k per token and head), landmark with every block retrieved (k ≥ blocks: exact full grouped
  attention through the cache; same process and cache as retrieval) and plain causal attention with a KV cache (same
  weights, its own process); prefill time is reported beside it.

Usage:
    python bench/landmark.py                               # print the markdown section
    python bench/landmark.py --write docs/benchmarks.md    # also replace the section in that file
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from benchlib import cpu_name, write_section  # noqa: E402

from lit_longctx.nn import DecodingSession, ModelConfig, Transformer
from lit_longctx.nn.attention.landmark import LandmarkSession, insert_on_grid

SECTION = "## Landmark attention"
TRAIN_KINDS = ("causal", "reference", "blockwise")
DECODE_KINDS = ("landmark", "causal")
MMAP_THRESHOLD = 128 * 1024


def model_config(args: argparse.Namespace, kind: str, **landmark: Any) -> ModelConfig:
    """The benchmark model; ``kind`` is ``causal`` or a landmark path (``reference`` / ``blockwise``)."""
    options = {"landmark_id": args.vocab - 1, "mem_freq": args.mem_freq, "path": "blockwise", **landmark}
    if kind in ("reference", "blockwise"):
        options["path"] = kind
    return ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                       ffn_dim=args.ffn, max_seq_len=args.train_len, attention="causal" if kind == "causal" else
                       "landmark", attention_options={"landmark": options})


def build(args: argparse.Namespace, kind: str, **landmark: Any) -> Transformer:
    torch.manual_seed(0)
    return Transformer(model_config(args, kind, **landmark))


def maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def train_probe(args: argparse.Namespace, kind: str, length: int) -> dict[str, Any]:
    """In a fresh process: seconds per training step and the peak RSS rise over the post-build baseline
    (``--probe memory``: one step only, run under a fixed glibc mmap threshold by the caller)."""
    model = build(args, kind).train()
    g = torch.Generator().manual_seed(length)
    regular = torch.randint(0, args.vocab - 1, (1, length), generator=g)
    ids = insert_on_grid(regular, args.mem_freq, args.vocab - 1)[:, :length]  # a landmark every 51 tokens
    labels = torch.randint(0, args.vocab - 1, (1, length), generator=g)
    base = maxrss_bytes()
    times = []
    steps = 1 if args.probe[0] == "memory" else 1 + (args.reps if length < 4096 else args.reps_long)
    for _ in range(steps):
        t0 = time.perf_counter()
        model(ids, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"kind": kind, "length": length, "step_s": statistics.median(times[1:] or times),
            "peak_rise": maxrss_bytes() - base}


def time_steps(session: DecodingSession, logits: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
    """Median milliseconds of ``n`` greedy one-token steps."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        logits = session.step(logits.argmax(-1, keepdim=True))
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times), logits


@torch.inference_mode()
def decode_probe(args: argparse.Namespace, kind: str, cached: int) -> dict[str, Any]:
    """In a fresh process: prefill ``cached`` ordinary tokens, then time greedy steps one token at a time.

    ``landmark``: prefill with top-k retrieval, time retrieval steps, then switch every cache to all blocks
    (k ≥ blocks, the same blocks for all tokens) and time again: the cache content does not depend on k, and a
    prefill with every block retrieved would be quadratic. ``causal``: the same weights with a KV cache.
    """
    prompt = torch.randint(0, args.vocab - 1, (1, cached), generator=torch.Generator().manual_seed(cached))
    if kind == "causal":
        session: DecodingSession = DecodingSession(build(args, "causal").eval(), prefill_chunk=args.train_len)
    else:
        session = LandmarkSession(build(args, "blockwise", top_k=args.top_k).eval())
    t0 = time.perf_counter()
    logits = session.prefill(prompt)
    out: dict[str, Any] = {"kind": kind, "cached": cached, "prefill_s": time.perf_counter() - t0,
                           "cache_tokens": session.position}
    out["ms_per_token"], logits = time_steps(session, logits, args.new_tokens)
    if kind == "landmark":
        for cache in session.state.caches:
            cache.top_k, cache.selection = 1 << 30, "max_over_tokens"
        out["all_blocks_ms_per_token"], _ = time_steps(session, logits, args.new_tokens)
    return out


def in_subprocess(args: argparse.Namespace, probe: str, kind: str, size: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--probe", probe, kind, str(size), *model_args(args)]
    env = dict(os.environ)
    if probe == "memory":  # no dynamic mmap threshold: freed large buffers leave RSS instead of fragmenting the heap
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(result), file=sys.stderr)
    return result


def model_args(args: argparse.Namespace) -> list[str]:
    return ["--vocab", str(args.vocab), "--dim", str(args.dim), "--layers", str(args.layers), "--heads",
            str(args.heads), "--ffn", str(args.ffn), "--mem-freq", str(args.mem_freq), "--top-k", str(args.top_k),
            "--train-len", str(args.train_len), "--reps", str(args.reps), "--reps-long", str(args.reps_long),
            "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]




def markdown(args: argparse.Namespace, train: dict, memory: dict, decode: dict, n_params: int, command: str,
             loads: tuple[float, float]) -> str:
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    lines = [
        SECTION,
        "",
        f"Measured {datetime.date.today().isoformat()} on {cpu_name()}, {args.threads} torch thread(s) "
        f"({os.cpu_count()} logical CPUs visible), {ram_gib:.0f} GiB RAM; Python {platform.python_version()}, "
        f"torch {torch.__version__}. The machine was shared with other jobs (1-minute load average {loads[0]:.1f} "
        f"at the start, {loads[1]:.1f} at the end), so absolute times are noisy; ratios within a row are the point. "
        "One intra-op thread: with two, OpenMP barriers stalled whenever another job held a core (decode steps "
        "measured 50× slower).",
        "",
        f"Model: vocab {args.vocab}, dim {args.dim}, {args.layers} layers, {args.heads} heads (head dim "
        f"{args.dim // args.heads}), SwiGLU {args.ffn} ({n_params / 1e6:.2f} M parameters); fp32, batch 1; "
        f"mem_freq {args.mem_freq} (blocks of {args.mem_freq + 1} tokens, landmark last).",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        "Training step = forward + chunked loss + backward on a landmark-augmented row (no optimizer step; it is the "
        f"same for all three). Time: median of {args.reps} steps ({args.reps_long} at 4096) after one warm-up step. "
        "Peak memory = rise of `resource.getrusage(RUSAGE_SELF).ru_maxrss` over a baseline read after the model and "
        "batch were built (activations, saved tensors, gradients; weights excluded), each (attention, length) in a "
        "fresh subprocess. Two allocator settings: glibc's default (what a CPU run sees; its dynamic mmap threshold "
        "rises as large buffers are freed, after which freed tiles stay in the heap, so RSS also counts "
        "fragmentation) and, in a separate one-step subprocess, `MALLOC_MMAP_THRESHOLD_="
        f"{MMAP_THRESHOLD}` (buffers above 128 KiB are returned when freed, so the peak tracks live tensors).",
        "",
        "| seq len | causal (SDPA) s/step | reference s/step | blockwise s/step | causal peak | reference peak | "
        "blockwise peak | causal peak, live | reference peak, live | blockwise peak, live | blockwise / reference "
        "(live) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for length in args.lengths:
        r = {k: train[(k, length)] for k in TRAIN_KINDS}
        rss = {k: r[k]["peak_rise"] / 2**20 for k in TRAIN_KINDS}
        live = {k: memory[(k, length)]["peak_rise"] / 2**20 for k in TRAIN_KINDS}
        lines.append(
            f"| {length} | {r['causal']['step_s']:.2f} | {r['reference']['step_s']:.2f} | "
            f"{r['blockwise']['step_s']:.2f} | {rss['causal']:,.0f} MiB | {rss['reference']:,.0f} MiB | "
            f"{rss['blockwise']:,.0f} MiB | {live['causal']:,.0f} MiB | {live['reference']:,.0f} MiB | "
            f"{live['blockwise']:,.0f} MiB | {live['blockwise'] / max(live['reference'], 1e-9):.2f} |"
        )
    lines += [
        "",
        f"Decoding: a prompt of N ordinary tokens is prefilled (landmark sessions insert a landmark every "
        f"{args.mem_freq} tokens and prefill in chunks of their default length; causal prefills in chunks of "
        f"{args.train_len}), then {args.new_tokens} greedy tokens are fed one at a time; ms/token is the median "
        f"step time. Retrieval: top-{args.top_k} blocks per token and head (paper default selection), scored at "
        "stingy positions; all blocks: the same landmark cache with k ≥ number of blocks (full grouped attention "
        "over the cache; switched on after the retrieval steps, since the cache content does not depend on k); "
        "causal: the same weights as a plain model with a KV cache over all N tokens. Prefill with per-token-and-head "
        "retrieval copies and rotates k'·Bk keys per (token, head), which dominates its time.",
        "",
        "| N (prompt tokens) | cached tokens (landmark) | retrieval ms/token | all blocks ms/token | causal KV "
        "ms/token | landmark prefill s (retrieval) | causal prefill s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in args.cached:
        lm, causal = decode[("landmark", n)], decode[("causal", n)]
        lines.append(
            f"| {n:,} | {lm['cache_tokens']:,} | {lm['ms_per_token']:.1f} | {lm['all_blocks_ms_per_token']:.1f} | "
            f"{causal['ms_per_token']:.1f} | {lm['prefill_s']:.1f} | {causal['prefill_s']:.1f} |"
        )
    lines.append("")
    return "\n".join(lines)




def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096], help="training sequence lengths")
    p.add_argument("--cached", type=int, nargs="+", default=[4096, 16384, 32768], help="decoding prompt lengths")
    p.add_argument("--reps", type=int, default=3, help="timed training steps (lengths < 4096)")
    p.add_argument("--reps-long", type=int, default=2, help="timed training steps at 4096 and above")
    p.add_argument("--new-tokens", type=int, default=16, help="generated tokens timed per decoding run")
    p.add_argument("--vocab", type=int, default=513, help="including the landmark (the last id)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=352)
    p.add_argument("--mem-freq", type=int, default=50)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--train-len", type=int, default=512, help="max_seq_len (sets the default prefill chunk)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (1: on a shared machine, 2-thread barriers stall under contention)")
    p.add_argument("--write", type=Path, default=None, help="markdown file whose section to replace")
    p.add_argument("--probe", nargs=3, metavar=("WHAT", "KIND", "SIZE"), help=argparse.SUPPRESS)  # train|memory|decode
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        what, kind, size = args.probe
        probe = decode_probe if what == "decode" else train_probe
        print(json.dumps(probe(args, kind, int(size))))
        return
    here = Path(__file__)
    command = "python " + " ".join([here.relative_to(Path.cwd()).as_posix() if here.is_relative_to(Path.cwd())
                                    else __file__, *sys.argv[1:]])
    load0 = os.getloadavg()[0]
    train = {(k, n): in_subprocess(args, "train", k, n) for n in args.lengths for k in TRAIN_KINDS}
    memory = {(k, n): in_subprocess(args, "memory", k, n) for n in args.lengths for k in TRAIN_KINDS}
    decode = {(k, n): in_subprocess(args, "decode", k, n) for n in args.cached for k in DECODE_KINDS}
    n_params = sum(p.numel() for p in build(args, "causal").parameters())
    section = markdown(args, train, memory, decode, n_params, command, (load0, os.getloadavg()[0]))
    print(section)
    if args.write:
        write_section(args.write, section, SECTION)


if __name__ == "__main__":
    main()
