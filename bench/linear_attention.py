"""Prefill and per-token decode cost of LoLCATs hybrid attention vs softmax attention with a KV cache (one layer).

One attention layer with Llama-3-style heads (head_dim 128, GQA 4:1; width 1024 so that the projections do not drown
the attention cost on a CPU) is run at several context lengths:

- prefill: one forward over L tokens that fills the layer's cache (softmax: sdpa, causal; hybrid: the linear-time
  path of its decode window, spec §2 b for ``sliding``);
- decode: per-token latency of single-token steps after the prefill (softmax: sdpa over the KV cache; hybrid: the
  recurrent step over the w-key window + linear state);
- state: bytes held by the layer's inference state after prefill + decode (KV cache buffers vs window + S, z);
- prefill peak: growth of the process' peak RSS during the prefill (each measurement runs in a fresh process).

Usage:
    python bench/linear_attention.py                       # 1k / 4k / 16k / 32k, markdown table on stdout
    python bench/linear_attention.py --lengths 1024 4096   # quicker
    python bench/linear_attention.py --threads 1           # stable numbers on a shared machine
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from benchlib import cpu_name  # noqa: E402

from lit_longctx.nn.attention.base import AttentionContext, build_attention
from lit_longctx.nn.attention.causal import KVCache
from lit_longctx.nn.attention.hybrid_linear import HybridLinearCache
from lit_longctx.nn.config import ModelConfig
from lit_longctx.nn.rope import RotaryEmbedding

KINDS = ("causal", "hybrid_linear")


def layer_config(args: argparse.Namespace, kind: str) -> ModelConfig:
    options = {"feature_dim": args.feature_dim, "window_size": args.window, "window": "tk",
               "decode_window": args.decode_window}
    return ModelConfig(vocab_size=256, dim=args.dim, n_layers=1, n_heads=args.heads, n_kv_heads=args.kv_heads,
                       head_dim=args.head_dim, ffn_dim=256, max_seq_len=max(args.lengths), attention=kind,
                       rope={"rope_theta": 500000.0}, attention_options={"hybrid_linear": options})


def context(rope: RotaryEmbedding, start: int, length: int) -> AttentionContext:
    pos = torch.arange(start, start + length).unsqueeze(0)
    cos, sin = rope(pos)
    return AttentionContext(pos, cos, sin, rope)


def state_bytes(cache: KVCache | HybridLinearCache) -> int:
    if isinstance(cache, HybridLinearCache):
        return cache.num_bytes()
    return sum(x.numel() * x.element_size() for x in (cache.k, cache.v))




def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@torch.inference_mode()
def worker(args: argparse.Namespace, kind: str, length: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = layer_config(args, kind)
    layer = build_attention(cfg, 0).eval()
    for proj in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj):
        torch.nn.init.normal_(proj.weight, std=0.02)
    rope = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_seq_len)
    x = torch.randn(1, length, cfg.dim)
    ctx = context(rope, 0, length)
    cache = layer.new_cache(1, x.device, x.dtype)
    rss_before = max_rss_mib()
    t0 = time.perf_counter()
    layer(x, ctx, cache)
    prefill_s = time.perf_counter() - t0
    rss_peak = max_rss_mib() - rss_before
    times = []
    for i in range(args.warmup + args.decode_tokens):
        xt = torch.randn(1, 1, cfg.dim)
        ct = context(rope, length + i, 1)
        t0 = time.perf_counter()
        layer(xt, ct, cache)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"kind": kind, "length": length, "prefill_s": prefill_s, "prefill_peak_mib": rss_peak,
            "decode_ms": 1000 * statistics.median(times), "state_mib": state_bytes(cache) / 2**20}


def run_one(args: argparse.Namespace, kind: str, length: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, str(length), "--dim", str(args.dim), "--heads", str(args.heads),
           "--kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim), "--feature-dim", str(args.feature_dim),
           "--window", str(args.window), "--decode-tokens", str(args.decode_tokens), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--decode-window", args.decode_window, "--lengths", *map(str, args.lengths)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--feature-dim", type=int, default=64)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--decode-window", choices=("sliding", "terrace"), default="sliding")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args, args.worker[0], int(args.worker[1]))))
        return
    rows = {(r["kind"], r["length"]): r for r in (run_one(args, k, n) for n in args.lengths for k in KINDS)}
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s), float32, batch 1; layer: dim {args.dim}, {args.heads} heads / "
          f"{args.kv_heads} KV heads × {args.head_dim}; hybrid: tk, F={args.feature_dim}, w={args.window}, "
          f"decode_window={args.decode_window}\n")
    print("| context | prefill softmax (s) | prefill hybrid (s) | decode softmax (ms/token) | decode hybrid (ms/token) "
          "| decode speed-up | state softmax (MiB) | state hybrid (MiB) | prefill peak RSS softmax / hybrid (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.lengths:
        s, h = rows[("causal", n)], rows[("hybrid_linear", n)]
        print(f"| {n:,} | {s['prefill_s']:.2f} | {h['prefill_s']:.2f} | {s['decode_ms']:.2f} | {h['decode_ms']:.2f} "
              f"| {s['decode_ms'] / h['decode_ms']:.1f}x | {s['state_mib']:.1f} | {h['state_mib']:.3f} "
              f"| {s['prefill_peak_mib']:.0f} / {h['prefill_peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
