"""float32 GEMMs through oneDNN on the CPU, where torch.mm's MKL leaves half the machine idle.

On AMD CPUs MKL does not run AVX-512 at full width, and oneDNN's linear (the GEMM PyTorch's
compiled CPU code uses, `torch.ops.mkldnn._linear_pointwise`, a private op) does: about twice
the GEMM throughput on Zen 5 cores (`selfablate.perf.gemm_peaks` measures both; figures in
docs/performance.md). On Intel's CPUs MKL runs at full width and is the faster of the two. The
model's linear layers and its chunked LM head (`lm_head`) take this path for float32 CPU tensors
outside autocast, with the `cpu` backend, where this PyTorch build has the op and the CPU is not
Intel's (`onednn_preferred`); everywhere else, torch.mm.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .backends import backend


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T + bias for a 2-D x (rows, in) and a weight (out, in), as it is (any strides)
    or packed once by `pack` for repeated use."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def pack(weight: Tensor) -> Tensor:
    """weight (out, in) reordered into oneDNN's own layout, for many `linear` calls with it."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


@functools.cache
def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's linear (a private op of its CPU compiler) and it
    computes a product right, packed weight or not."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        a = torch.ones(2, 3, device="cpu")  # not the default device, which may be anything
        return all(torch.allclose(linear(a, w), a @ a.T) for w in (a, pack(a)))
    except (AttributeError, RuntimeError):
        return False


def cpu_vendor() -> str:
    """The CPU's vendor id as Linux reports it ("GenuineIntel", "AuthenticAMD"), or "" elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


@functools.cache
def onednn_preferred() -> bool:
    """Whether float32 CPU GEMMs take oneDNN: this build has it (`onednn_available`) and the CPU
    is not Intel's, where MKL runs AVX-512 at full width and was the faster of the two in the
    model's step, as oneDNN was on AMD's cores (side by side, docs/performance.md)."""
    return onednn_available() and cpu_vendor() != "GenuineIntel"


def use_onednn(*tensors: Tensor) -> bool:
    """Whether GEMMs on these tensors go through oneDNN: the `cpu` backend, all float32 on the
    CPU, no autocast, where oneDNN is preferred (`onednn_preferred`)."""
    return backend() == "cpu" and kernels.float32_cpu(*tensors) and onednn_preferred()


class _LinearFunction(torch.autograd.Function):
    """F.linear with its forward and both backward GEMMs in oneDNN (each measured faster than
    torch.mm's at the paper's shapes on AMD CPUs)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])  # (rows, in)
        ctx.save_for_backward(x2, weight)
        return linear(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])  # (..., out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x2, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, weight.shape[0])  # (rows, out)
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = linear(g, weight.T).view(*grad_out.shape[:-1], weight.shape[1]) if need_x else None
        grad_w = _grad_weight(g, x2) if need_w else None
        grad_b = g.sum(0) if need_b else None  # False for a missing bias
        return grad_x, grad_w, grad_b


def _grad_weight(g: Tensor, x2: Tensor) -> Tensor:
    """g.T @ x2: (out, in) from g (rows, out) and x2 (rows, in). oneDNN wants the rows contiguous in
    its first operand, so one of the two is transposed: the narrower (for fc_in, x2 (rows, 128)
    instead of g (rows, 512); the small (in, out) result is transposed back)."""
    if g.shape[1] > x2.shape[1]:
        return kernels.transposed(linear(kernels.transposed(x2), g.T))  # (in, out) -> (out, in)
    return linear(kernels.transposed(g), x2.T)  # (out, in)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose GEMMs run through oneDNN when they can."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if use_onednn(x, self.weight):
            return _LinearFunction.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def linears(x: Tensor, layers: Sequence[nn.Linear]) -> tuple[Tensor, ...]:
    """layer(x) for each layer, all reading one input. On PyTorch's path (CUDA's) one GEMM over
    their stacked weights: one kernel instead of one per layer, forward and backward, where a
    small model's kernels are too small to fill a GPU; each output is a view of the stacked one,
    (..., out_i). Where the `cpu` backend's kernels run (float32 on the CPU), each layer's own
    call, whose contiguous output the attention kernel reads as it is."""
    biased = [layer.bias is not None for layer in layers]
    mixed = any(biased) and not all(biased)  # stacking would need zero biases: one by one
    if mixed or (backend() == "cpu" and kernels.float32_cpu(x, layers[0].weight)):
        return tuple(layer(x) for layer in layers)
    weight = torch.cat([layer.weight for layer in layers])  # (sum of out, in)
    bias = torch.cat([layer.bias for layer in layers]) if all(biased) else None
    return F.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1)
