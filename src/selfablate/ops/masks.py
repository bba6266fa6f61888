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
from .policy import policy


GAP_FLOOR = 0.01
"""Default fraction of a row's mean neighbour gap that the cut between winners and losers is
widened to where it is narrower (`widen_cut`); the config's `topk_gap_floor`."""


class Cut(NamedTuple):
    """A row's scores as the soft top-k sees them, and the two on either side of its cut."""

    scores: Tensor
    """(..., width)"""
    a: Tensor
    """(..., 1) s_(k), the smallest winner."""
    b: Tensor
    """(..., 1) s_(k+1), the largest loser."""
    ordered: Tensor | None
    """(..., 1) bool: the row's scores are not all equal (None: not checked)."""


def widen_cut(scores: Tensor, hard: Tensor, a: Tensor, b: Tensor, floor: float) -> Cut:
    """Where the gap a - b at the cut is below `floor` times the row's mean gap between neighbouring
    scores, low = floor * (max - min) / (width - 1), the winners are moved up and the losers down
    by half the difference, so that the gap is exactly low:

        s' = s + (2 hard - 1) * shift,  a' = a + shift,  b' = b - shift,  shift = max(0, low - (a - b)) / 2

    a constant of the row (no gradient flows through it). Why: the paper's divisor D = T (a - b) + eps
    makes the gradient grow as 1 / (a - b), and as 1 / eps at a tie (bf16 scores tie at the cut in
    ~15% of rows at the paper's widths, float32 ones now and then). With the cut widened, a tie's
    gradient is the gradient of a row whose gap is low; rows whose gap is above low keep the paper's
    formula exactly, and the gradient is continuous where the two meet. floor = 0 changes nothing.
    """
    if floor == 0:
        return Cut(scores, a, b, None)
    shift, ordered = _shift(scores, a, b, floor)
    return Cut(scores + (2 * hard - 1) * shift, a + shift, b - shift, ordered)


def _shift(scores: Tensor, a: Tensor, b: Tensor, floor: float) -> tuple[Tensor, Tensor]:
    """`widen_cut`'s shift = max(0, low - (a - b)) / 2 and whether the row is ordered (max > min):
    (..., 1) each, no gradient."""
    lo, hi = torch.aminmax(scores.detach(), dim=-1, keepdim=True)  # (..., 1) each
    low = (hi - lo) * (floor / (scores.shape[-1] - 1))
    return (low - (a - b).detach()).clamp_(min=0) / 2, hi > lo


def _divisor(cut: Cut, temperature: float, eps: float) -> Tensor:
    """D = T (a - b) + eps; inf for a row of equal scores, which has no order to learn (no gradient)."""
    D = temperature * (cut.a - cut.b) + eps
    return D if cut.ordered is None else torch.where(cut.ordered, D, torch.inf)


