"""gelu_new, GPT-2's and GPT-Neo's tanh approximation of GELU, with a C kernel on the CPU.

0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as F.gelu(x, approximate="tanh"), optionally
times a unit mask. On a float32 CPU `csrc/gelu.c` computes it, the mask product and their
derivatives in one vectorised pass each way instead of PyTorch's several (the measured gain is in
docs/performance.md); elsewhere, PyTorch's.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels


@functools.cache
def _library() -> ctypes.CDLL | None:
    P, L, I = kernels.P, kernels.L, kernels.I
    return kernels.library("gelu", {"gelu_fwd": [P, P, P, L, I], "gelu_bwd": [P, P, P, P, P, L, I]})


class _GeluNew(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor | None) -> Tensor:  # type: ignore[override]
        x = x.contiguous()
        mask = None if mask is None else mask.contiguous()
        y = torch.empty_like(x)
        _library().gelu_fwd(*kernels.pointers(x, mask, y), x.numel(), kernels.threads())
        ctx.save_for_backward(x, mask)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, mask = ctx.saved_tensors
        g = g.contiguous()
        dx = torch.empty_like(x)
        dm = None if mask is None or not ctx.needs_input_grad[1] else torch.empty_like(mask)
        _library().gelu_bwd(*kernels.pointers(x, mask, g, dx, dm), x.numel(), kernels.threads())
        return dx, dm


def gelu_new(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """gelu_new(x), times mask (the same shape) if given; elementwise."""
    tensors = (x,) if mask is None else (x, mask)
    if (mask is None or mask.shape == x.shape) and kernels.on_cpu_float32(*tensors) and _library() is not None:
        return _GeluNew.apply(x, mask)
    y = F.gelu(x, approximate="tanh")
    return y if mask is None else y * mask
