"""Export any lit-longctx checkpoint as a Hugging Face directory.

Plain LLaMA tensors go to the safetensors files transformers loads; tensors only a method has (LoLCATs feature maps,
...) go to ``lit_longctx_extras.safetensors``; the attention layout and method name go to ``config.json`` under
``lit_longctx`` (transformers ignores both), and the method may add its own top-level keys (FoT's ``mem_layers``,
``last_context_length``, ...) through ``hf_config_extras``. The result loads in ``transformers`` as plain LLaMA and
back into lit-longctx with the method intact.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch

from lit_longctx.checkpoint import LoadedCheckpoint, known_methods, load_model
from lit_longctx.hf import to_hf
from lit_longctx.nn.llama import Transformer


def method_class(method: str) -> type:
    methods = known_methods()
    path = methods.get(method)
    if path is None:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(methods)}")
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def split_extras(model: Transformer) -> tuple[set[str], dict[str, torch.Tensor]]:
    """(names of plain-LLaMA tensors, the other tensors) of ``model``'s state dict."""
    plain_config = model.config.replace(attention="causal", layer_attention={}, attention_options={})
    with torch.device("meta"):
        plain = set(Transformer(plain_config).state_dict())
    extras = {k: v for k, v in model.state_dict().items() if k not in plain}
    return plain, extras


def lit_config_record(model: Transformer, method: str) -> dict[str, Any]:
    c = model.config
    return {"method": method, "attention": c.attention, "layer_attention": {str(k): v for k, v in
            c.layer_attention.items()}, "attention_options": c.attention_options}


def export_model(
    model: Transformer,
    output: str | os.PathLike,
    *,
    method: str = "causal",
    tokenizer: Any | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` as an HF directory with its method record and extra tensors."""
    _, extras = split_extras(model)
    extra_config = {"lit_longctx": lit_config_record(model, method)}
    extra_config.update(method_class(method).hf_config_extras(model.config))
    return to_hf(model, output, dtype=dtype, tokenizer=tokenizer, extra_config=extra_config,
                 extra_tensors=extras or None)


def export_hf(checkpoint: str | os.PathLike, output: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Read ``checkpoint`` (any supported form) and export it to ``output``."""
    model, tokenizer, loaded = load_model(checkpoint)
    assert isinstance(loaded, LoadedCheckpoint)
    return export_model(model, output, method=loaded.method, tokenizer=tokenizer, dtype=dtype)
