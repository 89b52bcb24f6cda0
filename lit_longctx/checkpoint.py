"""Reading and writing model checkpoints in every form a user may point at.

``read_checkpoint(path)`` accepts:
- an HF LLaMA directory (``config.json`` + safetensors/bin) or hub id;
- a lit-longctx checkpoint file written by ``lit-longctx convert from-hf`` / :func:`save_checkpoint`;
- a Lightning ``.ckpt`` written by ``lit-longctx fit`` (it carries ``checkpoint["lit_longctx"]``);
- a distributed-checkpoint directory written under FSDP2 / ``ModelParallelStrategy``;
- a run directory (the newest ``last.ckpt`` below it).
Everything is loaded with ``weights_only=True`` (or safetensors). Tokenizer files travel inside lit-longctx and
Lightning checkpoints, so a checkpoint alone is enough to generate text.

This module knows no method by name. Methods fill two registries at import: :func:`register_method` (method name ->
LightningModule class path, and the methods whose checkpoints it starts from) and :func:`register_state_hook` (an
``extra`` entry whose reader turns the stored tensors into the model's plain weights, e.g. merging LoRA adapters).
"""

from __future__ import annotations

import atexit
import importlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lit_longctx.hf import CheckpointError, load_weights, read_hf_dir
from lit_longctx.io import atomic_write
from lit_longctx.nn.config import ModelConfig
from lit_longctx.nn.llama import Transformer
from lit_longctx.storage import is_remote, localize_checkpoint, newest_last_checkpoint
from lit_longctx.tokenizers import Tokenizer, load_tokenizer

FORMAT = "lit-longctx/1"

#: method name (``CausalLM.method``) -> LightningModule class path, for messages and the converters; filled by
#: :func:`register_method` when the method modules are imported (:func:`known_methods` imports them)
METHODS: dict[str, str] = {}

#: method -> methods whose checkpoints it starts from (e.g. LoLCATs stage 2 starts from stage 1)
FOLLOWS: dict[str, tuple[str, ...]] = {}

#: a state hook: (state dict, the ``extra`` entry it is registered for) -> the state dict readers see
StateHook = Callable[[dict[str, torch.Tensor], Any], dict[str, torch.Tensor]]
_STATE_HOOKS: dict[str, StateHook] = {}

#: a foreign-format recogniser: (checkpoint dict, source) -> the one-line message for a file of that format, or None
ForeignFormat = Callable[[dict[str, Any], str], "str | None"]
_FOREIGN_FORMATS: list[ForeignFormat] = []
#: modules declaring ``CHECKPOINT_STATE_HOOKS`` (extra key -> hook) and/or ``CHECKPOINT_FOREIGN_FORMATS``
#: (recognisers), not registered yet: the first read registers them, so importing this module stays free of theirs;
#: they must stay light (no Lightning: ``generate`` and ``serve`` read checkpoints without importing it) and may
#: import this module
_DECLARING_MODULES = ["lit_longctx.nn.lora", "lit_longctx.lolcats_import"]
#: the package whose import registers every built-in method (imports Lightning: only when a method is looked up)
_METHOD_PACKAGE = "lit_longctx.modules"


def register_method(method: str, class_path: str, follows: tuple[str, ...] = ()) -> None:
    """Record ``method``'s LightningModule class path and the methods whose checkpoints it may start from."""
    if METHODS.get(method, class_path) != class_path:
        raise ValueError(f"checkpoint method {method!r} is already registered as {METHODS[method]}")
    METHODS[method] = class_path
    if follows:
        FOLLOWS[method] = tuple(follows)


def known_methods() -> dict[str, str]:
    """Every registered method -> class path, after importing the built-in method modules."""
    importlib.import_module(_METHOD_PACKAGE)
    return METHODS


def register_state_hook(key: str, hook: StateHook) -> None:
    """Readers pop ``extra[key]`` from a checkpoint and pass the state dict through ``hook(state, extra[key])``.

    A checkpoint whose weights need a hook is read with an empty state dict under ``with_weights=False`` (never the
    stored tensors unconverted).
    """
    if _STATE_HOOKS.get(key, hook) is not hook:
        raise ValueError(f"a checkpoint state hook for extra[{key!r}] is already registered")
    _STATE_HOOKS[key] = hook


def register_foreign_format(recognise: ForeignFormat) -> None:
    """A file that is no lit-longctx checkpoint is shown to ``recognise``; its message (e.g. the converter to run)
    replaces the generic one."""
    if recognise not in _FOREIGN_FORMATS:
        _FOREIGN_FORMATS.append(recognise)


def _register_declared() -> None:
    """Register the hooks and recognisers of :data:`_DECLARING_MODULES` (once: the list empties)."""
    while _DECLARING_MODULES:
        module = importlib.import_module(_DECLARING_MODULES.pop())
        for key, hook in getattr(module, "CHECKPOINT_STATE_HOOKS", {}).items():
            register_state_hook(key, hook)
        for recognise in getattr(module, "CHECKPOINT_FOREIGN_FORMATS", ()):
            register_foreign_format(recognise)


