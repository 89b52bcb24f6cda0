"""FoT overhead: cross-batch training vs plain attention, and memory ingestion at inference (CPU, fp32).

Training: small LLaMAs on (B=8, T) batches laid out as doc_aware_k4 (dataset_packing 4) with ``cross_batch_range=3``
and stepping in 3 memory layers [2, 4, 6] of 8 (LongLLaMA-3B's setting: ¼(0,0), ¼(1,1), ¼(2,1), ¼(3,0)), against the
same weights with plain causal attention at the same local length T. Two shapes: ``attention-heavy`` (dim 256, T 512,
T/dim = 2) and ``3B-proportioned`` (dim 384, T 256: T/dim = 0.67, about LongLLaMA-3B's 2048/3200 = 0.64, so attention
takes the share of the step it takes there). Measured:
- step time: forward + loss + backward, the configurations interleaved round-robin in one process (so load changes
  hit them alike), medians over the repetitions of the process CPU time (what the step computes, insensitive to other
  jobs taking turns on the cores) and of the wall time;
- peak memory: each configuration in a fresh subprocess; after one warm-up step (gradients allocated) the kernel's
  peak-RSS counter is reset (``/proc/self/clear_refs`` ← 5) and the reported figure is VmHWM minus VmRSS at the reset,
  i.e. the extra memory the measured step needed at its peak.
Paths: ``dense`` (SDPA over [B, H, T, 4T] with the additive mask) and ``chunked`` (``scan_cross_batch``, blockwise).

Inference: a small FoT model (dim 128, 6 layers, 2 heads of 64, memory layer [3], W = 2048, Lc = 1024, ``mem_dtype``
bfloat16, ``mem_attention_grouping`` (1, 128)) ingests N = 4k / 16k / 64k tokens with ``FoTSession.prefill``: N - 1024
tokens go to memory. Each N runs in a fresh subprocess: time, peak extra RSS during ingestion (measured as above), RSS
still held afterwards, and the bytes of the memory tensors.

Every subprocess runs with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then returns large freed blocks to the system at
once, so RSS follows the live tensors instead of the allocator's cache (this costs page faults, i.e. some time).

Usage:
    python bench/fot_overhead.py                             # print the markdown section
    python bench/fot_overhead.py --write docs/benchmarks.md  # also replace/append "## FoT" in that file
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from benchlib import cpu_name, write_section  # noqa: E402

from lit_longctx.nn import ModelConfig, Transformer
from lit_longctx.nn.attention.fot import FoTCache, FoTSession

SECTION = "## FoT"
TRAIN_KINDS = ("plain", "fot-dense", "fot-chunked")
KIND_LABELS = {"plain": "plain causal", "fot-dense": "FoT r=3, dense (SDPA + mask)",
               "fot-chunked": "FoT r=3, chunked (`scan_cross_batch`)"}
SHAPES = {  # name: (dim, heads, ffn, T)
    "attention-heavy": (256, 4, 704, 512),
    "3B-proportioned": (384, 6, 1024, 256),
}
BATCH, LAYERS, VOCAB = 8, 8, 2048
MEM_LAYERS = (2, 4, 6)
INFER_MEM_LAYERS = (3,)


def train_setup(kind: str, shape: str, args: argparse.Namespace) -> tuple[Transformer, dict[str, Any]]:
    dim, heads, ffn, seq_len = SHAPES[shape]
    fot = {"scan_cross_batch": kind == "fot-chunked", "scan_query_chunk_size": args.chunk,
           "scan_key_chunk_size": args.chunk}
    config = ModelConfig(vocab_size=VOCAB, dim=dim, n_layers=LAYERS, n_heads=heads, ffn_dim=ffn, max_seq_len=seq_len,
                         layer_attention={} if kind == "plain" else {i: "fot" for i in MEM_LAYERS},
                         attention_options={"fot": fot})
    torch.manual_seed(0)
    model = Transformer(config).train()
    ids = torch.randint(0, VOCAB, (BATCH, seq_len + 1), generator=torch.Generator().manual_seed(1))
    batch: dict[str, Any] = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    if kind != "plain":
        batch.update(cross_batch_range=3, dataset_packing=4, cross_batch_stepping=True)
    return model, batch


def train_step(model: Transformer, batch: dict[str, Any]) -> float:
    model.zero_grad(set_to_none=False)
    loss = model(**batch).loss
    loss.backward()
    return loss.item()


def rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak() -> int:
    """Reset the peak-RSS counter (VmHWM) to the current RSS; return that RSS in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss_kib("VmRSS")


def probe_train(kind: str, shape: str, args: argparse.Namespace) -> dict[str, Any]:
    model, batch = train_setup(kind, shape, args)
    train_step(model, batch)
    base = reset_peak()
    train_step(model, batch)
    return {"peak_mib": (rss_kib("VmHWM") - base) / 1024}


