"""Micro-reproduction of the LoLCATs ablation (paper Table 7 pattern; Table 1 for the 0-step perplexities): linearize
the quickstart model and compare validation perplexity of

(a) the softmax teacher,
(b) linearized *without* attention transfer: the hybrid attention swapped in with identity-initialised feature maps
    (γ = 0.1), then stage-2 LoRA,
(c) LoLCATs: stage-1 attention transfer, then the same stage-2 LoRA budget.

Every run goes through ``lit-longctx fit --ckpt_path last`` (in-process; each stage's YAML is written to ``--out``;
an interrupted bench resumes, a finished stage returns at once) on the quickstart
data (TextData over ``builtin:pydoc``, the quickstart's 2048-piece BPE, 256-token rows). The quickstart model has
head_dim 64 and a 256-token context, so the hybrid uses F = 64 (identity init is exact) and a terrace window of 16:
16 blocks per row, the reference's 1024/64 ratio. Validation perplexity is on the held-out pydoc topics with
positions 0..255 per row (the hybrid has no per-document reset, so the teacher is scored the same way; its score
with document masking, as it was trained, is reported too).

    python bench/lolcats_repro.py                      # trains the quickstart model first (~5 min) unless --base
    python bench/lolcats_repro.py --base runs/lolcats_repro/quickstart   # reuse that model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from benchlib import cpu_name  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_fit(config: dict, path: Path, *extra: str) -> tuple[object, float]:
    """Write ``config`` to ``path`` and run ``lit-longctx fit --config path [extra]`` in this process."""
    from lit_longctx.cli import _make_cli

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"$ lit-longctx fit --config {path} {' '.join(extra)}", flush=True)
    start = time.perf_counter()
    cli = _make_cli(["fit", "--config", str(path), *extra])
    return cli, time.perf_counter() - start


def trainer_section(root: Path, steps: int, val_every: int) -> dict:
    return {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": steps,
            "val_check_interval": val_every, "check_val_every_n_epoch": None, "limit_val_batches": 10,
            "log_every_n_steps": 10, "gradient_clip_val": 1.0, "enable_progress_bar": False,
            "default_root_dir": str(root),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(root), "name": "logs"}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True}}]}


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: object, documents: bool = False) -> float:
    """exp(mean next-token loss) over every held-out row; ``documents`` uses the rows' position ids (document
    masking), else positions 0..T-1."""
    model.eval()
    total, count = 0.0, 0
    for batch in data.val_dataloader():
        positions = batch["position_ids"] if documents else None
        out = model(batch["input_ids"], positions, batch["labels"])
        n = int((batch["labels"] != -100).sum())
        total, count = total + float(out.loss) * n, count + n
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="a trained quickstart run or checkpoint (default: train one into --out)")
    parser.add_argument("--out", default="runs/lolcats_repro")
    parser.add_argument("--transfer_steps", type=int, default=150)
    parser.add_argument("--lora_steps", type=int, default=120)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--feature_dim", type=int, default=64)
    parser.add_argument("--lora_lr", type=float, default=1e-3)
    parser.add_argument("--lora_r", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1)  # honour OMP_NUM_THREADS
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    data = {**quick["data"], "init_args": {**quick["data"]["init_args"], "batch_size": args.batch_size}}
    times: dict[str, float] = {}

    base = args.base
    if base is None:
        base = str(out / "quickstart")  # resumed if interrupted; returns at once when already trained
        config = {**quick, "trainer": {**trainer_section(Path(base), quick["trainer"]["max_steps"], 100),
                                       "limit_val_batches": 20}}
        _, times["quickstart"] = run_fit(config, out / "quickstart.yaml", "--ckpt_path", "last")

    from lit_longctx.checkpoint import load_model
    from lit_longctx.datamodules import TextData
    from lit_longctx.modules import AttentionTransfer, LinearizedLoRA

    val_data = TextData(**{k: v for k, v in data["init_args"].items()})
    val_data.prepare_data()
    val_data.setup("validate")
    hybrid = {"feature_dim": args.feature_dim, "window_size": args.window, "window": "tk"}
    teacher, _, _ = load_model(base)
    results = {"teacher": {"ppl": perplexity(teacher, val_data),
                           "ppl_documents": perplexity(teacher, val_data, documents=True)}}
    swapped = AttentionTransfer(init_from=base, **hybrid)  # identity maps, γ = 0.1, no training
    swapped.configure_model()
    results["no_transfer"] = {"ppl_0": perplexity(swapped.model, val_data)}

    transfer_root = out / "transfer"
    transfer = {"seed_everything": 1234, "trainer": trainer_section(transfer_root, args.transfer_steps, 50),
                "model": {"class_path": "lit_longctx.modules.AttentionTransfer",
                          "init_args": {"init_from": base, **hybrid, "mse_factor": 1000.0, "learning_rate": 1e-2,
                                        "weight_decay": 0.0, "lr_scheduler": "plateau"}},
                "data": data}
    cli, times["stage 1: attention transfer"] = run_fit(transfer, out / "transfer.yaml", "--ckpt_path", "last")
    results["lolcats"] = {"ppl_0": perplexity(cli.model.model, val_data)}

    def lora(name: str, init_from: str, extra: dict) -> float:
        root = out / name
        config = {"seed_everything": 1234, "trainer": trainer_section(root, args.lora_steps, 50),
                  "model": {"class_path": "lit_longctx.modules.LinearizedLoRA",
                            "init_args": {"init_from": init_from, "lora_r": args.lora_r,
                                          "lora_alpha": 2.0 * args.lora_r, "learning_rate": args.lora_lr,
                                          "weight_decay": 0.0, "lr_scheduler": "plateau", **extra}},
                  "data": data}
        cli, times[f"stage 2: LoRA ({name})"] = run_fit(config, out / f"{name}.yaml", "--ckpt_path", "last")
        assert isinstance(cli.model, LinearizedLoRA)
        return perplexity(cli.model.model, val_data)

    layout = {"attention": "hybrid_linear", "attention_options": {"hybrid_linear": hybrid}}
    results["no_transfer"]["ppl"] = lora("lora_no_transfer", base, {"no_transfer": True, "model_overrides": layout})
    results["lolcats"]["ppl"] = lora("lora_lolcats", str(transfer_root), {})

    teacher_ppl, none, lol = results["teacher"]["ppl"], results["no_transfer"]["ppl"], results["lolcats"]["ppl"]
    closed = (none - lol) / (none - teacher_ppl) if none != teacher_ppl else float("nan")
    report = {"results": results, "gap_closed": closed, "seconds": times, "args": vars(args), "base": base,
              "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
              "threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print("| model | val PPL after swap (0 steps) | val PPL after LoRA |")
    print("|---|---|---|")
    print(f"| teacher (softmax) | {teacher_ppl:.2f} | - |")
    print(f"| no attention transfer | {results['no_transfer']['ppl_0']:.2f} | {none:.2f} |")
    print(f"| LoLCATs (transfer + LoRA) | {results['lolcats']['ppl_0']:.2f} | {lol:.2f} |")
    print(f"gap closed by transfer: {closed:.1%}; teacher with document masking: "
          f"{results['teacher']['ppl_documents']:.2f}; times: {json.dumps(times)}")


if __name__ == "__main__":
    main()
