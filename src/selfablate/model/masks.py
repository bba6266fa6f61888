"""k-winners-take-all masks over unit relevance scores.

All functions act on the last dimension of `scores` (..., width) and return a mask of the same
shape with exactly k ones per row (hard) or k in total (soft).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from . import kernels


def _gate(scores: Tensor, s_k: Tensor, s_k1: Tensor, temperature: float, eps: float) -> tuple[Tensor, Tensor]:
    """The soft top-k's sigmoid argument u = (s - m) / D, with m = (s_(k) + s_(k+1)) / 2 and
    D = T * (s_(k) - s_(k+1)) + eps, and D; s_k, s_k1: (..., 1)."""
    D = temperature * (s_k - s_k1) + eps
    return (scores - (s_k + s_k1) / 2).div_(D), D


def _soft_from_top(scores: Tensor, top: Tensor, k: int, temperature: float, eps: float) -> Tensor:
    """The soft top-k given the row's k+1 largest scores `top` (sorted, descending)."""
    u, _ = _gate(scores, top[..., k - 1 : k], top[..., k : k + 1], temperature, eps)
    w = torch.sigmoid(u)
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
    if k < scores.shape[-1] and _topk_kernel(scores) is not None:
        return topk_winners(scores, k).hard
    idx = scores.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(scores).scatter_(-1, idx, 1.0)


class Winners(NamedTuple):
    """A k-winners-take-all mask and the scores on either side of its cut."""

    hard: Tensor
    """(..., width) 0/1, exactly k ones per row."""
    ab: Tensor
    """(..., 2) the k-th and the (k+1)-th largest score of each row, s_(k) and s_(k+1)."""
    ab_idx: Tensor
    """(..., 2) int64 their positions in the row."""


@functools.cache
def _topk_library() -> ctypes.CDLL | None:
    P, L, I, F = kernels.P, kernels.L, kernels.I, kernels.F
    return kernels.library("topk", {"topk_mask": [P, P, P, P, L, I, I, I],
                                    "topk_soft_grad": [P, P, P, P, P, L, I, I, F, F, I]})


def _topk_kernel(*tensors: Tensor) -> ctypes.CDLL | None:
    """csrc/topk.c, for float32 CPU rows whose width is a multiple of 16 (its vector width)."""
    if not (kernels.on_cpu_float32(*tensors) and tensors[0].shape[-1] % 16 == 0 and tensors[0].numel()):
        return None
    return _topk_library()


def topk_winners(scores: Tensor, k: int) -> Winners:
    """The k largest scores of each row (1 <= k < width) as a mask, with s_(k), s_(k+1) and their
    positions. On a float32 CPU from csrc/topk.c (ties go to the earlier position; with its C
    backward, the mask's forward + backward 3.8-4.8x the torch.topk path at the paper's widths in
    two runs of `benchmarks/masks.py`), else from torch.topk."""
    lib = _topk_kernel(scores)
    if lib is None:
        return _torch_topk_winners(scores, k)
    s = scores.contiguous()
    hard, ab = torch.empty_like(s), s.new_empty(*s.shape[:-1], 2)
    ab_idx = torch.empty(*s.shape[:-1], 2, dtype=torch.long)
    width = s.shape[-1]
    if lib.topk_mask(s.data_ptr(), hard.data_ptr(), ab.data_ptr(), ab_idx.data_ptr(), s.numel() // width, width, k,
                     kernels.threads()):
        raise MemoryError("the top-k kernel could not allocate its buffers")
    return Winners(hard, ab, ab_idx)


def _torch_topk_winners(scores: Tensor, k: int) -> Winners:
    # An unsorted top-(k+1) is cheaper than a sorted one; its minimum is s_(k+1), the next s_(k).
    vals, idx = scores.topk(k + 1, dim=-1, sorted=False)  # (..., k+1)
    b, pos_b = vals.min(-1, keepdim=True)
    a, pos_a = vals.scatter(-1, pos_b, float("inf")).min(-1, keepdim=True)
    idx_b = idx.gather(-1, pos_b)
    hard = torch.zeros_like(scores).scatter_(-1, idx, 1.0).scatter_(-1, idx_b, 0.0)  # exactly k ones
    return Winners(hard, torch.cat([a, b], -1), torch.cat([idx.gather(-1, pos_a), idx_b], -1))


