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
import shlex
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
                                       lit-longctx convert from-meta --source META_DIR --output model.ckpt
                                       lit-longctx convert from-lolcats --base HF_DIR --distill RUN_distill.pt
                                       lit-longctx convert from-lm-benchmark --checkpoint ckpt.pt --output OUT
  generate   sample text from a checkpoint or HF directory (--prompts @FILE: one prompt a line, batched):
                                       lit-longctx generate --checkpoint CKPT_OR_HF_DIR --prompt "Once upon"
  evaluate   lm-evaluation-harness tasks through the method's inference path:
                                       lit-longctx evaluate --checkpoint CKPT_OR_HF_DIR --tasks arc_easy,hellaswag
  serve      serve completions, embeddings and tokens over HTTP (OpenAI-compatible, web page at /):
                                       lit-longctx serve --checkpoint CKPT_OR_HF_DIR --port 8000
  weight-diff  recover released weights from a weight diff (Landmark Attention's format), or make one:
                                       lit-longctx weight-diff recover --base LLAMA_DIR --diff DIFF_DIR --output OUT

Run `lit-longctx SUBCOMMAND --help` for the options of one subcommand
(`lit-longctx fit --model.help lit_longctx.modules.CausalLM` lists a module's arguments).
"""


# ---------------------------------------------------------------------------------------------------- LightningCLI
def _vocab_size_of(datamodule: Any) -> int | None:
    """The data's vocabulary size, or None for data modules that take the model's tokenizer (evaluation sets)."""
    return getattr(datamodule, "vocab_size", None)


def _safety_callbacks(subcommand: str) -> list[Any]:
    """Callbacks every run gets (lit_longctx.callbacks.safety); ``fit`` only, as the others do not train."""
    from lit_longctx.callbacks.safety import FinalCheckpoint, InterruptCheckpoint, NonFiniteGuard

    return [NonFiniteGuard(), FinalCheckpoint(), InterruptCheckpoint()] if subcommand == "fit" else []


def _resume_command(argv: list[str], ckpt_path: str) -> str:
    """The command line that continues an interrupted ``fit``: the same arguments, ``--ckpt_path`` replaced."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--ckpt_path="):
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        kept.append(shlex.quote(arg))
    return " ".join(["lit-longctx", *kept, "--ckpt_path", shlex.quote(ckpt_path)])


def _make_cli(args: list[str] | None) -> Any:
    import warnings

    from lightning.pytorch.cli import LightningCLI

    # our training streams shard by rank and worker themselves, so Lightning's caution about len() does not apply
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined")
    # main(argv) is also called in-process (tests, notebooks) while sys.argv holds the host program's arguments
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    from lit_longctx.callbacks.progress import install as install_progress
    from lit_longctx.callbacks.progress import quiet_lightning

    quiet_lightning()

    from lit_longctx.datamodules.base import LongCtxDataModule
    from lit_longctx.modules.causal_lm import CausalLM

    argv = list(sys.argv[1:] if args is None else args)

    class LongCtxCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.link_arguments("data.init_args.seq_len", "model.init_args.seq_len")
            parser.link_arguments("data", "model.init_args.vocab_size", compute_fn=_vocab_size_of,
                                  apply_on="instantiate")

        def _parse_ckpt_path(self) -> None:
            """Lightning applies a checkpoint's ``hyper_parameters`` (its ``_class_path`` and init args) over the
            command line here, so a checkpoint could pick the class to import and silently replace options the user
            gave. The class and its arguments come from the user's config only; the checkpoint is checked against
            them in :meth:`_prepare_run` (same for an explicit path and ``last``)."""

        def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
            from lightning.fabric.utilities.exceptions import MisconfigurationException

            from lit_longctx.nn.config import ConfigError

            max_steps = config.get("max_steps")
            if isinstance(max_steps, int) and max_steps < -1:
                raise ConfigError(f"trainer.max_steps must be >= 0 (or -1 for no limit), got {max_steps}")
            given = {type(cb) for cb in config.get("callbacks") or []}
            callbacks = callbacks + [cb for cb in _safety_callbacks(self.subcommand) if type(cb) not in given]
            try:
                return super()._instantiate_trainer(config, callbacks)
            except MisconfigurationException as exc:
                raise ConfigError(f"invalid trainer settings: {str(exc).splitlines()[0]}") from exc

        def _prepare_run(self) -> None:
            """Before the run: atomic, weights-only checkpoint IO; writable, exclusively claimed run directories;
            ``--ckpt_path`` resolved (``last``, a run directory, a URL) and checked against the configured module."""
            from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

            from lit_longctx.checkpoint_io import AtomicCheckpointIO
            from lit_longctx.runs import check_run_writable, claim_run_directories, resolve_ckpt_path
            from lit_longctx.storage import check_remote

            strategy = self.trainer.strategy
            if type(strategy.checkpoint_io) is TorchCheckpointIO:
                strategy.checkpoint_io = AtomicCheckpointIO()
            config = self.config_init[self.subcommand]
            roots = [str(self.trainer.default_root_dir)]  # strings: Path would break s3:// URLs
            roots += [str(cb.dirpath) for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
            for root in roots:  # an unusable bucket stops the run before it trains, not at its first save
                check_remote(root)
            check_run_writable(self.trainer)
            claim_run_directories(self.trainer)
            config["ckpt_path"] = resolve_ckpt_path(config.get("ckpt_path"), roots, self.subcommand,
                                                    self.model.method)
            self.model.ckpt_path_hint = config["ckpt_path"]

        before_fit = before_validate = before_test = before_predict = _prepare_run

        def _run_subcommand(self, subcommand: str) -> None:
            from lit_longctx.callbacks.safety import TrainingInterrupted

            try:
                super()._run_subcommand(subcommand)
            except TrainingInterrupted as stop:
                command = _resume_command(argv, str(stop.path))
                print(f"lit-longctx: training interrupted at step {stop.step}; checkpoint saved to {stop.path}\n"
                      f"resume with: {command}", file=sys.stderr, flush=True)
                sys.exit(130)

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            trainer = super().instantiate_trainer(**kwargs)
            install_progress(trainer)  # step/stage/tokens-per-second bar, training FLOPs in the model summary
            return trainer

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
    from lit_longctx.hf import read_hf_dir, resolve_hf_path
    from lit_longctx.io import check_writable
    from lit_longctx.nn.config import parse_dtype
    from lit_longctx.tokenizers import load_tokenizer

    path = resolve_hf_path(source)
    check_writable(Path(output).expanduser().parent, "output directory (--output)")
    overrides = {"rope_theta": rope_theta} if rope_theta is not None else {}
    directory = read_hf_dir(path, **overrides)  # the same reader as from_hf, generate and init_from
    model = directory.build(dtype=parse_dtype(dtype))
    tokenizer = None
    if (path / "tokenizer.model").exists() or (path / "tokenizer.json").exists():
        tokenizer = load_tokenizer(path)
    out = save_checkpoint(output, model, tokenizer=tokenizer, method=directory.method, extra=directory.record)
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
    from lit_longctx.io import check_writable
    from lit_longctx.nn.config import parse_dtype

    check_writable(Path(output).expanduser().parent, "output directory (--output)")
    out = export_hf(checkpoint, output, dtype=parse_dtype(dtype))
    print(f"wrote {out}")
    return out



# -------------------------------------------------------------------------------------------------------- generate
def _read_prompts(prompts: str) -> list[str]:
    """``@file`` (one prompt per line; empty lines skipped) or one prompt given inline."""
    if not prompts.startswith("@"):
        return [prompts]
    path = Path(prompts[1:]).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist (give --prompts @FILE, one prompt a line)")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompts file {str(path)!r} holds no prompt (one prompt per line)")
    return lines


def generate_text(
    checkpoint: str,
    prompt: str = "\n",
    prompts: str | None = None,
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
        prompts: several prompts, @path of a file with one prompt per line: generated together in one batch (left
            padding; each continuation equals that of its prompt alone when greedy). Replaces ``prompt``.
        max_new_tokens: tokens to generate per sample.
        temperature: 0 = greedy; higher = more random.
        top_k: sample only from the k most likely tokens.
        top_p: sample only from the smallest set of tokens whose probability reaches p.
        num_samples: independent samples (of every prompt).
        seed: random seed for sampling; sample i uses ``seed + i`` (so ``serve`` gives the same samples).
        device: cpu, cuda, or auto.
        dtype: compute dtype (default float32 on CPU, bfloat16 on CUDA).
        session: options for the model's decoding session (e.g. FoT's last_context_length).

    Returns the continuations, sample by sample, in prompt order.
    """
    import torch

    from lit_longctx.checkpoint import load_for_inference
    from lit_longctx.nn.generate import generate

    if prompts is not None:
        texts_in = _read_prompts(prompts)
    elif prompt.startswith("@"):
        prompt_file = Path(prompt[1:]).expanduser()
        if not prompt_file.exists():
            raise FileNotFoundError(f"prompt file {str(prompt_file)!r} does not exist")
        texts_in = [prompt_file.read_text()]
    else:
        texts_in = [prompt]
    model, tokenizer, _, device = load_for_inference(checkpoint, device, dtype)
    ids = [tokenizer.encode(text, bos=tokenizer.bos_id is not None) for text in texts_in]
    stops = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    texts = []
    for i in range(num_samples):
        # sample i draws from its own generator seeded seed + i, as the server's samples do (lit_longctx.serve)
        generator = torch.Generator(device=device).manual_seed(seed + i)
        start = time.perf_counter()
        new = generate(model, ids if len(ids) > 1 else ids[0], max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, stop_tokens=stops, generator=generator, **(session or {}))
        elapsed = time.perf_counter() - start
        for text_in, row in zip(texts_in, new):
            text = tokenizer.decode(row)
            print(text_in + text)
            texts.append(text)
        n = sum(len(row) for row in new)
        print(f"[{n} tokens in {elapsed:.2f} s, {n / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return texts


# ------------------------------------------------------------------------------------------------------------ main
def _user_error(exc: BaseException) -> bool:
    """Errors raised by lit-longctx for bad input (shown as one line) rather than bugs (shown with a traceback)."""
    from lit_longctx.hf import CheckpointError
    from lit_longctx.io import NotWritableError
    from lit_longctx.nn.config import ConfigError
    from lit_longctx.storage import RemoteStorageError

    if isinstance(exc, (ConfigError, CheckpointError, FileNotFoundError, NotWritableError, RemoteStorageError)):
        return True
    if isinstance(exc, (ValueError, TypeError, KeyError)):
        frames = traceback.extract_tb(exc.__traceback__)
        return bool(frames) and f"{os.sep}lit_longctx{os.sep}" in frames[-1].filename
    return False


_PROBLEM_MARKERS = ("is not accepted", "Got value", "not expected", "unrecognized", "required", "Not a valid",
                    "does not exist", "Unable to")
_UNION_REPORT = "Does not validate against any of the Union subtypes"


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


def _config_error_in_report(message: str) -> str | None:
    """The message of a :class:`ConfigError` that jsonargparse's union report quotes as text (see ConfigError)."""
    from lit_longctx.nn.config import ConfigError

    items = [line.strip().removeprefix("- ") for line in message.splitlines() if line.strip().startswith("- ")]
    raised = set(ConfigError.raised)
    return next((item for item in reversed(items) if item in raised), None)


def summarize_parse_error(message: str) -> str:
    """One line from jsonargparse's nested union report: the key path and the innermost problem (a ConfigError's
    message when the report quotes one, e.g. ``n_heads`` not dividing ``dim``)."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    prefix = f"invalid configuration {'.'.join(keys)}: " if keys else "invalid configuration: "
    quoted = _config_error_in_report(message)
    if quoted is not None:
        return prefix + quoted
    lines = [line for line in message.splitlines() if line.strip()]
    problems = [line for line in lines if any(m in line for m in _PROBLEM_MARKERS)]
    if not problems:
        return " ".join(line.strip() for line in lines[:2])
    deepest = max(problems, key=lambda line: len(line) - len(line.lstrip()))
    return f"{prefix}{deepest.strip().lstrip('- ')} (see --print_config for the valid keys)"


def _config_files(argv: list[str]) -> list[Path]:
    """The YAML files named on a command line (``--config F``, ``--config=F``, ``--data F.yaml``), in order."""
    files = []
    for arg in argv:
        value = Path(arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg)
        if value.suffix in (".yaml", ".yml") and value.is_file() and value not in files:
            files.append(value)
    return files


def _yaml_syntax_error(argv: list[str]) -> str | None:
    """"FILE line L, column C: PROBLEM" for the first YAML file on the command line that does not parse: jsonargparse
    names the file as "<unicode string>"."""
    import yaml

    for f in _config_files(argv):
        try:
            yaml.safe_load(f.read_text(encoding="utf-8", errors="replace"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            return f"YAML syntax error in {str(f)!r}{at}: {problem}; fix the file (indentation, a ':', a bracket)"
    return None


def _one_line(exc: BaseException, argv: list[str]) -> str | None:
    """The ``error:`` line for ``exc``, or None when it is not a user error (a bug: shown with its traceback)."""
    if isinstance(exc, argparse.ArgumentError):
        message = str(exc)
        if "Problems parsing config" in message or "<unicode string>" in message:
            return _yaml_syntax_error(argv) or summarize_parse_error(message)
        return summarize_parse_error(message)
    cause = _find_user_error(exc)
    if cause is not None:
        return str(cause)
    if _UNION_REPORT in str(exc) and _config_error_in_report(str(exc)) is not None:
        return summarize_parse_error(str(exc))
    return None


def _run_jsonargparse(components: Any, args: list[str], prog: str) -> Any:
    from jsonargparse import CLI

    return CLI(components, args=args, prog=prog, as_positional=False)


def run_with_one_line_errors(call: Callable[[], Any], argv: list[str] | None = None) -> Any:
    """``call()``; a user error (bad argument, missing file, wrong checkpoint, ...) ends the process with one ``error:``
    line and exit status 2 instead of a traceback (``LIT_LONGCTX_DEBUG=1`` shows the traceback). ``argv``, the
    command line, lets a YAML syntax error name its file."""
    try:
        return call()
    except KeyboardInterrupt:  # Ctrl-C before training started (imports, parsing, loading): nothing to save
        if os.environ.get("LIT_LONGCTX_DEBUG"):
            raise
        print("lit-longctx: interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # not sys.exit: CPython re-kills itself with SIGINT at exit (status -2) when the interrupt passed through
        # code run by an extension (PyRun_*) on its way here, so the status would depend on where it landed
        os._exit(130)
    except Exception as exc:
        line = None if os.environ.get("LIT_LONGCTX_DEBUG") else _one_line(exc, list(argv or []))
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)


def _convert() -> Any:
    from lit_longctx.lm_benchmark import convert_from_lm_benchmark
    from lit_longctx.lolcats_import import convert_from_lolcats
    from lit_longctx.meta import convert_from_meta

    return {"from-hf": convert_from_hf, "from-meta": convert_from_meta, "to-hf": convert_to_hf,
            "from-lolcats": convert_from_lolcats, "from-lm-benchmark": convert_from_lm_benchmark}


def _weight_diff() -> Any:
    from lit_longctx.weight_diff import make_diff, recover

    return {"recover": recover, "make": make_diff}


def _evaluate() -> Any:
    from lit_longctx.eval.evaluate import evaluate

    return evaluate


def _serve() -> Any:
    from lit_longctx.serve import serve

    return serve


# The subcommands that are not LightningCLI's: name -> a function returning what jsonargparse's CLI runs (a function
# or a dict of them). A new subcommand is a function in its own module plus one line here (imports stay lazy, so
# `lit-longctx fit` never imports a server or an evaluation harness).
SUBCOMMANDS: dict[str, Callable[[], Any]] = {
    "convert": _convert,
    "generate": lambda: generate_text,
    "serve": _serve,
    "weight-diff": _weight_diff,
    "evaluate": _evaluate,
}


def _import_deferring_ctrl_c(module: str) -> None:
    """Import ``module`` (torch, or Lightning) with Ctrl-C deferred until it is complete: an import interrupted half-way
    leaves modules broken (numpy's lazy submodules then recurse without end) and ends in a traceback instead of the
    one "interrupted" line."""
    import importlib
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        importlib.import_module(module)
        return
    interrupted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        importlib.import_module(module)
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt


def _dispatch(argv: list[str], explicit: bool) -> Any:
    _import_deferring_ctrl_c("torch" if argv[0] in SUBCOMMANDS else "lightning.pytorch")
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
    return run_with_one_line_errors(lambda: _dispatch(argv, explicit), argv)


def console_main() -> None:
    """The ``lit-longctx`` console script: :func:`main` without its return value, which the script wrapper would hand
    to ``sys.exit`` (printing it and exiting with status 1)."""
    main()


if __name__ == "__main__":
    console_main()
