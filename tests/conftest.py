"""Shared test setup: offline hub, seeds, GPU marker."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # tiny models run fastest on one thread, and CI runs two test processes on two cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small jsonl of real English documents."""
    from tests.cli_helpers import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl")


@pytest.fixture
def config(tmp_path, corpus) -> Path:
    """A tiny training config (CausalLM on byte-level TextData) writing its run under ``tmp_path / "run"``."""
    from tests.cli_helpers import TINY_CONFIG

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_CONFIG.format(root=tmp_path / "run", corpus=corpus))
    return path
