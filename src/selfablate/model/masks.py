"""k-winners-take-all masks over unit relevance scores.

All functions act on the last dimension of `scores` (..., width) and return a mask of the same
shape with exactly k ones per row (hard) or k in total (soft).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def _soft_from_top(scores: Tensor, top: Tensor, k: int, temperature: float, eps: float) -> Tensor:
    """The soft top-k given the row's k+1 largest scores `top` (sorted, descending)."""
    s_k, s_k1 = top[..., k - 1 : k], top[..., k : k + 1]
    midpoint = (s_k + s_k1) / 2
    w = torch.sigmoid((scores - midpoint) / (temperature * (s_k - s_k1) + eps))
    return w * (k / w.sum(dim=-1, keepdim=True))


def soft_topk(scores: Tensor, k: int, temperature: float, eps: float = 1e-12) -> Tensor:
    """Smooth top-k: w_i = sigmoid((s_i - m) / (T * (s_(k) - s_(k+1)) + eps)), renormalised so
    that sum_i w_i = k.

    s_(k) and s_(k+1) are the k-th and (k+1)-th largest scores of the row and m their midpoint,
    so the temperature is relative to the gap that separates winners from losers. With k equal
    to the width every unit is kept and the mask is all ones (no gradient).
    """
    if k >= scores.shape[-1]:
        return torch.ones_like(scores)
    top = scores.topk(k + 1, dim=-1, sorted=True).values  # (..., k+1), no full sort
    return _soft_from_top(scores, top, k, temperature, eps)


def hard_topk(scores: Tensor, k: int) -> Tensor:
    """Exact k-winners-take-all: 1 at the k largest scores of each row, 0 elsewhere."""
    idx = scores.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(scores).scatter_(-1, idx, 1.0)


def hard_topk_soft_grad(scores: Tensor, k: int, temperature: float, eps: float = 1e-12) -> Tensor:
    """Hard top-k in the forward pass, the soft top-k's gradient in the backward pass.

    Straight-through: hard + (soft - soft.detach()). Written this way (not hard - soft.detach() +
    soft) so that the forward value is exactly the 0/1 mask, with no rounding error. One top-(k+1)
    serves both parts; without autograd the soft part, which only shapes gradients, is skipped.
    """
    if k >= scores.shape[-1]:
        return torch.ones_like(scores)
    if not (torch.is_grad_enabled() and scores.requires_grad):
        return hard_topk(scores, k)
    top = scores.topk(k + 1, dim=-1, sorted=True)  # (..., k+1)
    hard = torch.zeros_like(scores).scatter_(-1, top.indices[..., :k], 1.0)
    soft = _soft_from_top(scores, top.values, k, temperature, eps)
    return hard + (soft - soft.detach())


MaskFunction = Callable[[Tensor, int, float, float], Tensor]

MASK_FUNCTIONS: dict[str, MaskFunction] = {
    "hard": hard_topk_soft_grad,
    "soft": soft_topk,
}
