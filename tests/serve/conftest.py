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
    with serving(hf_dir, "--max_samples", "64") as s:  # 64 samples: a request long enough to hold the worker
        yield s


@pytest.fixture(scope="session")
def reference(hf_dir):
    """The same weights loaded in the test process: the oracle's model and tokenizer."""
    model, tokenizer, _ = load_model(hf_dir)
    return model.eval(), tokenizer
