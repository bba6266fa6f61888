"""Chunked LM head + cross-entropy that never holds the (tokens, vocab) logits.

With a 50257-wide vocabulary the logits of one 2048-token batch take 411 MB in float32, and a
plain `F.cross_entropy(h @ W.T, y)` walks them several times (log-softmax, its backward, the zero-
filled gradient). Here each chunk of rows computes its logits, its share of the loss and, at once,
its gradients with respect to h and W, while the chunk is still in cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 21  # logits per chunk (8 MB in float32)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int, grads: bool) -> Tensor:  # type: ignore[override]
        # needs_input_grad follows requires_grad, not grad mode: under no_grad skip the gradients.
        need_h, need_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        acc = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 in tests
        n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        total = torch.zeros((), dtype=acc, device=h.device)
        for start in range(0, h.shape[0], chunk_rows):
            hc, tc = h[start : start + chunk_rows], targets[start : start + chunk_rows]
            valid = tc != IGNORE_INDEX
            tgt = tc.clamp(min=0).unsqueeze(1)  # (n, 1)
            logits = (hc @ weight.T).to(acc)  # (n, vocab)
            lse = logits.logsumexp(dim=-1)
            total += ((lse - logits.gather(1, tgt).squeeze(1)) * valid).sum()
            if not (need_h or need_w):
                continue
            # d(mean CE)/d(logits) = (softmax - onehot(target)) / n_valid, on valid rows only.
            grad = logits.sub_(lse.unsqueeze(1)).exp_()
            grad.scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=grad.dtype))
            grad.mul_((valid.to(acc) / n_valid).unsqueeze(1))
            if need_h:
                grad_h[start : start + chunk_rows] = (grad.to(weight.dtype) @ weight).to(h.dtype)
            if need_w:
                grad_w.addmm_(grad.T, hc.to(acc))
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out,
                None if grad_w is None else grad_w * grad_out, None, None, None)


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int | None = None) -> Tensor:
    """mean_i CE(h_i @ weight.T, targets_i) = mean_i [logsumexp_v(h_i . w_v) - h_i . w_{t_i}],
    over rows whose target is not -100; equal to F.cross_entropy(h @ weight.T, targets).

    h (..., d_model), weight (vocab, d_model), targets (...). Gradients are computed during the
    forward pass, chunk by chunk, and only scaled in the backward pass.
    """
    h2 = h.reshape(-1, h.shape[-1])
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(h2, weight, targets.reshape(-1), rows, torch.is_grad_enabled())


@torch.no_grad()
def per_token_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int | None = None) -> Tensor:
    """-log softmax(h_i @ weight.T)[targets_i] for every row, chunk by chunk (no gradients).
    h (..., d_model), targets (...) -> losses (...) in float32 (float64 for float64 inputs)."""
    h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    acc = torch.promote_types(weight.dtype, torch.float32)
    out = torch.empty(h2.shape[0], dtype=acc, device=h.device)
    for start in range(0, h2.shape[0], rows):
        logits = (h2[start : start + rows] @ weight.T).to(acc)  # (n, vocab)
        tgt = t2[start : start + rows].unsqueeze(1)
        out[start : start + rows] = logits.logsumexp(-1) - logits.gather(1, tgt).squeeze(1)
    return out.view(targets.shape)