def _foreign_format_message(ckpt: dict[str, Any], source: str) -> str | None:
    _register_declared()
    for recognise in _FOREIGN_FORMATS:
        message = recognise(ckpt, source)
        if message:
            return message
    return None


def _apply_state_hooks(
    state: dict[str, torch.Tensor], extra: dict[str, Any], with_weights: bool
) -> dict[str, torch.Tensor]:
    """Run the registered hooks of the entries in ``extra`` (popped from it) over ``state``."""
    _register_declared()  # declared hooks are registered by the first read
    for key in [k for k in extra if k in _STATE_HOOKS]:
        value = extra.pop(key)
        state = _STATE_HOOKS[key](state, value) if with_weights else {}
    return state


_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json")


@dataclass
class LoadedCheckpoint:
    """What a checkpoint holds, before any model is built."""

    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    method: str = "causal"
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def tokenizer(self) -> Tokenizer | None:
        return tokenizer_from_files(self.tokenizer_files)


def tokenizer_to_files(tokenizer: Tokenizer | None) -> dict[str, bytes]:
    """The files that rebuild ``tokenizer`` (name -> bytes), for embedding in a checkpoint."""
    if tokenizer is None:
        return {}
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


_UNPACK_ROOT: list[Path] = []


def _unpack_directory() -> Path:
    """A fresh directory for a checkpoint's tokenizer files, inside one per-process directory removed at exit (a
    sentencepiece tokenizer re-reads its file when it is saved again, so the files live as long as the process)."""
    if not _UNPACK_ROOT:
        root = Path(tempfile.mkdtemp(prefix="lit_longctx_tok_"))
        atexit.register(shutil.rmtree, root, True)
        _UNPACK_ROOT.append(root)
    return Path(tempfile.mkdtemp(dir=_UNPACK_ROOT[0]))


def tokenizer_from_files(files: dict[str, bytes]) -> Tokenizer | None:
    if not files:
        return None
    d = _unpack_directory()
    for name, data in files.items():
        (d / Path(name).name).write_bytes(data)
    return load_tokenizer(d)


def save_checkpoint(
    path: str | os.PathLike,
    model: Transformer,
    *,
    tokenizer: Tokenizer | None = None,
    method: str = "causal",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a self-contained lit-longctx checkpoint file (config, weights, tokenizer files, method)."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_write(path) as f:  # a failed write leaves an existing file at ``path`` intact
        torch.save({"format": FORMAT, "method": method, "model_config": model.config.to_dict(), "state_dict": state,
                    "tokenizer_files": tokenizer_to_files(tokenizer), "extra": extra or {}}, f)
    return path


def _hf_tokenizer_files(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in _TOKENIZER_FILES if (directory / name).exists()}


def _torch_load(f: str | os.PathLike | io.BytesIO) -> dict[str, Any]:
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=not isinstance(f, io.BytesIO))
    except Exception as e:  # pickle errors, truncated files, foreign formats
        raise CheckpointError(f"cannot read {f} as a checkpoint ({type(e).__name__}: {e})") from e


