"""Training throughput of `lit-longctx fit` vs the same model from `transformers`, in the same Lightning loop.

All runs use the quickstart model shape, the same initial weights, the same data (TextData over the pydoc text with
the quickstart tokenizer), AdamW with the same settings, fp32 on CPU, and a Lightning Trainer. The transformers run
wraps `LlamaForCausalLM` (attn_implementation="sdpa") in a thin LightningModule whose step is `model(input_ids,
labels=...)`, which attends causally over the whole row. lit-longctx runs twice: on the same rows without document
masking (the same attention as transformers: the like-for-like comparison) and as `fit` runs it, with the data's
per-document position ids, so attention is masked per packed document (an explicit mask, which SDPA cannot serve with
its causal fast path). Rounds alternate between the runs so machine load affects all alike; the table reports medians
of the per-step times after warm-up, tokens/s and MFU against `--peak-flops` (PaLM-formula FLOPs).

    python bench/train_throughput.py --rounds 3 --steps 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from benchlib import cpu_name  # noqa: E402

from lit_longctx.datamodules import TextData  # noqa: E402
from lit_longctx.flops import flops_per_batch  # noqa: E402
from lit_longctx.hf import config_to_hf  # noqa: E402
from lit_longctx.modules import CausalLM  # noqa: E402
from lit_longctx.nn import ModelConfig  # noqa: E402


class StepTimer(L.Callback):
    """Wall time of every optimizer step (batch start to batch end, data loading excluded)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._t0)


class CausalRowsLM(CausalLM):
    """CausalLM on the same rows without their per-document position ids: causal attention over the whole row."""

    def training_step(self, batch, batch_idx):
        return super().training_step({k: v for k, v in batch.items() if k != "position_ids"}, batch_idx)


class HFCausalLM(L.LightningModule):
    """The thin wrapper: transformers' LlamaForCausalLM trained by the same Lightning loop."""

    def __init__(self, config: ModelConfig, state: dict[str, torch.Tensor], lr: float) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_config = LlamaConfig.from_dict(config_to_hf(config))
        hf_config._attn_implementation = "sdpa"
        self.model = LlamaForCausalLM(hf_config)
        self.model.load_state_dict(state)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                 lr=self.lr, betas=(0.9, 0.95), fused=True)


def run(module: L.LightningModule, data: TextData, steps: int) -> list[float]:
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[timer])
    trainer.fit(module, datamodule=data)
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-flops", type=float, default=1e11)
    parser.add_argument("--cache-dir", default="runs/cache")
    args = parser.parse_args()

    data = TextData(["builtin:pydoc"], train_tokenizer=2048, seq_len=256, batch_size=16, cache_dir=args.cache_dir,
                    val_fraction=0.1)
    data.prepare_data()
    config = ModelConfig(vocab_size=data.vocab_size, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704,
                         max_seq_len=256)
    torch.manual_seed(0)
    ours = CausalLM(model=config, learning_rate=2e-3)
    ours.configure_model()
    state = {k: v.clone() for k, v in ours.model.state_dict().items()}
    tokens = 16 * 256
    flops = flops_per_batch(config, 16, 256)
    ours_rows, ours_docs = "lit-longctx (causal rows)", "lit-longctx (document masking)"
    times: dict[str, list[float]] = {ours_rows: [], "transformers": [], ours_docs: []}
    for r in range(args.rounds):
        for name in times:
            if name != "transformers":
                module = (CausalRowsLM if name == ours_rows else CausalLM)(model=config, learning_rate=2e-3)
                module.configure_model()
                module.model.load_state_dict(state)
            else:
                module = HFCausalLM(config, state, lr=2e-3)
            step_times = run(module, data, args.steps)[args.warmup :]
            times[name].extend(step_times)
            print(f"round {r} {name}: median step {statistics.median(step_times) * 1e3:.1f} ms", flush=True)

    rows = []
    for name, ts in times.items():
        median = statistics.median(ts)
        rows.append((name, median, tokens / median, flops / median / args.peak_flops))
    ratio = rows[1][1] / rows[0][1]  # transformers' step time / ours on the same attention
    print(f"\nCPU fp32, {cpu_name()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; batch 16 x 256 tokens; {args.rounds} rounds x {args.steps} steps")
    print(f"| implementation | median step (ms) | tokens/s | MFU (peak {args.peak_flops:.0e}) |")
    print("|---|---:|---:|---:|")
    for name, median, tps, mfu in rows:
        print(f"| {name} | {median * 1e3:.1f} | {tps:,.0f} | {mfu:.1%} |")
    print(f"\nthroughput ratio lit-longctx (causal rows) / transformers: {ratio:.2f}; with document masking: "
          f"{rows[1][1] / rows[2][1]:.2f}")
    Path("runs").mkdir(exist_ok=True)


if __name__ == "__main__":
    main()
