"""One causal server (an HF directory with a chat template) shared by the endpoint, concurrency and browser tests."""

from __future__ import annotations

import pytest

from lit_longctx.checkpoint import load_model
from tests.serve.helpers import causal_hf_dir, serving


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    return causal_hf_dir(tmp_path_factory.mktemp("serve") / "tiny-llama")


@pytest.fixture(scope="session")
def server(hf_dir):
    with serving(hf_dir) as s:
        yield s


@pytest.fixture(scope="session")
def reference(hf_dir):
    """The same weights loaded in the test process: the oracle's model and tokenizer."""
    model, tokenizer, _ = load_model(hf_dir)
    return model.eval(), tokenizer
