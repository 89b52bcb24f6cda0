"""The ``lit-longctx`` command.

``fit | validate | test | predict`` are LightningCLI subcommands (model and data chosen by ``class_path`` in YAML,
several ``--config`` files composed left to right, ``--print_config``); ``convert`` and ``generate`` work on
checkpoints directly. User errors (bad config values, missing files, wrong checkpoints) print one ``error:`` line
instead of a traceback; set ``LIT_LONGCTX_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOP_HELP = """usage: lit-longctx SUBCOMMAND ...

Train, fine-tune, extend and evaluate long-context LLaMA-family models.

subcommands:
  fit        train a model:            lit-longctx fit --config configs/quickstart.yaml
  validate   run the validation loop:  lit-longctx validate --config CFG --ckpt_path last
  test       evaluate (perplexity, passkey, ...):
                                       lit-longctx test --config configs/quickstart.yaml --ckpt_path last
  predict    generate for the predict data of a config
  convert    checkpoints to and from Hugging Face format:
                                       lit-longctx convert from-hf --source HF_DIR --output model.ckpt
                                       lit-longctx convert to-hf --checkpoint CKPT --output HF_DIR
  generate   sample text from a checkpoint or HF directory:
                                       lit-longctx generate --checkpoint CKPT_OR_HF_DIR --prompt "Once upon"
  weight-diff  recover released weights from a weight diff (Landmark Attention's format), or make one:
                                       lit-longctx weight-diff recover --base LLAMA_DIR --diff DIFF_DIR --output OUT

Run `lit-longctx SUBCOMMAND --help` for the options of one subcommand
(`lit-longctx fit --model.help lit_longctx.modules.CausalLM` lists a module's arguments).
"""


# ---------------------------------------------------------------------------------------------------- LightningCLI
def _vocab_size_of(datamodule: Any) -> int | None:
    """The data's vocabulary size, or None for data modules that take the model's tokenizer (evaluation sets)."""
    return getattr(datamodule, "vocab_size", None)


def _find_last_checkpoint(root: Path) -> Path | None:
    found = list(root.rglob("last*.ckpt")) if root.exists() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _make_cli(args: list[str] | None) -> Any:
    import warnings

    from lightning.pytorch.cli import LightningCLI

    # our training streams shard by rank and worker themselves, so Lightning's caution about len() does not apply
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined")
    # main(argv) is also called in-process (tests, notebooks) while sys.argv holds the host program's arguments
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")

    from lit_longctx.datamodules.base import LongCtxDataModule
    from lit_longctx.modules.causal_lm import CausalLM

    class LongCtxCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.link_arguments("data.init_args.seq_len", "model.init_args.seq_len")
            parser.link_arguments("data", "model.init_args.vocab_size", compute_fn=_vocab_size_of,
                                  apply_on="instantiate")

        def _resolve_last(self) -> None:
            """Resolve ``--ckpt_path last`` to the newest last.ckpt of the run and tell the module what it restores."""
            config = self.config_init[self.subcommand]
            if config.get("ckpt_path") != "last":
                self.model.ckpt_path_hint = config.get("ckpt_path")
                return
            roots = [Path(self.trainer.default_root_dir)]
            roots += [Path(cb.dirpath) for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
            found = [p for p in (_find_last_checkpoint(r) for r in roots) if p is not None]
            if found:
                config["ckpt_path"] = str(max(found, key=lambda p: p.stat().st_mtime))
                self.model.ckpt_path_hint = config["ckpt_path"]
            elif self.subcommand == "fit":
                print("lit-longctx: no last.ckpt found, starting a new run", file=sys.stderr)
                config["ckpt_path"] = None
            else:
                from lit_longctx.hf import CheckpointError

                raise CheckpointError(
                    f"--ckpt_path last: no last.ckpt under {', '.join(str(r) for r in roots)}; train first "
                    "(lit-longctx fit --config ...) or pass the checkpoint path"
                )

        before_fit = before_validate = before_test = before_predict = _resolve_last

        def before_instantiate_classes(self) -> None:
            from lit_longctx.modules.xla import check_xla_requested

            check_xla_requested(self.config.get(self.subcommand, self.config).get("trainer"))

    # XLAStrategy forks its workers and pickles the Trainer, whose SaveConfigCallback holds the parser that names this
    # class: make it reachable as lit_longctx.cli.LongCtxCLI (a local class cannot be pickled)
    LongCtxCLI.__qualname__ = "LongCtxCLI"
    globals()["LongCtxCLI"] = LongCtxCLI
    return LongCtxCLI(
        CausalLM,
        LongCtxDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False},
        args=args,
        auto_configure_optimizers=False,
    )


# --------------------------------------------------------------------------------------------------------- convert
def convert_from_hf(source: str, output: str, dtype: str | None = None, rope_theta: float | None = None) -> Path:
    """Convert an HF LLaMA directory (or hub id) into a lit-longctx checkpoint file.

    Args:
        source: HF checkpoint directory or hub id.
        output: path of the lit-longctx checkpoint to write.
        dtype: store the weights in this dtype (float32, bfloat16, float16); default: as in the source.
        rope_theta: override the RoPE base (e.g. Llemma contracted Code Llama's 1e6 to 1e4).
    """
    from lit_longctx.checkpoint import save_checkpoint
    from lit_longctx.hf import from_hf, resolve_hf_path
    from lit_longctx.nn.config import parse_dtype
    from lit_longctx.tokenizers import load_tokenizer

    path = resolve_hf_path(source)
    overrides = {"rope_theta": rope_theta} if rope_theta is not None else {}
    model = from_hf(path, dtype=parse_dtype(dtype), **overrides)
    tokenizer = None
    if (path / "tokenizer.model").exists() or (path / "tokenizer.json").exists():
        tokenizer = load_tokenizer(path)
    out = save_checkpoint(output, model, tokenizer=tokenizer)
    print(f"wrote {out} ({model.num_params() / 1e6:.1f}M parameters)")
    return out


def convert_to_hf(checkpoint: str, output: str, dtype: str | None = None) -> Path:
    """Export any lit-longctx checkpoint (converted file, fit .ckpt, run dir, FSDP2 dir) as an HF directory.

    Args:
        checkpoint: the checkpoint to export.
        output: HF directory to write (config.json, safetensors, tokenizer files).
        dtype: write the weights in this dtype; default: as stored.
    """
    from lit_longctx.export import export_hf
    from lit_longctx.nn.config import parse_dtype

    out = export_hf(checkpoint, output, dtype=parse_dtype(dtype))
    print(f"wrote {out}")
    return out



# -------------------------------------------------------------------------------------------------------- generate
def generate_text(
    checkpoint: str,
    prompt: str = "\n",
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_samples: int = 1,
    seed: int = 1234,
    device: str = "auto",
    dtype: str | None = None,
    session: dict[str, Any] | None = None,
) -> list[str]:
    """Generate text from a checkpoint or HF directory and print it.

    Args:
        checkpoint: an HF directory, a lit-longctx checkpoint, a fit .ckpt or a run directory.
        prompt: the prompt text, or @path to read it from a file.
        max_new_tokens: tokens to generate per sample.
        temperature: 0 = greedy; higher = more random.
        top_k: sample only from the k most likely tokens.
        top_p: sample only from the smallest set of tokens whose probability reaches p.
        num_samples: independent samples.
        seed: random seed for sampling.
        device: cpu, cuda, or auto.
        dtype: compute dtype (default float32 on CPU, bfloat16 on CUDA).
        session: options for the model's decoding session (e.g. FoT's last_context_length).
    """
    import torch

    from lit_longctx.checkpoint import load_model
    from lit_longctx.nn.config import parse_dtype
    from lit_longctx.nn.generate import generate

    if prompt.startswith("@"):
        prompt_file = Path(prompt[1:]).expanduser()
        if not prompt_file.exists():
            raise FileNotFoundError(f"prompt file {str(prompt_file)!r} does not exist")
        prompt = prompt_file.read_text()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = parse_dtype(dtype) or (torch.bfloat16 if device == "cuda" else torch.float32)
    model, tokenizer, _ = load_model(checkpoint, device=device, dtype=torch_dtype)
    if tokenizer is None:
        from lit_longctx.hf import CheckpointError

        raise CheckpointError(f"{checkpoint!r} carries no tokenizer, so text prompts cannot be encoded")
    ids = tokenizer.encode(prompt, bos=tokenizer.bos_id is not None)
    generator = torch.Generator(device=device).manual_seed(seed)
    stops = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    texts = []
    for _ in range(num_samples):
        start = time.perf_counter()
        new = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       stop_tokens=stops, generator=generator, **(session or {}))[0]
        elapsed = time.perf_counter() - start
        text = tokenizer.decode(new)
        print(prompt + text)
        print(f"[{len(new)} tokens in {elapsed:.2f} s, {len(new) / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
        texts.append(text)
    return texts


# ------------------------------------------------------------------------------------------------------------ main
def _user_error(exc: BaseException) -> bool:
    """Errors raised by lit-longctx for bad input (shown as one line) rather than bugs (shown with a traceback)."""
    from lit_longctx.hf import CheckpointError
    from lit_longctx.io import NotWritableError
    from lit_longctx.nn.config import ConfigError

    if isinstance(exc, (ConfigError, CheckpointError, FileNotFoundError, NotWritableError)):
        return True
    if isinstance(exc, (ValueError, TypeError, KeyError)):
        frames = traceback.extract_tb(exc.__traceback__)
        return bool(frames) and f"{os.sep}lit_longctx{os.sep}" in frames[-1].filename
    return False


_PROBLEM_MARKERS = ("is not accepted", "Got value", "not expected", "unrecognized", "required", "Not a valid",
                    "does not exist", "Unable to")


def _find_user_error(exc: BaseException) -> BaseException | None:
    """The user error behind ``exc``: itself, or one it wraps (jsonargparse wraps errors raised while instantiating
    classes in a report of union alternatives)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _user_error(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def summarize_parse_error(message: str) -> str:
    """One line from jsonargparse's nested union report: the key path and the innermost problem."""
    lines = [line for line in message.splitlines() if line.strip()]
    keys = re.findall(r'Parser key "([^"]+)"', message)
    problems = [line for line in lines if any(m in line for m in _PROBLEM_MARKERS)]
    if not problems:
        return " ".join(line.strip() for line in lines[:2])
    deepest = max(problems, key=lambda line: len(line) - len(line.lstrip()))
    where = f"{'.'.join(keys)}: " if keys else ""
    return f"invalid configuration {where}{deepest.strip().lstrip('- ')} (see --print_config for the valid keys)"


def _run_jsonargparse(components: Any, args: list[str], prog: str) -> Any:
    from jsonargparse import CLI

    return CLI(components, args=args, prog=prog, as_positional=False)


def run_with_one_line_errors(call: Callable[[], Any]) -> Any:
    """``call()``; a user error (bad argument, missing file, wrong checkpoint, ...) ends the process with one ``error:``
    line and exit status 2 instead of a traceback (``LIT_LONGCTX_DEBUG=1`` shows the traceback)."""
    try:
        return call()
    except argparse.ArgumentError as exc:
        if os.environ.get("LIT_LONGCTX_DEBUG"):
            raise
        print(f"error: {summarize_parse_error(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        cause = _find_user_error(exc)
        if os.environ.get("LIT_LONGCTX_DEBUG") or cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


def _convert() -> Any:
    return {"from-hf": convert_from_hf, "to-hf": convert_to_hf}


def _weight_diff() -> Any:
    from lit_longctx.weight_diff import make_diff, recover

    return {"recover": recover, "make": make_diff}


# The subcommands that are not LightningCLI's: name -> a function returning what jsonargparse's CLI runs (a function
# or a dict of them). A new subcommand is a function in its own module plus one line here (imports stay lazy, so
# `lit-longctx fit` never imports a server or an evaluation harness).
SUBCOMMANDS: dict[str, Callable[[], Any]] = {
    "convert": _convert,
    "generate": lambda: generate_text,
    "weight-diff": _weight_diff,
}


def _dispatch(argv: list[str], explicit: bool) -> Any:
    if argv[0] in SUBCOMMANDS:
        return _run_jsonargparse(SUBCOMMANDS[argv[0]](), argv[1:], f"lit-longctx {argv[0]}")
    _make_cli(argv if explicit else None)
    return None


def main(argv: list[str] | None = None) -> Any:
    explicit = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(TOP_HELP)
        return None if argv else sys.exit(2)
    return run_with_one_line_errors(lambda: _dispatch(argv, explicit))


def console_main() -> None:
    """The ``lit-longctx`` console script: :func:`main` without its return value, which the script wrapper would hand
    to ``sys.exit`` (printing it and exiting with status 1)."""
    main()

if __name__ == "__main__":
    console_main()
