"""Causal attention for small heads on the CPU, from a C kernel built on first use.

At the paper's shapes (d_head 8, pos 256) PyTorch's fused CPU attention spends most of its time
on per-block overhead: a self-ablating step's 32 attention calls took about 0.29 s of 1.06.
`csrc/attention.c` vectorises over 16 queries or 16 keys instead (no horizontal sums), reads the
projections' (batch, pos, n_heads, d_head) layout as it is (no padding, transposes or the ablated
stream's extra self key), and computes the two-stream rule directly: query t sees the keys
j < t and, at j = t, a diagonal key of its own (`benchmarks/attention.py`).

The kernel is built per head dim on first use (`kernels.load`). Without a compiler, or if the
build fails, `available` is False (with one warning) and the model keeps PyTorch's fused kernel.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from . import kernels
from .policy import policy

MAX_HEAD_DIM = 32
"""Wider heads take PyTorch's kernel: its per-block overhead, which this kernel avoids, matters
less as heads widen, and at 64 the two were measured even (`benchmarks/attention.py --d-head N`;
figures in docs/performance.md)."""


@functools.cache
def _library(d_head: int, **defines: int) -> ctypes.CDLL | None:
    """csrc/attention.c built for d_head (with any other -D defines), its functions typed."""
    P, I = kernels.P, kernels.I
    return kernels.library("attention", {"attn_fwd": [P] * 7 + [I] * 4, "attn_bwd": [P] * 13 + [I] * 5,
                                         "exp_array": [P, P, I]}, HEAD_DIM=d_head, **defines)


def available(d_head: int) -> bool:
    return d_head <= MAX_HEAD_DIM and _library(d_head) is not None


def applies(*tensors: Tensor) -> bool:
    """Whether the kernel computes attention on these (..., d_head) tensors: float32 on the CPU,
    outside autocast, a head dim up to MAX_HEAD_DIM, and a kernel that built."""
    return kernels.on_cpu_float32(*tensors) and available(tensors[0].shape[-1])


def _run(fn, tensors: list[Tensor], B: int, T: int, H: int, *flags: int) -> None:
    """fn over the B * H (batch, head) tasks, on torch's thread count."""
    if fn(*kernels.pointers(*tensors), B, T, H, *flags, kernels.threads()):
        raise MemoryError("the CPU attention kernel could not allocate its buffers")


class _KernelAttention(torch.autograd.Function):
    """z_t = sum_{j<t} p_tj v_j + p_tt vd_t, p_t = softmax over (q_t . k_j for j < t, q_t . kd_t).
    All tensors (B, T, H, Dh) contiguous float32; `diagonal_is_k`: kd, vd are k, v themselves."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, kd: Tensor, vd: Tensor,  # type: ignore[override]
                diagonal_is_k: bool) -> Tensor:
        B, T, H, Dh = q.shape
        out, lse = torch.empty_like(q), q.new_empty(B, H, T)
        _run(_library(Dh).attn_fwd, [q, k, v, kd, vd, out, lse], B, T, H)
        ctx.save_for_backward(q, k, v, kd, vd, out, lse)
        ctx.diagonal_is_k = diagonal_is_k
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        q, k, v, kd, vd, out, lse = ctx.saved_tensors
        B, T, H, Dh = q.shape
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dkd, dvd = (dk, dv) if ctx.diagonal_is_k else (torch.empty_like(kd), torch.empty_like(vd))
        # With the CPU's flush policy, p below 2^-64 counts as 0, so that no subnormal is made.
        flush = int(policy(q.device).flush_subnormal_grads)
        _run(_library(Dh).attn_bwd, [q, k, v, kd, vd, out, lse, grad.contiguous(), dq, dk, dv, dkd, dvd], B, T, H, flush)
        if ctx.diagonal_is_k:
            return dq, dk, dv, None, None, None
        return dq, dk, dv, dkd, dvd, None


def _per_pos(x: Tensor) -> Tensor:
    """(B, H, T, Dh) -> (B, T, H, Dh) contiguous: a free view for the projections' outputs."""
    return x.transpose(1, 2).contiguous()


def causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Unscaled causal softmax attention. q, k, v: (B, H, T, Dh) -> (B, H, T, Dh)."""
    q2, k2, v2 = _per_pos(q), _per_pos(k), _per_pos(v)
    return _KernelAttention.apply(q2, k2, v2, k2, v2, True).transpose(1, 2)  # (B, H, T, Dh)


def two_stream(q: Tensor, clean_k: Tensor, clean_v: Tensor, own_k: Tensor, own_v: Tensor) -> Tensor:
    """The ablated stream's attention: query t sees the clean keys j < t and its own key t.
    All (B, H, T, Dh) -> (B, H, T, Dh)."""
    args = [_per_pos(x) for x in (q, clean_k, clean_v, own_k, own_v)]
    return _KernelAttention.apply(*args, False).transpose(1, 2)  # (B, H, T, Dh)
