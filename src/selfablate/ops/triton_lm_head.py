"""The LM head's loss and gradients in two Triton kernels that never write the logits (CUDA).

The chunked head (`ops.lm_head`) writes each chunk's (vocab, rows) logits to memory and reads them
back three times (exp2 and its sums, then two gradient GEMMs): in float32, 1.2 GB a stream at 24 x
256 tokens and GPT-2's vocabulary, 10 GB at 192 x 256. With a 128-wide inner dimension the GEMMs
cannot hide that traffic, and torch.compile does not fuse a softmax over the vocabulary into the
GEMM that makes it. Here the logits live only in registers, as flash attention keeps its scores
(the rows are its queries, the vocabulary its keys and values at once):

- `triton_jit.rows_kernel`, a program per block of rows and split of the vocabulary: an online
  base-2 softmax over its split and sum_v 2^(l_v - m) w_v. The splits are merged in PyTorch
  (flash-decoding's trick: a few thousand rows still fill the GPU). grad_h = s (sum_v p_v w_v -
  w_t); the target's logit is a row's dot product, outside the kernels.
- `triton_jit.vocab_kernel`, a program per block of the vocabulary: the logits again, p = 2^(l -
  lse), and grad_W_v = sum_i s_i p_iv h_i; the targets' -s_i h_i is one index_add_.

Four GEMMs' arithmetic instead of three, and no (rows, vocab) tensor. Without a GPU the kernels
run in Triton's interpreter (`triton_base`), which is how the tests check them against float64.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from .triton_base import KERNEL_DTYPES, LOG2E, dot_precision, kernels, launch_options, padded, runs_on


def available(h: Tensor, weight: Tensor) -> bool:
    """Triton runs here (`triton_base.runs_on`) and the GEMMs' dtype is one the kernels take."""
    return runs_on(h) and _gemm_dtype(h, weight) in KERNEL_DTYPES


