"""Chunked LM head + cross-entropy that never holds the (tokens, vocab) logits.

With a 50257-wide vocabulary the logits of one 2048-token batch take 411 MB in float32, and a
plain `F.cross_entropy(h @ W.T, y)` walks them several times (log-softmax, its backward, the zero-
filled gradient). Here each chunk of rows computes its logits, its share of the loss and, at once,
its gradients with respect to h and W, while the chunk is still in cache. Where the device's
policy asks for it, `triton_lm_head`'s kernels do the same with no chunk of logits in memory at all.
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels, triton_lm_head
from .onednn import linear, pack, use_onednn
from .policy import policy
from .recon import at_least_fp32

IGNORE_INDEX = -100


LOG2E, LN2 = math.log2(math.e), math.log(2.0)
Z_RANGE = (2.0**-32, 2.0**64)
"""A chunk's exp2 is taken without the max shift when every row's sum lands in this range: then
no logit passes 64, so exp2 and the sums of the gradient GEMMs stay far from float32's 2^128;
and the largest is above -48, so every probability down to 2^-78 of the top one is a normal float
(the shifted softmax keeps those down to 2^-126; the difference is below any gradient that
matters). Trained models' logits sit well inside: a cpu-small local model after 3,000 steps had
each row's largest base-2 logit at 4.0-27.0 on held-out text (both streams)."""


def _logits_buffer(h: Tensor, weight: Tensor, chunk_rows: int, acc: torch.dtype) -> Tensor | None:
    """One (vocab, chunk_rows) buffer for every full chunk's logits, when the GEMM's own dtype is
    the accumulation dtype (not under autocast, which picks the GEMM's dtype itself)."""
    if h.dtype != acc or weight.dtype != acc or torch.is_autocast_enabled(h.device.type):
        return None
    return torch.empty(weight.shape[0], chunk_rows, dtype=acc, device=h.device)


def _chunk_logits(weight: Tensor, h_chunk: Tensor, buf: Tensor | None, acc: torch.dtype) -> Tensor:
    """weight @ h_chunk^T: (vocab, n), in the reused buffer when there is one and the chunk is full."""
    if buf is not None and h_chunk.shape[0] == buf.shape[1]:
        return torch.mm(weight, h_chunk.T, out=buf)
    return (weight @ h_chunk.T).to(acc)


