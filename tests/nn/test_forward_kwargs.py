"""Transformer.forward rejects keyword arguments no attention kind of the model declares (Attention.forward_extras).

Oracle: a declared option changes the computation (cross-batch attention differs from plain attention), so silently
dropping a misspelt one would change results; the error names the accepted options."""

from __future__ import annotations

import pytest
import torch

from lit_longctx.cli import run_with_one_line_errors
from lit_longctx.nn import ModelConfig, Transformer

TINY = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)


def test_a_typo_is_an_error_naming_the_accepted_options():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, layer_attention={1: "fot"}))
    ids = torch.randint(0, 64, (4, 8))
    plain = model(ids).logits
    crossed = model(ids, cross_batch_range=3).logits
    assert (crossed - plain).abs().max() > 1e-4  # the real option matters
    with pytest.raises(ValueError, match=r"\['cross_batch_rang'\].*did you mean cross_batch_range\?.*fot: "
                                         r"cross_batch_range, cross_batch_stepping"):
        model(ids, cross_batch_rang=3)


def test_an_option_of_a_kind_the_model_does_not_use_is_an_error(capsys):
    model = Transformer(ModelConfig(**TINY))
    ids = torch.randint(0, 64, (2, 8))
    with pytest.raises(ValueError, match="cross_batch_range is an option of attention kind 'fot', which no layer"):
        model(ids, cross_batch_range=2)
    with pytest.raises(ValueError, match=r"distill is an option of attention kind 'hybrid_linear'.*causal: none"):
        model(ids, distill=True)
    with pytest.raises(SystemExit) as exit_info:  # a user error: one line, status 2
        run_with_one_line_errors(lambda: model(ids, retrun_logits=True))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown keyword argument(s) ['retrun_logits']")
    assert "did you mean return_logits" in err
    assert len(err.splitlines()) == 1
