"""Passkey accuracy of any checkpoint through FoTSession, with and without memory (a diagnostic, not a test).

Used for the controls of docs/results.md "## FoT": a plain checkpoint (no memory layers, e.g. the passkey baseline
runs/passkey_train) gets ``--mem-layers`` turned into FoT memory layers at inference only (FoT adds no parameters), so
its weights can be evaluated with LongLLaMA's memory schedule. Same prompts as ``lit-longctx test --config
configs/eval/passkey.yaml`` (task seed 1234, BOS, greedy, 10 new tokens, the first integer must equal the key).

    python bench/fot_session_eval.py runs/passkey_train/checkpoints/last.ckpt --key-range 1 999
"""

from __future__ import annotations

import argparse
import time

import torch

from lit_longctx.checkpoint import load_model
from lit_longctx.eval.passkey import build_task, score_answer
from lit_longctx.nn.attention.fot import FoTSession
from lit_longctx.nn.generate import generate

NO_MEMORY = {"context_window": 65536, "last_context_length": 65536}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--key-range", type=int, nargs=2, default=[1, 999])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--seed", type=int, default=1234, help="task seed (configs/eval/passkey.yaml's)")
    p.add_argument("--mem-layers", type=int, nargs="+", default=[2], help="memory layers for a plain checkpoint")
    p.add_argument("--last-context-length", type=int, default=128, help="Lc for a plain checkpoint")
    p.add_argument("--show", type=int, default=2, help="generations printed per (length, mode)")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tok, _ = load_model(args.checkpoint)
    if not model.config.layer_attention:  # plain weights: memory layers at inference only
        model, tok, _ = load_model(args.checkpoint, layer_attention={i: "fot" for i in args.mem_layers},
                                   attention_options={"fot": {"last_context_length": args.last_context_length,
                                                              "mem_dtype": "float32"}})
    model.eval()
    print(args.checkpoint, "memory layers:", model.config.layer_attention, model.config.attention_options.get("fot"))
    task = build_task("passkey", tok, seed=args.seed, key_range=tuple(args.key_range), bos=True)
    for n in args.lengths:
        for name, kwargs in (("memory", {}), ("no memory", NO_MEMORY)):
            ok = total = shown = 0
            start = time.perf_counter()
            for depth in args.depths:
                for trial in range(args.trials):
                    sample = task.sample(n, depth, trial)
                    with torch.no_grad():
                        new = generate(model, sample.input_ids, 10, session=FoTSession(model, 1, **kwargs))[0]
                    text = tok.decode(new)
                    ok += score_answer(text, sample.answer)[1]
                    total += 1
                    if shown < args.show:
                        print(f"  [{name}, {n} tokens, depth {depth}, key {sample.answer}] -> {text!r}")
                        shown += 1
            print(f"{name:9s} {n:5d} tokens: {ok}/{total} = {100 * ok / total:.0f}%  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
