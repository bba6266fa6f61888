"""The Triton LM head (`ops.triton_lm_head`, `DevicePolicy.triton_lm_head`) against float64 and the
chunked head. Without a GPU its kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET)."""

import pytest
import torch
import torch.nn.functional as F

from selfablate import ops
from selfablate.ops import triton_lm_head
from selfablate.ops.lm_head import linear_cross_entropy

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def fused(monkeypatch):
    """This device's policy asks for the Triton head; counts the calls that take it; float32 GEMMs
    exact (no TF32) where there is a GPU."""
    monkeypatch.setitem(ops.POLICIES, DEVICE, ops.POLICIES[DEVICE]._replace(triton_lm_head=True))
    calls = []
    inner = triton_lm_head.cross_entropy_and_grads
    monkeypatch.setattr(triton_lm_head, "cross_entropy_and_grads", lambda *a: calls.append(1) or inner(*a))
    saved, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    yield calls
    torch.backends.cuda.matmul.allow_tf32 = saved


def problem(n, vocab, d_model, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d_model, generator=g, dtype=dtype)
    w = torch.randn(vocab, d_model, generator=g, dtype=dtype) / 3
    y = torch.randint(0, vocab, (n,), generator=g)
    y[: n // 7] = -100  # ignored positions
    return h.to(DEVICE), w.to(DEVICE), y.to(DEVICE)


def loss_and_grads(fn, h, w, y, dtype):
    h, w = h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    loss = fn(h, w, y)
    return [t.detach().double() for t in (loss, *torch.autograd.grad(loss * 2.5, (h, w)))]


def plain(h, w, y):
    return F.cross_entropy(h @ w.T, y, ignore_index=-100)


@pytest.mark.parametrize("n, vocab, d_model", [(70, 97, 32), (130, 300, 24), (5, 1000, 128)])
def test_the_triton_head_equals_float64(fused, n, vocab, d_model):
    """Rows, vocabulary and d_model that fill no tile (64 x 64 tiles, d_model padded to a power of
    two), split vocabularies merged, ignored targets: the loss and both gradients of float32 inputs
    against float64's, and no further off than the chunked float32 head."""
    h, w, y = problem(n, vocab, d_model)
    ref = loss_and_grads(plain, h, w, y, torch.float64)
    got = loss_and_grads(linear_cross_entropy, h, w, y, torch.float32)
    assert len(fused) == 1
    chunked = loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows=64), h, w, y, torch.float32)
    assert len(fused) == 1  # an explicit chunk size takes the chunked head
    for name, g, c, r in zip(("loss", "grad_h", "grad_w"), got, chunked, ref):
        err, err_chunked = (g - r).abs().max() / r.abs().max(), (c - r).abs().max() / r.abs().max()
        assert err <= 2e-6 and err <= 4 * err_chunked + 1e-7, (name, err.item(), err_chunked.item())


@pytest.mark.parametrize("splits", [1, 2, 3, 9])
def test_any_split_of_the_vocabulary_merges_to_the_same_softmax(splits):
    """`_rows_kernel` over 1..9 splits of 5 vocabulary blocks (9: splits that see no block), merged:
    each row's log-sum-exp and sum_v p_v w_v equal float64's."""
    h, w, _ = problem(50, 300, 32, seed=1)
    lse, mean_w = triton_lm_head.merge(triton_lm_head.RowSums(*triton_lm_head.lm_head_rows(
        h.float().contiguous(), w.float().contiguous(), splits, "ieee")), 32)
    logits = h @ w.T
    torch.testing.assert_close(lse.double(), logits.logsumexp(1) / torch.log(torch.tensor(2.0, dtype=torch.float64)),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean_w.double(), logits.softmax(1) @ w, rtol=1e-5, atol=1e-6)


def test_ignored_rows_give_no_gradient_and_all_ignored_a_zero_loss(fused):
    h, w, y = problem(40, 97, 32, dtype=torch.float32)
    h.requires_grad_()
    y[:10] = -100
    grad_h = torch.autograd.grad(linear_cross_entropy(h, w, y), h)[0]
    assert (grad_h[:10] == 0).all() and (grad_h[10:] != 0).any()
    y[:] = -100
    loss = linear_cross_entropy(h, w, y)
    assert loss.item() == 0 and (torch.autograd.grad(loss, h)[0] == 0).all()


def test_under_bf16_autocast_it_is_the_float32_loss_to_bf16s_rounding(fused):
    """The kernels multiply bfloat16 operands (autocast's dtype) with float32 sums; the loss and
    gradients come back float32 and near float32's (bf16 keeps 8 bits of mantissa)."""
    h, w, y = problem(90, 300, 32, dtype=torch.float32)
    ref = loss_and_grads(plain, h, w, y, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = loss_and_grads(linear_cross_entropy, h, w, y, torch.float32)
    assert len(fused) == 1
    assert abs(got[0] - ref[0]) <= 2e-3 * ref[0]
    for g, r in zip(got[1:], ref[1:]):
        assert F.cosine_similarity(g.flatten(), r.flatten(), 0) >= 0.9999 and abs(g.norm() / r.norm() - 1) < 1e-3


def test_float64_stays_with_the_chunked_head(fused):
    h, w, y = problem(30, 97, 16)
    got = loss_and_grads(linear_cross_entropy, h, w, y, torch.float64)
    for g, r in zip(got, loss_and_grads(plain, h, w, y, torch.float64)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert not fused


def test_a_gpu_gets_enough_programs_and_the_interpreter_two_splits():
    """At least `PROGRAMS` (264) programs of `_rows_kernel` on a GPU, by splitting the vocabulary
    (GPT-2's: 786 blocks of 64): 96 row blocks (one stream at 24 x 256) -> 3 splits, 768 -> 1;
    2 splits elsewhere."""
    t = triton_lm_head.tiles(torch.bfloat16)
    gpu = torch.device("cuda", 0)
    assert [triton_lm_head._splits(n, 786, t, gpu) for n in (6144, 49152, 64, 1)] == [3, 1, 264, 264]
    assert triton_lm_head._splits(64, 3, t, gpu) == 3 and triton_lm_head._splits(6144, 786, t, torch.device("cpu")) == 2
