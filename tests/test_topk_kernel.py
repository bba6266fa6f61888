"""csrc/topk.c (the model's k-winners-take-all on a float32 CPU) against the torch.topk path."""

import shutil

import pytest
import torch

from selfablate.ops import kernels
from selfablate.ops.masks import _torch_topk_winners, hard_topk_soft_grad, soft_topk, topk_winners

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the kernel")


@pytest.mark.parametrize("width, k", [(16, 1), (16, 15), (128, 32), (512, 32), (512, 500), (48, 7)])
def test_kernel_winners_equal_torch_topk_without_ties(width, k):
    scores = torch.randn(3, 50, width, generator=torch.Generator().manual_seed(width + k))
    fast = topk_winners(scores, k)
    slow = _torch_topk_winners(scores, k)
    assert torch.equal(fast.hard, slow.hard)
    assert torch.equal(fast.ab, slow.ab)
    assert torch.equal(fast.ab_idx, slow.ab_idx)


@pytest.mark.parametrize("k", [1, 4, 9, 31])
def test_kernel_winners_with_ties_cut_exactly_k(k):
    """Scores from a few integers (many ties, also negative and zero): exactly k winners, none below a
    loser, s_(k) and s_(k+1) at the positions given, ties taken earliest first."""
    scores = torch.randint(-3, 3, (200, 32), generator=torch.Generator().manual_seed(k)).float()
    scores[0] = -0.0
    w = topk_winners(scores, k)
    assert (w.hard.sum(-1) == k).all() and set(w.hard.unique().tolist()) <= {0.0, 1.0}
    won, lost = scores.masked_fill(w.hard == 0, float("inf")), scores.masked_fill(w.hard == 1, -float("inf"))
    torch.testing.assert_close(w.ab[:, 0], won.min(-1).values, rtol=0, atol=0)
    torch.testing.assert_close(w.ab[:, 1], lost.max(-1).values, rtol=0, atol=0)
    rows = torch.arange(200)
    assert (scores[rows, w.ab_idx[:, 0]] == w.ab[:, 0]).all() and (w.hard[rows, w.ab_idx[:, 0]] == 1).all()
    assert (scores[rows, w.ab_idx[:, 1]] == w.ab[:, 1]).all() and (w.hard[rows, w.ab_idx[:, 1]] == 0).all()
    # Among the ties at s_(k+1), the winners come before the first loser.
    tie = scores == w.ab[:, 1:]
    pos = torch.arange(32).expand(200, 32)
    assert (pos[tie & (w.hard == 1)].view(-1) >= 0).all()
    first_lost = torch.where(tie & (w.hard == 0), pos, 99).min(-1).values
    assert (torch.where(tie & (w.hard == 1), pos, -1).max(-1).values < first_lost).all()


@pytest.mark.parametrize("width, k", [(128, 32), (512, 32), (16, 3)])
def test_kernel_soft_grad_is_as_accurate_as_the_torch_backward(width, k, monkeypatch, set_backend):
    """Both float32 backward passes against autograd through soft_topk in float64: the C one may
    not be further off than torch's (the gradient is steep near the cut, so float32 itself is
    off by up to 1e-3 of the largest entry here)."""
    g = torch.Generator().manual_seed(width)
    scores, w = (torch.randn(4, 30, width, generator=g, dtype=torch.float64) for _ in range(2))
    s64 = scores.clone().requires_grad_()
    (soft_topk(s64, k, 0.3, 1e-12) * w).sum().backward()
    errors = {}
    for use in (True, False):
        set_backend("cpu" if use else "torch")
        s32 = scores.float().requires_grad_()
        (hard_topk_soft_grad(s32, k, 0.3, 1e-12) * w.float()).sum().backward()
        errors[use] = (s32.grad.double() - s64.grad).abs().max().item()
    assert errors[True] <= 1.2 * errors[False] + 1e-6 * s64.grad.abs().max().item(), errors


def test_kernel_is_skipped_where_it_does_not_apply(monkeypatch, set_backend):
    calls = []
    real = kernels.load
    monkeypatch.setattr(kernels, "load", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    from selfablate.ops import masks

    assert masks._topk_kernel(torch.randn(2, 32)) is not None
    for scores in (torch.randn(2, 24), torch.randn(2, 32, dtype=torch.float64), torch.randn(0, 32)):
        assert masks._topk_kernel(scores) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert masks._topk_kernel(torch.randn(2, 32)) is None
    set_backend("torch")
    assert masks._topk_kernel(torch.randn(2, 32)) is None


@pytest.mark.parametrize("packed", [True, False])
def test_kernel_winners_when_many_scores_share_their_leading_bits(packed):
    """Distinct scores 1 + i 2^-23 all share the top 16 bits of their keys (more than the 64 the
    kernel sorts: it goes on bit by bit); scores in [1, 2) share them a few at a time (it sorts)."""
    g = torch.Generator().manual_seed(5)
    if packed:
        scores = 1.0 + torch.stack([torch.randperm(512, generator=g) for _ in range(64)]).float() * 2**-23
        assert ((scores.view(torch.int32) >> 16) == (scores[:1, :1].view(torch.int32) >> 16)).all()
    else:
        scores = 1.0 + torch.rand(64, 512, generator=g)
    fast, slow = topk_winners(scores, 32), _torch_topk_winners(scores, 32)
    assert torch.equal(fast.hard, slow.hard) and torch.equal(fast.ab, slow.ab)
    assert torch.equal(fast.ab_idx, slow.ab_idx)