def chunk_rows_for(vocab: int, device: torch.device | str = "cpu") -> int:
    """Rows per chunk: the device's `ops.DevicePolicy.lm_head_rows`, or the largest power of two
    whose logits fit its `lm_head_elements`. On a CPU (256 rows, 2^24 logits), measured side by
    side over 2048 rows: with GPT-2's vocabulary 256 rows beat 128 by 1-2% and 1024 rows lose 3%;
    with a compact one (8,726 ids, d_model 64) 128 and 256 tie and 1024 rows lose; powers of two
    matter (333-row chunks were far slower than 128 or 256)."""
    p = policy(device)
    return min(p.lm_head_rows, 1 << max(0, (p.lm_head_elements // vocab).bit_length() - 1))


class _Products(NamedTuple):
    """A chunk's products with the weight, in one memory layout of its logits."""

    vocab_dim: int
    """Where the vocabulary is in a chunk's logits and in the grad_W accumulator: 0 for (vocab, n)
    logits and a (vocab, d_model) accumulator, 1 for (n, vocab) and (d_model, vocab)."""
    logits: Callable[[Tensor], Tensor]
    """A chunk of base-2 inputs (n, d_model) -> its logits in this layout."""
    grad_h: Callable[[Tensor], Tensor]
    """A chunk's probabilities in this layout -> their product with the weight (n, d_model)."""
    grad_w: Callable[[Tensor | None, Tensor, Tensor], Tensor]
    """(accumulator or None, probabilities, row-scaled inputs (n, d_model)) -> the accumulator plus
    their product over the chunk's rows (the first chunk's GEMM writes it: no zero-fill pass)."""


def _mkl_grad_w(acc: Tensor | None, probs: Tensor, hs: Tensor) -> Tensor:
    """acc (vocab, d_model) += probs (vocab, n) @ hs, in place (beta=0 for the first chunk)."""
    if acc is None:
        return torch.empty(probs.shape[0], hs.shape[1], dtype=hs.dtype, device=hs.device).addmm_(probs, hs, beta=0)
    return acc.addmm_(probs, hs)


def _mkl_products(h: Tensor, weight: Tensor, chunk_rows: int, acc: torch.dtype) -> _Products:
    """(vocab, n) logits through torch.mm, into one reused buffer."""
    buf = _logits_buffer(h, weight, chunk_rows, acc)
    return _Products(0, lambda h2c: _chunk_logits(weight, h2c, buf, acc),
                     lambda probs: probs.T.to(weight.dtype) @ weight, _mkl_grad_w)


def _onednn_products(weight: Tensor) -> _Products:
    """(n, vocab) logits through oneDNN's linear, which on AMD CPUs runs AVX-512 at full width
    where torch.mm's MKL does not (`selfablate.ops.onednn`). grad_W is accumulated transposed,
    (d_model, vocab), as oneDNN wants the probabilities as its contiguous operand. The chunk size
    is the CPU policy's (`ops.DevicePolicy`), chosen by side-by-side measurement."""
    packed = pack(weight)  # once per call, for the logits

    def grad_w(acc: Tensor | None, probs: Tensor, hs: Tensor) -> Tensor:
        out = linear(kernels.transposed(hs), probs.T)  # (d_model, vocab)
        return out if acc is None else acc.add_(out)

    return _Products(1, lambda h2c: linear(h2c, packed), lambda probs: linear(probs, weight.T), grad_w)


class _ChunkSoftmax(NamedTuple):
    """One chunk's unnormalised softmax, in place of its logits."""

    probs: Tensor
    """2^(l - shift) of the base-2 logits l, in the products' layout."""
    z: Tensor
    """(n,) sums of probs over the vocabulary."""
    shift: Tensor | float
    """(n,) each row's max logit, or 0.0 when unshifted."""
    picked: Tensor
    """(n,) the targets' base-2 logits."""


@functools.cache
def _lmhead_library() -> ctypes.CDLL | None:
    P, L, I = kernels.P, kernels.L, kernels.I
    return kernels.library("lmhead", {"exp2_rowsum": [P, P, L, L, I], "exp2_array": [P, P, I]})


def _exp2_sums(logits: Tensor, dim: int) -> Tensor:
    """2^logits in place, and their sums over dim. A (rows, vocab) float32 CPU chunk takes one C
    pass (csrc/lmhead.c) instead of two (exp2_, then sum) over memory that no longer fits in cache."""
    lib = (_lmhead_library() if dim == 1 and kernels.on_cpu_float32(logits) and logits.is_contiguous()
           else None)
    if lib is None:
        return logits.exp2_().sum(dim)
    sums = logits.new_empty(logits.shape[0])
    lib.exp2_rowsum(*kernels.pointers(logits, sums), logits.shape[0], logits.shape[1], kernels.threads())
    return sums


def _chunk_softmax(products: _Products, h2_chunk: Tensor, tgt: Tensor, unshifted: bool) -> _ChunkSoftmax:
    """Logits, then exp2 in place. `unshifted` tries it without subtracting each row's max,
    which saves two passes over the logits (amax and sub_), and keeps the result if every sum
    is in Z_RANGE; otherwise the logits are computed again and shifted by their max, the plain
    safe softmax."""
    dim = products.vocab_dim
    logits = products.logits(h2_chunk)
    if unshifted:
        picked = logits.gather(dim, tgt.unsqueeze(dim)).squeeze(dim)  # before the in-place exp2
        z = _exp2_sums(logits, dim)
        if bool(((z >= Z_RANGE[0]) & (z <= Z_RANGE[1])).all()):
            return _ChunkSoftmax(logits, z, 0.0, picked)
        logits = products.logits(h2_chunk)
    shift = logits.amax(dim, keepdim=True)
    picked = logits.gather(dim, tgt.unsqueeze(dim)).squeeze(dim)
    z = _exp2_sums(logits.sub_(shift), dim)
    return _ChunkSoftmax(logits, z, shift.squeeze(dim), picked)


def _finish_grad_w(acc: Tensor | None, products: _Products, weight: Tensor, h: Tensor, targets: Tensor,
                   n_valid: Tensor) -> Tensor:
    """The accumulator as weight's gradient, (vocab, d_model) contiguous in weight's dtype, with
    the one-hot part of every row added at once: grad_W[t_i] -= h_i * valid_i / n_valid (one
    index_add_ over whole rows instead of one a chunk, into the transposed accumulator)."""
    if acc is None:  # no rows
        return torch.zeros_like(weight)
    gw = acc if products.vocab_dim == 0 else kernels.transposed(acc)
    valid = (targets != IGNORE_INDEX).to(gw.dtype)
    gw.index_add_(0, targets.clamp(min=0), h.to(gw.dtype) * (-valid / n_valid)[:, None])
    return gw.to(weight.dtype)


def _chunked(h: Tensor, weight: Tensor, targets: Tensor, need_h: bool, need_w: bool, chunk_rows: int,
             onednn: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The mean CE and its gradients, chunk by chunk of rows, while each chunk's logits are hot, in
    one of two layouts (`_Products`). On a float32 CPU with oneDNN: (rows, vocab) logits from
    oneDNN's GEMMs. Elsewhere: (vocab, rows) logits through torch.mm, so that the logits GEMM
    (W @ h^T) and grad_W (G @ h) both have the vocabulary as their long dimension, into one reused
    buffer (a fresh tensor per chunk would fault its pages in again). Rows per chunk:
    `chunk_rows_for`. `benchmarks/lm_head.py` measures each of these choices against the plain path.

    In both, the logits are in base-2 units, h scaled by log2(e), because exp2 is cheaper than
    exp on CPUs (softmax is unchanged: 2^(l log2 e) = e^l); after their GEMM the chunk's logits
    are touched by exp2 in place and their sums only (one C pass on a float32 CPU, `_exp2_sums`);
    where host reads are free the max shift is skipped while the sums stay in Z_RANGE
    (`_chunk_softmax`); the softmax's normalisation goes into the (rows, d_model) operands of the
    gradient GEMMs instead of a pass over the logits, and the target's -1 into grad_h's small
    product and one index_add_ over all rows (`_finish_grad_w`).
    """
    acc = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 in tests
    n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = None  # the products' accumulator, laid out as they like it
    total = torch.zeros((), dtype=acc, device=h.device)
    h2 = h * LOG2E  # base-2 logits: log2-sum-exp2 = logsumexp / ln 2
    products = _onednn_products(weight) if onednn else _mkl_products(h, weight, chunk_rows, acc)
    unshifted = policy(h.device).host_reads_free
    for start in range(0, h.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        valid = (targets[rows] != IGNORE_INDEX).to(acc)
        tgt = targets[rows].clamp(min=0)
        sm = _chunk_softmax(products, h2[rows], tgt, unshifted)
        unshifted = isinstance(sm.shift, float)  # once a chunk needed the shift, the rest likely do
        total += ((sm.shift + sm.z.log2() - sm.picked) * valid).sum() * LN2  # back to nats
        if not (need_h or need_w):
            continue
        # d(mean CE)/d(logits) = (probs / z - onehot(target)) * valid / n_valid. The row
        # scales go into the GEMMs' small operands, not over the (vocab, n) probs.
        scale, hit = (valid / sm.z / n_valid)[:, None], (valid / n_valid)[:, None]  # (n, 1)
        if need_h:
            grad_h[rows] = (products.grad_h(sm.probs) * scale - hit * weight[tgt]).to(h.dtype)
        if need_w:
            grad_w = products.grad_w(grad_w, sm.probs, h[rows].to(acc) * scale)
    grad_w = _finish_grad_w(grad_w, products, weight, h, targets, n_valid) if need_w else None
    return total / n_valid, grad_h, grad_w


def _fused(h: Tensor, weight: Tensor, targets: Tensor, need_h: bool, need_w: bool) -> tuple[Tensor, Tensor | None,
                                                                                               Tensor | None]:
    """The mean CE and its gradients from `ops.triton_lm_head`'s two kernels, which keep the
    logits in registers (CUDA; the interpreter elsewhere)."""
    valid = targets != IGNORE_INDEX
    scale = valid.float() / valid.sum().clamp(min=1)  # (rows,): d(mean CE) / d(CE_i)
    ce, grad_h, grad_w = triton_lm_head.cross_entropy_and_grads(h, weight, targets.clamp(min=0), scale, need_h,
                                                                need_w)
    return ((ce * scale).sum(), None if grad_h is None else grad_h.to(h.dtype),
            None if grad_w is None else grad_w.to(weight.dtype))


class _GradientsInForward(torch.autograd.Function):
    """A loss whose gradients `compute` works out in the forward pass, while its operands are at
    hand (the LM head's logits are never kept for a backward pass); backward only scales them."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, grads: bool, compute: Callable) -> Tensor:  # type: ignore[override]
        # needs_input_grad follows requires_grad, not grad mode: under no_grad skip the gradients.
        need_h, need_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        loss, grad_h, grad_w = compute(h, weight, targets, need_h, need_w)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out,
                None if grad_w is None else grad_w * grad_out, None, None, None)


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int | None = None) -> Tensor:
    """mean_i CE(h_i @ weight.T, targets_i) = mean_i [logsumexp_v(h_i . w_v) - h_i . w_{t_i}],
    over rows whose target is not -100; equal to F.cross_entropy(h @ weight.T, targets).

    h (..., d_model), weight (vocab, d_model), targets (...). Gradients are computed during the
    forward pass and only scaled in the backward pass: chunk by chunk of rows (`_chunked`), or,
    where the device's policy asks for `triton_lm_head` and no chunk size is given, by the Triton
    kernels that never write the logits (`_fused`).
    """
    h2 = h.reshape(-1, h.shape[-1])
    if policy(h.device).plain_lm_head:
        return F.cross_entropy(at_least_fp32(h2 @ weight.T), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    if policy(h.device).triton_lm_head and chunk_rows is None and triton_lm_head.available(h2, weight):
        compute = _fused
    else:
        rows = chunk_rows or chunk_rows_for(weight.shape[0], h.device)
        compute = functools.partial(_chunked, chunk_rows=rows, onednn=use_onednn(h2, weight))
    return _GradientsInForward.apply(h2, weight, targets.reshape(-1), torch.is_grad_enabled(), compute)


@torch.no_grad()
def per_token_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int | None = None) -> Tensor:
    """-log softmax(h_i @ weight.T)[targets_i] for every row, chunk by chunk (no gradients).
    h (..., d_model), targets (...) -> losses (...) in float32 (float64 for float64 inputs)."""
    h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    rows = chunk_rows or chunk_rows_for(weight.shape[0], h.device)
    acc = torch.promote_types(weight.dtype, torch.float32)
    out = torch.empty(h2.shape[0], dtype=acc, device=h.device)
    for start in range(0, h2.shape[0], rows):
        logits = (weight @ h2[start : start + rows].T).to(acc)  # (vocab, n), as in training
        tgt = t2[start : start + rows]
        out[start : start + rows] = logits.logsumexp(0) - logits[tgt, torch.arange(len(tgt), device=h.device)]
    return out.view(targets.shape)
