"""Chunked linear cross-entropy against ``F.cross_entropy`` on full logits (values and gradients), and a check that
no op ever produces the full ``[tokens, vocab]`` logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lit_longctx.nn import linear_cross_entropy
from lit_longctx.nn.loss import default_chunk_size

V, D = 50, 16


def inputs(shape=(3, 20), seed=0, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, D, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(V, D, generator=g) / D**0.5).requires_grad_()
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    return hidden, weight, labels


def reference(hidden, weight, labels, reduction="mean"):
    return F.cross_entropy((hidden @ weight.t()).reshape(-1, weight.shape[0]), labels.reshape(-1), ignore_index=-100,
                           reduction=reduction)


def grads_of(fn, hidden, weight, labels, **kw):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, w, labels, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 60, 1000, None])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_values_and_gradients_equal_full_cross_entropy(chunk_size, reduction):
    hidden, weight, labels = inputs()
    got = grads_of(linear_cross_entropy, hidden, weight, labels, reduction=reduction, chunk_size=chunk_size)
    ref = grads_of(reference, hidden, weight, labels, reduction=reduction)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_upstream_gradient_is_applied():
    hidden, weight, labels = inputs()
    got = grads_of(lambda h, w, y: 3.5 * linear_cross_entropy(h, w, y, chunk_size=8), hidden, weight, labels)
    ref = grads_of(lambda h, w, y: 3.5 * reference(h, w, y), hidden, weight, labels)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_tied_weight_accumulates_both_gradients():
    """The output weight doubles as an embedding table: its gradient is the sum of both uses."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 12), generator=g)
    labels = torch.randint(0, V, (2, 12), generator=g)

    def run(loss_fn):
        w = (torch.randn(V, D, generator=torch.Generator().manual_seed(2))).requires_grad_()
        hidden = torch.tanh(F.embedding(ids, w))
        loss_fn(hidden, w, labels).backward()
        return w.grad

    torch.testing.assert_close(run(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_size=5)), run(reference),
                               atol=1e-6, rtol=1e-5)


def test_frozen_weight_gets_no_gradient():
    hidden, weight, labels = inputs()
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    loss.backward()
    assert weight.grad is None
    h = hidden.detach().clone().requires_grad_()
    reference(h, weight, labels).backward()
    torch.testing.assert_close(hidden.grad, h.grad, atol=1e-6, rtol=1e-5)


def test_frozen_hidden_gets_no_gradient():
    hidden, weight, labels = inputs()
    hidden = hidden.detach()
    linear_cross_entropy(hidden, weight, labels, chunk_size=4).backward()
    w = weight.detach().clone().requires_grad_()
    reference(hidden, w, labels).backward()
    torch.testing.assert_close(weight.grad, w.grad, atol=1e-6, rtol=1e-5)


def test_all_ignored_gives_zero_loss_and_zero_gradients():
    hidden, weight, _ = inputs()
    labels = torch.full((3, 20), -100)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=7)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.isnan(reference(hidden, weight, labels))  # what the unguarded mean would give


def test_no_grad_mode_returns_the_same_value():
    hidden, weight, labels = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=9)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(hidden, weight, labels).detach())


def test_bf16_inputs_stay_close_to_fp32():
    hidden, weight, labels = inputs()
    h16, w16 = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    got = linear_cross_entropy(h16, w16, labels, chunk_size=8)
    assert got.dtype == torch.float32  # the loss is accumulated in float32
    got.backward()
    assert h16.grad.dtype == w16.grad.dtype == torch.bfloat16
    loss, h_grad, w_grad = grads_of(reference, h16.detach().float(), w16.detach().float(), labels)
    assert got.item() == pytest.approx(loss.item(), rel=1e-2)
    for g, ref in ((h16.grad, h_grad), (w16.grad, w_grad)):
        assert (g.float() - ref).abs().max() < 2e-2 * ref.abs().max()


class _VocabTiles(TorchDispatchMode):
    """Records the shape of every new (non-view) floating tensor whose last dimension is the vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.shapes = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in () if func.is_view else out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == self.vocab and t.is_floating_point():
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("chunk_size", [8, 25])
def test_never_materialises_the_full_logits(chunk_size):
    """With 200 tokens and vocab 3000, the largest [*, vocab] tensor produced in forward + backward is one chunk."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(200, D, generator=g, requires_grad=True)
    weight = torch.randn(3000, D, generator=g, requires_grad=True)
    labels = torch.randint(0, 3000, (200,), generator=g)
    with _VocabTiles(3000) as probe:
        linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size).backward()
    assert probe.shapes  # the probe sees the tiles
    assert max(rows for rows, _ in probe.shapes) == chunk_size
    with _VocabTiles(3000) as probe:  # and it would have seen the full logits
        reference(hidden, weight, labels).backward()
    assert (200, 3000) in probe.shapes


def test_default_chunk_size_bounds_the_tile():
    for vocab in (32000, 128256, 7):
        chunk = default_chunk_size(vocab)
        assert chunk >= 1 and (chunk * vocab <= 1 << 26 or chunk == 1)
    assert default_chunk_size(10**9) == 1


def test_errors():
    hidden, weight, labels = inputs()
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'none'"):
        linear_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="labels have 59 tokens but hidden states have 60"):
        linear_cross_entropy(hidden, weight, labels.reshape(-1)[:59])
