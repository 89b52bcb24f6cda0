"""On a non-TPU XLA runtime (XLA:CPU) the TPU peak is unknown and asked of no metadata server: MFU is not logged."""

from __future__ import annotations

import time

from lit_longctx.modules.xla import tpu_peak_flops


def test_no_tpu_peak_on_xla_cpu(monkeypatch):
    monkeypatch.delenv("TYPE", raising=False)
    monkeypatch.delenv("ACCELERATOR_TYPE", raising=False)
    t0 = time.perf_counter()
    assert tpu_peak_flops() is None
    assert time.perf_counter() - t0 < 5  # no network round trip to a TPU metadata server
    monkeypatch.setenv("ACCELERATOR_TYPE", "v6e-8")
    assert tpu_peak_flops() == 918e12