def _gemm_dtype(h: Tensor, weight: Tensor) -> torch.dtype:
    """Autocast's dtype where it is on (as the chunked head's torch.mm would take), else the inputs'."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, weight.dtype)


class Tiles(NamedTuple):
    """Block sizes and launch shape of both kernels (rows x vocabulary x d_model tiles)."""

    rows: int
    """BM: rows per block."""
    vocab: int
    """BV: vocabulary entries per block."""
    warps: int
    stages: int


def tiles(dtype: torch.dtype) -> Tiles:
    """64 x 64 tiles of a 128-wide d_model, 8 warps: the largest that ptxas builds for sm_90 without
    spilling registers in both kernels and both dtypes (`python benchmarks/triton_kernels.py`
    prints each kernel's registers, spills and shared memory); float32 (TF32) operands take
    twice the shared memory a stage, so one stage fewer. Not yet timed on a GPU."""
    return Tiles(64, 64, 8, 3) if dtype != torch.float32 else Tiles(64, 64, 8, 2)


PROGRAMS = 264
"""Programs `triton_jit.rows_kernel` aims for: two waves of an H100's or H200's 132 multiprocessors (a
constant, not a query of the device, which the compiler would have to trace)."""


def _splits(n_rows: int, vocab_blocks: int, t: Tiles, device: torch.device) -> int:
    """Vocabulary splits for `triton_jit.rows_kernel`: at least PROGRAMS programs (at 24 x 256 tokens a stream
    has 96 row blocks: 3 splits), and two under the interpreter, so that the tests merge splits."""
    if device.type != "cuda":
        return min(2, vocab_blocks)
    return max(1, min(vocab_blocks, -(-PROGRAMS // -(-n_rows // t.rows))))


class RowSums(NamedTuple):
    """`triton_jit.rows_kernel`'s results for each split of the vocabulary, (splits, rows[, D]) float32."""

    m: Tensor
    """The largest base-2 logit the split saw in each row."""
    z: Tensor
    """sum_v 2^(l_v - m) over the split."""
    acc: Tensor
    """sum_v 2^(l_v - m) w_v over the split, d_model padded to D."""


@torch.library.custom_op("selfablate::lm_head_rows", mutates_args=())
def lm_head_rows(h: Tensor, weight: Tensor, splits: int, precision: str) -> tuple[Tensor, Tensor, Tensor]:
    """`triton_jit.rows_kernel` over (rows / BM, splits) programs: h (rows, d_model), weight (vocab, d_model)
    contiguous, in the GEMMs' dtype. An opaque operator to torch.compile, which calls it as it is."""
    n, d = h.shape
    t = tiles(h.dtype)
    blocks = -(-weight.shape[0] // t.vocab)
    out = _rows_outputs(h, splits)
    kernels().rows_kernel[(-(-n // t.rows), splits)](h, weight, *out, n, weight.shape[0], d, -(-blocks // splits),
                                             D=padded(d), BM=t.rows, BV=t.vocab, PRECISION=precision,
                                             num_warps=t.warps, num_stages=t.stages, **launch_options())
    return tuple(out)


@lm_head_rows.register_fake
def _(h, weight, splits, precision):
    return tuple(_rows_outputs(h, splits))


def _rows_outputs(h: Tensor, splits: int) -> RowSums:
    n = h.shape[0]
    new = functools.partial(h.new_empty, dtype=torch.float32)
    return RowSums(new(splits, n), new(splits, n), new(splits, n, padded(h.shape[1])))


@torch.library.custom_op("selfablate::lm_head_vocab", mutates_args=())
def lm_head_vocab(h: Tensor, weight: Tensor, lse: Tensor, scale: Tensor, precision: str) -> Tensor:
    """`triton_jit.vocab_kernel` over vocab / BV programs: sum_i scale_i 2^(l_iv - lse_i) h_i, (vocab, d_model)
    float32, from each row's base-2 log-sum-exp and scale (rows,) float32."""
    n, d = h.shape
    t = tiles(h.dtype)
    gw = weight.new_empty(weight.shape, dtype=torch.float32)
    kernels().vocab_kernel[(-(-weight.shape[0] // t.vocab),)](h, weight, lse, scale, gw, n, weight.shape[0], d,
                                                      D=padded(d), BM=t.rows, BV=t.vocab, PRECISION=precision,
                                                      num_warps=t.warps, num_stages=t.stages, **launch_options())
    return gw


@lm_head_vocab.register_fake
def _(h, weight, lse, scale, precision):
    return weight.new_empty(weight.shape, dtype=torch.float32)


def merge(sums: RowSums, d_model: int) -> tuple[Tensor, Tensor]:
    """The splits' online softmaxes as one: each row's base-2 log-sum-exp (rows,) and sum_v p_v w_v
    (rows, d_model), in float32."""
    top = sums.m.amax(0)  # (rows,)
    weight = torch.exp2(sums.m - top)  # (splits, rows); 0 for a split that saw no block
    z = (sums.z * weight).sum(0)
    mean_w = (sums.acc[..., :d_model] * weight[..., None]).sum(0) / z[:, None]  # (rows, d_model)
    return top + z.log2(), mean_w


def cross_entropy_and_grads(h: Tensor, weight: Tensor, targets: Tensor, scale: Tensor, need_h: bool,
                            need_w: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per-row CE in nats (rows,), and the gradients of sum_i scale_i CE_i with respect to h
    (rows, d_model) and weight (vocab, d_model), in float32. h (rows, d_model), targets (rows,),
    every one a valid id, and scale (rows,) float32. The target's logit is a row's dot product
    here, of the operands the kernels multiply (bfloat16 under autocast); the targets' terms of
    the gradients take them unrounded, as the chunked head does."""
    dtype = _gemm_dtype(h, weight)
    prec = dot_precision(dtype)
    hq, wq = h.to(dtype).contiguous(), weight.to(dtype).contiguous()
    t = tiles(dtype)
    splits = _splits(h.shape[0], -(-weight.shape[0] // t.vocab), t, h.device)
    lse, mean_w = merge(RowSums(*lm_head_rows(hq, wq, splits, prec)), h.shape[1])
    ce = lse * (1 / LOG2E) - (hq.float() * wq[targets].float()).sum(1)
    grad_h = (mean_w - weight[targets].float()) * scale[:, None] if need_h else None
    grad_w = None
    if need_w:
        grad_w = lm_head_vocab(hq, wq, lse, scale, prec)
        grad_w.index_add_(0, targets, h.float() * -scale[:, None])
    return ce, grad_h, grad_w