def infer_model(args: argparse.Namespace) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, dim=128, n_layers=6, n_heads=2, ffn_dim=352, max_seq_len=2048,
                         layer_attention={i: "fot" for i in INFER_MEM_LAYERS},
                         attention_options={"fot": {"last_context_length": 1024, "mem_dtype": "bfloat16",
                                                    "mem_attention_grouping": [1, args.query_group]}})
    return Transformer(config).eval()


def probe_ingest(n: int, args: argparse.Namespace) -> dict[str, Any]:
    model = infer_model(args)
    ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        session = FoTSession(model)
        base = reset_peak()
        start, cpu = time.perf_counter(), time.process_time()
        session.prefill(ids)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    caches = [c for c in session.state.caches if isinstance(c, FoTCache)]
    mem_bytes = sum(t.numel() * t.element_size() for c in caches for t in c.memory())
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mib": (rss_kib("VmHWM") - base) / 1024,
            "held_mib": (rss_kib("VmRSS") - base) / 1024, "memory_tokens": caches[0].memory_length,
            "memory_mib": mem_bytes / 2**20}


def child(args: argparse.Namespace, *probe: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *probe, "--chunk", str(args.chunk), "--query-group", str(args.query_group),
           "--threads", str(args.threads)]
    # a fixed mmap threshold makes glibc return large freed blocks at once, so RSS follows the live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_training(shape: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    setups = {kind: train_setup(kind, shape, args) for kind in TRAIN_KINDS}
    plain = setups["plain"][0].state_dict()
    for kind in TRAIN_KINDS[1:]:  # identical weights everywhere
        setups[kind][0].load_state_dict(plain)
    losses = {kind: train_step(*setups[kind]) for kind in TRAIN_KINDS}  # warm-up
    assert abs(losses["fot-dense"] - losses["fot-chunked"]) < 1e-4, losses
    cpu: dict[str, list[float]] = {kind: [] for kind in TRAIN_KINDS}
    wall: dict[str, list[float]] = {kind: [] for kind in TRAIN_KINDS}
    for _ in range(args.reps):
        for kind in TRAIN_KINDS:
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(*setups[kind])
            cpu[kind].append(time.process_time() - start_cpu)
            wall[kind].append(time.perf_counter() - start)
    return {kind: {"cpu": statistics.median(cpu[kind]), "wall": statistics.median(wall[kind])}
            for kind in TRAIN_KINDS}


