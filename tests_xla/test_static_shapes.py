"""An XLA run whose batch shapes keep changing (dynamic padding) is warned about: each new shape is a new graph."""

from __future__ import annotations

import pytest
import torch
import torch_xla
import torch_xla.debug.metrics as met

from lit_longctx.modules.xla import MAX_STATIC_SHAPES, check_static_shape
from lit_longctx.nn import ModelConfig
from lit_longctx.nn.llama import Transformer


def test_changing_batch_shapes_recompile_and_are_warned_about_once():
    device = torch_xla.device()
    model = Transformer(ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32,
                                    max_seq_len=64)).to(device)
    holder = type("Module", (), {})()
    compiles = []
    with pytest.warns(UserWarning, match="distinct batch shapes") as record:
        for t in range(8, 8 + MAX_STATIC_SHAPES + 3):  # a new sequence length every step: dynamic padding
            batch = {"input_ids": torch.randint(0, 64, (2, t)).to(device)}
            check_static_shape(holder, batch)
            model(batch["input_ids"], labels=batch["input_ids"]).loss.backward()
            torch_xla.sync()
            compiles.append(met.metric_data("CompileTime")[0])
    assert sum("distinct batch shapes" in str(w.message) for w in record) == 1
    # the oracle for the warning's claim: every new shape really compiled at least one new graph
    assert all(b > a for a, b in zip(compiles, compiles[1:])), compiles