def hard_topk_soft_grad_reference(scores: Tensor, k: int, temperature: float, eps: float = 1e-12) -> Tensor:
    """Hard top-k in the forward pass, the soft top-k's gradient in the backward pass, written
    with autograd: hard + (soft - soft.detach()) (not hard - soft.detach() + soft, so that the
    forward value is exactly the 0/1 mask). The plain form that `hard_topk_soft_grad` is tested
    against."""
    if k >= scores.shape[-1]:
        return torch.ones_like(scores)
    top = scores.topk(k + 1, dim=-1, sorted=True)  # (..., k+1)
    hard = torch.zeros_like(scores).scatter_(-1, top.indices[..., :k], 1.0)
    soft = _soft_from_top(scores, top.values, k, temperature, eps)
    return hard + (soft - soft.detach())


class _HardTopkSoftGrad(torch.autograd.Function):
    """`hard_topk_soft_grad_reference` with a hand-written backward: the forward pass computes only
    the hard mask, and the backward pass the soft top-k's vector-Jacobian product in a few fused
    passes (1.1-1.9x faster at the paper's widths over runs: benchmarks/masks.py).

    With a = s_(k), b = s_(k+1), D = T (a - b) + eps, u = (s - (a + b) / 2) / D, w = sigmoid(u),
    soft = k w / sum(w), and g the incoming gradient:
        ds_i = k / sum(w) * (g_i - <g, w> / sum(w)) * w_i (1 - w_i) / D
    plus, through a and b, dm = -sum(ds) and dD = -sum(ds * u): da = dm / 2 + T dD and
    db = dm / 2 - T dD, added at the positions of a and b.
    """

    @staticmethod
    def forward(ctx, scores: Tensor, k: int, temperature: float, eps: float) -> Tensor:  # type: ignore[override]
        hard, ab, ab_idx = topk_winners(scores, k)
        ctx.save_for_backward(scores, ab, ab_idx)
        ctx.k, ctx.temperature, ctx.eps = k, temperature, eps
        return hard

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        s, ab, ab_idx = ctx.saved_tensors
        lib = _topk_kernel(s, g)
        if lib is not None:
            return _kernel_soft_grad(lib, s, g, ab, ab_idx, ctx.k, ctx.temperature, ctx.eps), None, None, None
        k, T = ctx.k, ctx.temperature
        u, D = _gate(s, ab[..., :1], ab[..., 1:], T, ctx.eps)
        w = torch.sigmoid(u)
        w_sum = w.sum(-1, keepdim=True)
        g_dot_w = (g * w).sum(-1, keepdim=True)
        ds = (g - g_dot_w / w_sum).mul_(w).mul_(1 - w).mul_(k / (w_sum * D))
        dm, dD = -ds.sum(-1, keepdim=True), -(ds * u).sum(-1, keepdim=True)
        ds.scatter_add_(-1, ab_idx, torch.cat([dm / 2 + T * dD, dm / 2 - T * dD], -1))
        return ds, None, None, None


def _kernel_soft_grad(lib: ctypes.CDLL, s: Tensor, g: Tensor, ab: Tensor, ab_idx: Tensor, k: int,
                      temperature: float, eps: float) -> Tensor:
    """The backward above in csrc/topk.c: two passes over each row instead of a dozen."""
    s, g = s.contiguous(), g.contiguous()
    ds = torch.empty_like(s)
    width = s.shape[-1]
    lib.topk_soft_grad(s.data_ptr(), g.data_ptr(), ab.data_ptr(), ab_idx.data_ptr(), ds.data_ptr(),
                       s.numel() // width, width, k, temperature, eps, kernels.threads())
    return ds


def hard_topk_soft_grad(scores: Tensor, k: int, temperature: float, eps: float = 1e-12) -> Tensor:
    """Hard top-k in the forward pass (exactly k ones per row), the soft top-k's gradient in the
    backward pass (straight-through). Without autograd the soft part, which only shapes
    gradients, is skipped."""
    if k >= scores.shape[-1]:
        return torch.ones_like(scores)
    if not (torch.is_grad_enabled() and scores.requires_grad):
        return hard_topk(scores, k)
    return _HardTopkSoftGrad.apply(scores, k, temperature, eps)


MaskFunction = Callable[[Tensor, int, float, float], Tensor]

MASK_FUNCTIONS: dict[str, MaskFunction] = {
    "hard": hard_topk_soft_grad,
    "soft": soft_topk,
}