def _cut(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """s_(k) and s_(k+1), the k-th and (k+1)-th largest scores of each row: (..., 1) each.

    From the k + 1 largest in no order: s_(k+1) is their least, and s_(k) the least of the
    others, which is s_(k+1) again where that value occurs more than once. (Asking topk for them
    in order sorts them: on CUDA a radix sort of its own, as costly as the selection.)"""
    top = scores.topk(k + 1, dim=-1, sorted=False).values  # (..., k+1), in no order
    b = top.amin(-1, keepdim=True)  # (..., 1)
    at_b = top == b
    above_b = top.masked_fill(at_b, torch.inf).amin(-1, keepdim=True)  # (..., 1); inf where all tie
    return torch.where(at_b.sum(-1, keepdim=True) > 1, b, above_b), b


def soft_topk(scores: Tensor, k: int, temperature: float, eps: float = 1e-12, floor: float = GAP_FLOOR) -> Tensor:
    """Smooth top-k: w_i = sigmoid((s_i - m) / D), renormalised so that sum_i w_i = k, with
    m = (s_(k) + s_(k+1)) / 2 and D = T * (s_(k) - s_(k+1)) + eps, on the row with its cut widened
    to the floor (`widen_cut`).

    s_(k) and s_(k+1) are the k-th and (k+1)-th largest scores of the row and m their midpoint,
    so the temperature is relative to the gap that separates winners from losers; their gradients
    go to the positions `topk_winners` names (the tie rule's). With k equal
    to the width every unit is kept and the mask is all ones (no gradient).
    """
    if k >= scores.shape[-1]:
        return torch.ones_like(scores)
    hard, _, ab_idx = topk_winners(scores.detach(), k)
    a, b = scores.gather(-1, ab_idx[..., :1]), scores.gather(-1, ab_idx[..., 1:])  # (..., 1) each
    cut = widen_cut(scores, hard, a, b, floor)
    w = torch.sigmoid((cut.scores - (cut.a + cut.b) / 2) / _divisor(cut, temperature, eps))
    return w * (k / w.sum(dim=-1, keepdim=True))


def hard_topk(scores: Tensor, k: int) -> Tensor:
    """Exact k-winners-take-all: 1 at the k largest scores of each row, 0 elsewhere; of tied
    scores at the cut, the earliest positions win (on every backend and device)."""
    if k >= scores.shape[-1]:
        return torch.ones_like(scores)
    return topk_winners(scores, k).hard


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
                                    "topk_soft_grad": [P, P, P, P, P, L, I, I, F, F, I, I]})


def _topk_kernel(*tensors: Tensor) -> ctypes.CDLL | None:
    """csrc/topk.c, for float32 CPU rows whose width is a multiple of 16 (its vector width)."""
    if not (kernels.on_cpu_float32(*tensors) and tensors[0].shape[-1] % 16 == 0 and tensors[0].numel()):
        return None
    return _topk_library()