def render(args: argparse.Namespace, train: dict[str, dict[str, Any]], ingest: dict[int, dict[str, Any]],
           minutes: float) -> str:
    cmd = "python bench/fot_overhead.py --write docs/benchmarks.md"
    lines = [
        SECTION,
        "",
        f"Measured {datetime.date.today()} by `bench/fot_overhead.py` ({minutes:.1f} min): `{cmd}`. Hardware: "
        f"{cpu_name()}, {os.cpu_count()} CPU cores ({torch.get_num_threads()} torch thread: the machine was "
        f"shared with other jobs, which more threads mostly measure), Linux {platform.release()}; Python "
        f"{platform.python_version()}, torch {torch.__version__}; fp32.",
        "",
        f"**Training step** (forward + loss + backward), B={BATCH} windows, {LAYERS} layers, head dim 64, vocab "
        f"{VOCAB}; FoT: memory layers {list(MEM_LAYERS)}, cross_batch_range 3, dataset_packing 4, stepping "
        "(d = [0,1,2,3,0,2,3,3]: ¼(0,0), ¼(1,1), ¼(2,1), ¼(3,0) in the second pack); plain: every layer causal at "
        f"the same T, same weights. Step time = median over {args.reps} interleaved steps of the process CPU time "
        "(wall time beside it; other jobs shared the cores, so wall time is noisy); peak = extra RSS of one step after "
        "a warm-up step, each configuration in a fresh process (VmHWM reset through `/proc/self/clear_refs`). "
        f"Chunked path: query and key chunks of {args.chunk}.",
        "",
        "| shape | configuration | CPU s/step | vs plain | wall s/step | tokens/s (CPU) | peak extra RSS (MiB) "
        "| vs plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape, result in train.items():
        dim, heads, _, seq_len = SHAPES[shape]
        step, peak = result["step"], result["peak"]
        base_cpu, base_peak = step["plain"]["cpu"], peak["plain"]
        for kind in TRAIN_KINDS:
            lines.append(
                f"| {shape}: dim {dim}, {heads} heads, T {seq_len} | {KIND_LABELS[kind]} | {step[kind]['cpu']:.2f} "
                f"| {step[kind]['cpu'] / base_cpu:.2f}x | {step[kind]['wall']:.2f} "
                f"| {BATCH * seq_len / step[kind]['cpu']:.0f} | {peak[kind]:.0f} | {peak[kind] / base_peak:.2f}x |")
    lines += ["", "Targets (training overhead ≤ 1.5x; chunked peak memory below the dense path's):", ""]
    for shape, result in train.items():
        step, peak = result["step"], result["peak"]
        ratios = {kind: step[kind]["cpu"] / step["plain"]["cpu"] for kind in TRAIN_KINDS[1:]}
        best = min(ratios, key=ratios.get)
        lines.append(
            f"- {shape}: overhead {ratios['fot-dense']:.2f}x dense, {ratios['fot-chunked']:.2f}x chunked "
            f"({'met' if ratios[best] <= 1.5 else 'missed'} by the {best.removeprefix('fot-')} path); chunked peak "
            f"{peak['fot-chunked']:.0f} vs dense {peak['fot-dense']:.0f} MiB "
            f"({'met' if peak['fot-chunked'] < peak['fot-dense'] else 'missed'}).")
    lines += [
        "",
        "Each memory layer computes about 4.5x the attention of a causal layer (its own causal window plus 1.75 "
        "visible extra windows per row on average with stepping; the dense path also scores the masked slots, 8x), so "
        "the overhead is set by attention's share of the step: it is larger at T/dim = 2 than at LongLLaMA-3B's "
        "proportions.",
        "",
        "**Memory ingestion** (inference): dim 128, 6 layers, 2 heads × 64, memory layer "
        f"{list(INFER_MEM_LAYERS)}, W = 2048, last_context_length 1024, mem_dtype bfloat16, mem_attention_grouping "
        f"(1, {args.query_group}); `FoTSession.prefill` of N random tokens, batch 1, one fresh process per N. "
        "Memory tensors = keys + values + masks of the memory layer (its buffers grow by doubling, so up to twice that "
        "is allocated); RSS held after also counts every layer's local window and the model's last activations.",
        "",
        "| N tokens | tokens in memory | CPU s | wall s | CPU µs/token | memory tensors (MiB) | RSS held after (MiB) "
        "| peak extra RSS (MiB) | peak growth per 1k more memory tokens (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    previous = None
    for n, r in ingest.items():
        slope = "—" if previous is None else (
            f"{1024 * (r['peak_mib'] - previous['peak_mib']) / (r['memory_tokens'] - previous['memory_tokens']):.2f}")
        lines.append(f"| {n} | {r['memory_tokens']} | {r['cpu_seconds']:.2f} | {r['seconds']:.2f} "
                     f"| {1e6 * r['cpu_seconds'] / n:.0f} | {r['memory_mib']:.1f} | {r['held_mib']:.1f} "
                     f"| {r['peak_mib']:.1f} | {slope} |")
        previous = r
    first, last = ingest[min(ingest)], ingest[max(ingest)]
    lines += [
        "",
        f"Memory: {last['memory_tokens'] / first['memory_tokens']:.1f}x the tokens in memory take "
        f"{last['memory_mib'] / first['memory_mib']:.1f}x the memory tensors ((N - 1024) × (K + V) × 128 dims × 2 "
        "bytes + a 4-byte mask per token); linear growth shows as a constant last column (the peak's growth per token "
        "added to memory: the memory itself, its doubling headroom, and the float32 copy and logits of one block of "
        f"1 head × {args.query_group} queries). Time grows faster than linearly: every W-chunk attends densely to the "
        "whole memory so far (dense memory attention, as in LongLLaMA), so ingestion costs O(N²/W) score blocks; "
        "`top_k` retrieval is exact and computes the same scores.",
        "",
    ]
    return "\n".join(lines)




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk", type=int, default=256, help="query and key chunk of the chunked path")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--query-group", type=int, default=128, help="queries per block of the memory attention")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: on a shared machine, more threads mostly measure contention)")
    parser.add_argument("--write", type=Path, help="replace or append the section in this markdown file")
    parser.add_argument("--probe-train", nargs=2, metavar=("KIND", "SHAPE"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-ingest", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe_train:
        print(json.dumps(probe_train(*args.probe_train, args)))
        return
    if args.probe_ingest:
        print(json.dumps(probe_ingest(args.probe_ingest, args)))
        return
    start = time.perf_counter()
    train = {shape: {"peak": {kind: child(args, "--probe-train", kind, shape)["peak_mib"] for kind in TRAIN_KINDS},
                     "step": time_training(shape, args)} for shape in SHAPES}
    ingest = {n: child(args, "--probe-ingest", str(n)) for n in args.lengths}
    text = render(args, train, ingest, (time.perf_counter() - start) / 60)
    print(text)
    if args.write:
        write_section(args.write, text, SECTION)


if __name__ == "__main__":
    main()
