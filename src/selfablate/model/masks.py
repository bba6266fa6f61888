"""k-winners-take-all masks over unit relevance scores.

All functions act on the last dimension of `scores` (..., width) and return a mask of the same
shape with exactly k ones per row (hard) or k in total (soft).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def soft_topk(scores: Tensor, k: int, temperature: float, eps: float = 1e-12) -> Tensor:
    """Smooth top-k: w_i = sigmoid((s_i - m) / (T * (s_(k) - s_(k+1)) + eps)), renormalised so
    that sum_i w_i = k.

    s_(k) and s_(k+1) are the k-th and (k+1)-th largest scores of the row and m their midpoint,
    so the temperature is relative to the gap that separates winners from losers. With k equal
    to the width every unit is kept and the mask is all ones (no gradient).
    """
    width = scores.shape[-1]
    if k >= width:
        return torch.ones_like(scores)
    top = scores.topk(k + 1, dim=-1, sorted=True).values  # (..., k+1), no full sort
    s_k, s_k1 = top[..., k - 1 : k], top[..., k : k + 1]
    midpoint = (s_k + s_k1) / 2
    w = torch.sigmoid((scores - midpoint) / (temperature * (s_k - s_k1) + eps))
    return w * (k / w.sum(dim=-1, keepdim=True))


def hard_topk(scores: Tensor, k: int) -> Tensor:
    """Exact k-winners-take-all: 1 at the k largest scores of each row, 0 elsewhere."""
    idx = scores.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(scores).scatter_(-1, idx, 1.0)


def hard_topk_soft_grad(scores: Tensor, k: int, temperature: float, eps: float = 1e-12) -> Tensor:
    """Hard top-k in the forward pass, the soft top-k's gradient in the backward pass.

    Straight-through: hard + (soft - soft.detach()). Written this way (not hard - soft.detach() +
    soft) so that the forward value is exactly the 0/1 mask, with no rounding error.
    """
    soft = soft_topk(scores, k, temperature, eps)
    hard = hard_topk(scores.detach(), k)
    return hard + (soft - soft.detach())


MaskFunction = Callable[[Tensor, int, float, float], Tensor]

MASK_FUNCTIONS: dict[str, MaskFunction] = {
    "hard": hard_topk_soft_grad,
    "soft": soft_topk,
}