def topk_winners(scores: Tensor, k: int) -> Winners:
    """The k largest scores of each row (1 <= k < width) as a mask, with s_(k), s_(k+1) and their
    positions. Of scores tied at the cut the earliest positions win, on every path: s_(k)'s
    position is then the last tie taken (else the first position holding s_(k)), s_(k+1)'s the
    first tie left out. On a float32 CPU from csrc/topk.c, else from PyTorch's operators."""
    lib = _topk_kernel(scores)
    if lib is None:
        by_sort = policy(scores.device).topk_by_sort
        return _sorted_topk_winners(scores, k) if by_sort else _torch_topk_winners(scores, k)
    s = scores.contiguous()
    hard, ab = torch.empty_like(s), s.new_empty(*s.shape[:-1], 2)
    ab_idx = s.new_empty(*s.shape[:-1], 2, dtype=torch.long)
    width = s.shape[-1]
    if lib.topk_mask(*kernels.pointers(s, hard, ab), *kernels.pointers(ab_idx, dtype=torch.long),
                     s.numel() // width, width, k, kernels.threads()):
        raise MemoryError("the top-k kernel could not allocate its buffers")
    return Winners(hard, ab, ab_idx)


def _first(where: Tensor) -> Tensor:
    """The first True position of each row of a bool (..., width): (..., 1) int64."""
    return where.to(torch.uint8).argmax(-1, keepdim=True)  # argmax returns the first of equal maxima


def _torch_topk_winners(scores: Tensor, k: int) -> Winners:
    """The C kernel's rule in PyTorch's operators, without host syncs (the CUDA path)."""
    a, b = _cut(scores, k)  # (..., 1) each
    above, ties = scores > b, scores == b
    needed = k - above.sum(-1, keepdim=True)  # ties at b to take: > 0 only when a == b
    rank = ties.cumsum(-1)  # (..., width) 1-based rank of each tie in its row
    hard = above | (ties & (rank <= needed))
    idx_a = _first(torch.where(needed > 0, ties & (rank == needed), scores == a))
    idx_b = _first(ties & (rank == needed + 1))
    return Winners(hard.to(scores.dtype), torch.cat([a, b], -1), torch.cat([idx_a, idx_b], -1))


def _sorted_topk_winners(scores: Tensor, k: int) -> Winners:
    """`_torch_topk_winners` from one stable descending sort of each row: of equal scores the
    earlier comes first, so the first k sorted positions are the winners under the tie rule, and
    the k-th and (k+1)-th are s_(k)'s and s_(k+1)'s positions where the cut is a tie; where it is
    not, s_(k)'s is the first position holding it, as the rule says. No host syncs."""
    values, order = scores.sort(dim=-1, descending=True, stable=True)  # (..., width) each
    ab = values[..., k - 1 : k + 1]  # (..., 2)
    a, b = ab[..., :1], ab[..., 1:]
    idx_a = torch.where(a == b, order[..., k - 1 : k], _first(scores == a))
    hard = torch.zeros_like(scores).scatter_(-1, order[..., :k], 1.0)
    return Winners(hard, ab.contiguous(), torch.cat([idx_a, order[..., k : k + 1]], -1))


def hard_topk_soft_grad_reference(scores: Tensor, k: int, temperature: float, eps: float = 1e-12,
                                  floor: float = GAP_FLOOR) -> Tensor:
    """Hard top-k in the forward pass, the soft top-k's gradient in the backward pass, written
    with autograd: hard + (soft - soft.detach()) (not hard - soft.detach() + soft, so that the
    forward value is exactly the 0/1 mask). The plain form that `hard_topk_soft_grad` is tested
    against."""
    if k >= scores.shape[-1]:
        return torch.ones_like(scores)
    soft = soft_topk(scores, k, temperature, eps, floor)
    return hard_topk(scores.detach(), k) + (soft - soft.detach())


def _soft_grad(cut: Cut, g: Tensor, ab_idx: Tensor, k: int, T: float, eps: float) -> Tensor:
    """The soft top-k's vector-Jacobian product in PyTorch's operators (`_HardTopkSoftGrad`)."""
    D = _divisor(cut, T, eps)
    u = (cut.scores - (cut.a + cut.b) / 2) / D
    w = torch.sigmoid(u)
    w_sum = w.sum(-1, keepdim=True)
    g_dot_w = (g * w).sum(-1, keepdim=True)
    ds = (g - g_dot_w / w_sum).mul_(w).mul_(1 - w).mul_(k / (w_sum * D))
    dm, dD = -ds.sum(-1, keepdim=True), -(ds * u).sum(-1, keepdim=True)
    return ds.scatter_add_(-1, ab_idx, torch.cat([dm / 2 + T * dD, dm / 2 - T * dD], -1))


class _HardTopkSoftGrad(torch.autograd.Function):
    """`hard_topk_soft_grad_reference` with a hand-written backward: the forward pass computes only
    the hard mask, and the backward pass the soft top-k's vector-Jacobian product in a few fused
    passes (`benchmarks/masks.py` compares them).

    With a = s_(k), b = s_(k+1) (the cut widened: `widen_cut`), D = T (a - b) + eps,
    u = (s - (a + b) / 2) / D, w = sigmoid(u), soft = k w / sum(w), and g the incoming gradient:
        ds_i = k / sum(w) * (g_i - <g, w> / sum(w)) * w_i (1 - w_i) / D
    plus, through a and b, dm = -sum(ds) and dD = -sum(ds * u): da = dm / 2 + T dD and
    db = dm / 2 - T dD, added at the positions of a and b.
    """

    @staticmethod
    def forward(ctx, scores: Tensor, k: int, temperature: float, eps: float, floor: float) -> Tensor:  # type: ignore[override]
        hard, ab, ab_idx = topk_winners(scores, k)
        ctx.save_for_backward(scores, hard, ab, ab_idx)
        ctx.args = k, temperature, eps, floor
        return hard

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        s, hard, ab, ab_idx = ctx.saved_tensors
        k, T, eps, floor = ctx.args
        lib, flush = _topk_kernel(s, g), policy(s.device).flush_subnormal_grads
        if lib is not None:  # the kernel flushes as it goes, making no subnormal on the way
            return _kernel_soft_grad(lib, s, g, hard, ab, ab_idx, k, T, eps, floor, flush), None, None, None, None
        ds = _soft_grad(widen_cut(s, hard, ab[..., :1], ab[..., 1:], floor), g, ab_idx, k, T, eps)
        if flush:
            ds = ds.masked_fill_(ds.abs() < torch.finfo(ds.dtype).tiny, 0.0)
        return ds, None, None, None, None


def _kernel_cut(s: Tensor, hard: Tensor, ab: Tensor, floor: float) -> tuple[Tensor, Tensor, Tensor]:
    """`widen_cut` for the C kernel, which takes (s, ab): only the rows it widens are touched (on
    a CPU, finding them costs no wait). Also returns the rows of equal scores."""
    if floor == 0:
        return s, ab, s.new_zeros(0, dtype=torch.long)
    width = s.shape[-1]
    ab2 = ab.view(-1, 2)  # (rows, 2)
    shift, ordered = _shift(s.view(-1, width), ab2[:, :1], ab2[:, 1:], floor)  # (rows, 1) each
    rows = shift.squeeze(1).nonzero().squeeze(1)
    if len(rows):
        s, ab = s.clone(), ab.clone()
        sh = shift[rows]  # (r, 1)
        s.view(-1, width)[rows] += (2 * hard.reshape(-1, width)[rows] - 1) * sh
        ab.view(-1, 2)[rows] += torch.cat([sh, -sh], -1)
    return s, ab, (~ordered).squeeze(1).nonzero().squeeze(1)


def _kernel_soft_grad(lib: ctypes.CDLL, s: Tensor, g: Tensor, hard: Tensor, ab: Tensor, ab_idx: Tensor, k: int,
                      temperature: float, eps: float, floor: float, flush: bool) -> Tensor:
    """The backward above in csrc/topk.c: two passes over each row instead of a dozen. With flush,
    w below 2^-64 counts as 0 and results below float32's smallest normal become 0, so that no
    subnormal is made: on x86 cores each costs about 100 cycles, and far below a narrow cut nearly
    every w would be one."""
    s, g = s.contiguous(), g.contiguous()
    s, ab, flat = _kernel_cut(s, hard.contiguous(), ab, floor)
    ds = torch.empty_like(s)
    width = s.shape[-1]
    lib.topk_soft_grad(*kernels.pointers(s, g, ab), *kernels.pointers(ab_idx, dtype=torch.long),
                       *kernels.pointers(ds), s.numel() // width, width, k, temperature, eps, int(flush),
                       kernels.threads())
    if len(flat):
        ds.view(-1, width)[flat] = 0.0  # rows of equal scores: no order, no gradient (`_divisor`)
    return ds


def hard_topk_soft_grad(scores: Tensor, k: int, temperature: float, eps: float = 1e-12,
                        floor: float = GAP_FLOOR) -> Tensor:
    """Hard top-k in the forward pass (exactly k ones per row), the soft top-k's gradient in the
    backward pass (straight-through). Without autograd the soft part, which only shapes
    gradients, is skipped."""
    if k >= scores.shape[-1]:
        return torch.ones_like(scores)
    if not (torch.is_grad_enabled() and scores.requires_grad):
        return hard_topk(scores, k)
    return _HardTopkSoftGrad.apply(scores, k, temperature, eps, floor)


MaskFunction = Callable[[Tensor, int, float, float, float], Tensor]
"""(scores, k, temperature, eps, gap floor) -> mask."""

MASK_FUNCTIONS: dict[str, MaskFunction] = {
    "hard": hard_topk_soft_grad,
    "soft": soft_topk,
}
