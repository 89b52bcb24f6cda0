"""XLA:CPU tests (run by scripts/ci/xla.sh in the torch 2.9 + torch_xla venv of scripts/xla_env.sh, never collected
by the main suite). torch_xla runs its PJRT CPU client here; the whole directory is skipped without torch_xla."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest.importorskip("torch_xla", reason="needs torch_xla (scripts/xla_env.sh builds a venv with it)")

from tests_xla.helpers import patch_xla_accelerator  # noqa: E402


@pytest.fixture
def xla_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let Lightning treat XLA:CPU as an XLA accelerator. TESTS ONLY: Lightning's ``XLAAccelerator.is_available()``
    asks for a TPU, so without this patch nothing XLA would run on a CPU-only machine; lit-longctx itself never
    patches Lightning."""
    patch_xla_accelerator(monkeypatch.setattr)


@pytest.fixture
def build_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """TESTS ONLY: Lightning's single-device XLA strategy builds the model directly on the XLA device, whose random
    generator differs from the CPU's; building it on the CPU (it is then moved) gives the XLA run the same initial
    weights as the eager oracle run, so their losses can be compared step by step."""
    import contextlib

    from lightning.pytorch.strategies import SingleDeviceXLAStrategy

    monkeypatch.setattr(SingleDeviceXLAStrategy, "tensor_init_context",
                        lambda self, empty_init=None: contextlib.nullcontext())


def pytest_configure(config: pytest.Config) -> None:
    # start the XLA runtime before any eager CPU backward: torch's autograd engine sizes its per-device queues at
    # its first backward and cannot serve an XLA device registered after that (an internal assert)
    import torch
    import torch_xla

    torch.zeros(1, device=torch_xla.device())
