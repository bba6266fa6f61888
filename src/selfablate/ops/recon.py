"""The reconstruction loss: normalised MSE between the clean and ablated residuals, one C pass
each way per term on a float32 CPU (`cpu` backend), in one pass of each operator elsewhere."""

from __future__ import annotations

import ctypes
import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels


def reconstruction_loss(clean: Sequence[Tensor], ablated: Sequence[Tensor]) -> Tensor:
    """Mean over the given residuals of the MSE between L2-normalised clean and ablated vectors:

        1/|R| sum_r mean_{b,t,d} (x_c/||x_c|| - x_a/||x_a||)^2

    The residuals are each block's output and the final LayerNorm's output (n_layers + 1 terms),
    as in the paper. The clean side is not detached: both streams are pulled together.
    """
    if len(clean) != len(ablated) or not clean:
        raise ValueError("reconstruction_loss needs the same, non-zero number of clean and ablated residuals")
    if _recon_kernel_applies(clean[0], ablated[0]):
        terms = [_NormalizedMSE.apply(c, a) for c, a in zip(clean, ablated)]
        return sum(terms) / len(terms)  # type: ignore[return-value]
    if all(c.shape == clean[0].shape for c in (*clean, *ablated)):
        # The same mean in one pass of each operator (on a GPU, launches, not bytes, cost here).
        return _normalized_mse(torch.stack(list(clean)), torch.stack(list(ablated)))  # (terms, ...) each
    terms = [_normalized_mse(c, a) for c, a in zip(clean, ablated)]
    return sum(terms) / len(terms)  # type: ignore[return-value]


def _recon_kernel_applies(c: Tensor, a: Tensor) -> bool:
    """csrc/recon.c computes each term on a float32 CPU, one pass each way instead of the
    half-dozen of F.normalize and F.mse_loss."""
    return c.shape == a.shape and c.numel() > 0 and kernels.on_cpu_float32(c, a) and _recon_library() is not None


def _normalized_mse(c: Tensor, a: Tensor) -> Tensor:
    """F.mse_loss(F.normalize(c, dim=-1), F.normalize(a, dim=-1)) in at least float32."""
    return F.mse_loss(F.normalize(at_least_fp32(c), dim=-1), F.normalize(at_least_fp32(a), dim=-1))


@functools.cache
def _recon_library() -> ctypes.CDLL | None:
    P, L, I, F = kernels.P, kernels.L, kernels.I, kernels.F
    return kernels.library("recon", {"recon_fwd": [P, P, L, I, F, I], "recon_bwd": [P, P, L, I, F, F, P, P, I]},
                           {"recon_fwd": ctypes.c_double})


class _NormalizedMSE(torch.autograd.Function):
    """mean over rows and d of (c/max(|c|, eps) - a/max(|a|, eps))^2, eps = 1e-12 (F.normalize's);
    the formulas are in csrc/recon.c."""

    EPS = 1e-12

    @staticmethod
    def forward(ctx, c: Tensor, a: Tensor) -> Tensor:  # type: ignore[override]
        c, a = c.contiguous(), a.contiguous()
        d = c.shape[-1]
        total = _recon_library().recon_fwd(*kernels.pointers(c, a), c.numel() // d, d, _NormalizedMSE.EPS,
                                           kernels.threads())
        ctx.save_for_backward(c, a)
        return c.new_tensor(total / c.numel())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        c, a = ctx.saved_tensors
        d = c.shape[-1]
        grad_c, grad_a = torch.empty_like(c), torch.empty_like(a)
        _recon_library().recon_bwd(*kernels.pointers(c, a), c.numel() // d, d, _NormalizedMSE.EPS,
                                   float(g) / c.numel(), *kernels.pointers(grad_c, grad_a), kernels.threads())
        return grad_c, grad_a


def at_least_fp32(x: Tensor) -> Tensor:
    """x in float32, or kept in float64: losses are reduced so even under bf16 autocast, and the
    mask heads score so."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
