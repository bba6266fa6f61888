"""Causal and two-stream attention for narrow heads, as Triton kernels (CUDA).

The paper's heads are 8 wide. PyTorch's fused attention on a GPU (cuDNN's or flash's kernels) works
in 64-wide tiles of the head dimension, so most of its arithmetic and loads are padding: on an
H200 its forward and backward took about 2.3 ms of a 12.4 ms compiled step. These kernels pad the
head only to 16 (the least `tl.dot` takes) and follow flash attention 2 (online softmax forward,
the log-sum-exp kept for a backward that recomputes the scores):

The kernels (in `triton_jit`; the attention's: `attention_forward`, `attention_backward_kv`,
`attention_backward_q`):

- the forward: a program per block of queries and (batch, head): causal attention (query t sees
  keys j <= t), or with SELF the two-stream rule: the clean keys j < t and the query's own
  ablated key, which starts each row's softmax (so that no separate "self" key is made);
- the backward over keys: a program per block of keys, their dK and dV over the queries that see
  them;
- the backward over queries: a program per block of queries, dQ, and with SELF the own key's and
  value's gradients, each row's own.

Scores are unscaled (GPT-Neo's). Inputs (batch, heads, pos, d_head) share one layout (views of
the q/k/v projections' output do); outputs and gradients are laid out (batch, pos, heads, d_head),
so that the caller's transpose back to (batch, pos, d_model) is free.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .triton_base import KERNEL_DTYPES, dot_precision, kernels, launch_options, padded, runs_on

BLOCK = 64
"""Queries and keys per block (both kernels' tiles are BLOCK x BLOCK x the padded head)."""
WARPS = 4


def available(q: Tensor) -> bool:
    """Triton runs here, the dtype is one the kernels take, and the head fits one tile."""
    return runs_on(q) and q.dtype in KERNEL_DTYPES and q.shape[-1] <= 64


class Layout(NamedTuple):
    """Strides of (batch, head, pos) in elements; d_head's is 1."""

    b: int
    h: int
    t: int


def _operands(q: Tensor, k: Tensor, v: Tensor, own_k: Tensor | None,
              own_v: Tensor | None) -> tuple[tuple[Tensor, ...], Layout, bool]:
    """The five inputs the kernels take (without own keys, q stands in for them, unread), their
    layout, and whether the two-stream rule applies. Inputs that share one layout with unit stride
    along d_head (views of one projection's output do) are read as they are, others copied."""
    two_stream = own_k is not None
    xs = (q, k, v, own_k, own_v) if two_stream else (q, k, v)
    if any(x.stride() != q.stride() for x in xs) or q.stride(-1) != 1:
        xs = tuple(x.contiguous() for x in xs)
    return (xs if two_stream else (*xs, xs[0], xs[0])), _layout(xs[0]), two_stream


def _bthd(like: Tensor) -> Tensor:
    """An empty (B, H, T, Dh) tensor laid out (B, T, H, Dh): its transpose(1, 2) is contiguous."""
    B, H, T, Dh = like.shape
    return like.new_empty(B, T, H, Dh).transpose(1, 2)


def _lse_like(q: Tensor) -> Tensor:
    """An empty (B * H, T) float32 tensor for each row's log-sum-exp."""
    return q.new_empty(q.shape[0] * q.shape[1], q.shape[2], dtype=torch.float32)


def _layout(x: Tensor) -> Layout:
    return Layout(*x.stride()[:3])


def _grid(q: Tensor) -> tuple[int, int]:
    B, H, T, _ = q.shape
    return -(-T // BLOCK), B * H



def _constants(q: Tensor, two_stream: bool) -> dict[str, object]:
    """Every launch's compile-time constants and options."""
    return dict(D=padded(q.shape[3]), BLOCK=BLOCK, SELF=two_stream, PRECISION=dot_precision(q.dtype), num_warps=WARPS,
                **launch_options())


@torch.library.custom_op("selfablate::flash_attention", mutates_args=())
def flash_attention(q: Tensor, k: Tensor, v: Tensor, own_k: Optional[Tensor],
                    own_v: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Unscaled softmax attention, causal, or the two-stream rule where own_k and own_v are given.
    All (B, H, T, Dh) -> the output (B, H, T, Dh) and each row's base-2 log-sum-exp (B * H, T)."""
    (q, k, v, own_k, own_v), s, two_stream = _operands(q, k, v, own_k, own_v)
    o, lse = _bthd(q), _lse_like(q)
    sizes = (q.shape[1], q.shape[2], q.shape[3], *s, *_layout(o))
    kernels().attention_forward[_grid(q)](q, k, v, own_k, own_v, o, lse, *sizes, **_constants(q, two_stream))
    return o, lse


@flash_attention.register_fake
def _(q, k, v, own_k, own_v):
    return _bthd(q), _lse_like(q)


@torch.library.custom_op("selfablate::flash_attention_backward", mutates_args=())
def flash_attention_backward(grad_o: Tensor, o: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor,
                             own_k: Optional[Tensor], own_v: Optional[Tensor]) -> list[Tensor]:
    """dQ, dK, dV (and dK_own, dV_own for the two-stream rule), laid out as the output is."""
    (q, k, v, own_k, own_v), s, two_stream = _operands(q, k, v, own_k, own_v)
    grad_o = grad_o if grad_o.stride() == o.stride() else _bthd(q).copy_(grad_o)  # in the outputs' layout
    delta = (grad_o.float() * o.float()).sum(-1).reshape(lse.shape)  # (B * H, T): sum_j p_tj dP_tj
    grads = [_bthd(q) for _ in range(5 if two_stream else 3)]
    dq, dk, dv = grads[:3]
    dok, dov = grads[3:] if two_stream else (dq, dq)
    common = _constants(q, two_stream)
    sizes = (q.shape[1], q.shape[2], q.shape[3], *s, *_layout(dq))
    kernels().attention_backward_kv[_grid(q)](q, k, v, grad_o, lse, delta, dk, dv, *sizes, **common)
    kernels().attention_backward_q[_grid(q)](q, k, v, own_k, own_v, grad_o, lse, delta, dq, dok, dov, *sizes, **common)
    return grads


@flash_attention_backward.register_fake
def _(grad_o, o, lse, q, k, v, own_k, own_v):
    return [_bthd(q) for _ in range(5 if own_k is not None else 3)]


def _setup(ctx, inputs, output):
    q, k, v, own_k, own_v = inputs
    o, lse = output
    ctx.save_for_backward(o, lse, q, k, v, own_k, own_v)


def _backward(ctx, grad_o, grad_lse):
    o, lse, q, k, v, own_k, own_v = ctx.saved_tensors
    grads = flash_attention_backward(grad_o, o, lse, q, k, v, own_k, own_v)
    return (*grads, None, None) if len(grads) == 3 else tuple(grads)


flash_attention.register_autograd(_backward, setup_context=_setup)


def causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention with unscaled scores. (B, H, T, Dh) each -> (B, H, T, Dh)."""
    return flash_attention(q, k, v, None, None)[0]


def two_stream(q: Tensor, clean_k: Tensor, clean_v: Tensor, own_k: Tensor, own_v: Tensor) -> Tensor:
    """Query t sees the clean keys j < t and its own key t. (B, H, T, Dh) each -> (B, H, T, Dh)."""
    return flash_attention(q, clean_k, clean_v, own_k, own_v)[0]
