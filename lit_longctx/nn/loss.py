"""Cross-entropy of a linear output layer, computed in chunks of tokens.

``[B, T, vocab]`` float32 logits are never materialised: each chunk's logits are formed, reduced to its loss and —
when gradients are needed — immediately turned into that chunk's gradients with respect to the hidden states and the
output weight (d loss / d logits = softmax − onehot). Backward then only scales the stored gradients, so nothing is
recomputed; peak extra memory is one ``[chunk, vocab]`` float32 tile plus a float32 gradient of the weight.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def default_chunk_size(vocab_size: int, max_elements: int = 1 << 26) -> int:
    """Tokens per chunk so that one float32 logits tile stays under ``max_elements`` (256 MiB by default)."""
    return max(1, max_elements // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, denom, chunk_size, grad_enabled):  # noqa: D102 - autograd API
        # Function.forward runs with grad mode off, so whether gradients are wanted is passed in from outside.
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        inv_denom = 1.0 / denom
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            y = labels[start : start + chunk_size]
            valid = y != IGNORE_INDEX
            target = torch.where(valid, y, 0).unsqueeze(1)
            logits = (h @ weight.t()).float()  # (n, V), the only vocab-sized tile
            target_logit = logits.gather(1, target)
            row_max = logits.amax(dim=-1, keepdim=True)
            # exp(logits - max) in place: one pass serves both the logsumexp and the softmax of the gradient
            probs = logits.sub_(row_max).exp_()
            sum_exp = probs.sum(dim=-1, keepdim=True)
            nll = sum_exp.log() + row_max - target_logit  # logsumexp - logit[target], (n, 1)
            total += (nll.squeeze(1) * valid).sum()
            if need_h or need_w:
                scale = valid.unsqueeze(1) * inv_denom  # (n, 1): 1/denom for counted targets, 0 for ignored ones
                grad = probs.mul_(scale / sum_exp)  # softmax / denom
                grad.scatter_add_(1, target, -scale)  # - onehot / denom
                grad = grad.to(hidden.dtype)
                if need_h:
                    grad_h[start : start + chunk_size] = grad @ weight
                if need_w:
                    grad_w.addmm_(grad.t().float(), h.float())
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.need = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        return total * inv_denom

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102 - autograd API
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.need
        grad_h = grad_w = None
        if need_h:
            g = saved.pop(0)
            grad_h = g * grad_out.to(g.dtype)
        if need_w:
            grad_w = (saved.pop(0) * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` (-100 = ignore), chunked over tokens.

    Args:
        hidden: (..., dim) final hidden states (already normalised).
        weight: (vocab, dim) output projection.
        labels: (...) target ids aligned with ``hidden`` (no shift is applied here).
        reduction: ``mean`` over non-ignored targets (0 when there are none) or ``sum``.
        chunk_size: tokens per chunk; default keeps a float32 logits tile under 256 MiB.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if y.shape[0] != h.shape[0]:
        raise ValueError(f"labels have {y.shape[0]} tokens but hidden states have {h.shape[0]}")
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    if reduction == "mean":
        denom = (y != IGNORE_INDEX).sum().clamp_min(1).float()
    elif reduction == "sum":
        denom = torch.ones((), device=h.device)
    else:
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return _LinearCrossEntropy.apply(h, weight, y, denom, chunk, torch.is_grad_enabled())
