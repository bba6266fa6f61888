"""Causal and two-stream attention for narrow heads, as Triton kernels (CUDA).

The paper's heads are 8 wide. PyTorch's fused attention on a GPU (cuDNN's or flash's kernels) works
in 64-wide tiles of the head dimension, so most of its arithmetic and loads are padding: on an
H200 its forward and backward took about 2.3 ms of a 12.4 ms compiled step. These kernels pad the
head only to 16 (the least `tl.dot` takes) and follow flash attention 2 (online softmax forward,
the log-sum-exp kept for a backward that recomputes the scores):

- `_forward`: a program per block of queries and (batch, head): causal attention (query t sees
  keys j <= t), or with SELF the two-stream rule: the clean keys j < t and the query's own
  ablated key, which starts each row's softmax (so that no separate "self" key is made).
- `_backward_kv`: a program per block of keys: their dK and dV over the queries that see them.
- `_backward_q`: a program per block of queries: dQ, and with SELF the own key's and value's
  gradients, each row's own.

Scores are unscaled (GPT-Neo's). Inputs (batch, heads, pos, d_head) share one layout (views of
the q/k/v projections' output do); outputs and gradients are laid out (batch, pos, heads, d_head),
so that the caller's transpose back to (batch, pos, d_model) is free.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .triton_base import BASE2, KERNEL_DTYPES, dot, dot_precision, launch_options, padded, runs_on, tl, triton

BLOCK = 64
"""Queries and keys per block (both kernels' tiles are BLOCK x BLOCK x the padded head)."""
WARPS = 4


def available(q: Tensor) -> bool:
    """Triton runs here, the dtype is one the kernels take, and the head fits one tile."""
    return runs_on(q) and q.dtype in KERNEL_DTYPES and q.shape[-1] <= 64


if triton is not None:

    @triton.jit
    def _tile(ptr, rows, dims, n_rows, d_head, s_row):
        """A (rows, dims) tile of one (batch, head)'s (pos, d_head) matrix, zero past its edges."""
        mask = (rows[:, None] < n_rows) & (dims[None, :] < d_head)
        return tl.load(ptr + rows[:, None] * s_row + dims[None, :], mask=mask, other=0.0)

    @triton.jit
    def _sees(rows, cols, n_rows, SELF: tl.constexpr):
        """Which keys each query sees: j < t with SELF (the clean keys), else j <= t. (Rows past the
        end see every key: their results are never stored, and no row is left without a key.)"""
        past = cols[None, :] < rows[:, None] if SELF else cols[None, :] <= rows[:, None]
        return past & (cols[None, :] < n_rows)

    @triton.jit
    def _forward(q_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, o_ptr, lse_ptr, n_heads, n_rows, d_head,
                 s_b, s_h, s_t, o_b, o_h, o_t, D: tl.constexpr, BLOCK: tl.constexpr, SELF: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        bh = tl.program_id(1)
        inputs = (bh // n_heads) * s_b + (bh % n_heads) * s_h  # this (batch, head)'s offset
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        dims = tl.arange(0, D)
        q = _tile(q_ptr + inputs, rows, dims, n_rows, d_head, s_t)  # (BLOCK, D)
        if SELF:  # the own key first: m = its base-2 score, l = 1, acc = its value
            own_k = _tile(ok_ptr + inputs, rows, dims, n_rows, d_head, s_t).to(tl.float32)
            m = tl.sum(q.to(tl.float32) * own_k, axis=1) * BASE2
            l = tl.full((BLOCK,), 1.0, tl.float32)
            acc = _tile(ov_ptr + inputs, rows, dims, n_rows, d_head, s_t).to(tl.float32)
        else:
            m = tl.full((BLOCK,), float("-inf"), tl.float32)
            l = tl.zeros((BLOCK,), tl.float32)
            acc = tl.zeros((BLOCK, D), tl.float32)
        for start in range(0, tl.minimum((tl.program_id(0) + 1) * BLOCK, n_rows), BLOCK):  # causal: no later block
            cols = start + tl.arange(0, BLOCK)
            k = _tile(k_ptr + inputs, cols, dims, n_rows, d_head, s_t)  # (BLOCK, D)
            v = _tile(v_ptr + inputs, cols, dims, n_rows, d_head, s_t)
            s = dot(q, tl.trans(k), PRECISION, UPCAST) * BASE2  # (queries, keys), base 2
            s = tl.where(_sees(rows, cols, n_rows, SELF), s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, UPCAST)
            m = m_new
        outputs = (bh // n_heads) * o_b + (bh % n_heads) * o_h
        keep = (rows[:, None] < n_rows) & (dims[None, :] < d_head)
        tl.store(o_ptr + outputs + rows[:, None] * o_t + dims[None, :], acc / l[:, None], mask=keep)
        tl.store(lse_ptr + bh * n_rows + rows, m + tl.log2(l), mask=rows < n_rows)

    @triton.jit
    def _probs(q, k, lse, rows, cols, n_rows, SELF: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """p (queries, keys) of the forward pass, from its base-2 log-sum-exp."""
        s = dot(q, tl.trans(k), PRECISION, UPCAST) * BASE2
        return tl.where(_sees(rows, cols, n_rows, SELF), tl.exp2(s - lse[:, None]), 0.0)

    @triton.jit
    def _backward_kv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, n_heads, n_rows, d_head,
                     s_b, s_h, s_t, o_b, o_h, o_t, D: tl.constexpr, BLOCK: tl.constexpr, SELF: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        bh = tl.program_id(1)
        inputs = (bh // n_heads) * s_b + (bh % n_heads) * s_h
        outputs = (bh // n_heads) * o_b + (bh % n_heads) * o_h
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        dims = tl.arange(0, D)
        k = _tile(k_ptr + inputs, cols, dims, n_rows, d_head, s_t)  # (BLOCK, D)
        v = _tile(v_ptr + inputs, cols, dims, n_rows, d_head, s_t)
        dk = tl.zeros((BLOCK, D), tl.float32)
        dv = tl.zeros((BLOCK, D), tl.float32)
        for start in range(tl.program_id(0) * BLOCK, n_rows, BLOCK):  # causal: no earlier query sees these keys
            rows = start + tl.arange(0, BLOCK)
            q = _tile(q_ptr + inputs, rows, dims, n_rows, d_head, s_t)
            do = _tile(do_ptr + outputs, rows, dims, n_rows, d_head, o_t)
            lse = tl.load(lse_ptr + bh * n_rows + rows, mask=rows < n_rows, other=0.0)
            delta = tl.load(delta_ptr + bh * n_rows + rows, mask=rows < n_rows, other=0.0)
            p = _probs(q, k, lse, rows, cols, n_rows, SELF, PRECISION, UPCAST)  # (queries, keys)
            dv += dot(tl.trans(p).to(do.dtype), do, PRECISION, UPCAST)
            ds = p * (dot(do, tl.trans(v), PRECISION, UPCAST) - delta[:, None])  # dL/d(score)
            dk += dot(tl.trans(ds).to(q.dtype), q, PRECISION, UPCAST)
        keep = (cols[:, None] < n_rows) & (dims[None, :] < d_head)
        at = outputs + cols[:, None] * o_t + dims[None, :]
        tl.store(dk_ptr + at, dk, mask=keep)
        tl.store(dv_ptr + at, dv, mask=keep)

    @triton.jit
    def _backward_q(q_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dok_ptr, dov_ptr,
                    n_heads, n_rows, d_head, s_b, s_h, s_t, o_b, o_h, o_t, D: tl.constexpr, BLOCK: tl.constexpr,
                    SELF: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        bh = tl.program_id(1)
        inputs = (bh // n_heads) * s_b + (bh % n_heads) * s_h
        outputs = (bh // n_heads) * o_b + (bh % n_heads) * o_h
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        dims = tl.arange(0, D)
        q = _tile(q_ptr + inputs, rows, dims, n_rows, d_head, s_t)
        do = _tile(do_ptr + outputs, rows, dims, n_rows, d_head, o_t)
        lse = tl.load(lse_ptr + bh * n_rows + rows, mask=rows < n_rows, other=0.0)
        delta = tl.load(delta_ptr + bh * n_rows + rows, mask=rows < n_rows, other=0.0)
        dq = tl.zeros((BLOCK, D), tl.float32)
        for start in range(0, tl.minimum((tl.program_id(0) + 1) * BLOCK, n_rows), BLOCK):
            cols = start + tl.arange(0, BLOCK)
            k = _tile(k_ptr + inputs, cols, dims, n_rows, d_head, s_t)
            v = _tile(v_ptr + inputs, cols, dims, n_rows, d_head, s_t)
            p = _probs(q, k, lse, rows, cols, n_rows, SELF, PRECISION, UPCAST)
            ds = p * (dot(do, tl.trans(v), PRECISION, UPCAST) - delta[:, None])
            dq += dot(ds.to(k.dtype), k, PRECISION, UPCAST)
        at = outputs + rows[:, None] * o_t + dims[None, :]
        keep = (rows[:, None] < n_rows) & (dims[None, :] < d_head)
        if SELF:  # each row's own key and value: row-wise products, no GEMM
            own_k = _tile(ok_ptr + inputs, rows, dims, n_rows, d_head, s_t).to(tl.float32)
            own_v = _tile(ov_ptr + inputs, rows, dims, n_rows, d_head, s_t).to(tl.float32)
            qf, dof = q.to(tl.float32), do.to(tl.float32)
            p_own = tl.exp2(tl.sum(qf * own_k, axis=1) * BASE2 - lse)
            ds_own = p_own * (tl.sum(dof * own_v, axis=1) - delta)
            dq += ds_own[:, None] * own_k
            tl.store(dok_ptr + at, ds_own[:, None] * qf, mask=keep)
            tl.store(dov_ptr + at, p_own[:, None] * dof, mask=keep)
        tl.store(dq_ptr + at, dq, mask=keep)


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
    _forward[_grid(q)](q, k, v, own_k, own_v, o, lse, q.shape[1], q.shape[2], q.shape[3], *s, *_layout(o),
                       **_constants(q, two_stream))
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
    _backward_kv[_grid(q)](q, k, v, grad_o, lse, delta, dk, dv, *sizes, **common)
    _backward_q[_grid(q)](q, k, v, own_k, own_v, grad_o, lse, delta, dq, dok, dov, *sizes, **common)
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