def _from_dcp(directory: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from lit_longctx.dcp import verify

    verify(directory)  # torch unpickles its metadata and values unchecked: prove them plain data first
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "consolidated.pt"
        dcp_to_torch_save(directory, out)
        ckpt = _torch_load(out)
        ckpt = {k: v for k, v in ckpt.items()}
    meta = directory / "meta.pt"
    if meta.exists():
        ckpt.update(_torch_load(meta))
    return ckpt


def _from_dict(ckpt: dict[str, Any], source: str, with_weights: bool = True) -> LoadedCheckpoint:
    if ckpt.get("format") == FORMAT:
        state, extra = ckpt["state_dict"], dict(ckpt.get("extra", {}))
        state = _apply_state_hooks(state, extra, with_weights)  # every reader sees the model's plain weights
        return LoadedCheckpoint(ModelConfig.from_dict(ckpt["model_config"]), state, ckpt.get("method", "causal"),
                                ckpt.get("tokenizer_files", {}), extra, source)
    meta = ckpt.get("lit_longctx")
    if meta is not None and "state_dict" in ckpt:
        prefix = "model."
        state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        extra = dict(meta.get("extra", {}))
        state = _apply_state_hooks(state, extra, with_weights)  # every reader sees the model's plain weights
        return LoadedCheckpoint(ModelConfig.from_dict(meta["model_config"]), state, meta.get("method", "causal"),
                                meta.get("tokenizer_files", {}), extra, source)
    keys = sorted(ckpt)[:10]
    message = _foreign_format_message(ckpt, source)
    if message:
        raise CheckpointError(message)
    raise CheckpointError(
        f"{source} is not a lit-longctx checkpoint (top-level keys {keys}); give an HF directory, a file written by "
        "`lit-longctx convert from-hf` or a .ckpt written by `lit-longctx fit`"
    )


def _from_hf_dir(p: Path, with_weights: bool = True) -> LoadedCheckpoint:
    """An HF directory through the one HF-directory reader (:func:`lit_longctx.hf.read_hf_dir`)."""
    d = read_hf_dir(p, with_weights=with_weights)
    return LoadedCheckpoint(d.config, d.state_dict, d.method, _hf_tokenizer_files(p), d.record, str(p))


def read_checkpoint(path: str | os.PathLike, with_weights: bool = True) -> LoadedCheckpoint:
    """Read any supported checkpoint form (see module docstring) without building a model.

    ``with_weights=False`` skips reading the tensors of HF directories (config and tokenizer only); other forms are
    memory-mapped, so their tensors cost nothing until used. Remote URLs (``s3://...``) are copied to a local cache
    first (:func:`lit_longctx.storage.localize_checkpoint`).
    """
    if is_remote(path):
        path = localize_checkpoint(path)
    p = Path(path).expanduser()
    if not p.exists():
        from lit_longctx.inputs import looks_local, not_found

        if looks_local(path):  # never sent to the hub: "not found", with the nearest existing match
            raise not_found(path, "checkpoint", "give a checkpoint file, a run directory or an HF directory")
        from lit_longctx.hf import resolve_hf_path

        p = resolve_hf_path(path)  # a clear org/name hub id, when the hub is allowed
    if p.is_dir():
        if (p / "params.json").exists():  # Meta's original format
            from lit_longctx.meta import read_meta_checkpoint

            return read_meta_checkpoint(p, with_weights)
        if (p / "config.json").exists():
            return _from_hf_dir(p, with_weights)
        if (p / ".metadata").exists():
            return _from_dict(_from_dcp(p), str(p), with_weights)
        last = newest_last_checkpoint(p)  # a run directory: its newest complete last*.ckpt
        if last is None:
            raise CheckpointError(
                f"{str(p)!r} is a directory without config.json (HF), .metadata (distributed checkpoint) or any "
                "complete last.ckpt below it"
            )
        return read_checkpoint(last, with_weights)
    return _from_dict(_torch_load(p), str(p), with_weights)


def checkpoint_config(path: str | os.PathLike) -> tuple[ModelConfig, str] | None:
    """(model config, method) recorded in a checkpoint, read cheaply; None when the path holds no lit-longctx record."""
    p = localize_checkpoint(path)
    if p.is_dir() and (p / ".metadata").exists() and (p / "meta.pt").exists():
        meta = _torch_load(p / "meta.pt").get("lit_longctx")
        return (ModelConfig.from_dict(meta["model_config"]), meta.get("method", "causal")) if meta else None
    try:
        loaded = read_checkpoint(p, with_weights=False)
    except (CheckpointError, FileNotFoundError):
        return None
    return loaded.model_config, loaded.method


def check_method(loaded: LoadedCheckpoint, expected: str | None) -> None:
    """Raise a clear error when a checkpoint was written by another method than the one loading it."""
    if expected is None or loaded.method == expected:
        return
    if expected == "causal" or loaded.method == "causal":
        # plain LLaMA weights load into any method, and any method's LLaMA weights load as plain LLaMA
        return
    methods = known_methods()
    if loaded.method in FOLLOWS.get(expected, ()):
        return
    raise CheckpointError(
        f"{loaded.source} is a checkpoint of method {loaded.method!r}, but it is being loaded by method "
        f"{expected!r}; use --model.class_path {methods.get(loaded.method, loaded.method)} (or export it with "
        "`lit-longctx convert to-hf` and start from the plain LLaMA weights)"
    )


def load_model(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    expected_method: str | None = None,
    **config_overrides: Any,
) -> tuple[Transformer, Tokenizer | None, LoadedCheckpoint]:
    """Build the model stored at ``path`` with its weights; also return its tokenizer (or None)."""
    loaded = read_checkpoint(path)
    check_method(loaded, expected_method)
    config = loaded.model_config.replace(**config_overrides) if config_overrides else loaded.model_config
    with torch.device("meta"):
        model = Transformer(config)
    load_weights(model, loaded.state_dict, source=loaded.source)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model, loaded.tokenizer(), loaded


def load_for_inference(
    path: str | os.PathLike, device: str = "auto", dtype: str | torch.dtype | None = None
) -> tuple[Transformer, Tokenizer, LoadedCheckpoint, str]:
    """(model, tokenizer, checkpoint, device) for text in, text out (``generate``, ``serve``, ``evaluate``).

    ``device`` ``auto`` is CUDA when available, else CPU; ``dtype`` defaults to bfloat16 on CUDA, float32 on CPU. A
    checkpoint without a tokenizer is refused (text cannot be encoded).
    """
    from lit_longctx.nn.config import parse_dtype

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = parse_dtype(dtype) or (torch.bfloat16 if device == "cuda" else torch.float32)
    model, tokenizer, loaded = load_model(path, device=device, dtype=torch_dtype)
    if tokenizer is None:
        raise CheckpointError(f"{str(path)!r} carries no tokenizer, so text cannot be encoded or decoded")
    return model, tokenizer, loaded, device
