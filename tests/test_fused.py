"""The chunked LM head + cross-entropy equals the plain one, in value and gradient."""

import pathlib
import shutil

import pytest
import torch
import torch.nn.functional as F

from selfablate import ops
from selfablate.ops import lm_head as fused_module
from selfablate.ops import onednn
from selfablate.ops.lm_head import linear_cross_entropy


@pytest.mark.parametrize("policy_of", ["cpu", "cuda"], ids=["unshifted", "max-shifted"])  # CUDA's: shifted
@pytest.mark.parametrize("chunk_rows", [1, 7, 64, None])
def test_fused_linear_cross_entropy_matches_plain(chunk_rows, policy_of):
    with ops.device_policy_as(policy_of):
        _fused_matches_plain(chunk_rows)


def _fused_matches_plain(chunk_rows):
    torch.manual_seed(0)
    h = torch.randn(3, 13, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (3, 13))
    y[0, :4] = -100  # ignored positions
    plain = F.cross_entropy((h @ w.T).reshape(-1, 50), y.reshape(-1), ignore_index=-100)
    gh, gw = torch.autograd.grad(plain * 2.5, (h, w))
    fused = linear_cross_entropy(h, w, y, chunk_rows)
    fh, fw = torch.autograd.grad(fused * 2.5, (h, w))
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fh, gh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fw, gw, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_float32_fast_path_is_as_accurate_as_plain_float32(scale):
    """float32 takes the reused-buffer, base-2 path. Against a float64 reference its error must be
    no worse than plain float32 F.cross_entropy's (scale 300 gives logits in the thousands, where
    an unshifted exp would overflow and float32 rounding of the logits themselves dominates)."""
    torch.manual_seed(3)
    h64, w64 = torch.randn(300, 32, dtype=torch.float64) * scale, torch.randn(1000, 32, dtype=torch.float64) / 8
    y = torch.randint(0, 1000, (300,))

    def value_and_grads(fn, h, w):
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        loss = fn(h, w)
        return [t.double() for t in (loss, *torch.autograd.grad(loss, (h, w)))]

    ref = value_and_grads(lambda h, w: F.cross_entropy(h @ w.T, y), h64, w64)
    plain = value_and_grads(lambda h, w: F.cross_entropy(h @ w.T, y), h64.float(), w64.float())
    fused = value_and_grads(lambda h, w: linear_cross_entropy(h, w, y, 64), h64.float(), w64.float())
    assert torch.isfinite(fused[0])
    for f, p, r in zip(fused, plain, ref):
        assert (f - r).abs().max() <= 2 * (p - r).abs().max() + 1e-6


def test_chunks_whose_logits_leave_the_unshifted_range_fall_back_to_the_max_shift(monkeypatch):
    """Chunks 1-2 have ordinary logits (exp2 unshifted), chunk 3 logits in the hundreds (recomputed
    with the max shift), chunk 4 ordinary again (shifted too: after one miss the rest are). Value and
    gradients equal the plain float64 ones throughout."""
    amax_calls = []
    real_amax = torch.Tensor.amax
    monkeypatch.setattr(torch.Tensor, "amax", lambda self, *a, **k: amax_calls.append(1) or real_amax(self, *a, **k))
    torch.manual_seed(4)
    h = torch.randn(32, 8, dtype=torch.float64)
    h[16:24] *= 200  # logits far beyond 2^64 in chunk 3 (8-row chunks)
    h.requires_grad_()
    w = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 40, (32,))
    plain = F.cross_entropy(h @ w.T, y)
    fused = linear_cross_entropy(h, w, y, 8)
    assert len(amax_calls) == 2
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for f, p in zip(torch.autograd.grad(fused, (h, w)), torch.autograd.grad(plain, (h, w))):
        torch.testing.assert_close(f, p, rtol=1e-10, atol=1e-12)


def test_weight_gradient_ignores_what_its_uninitialised_buffer_held(monkeypatch):
    """grad_W is allocated without a zero-fill and the first chunk's GEMM overwrites it (beta=0)."""
    for name in ("empty", "empty_like"):  # every uninitialised tensor the head allocates starts as NaN
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, real=real, **k: real(*a, **k).fill_(float("nan")))
    torch.manual_seed(5)
    h = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 9, (10,))
    fused = torch.autograd.grad(linear_cross_entropy(h, w, y, 4), w)[0]
    torch.testing.assert_close(fused, torch.autograd.grad(F.cross_entropy(h @ w.T, y), w)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 300.0], ids=["unshifted", "max-shifted"])
def test_onednn_path_matches_the_torch_mm_path_in_float32(scale, monkeypatch, set_backend):
    """The float32 CPU head runs its logits and grad_h GEMMs through oneDNN in a (rows, vocab)
    layout; against the float64 plain loss it must be as accurate as the torch.mm path, with
    ignored targets and a partial last chunk (scale 300: every chunk takes the max shift)."""
    if not onednn.onednn_available():
        pytest.skip("this PyTorch build has no oneDNN linear")
    monkeypatch.setattr(onednn, "onednn_preferred", lambda: True)  # as on a CPU that is not Intel's
    torch.manual_seed(6)
    h64, w64 = torch.randn(203, 32, dtype=torch.float64) * scale, torch.randn(700, 32, dtype=torch.float64) / 8
    y = torch.randint(0, 700, (203,))
    y[::7] = -100
    ref = [F.cross_entropy(h64 @ w64.T, y)] + list(torch.autograd.grad(
        F.cross_entropy((h64.requires_grad_() @ w64.requires_grad_().T), y), (h64, w64)))
    h64, w64 = h64.detach(), w64.detach()
    results = {}
    for use in (True, False):
        set_backend("cpu" if use else "torch")
        h, w = h64.float().requires_grad_(), w64.float().requires_grad_()
        assert onednn.use_onednn(h, w) == use
        loss = linear_cross_entropy(h, w, y, 64)
        results[use] = [t.double() for t in (loss, *torch.autograd.grad(loss, (h, w)))]
    for fast, mm, r in zip(results[True], results[False], ref):
        assert (fast - r).abs().max() <= 2 * (mm - r).abs().max() + 1e-6


def test_onednn_path_is_taken_only_for_float32_on_the_cpu_outside_autocast(monkeypatch):
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    assert onednn.use_onednn(h, w) == onednn.onednn_preferred()
    monkeypatch.setattr(onednn, "onednn_preferred", lambda: True)
    assert onednn.use_onednn(h, w)
    assert not onednn.use_onednn(h.double(), w.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn.use_onednn(h, w)


@pytest.mark.parametrize("vendor, preferred", [("GenuineIntel", False), ("AuthenticAMD", True), ("", True)])
def test_onednn_is_preferred_except_on_intels_cpus(vendor, preferred, monkeypatch):
    """MKL, torch.mm's library, runs AVX-512 at full width on Intel's CPUs only: there torch.mm,
    elsewhere oneDNN (where this build has it)."""
    monkeypatch.setattr(onednn, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(onednn, "onednn_available", lambda: True)
    onednn.onednn_preferred.cache_clear()
    try:
        assert onednn.onednn_preferred() == preferred
    finally:
        onednn.onednn_preferred.cache_clear()


def test_the_cpu_vendor_is_read_from_linuxs_cpuinfo():
    vendor = onednn.cpu_vendor()
    if not pathlib.Path("/proc/cpuinfo").exists():
        assert vendor == ""
    else:
        assert vendor and vendor in pathlib.Path("/proc/cpuinfo").read_text()


@pytest.mark.parametrize("bias, d_in, d_out", [(True, 24, 40), (False, 24, 40), (True, 40, 24)])
def test_onednn_linear_matches_f_linear_in_value_and_gradients(bias, d_in, d_out, monkeypatch):
    """model.onednn.Linear (every linear layer of the model) against F.linear, float32, on a
    (batch, pos, in) input with a non-contiguous incoming gradient; float64 takes F.linear.
    Wider and narrower outputs take the two orientations of the weight's gradient."""
    if not onednn.onednn_available():
        pytest.skip("this PyTorch build has no oneDNN linear")
    monkeypatch.setattr(onednn, "onednn_preferred", lambda: True)  # as on a CPU that is not Intel's
    calls = []
    real = onednn.linear
    monkeypatch.setattr(onednn, "linear", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(7)
    layer = onednn.Linear(d_in, d_out, bias=bias)
    x = torch.randn(3, 5, d_in, requires_grad=True)
    g = torch.randn(3, d_out, 5).transpose(1, 2)  # (3, 5, d_out), not contiguous
    out = layer(x)
    grads = torch.autograd.grad(out, [x, *layer.parameters()], g)
    assert len(calls) == 3  # forward, grad_input, grad_weight
    ref = F.linear(x, layer.weight, layer.bias)
    ref_grads = torch.autograd.grad(ref, [x, *layer.parameters()], g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    calls.clear()
    layer.double()(x.double().detach())
    assert calls == []


def test_fused_loss_gradcheck():
    torch.manual_seed(1)
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 9, (5,))
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, y, 2), (h, w))


def test_model_training_path_matches_the_logits_path(float64_model):
    model = float64_model()
    vocab, n_ctx = model.cfg.vocab_size, model.cfg.n_ctx
    x, y = torch.randint(0, vocab, (2, n_ctx)), torch.randint(0, vocab, (2, n_ctx))
    ref = model(x, y, return_logits=True)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fast = model(x, y, return_logits=False, return_masks=False)
    fast.loss.backward()
    assert fast.logits_clean is None and fast.logits_ablated is None
    assert fast.attn_mask is None and fast.mlp_mask is None
    for a, b in [(fast.loss, ref.loss), (fast.loss_clean, ref.loss_clean), (fast.loss_ablated, ref.loss_ablated)]:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-9, atol=1e-12, msg=n)


def test_no_gradients_are_computed_under_no_grad(monkeypatch):
    calls = []
    real_addmm = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda self, *a, **k: calls.append(1) or real_addmm(self, *a, **k))
    h = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    y = torch.randint(0, 9, (6,))
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y, 2)
    assert calls == []
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.T, y))


def test_per_token_cross_entropy_matches_plain():
    from selfablate.ops.lm_head import per_token_cross_entropy

    torch.manual_seed(2)
    h, w, y = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(11, 4, dtype=torch.float64), torch.randint(0, 11, (2, 5))
    ref = F.cross_entropy((h @ w.T).reshape(-1, 11), y.reshape(-1), reduction="none").view(2, 5)
    torch.testing.assert_close(per_token_cross_entropy(h, w, y, 3), ref)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the kernel")
def test_exp2_pass_in_c_is_accurate_and_taken_for_float32_rows(monkeypatch):
    """csrc/lmhead.c: 2^x within 2 ulp (0 below 2^-126), row sums as torch's; the head takes it for
    (rows, vocab) float32 chunks only."""
    fused = fused_module
    lib = fused._lmhead_library()
    x = torch.cat([torch.linspace(-126, 60, 4096 * 16 - 16), torch.tensor([-127.0, -1e4] + [0.0] * 14)])
    out = torch.empty_like(x)
    lib.exp2_array(x.data_ptr(), out.data_ptr(), x.numel())
    ref = torch.exp2(x[:-16].double())
    assert ((out[:-16].double() - ref) / ref).abs().max() < 8 * 2**-24
    assert (out[-16:-14] == 0).all() and (out[-14:] == 1).all()
    logits = torch.randn(5, 1000) * 8
    sums = fused._exp2_sums(logits.clone(), 1)  # 1000 = 62 vectors + a tail of 8
    torch.testing.assert_close(sums, logits.double().exp2().sum(1).float(), rtol=2e-6, atol=0)
    calls = []
    real = fused._exp2_sums
    monkeypatch.setattr(fused, "_lmhead_library", lambda: calls.append(1) or lib)
    real(logits.clone(), 1)
    real(logits.T.clone(), 0)  # the (vocab, rows) layout: torch
    real(logits.double(), 1)
    assert len(calls) == 1


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_fused_head_gradients_survive_a_retained_graph(weight):
    """The backward pass returns (or scales) the gradients computed in the forward pass; a second
    backward through a retained graph must give the same, scaled by the loss's weight."""
    torch.manual_seed(2)
    h = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(30, 16, requires_grad=True)
    y = torch.randint(0, 30, (40,))
    loss = linear_cross_entropy(h, w, y) * weight
    first = torch.autograd.grad(loss, (h, w), retain_graph=True)
    second = torch.autograd.grad(loss, (h, w))
    ref = torch.autograd.grad(F.cross_entropy(h @ w.T, y) * weight, (h, w))
    for a, b, r in zip(first, second, ref):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_the_plain_lm_head_policy_equals_the_chunked_head(monkeypatch):
    """`DevicePolicy.plain_lm_head` (F.cross_entropy(h @ W.T), for torch.compile to fuse on CUDA)
    takes the plain path and gives the chunked head's loss and gradients, ignored targets
    included (float64); under bf16 autocast its loss is reduced in float32."""
    torch.manual_seed(0)
    h = torch.randn(3, 13, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (3, 13))
    y[0, :4] = -100
    results = {}
    for plain in (False, True):
        monkeypatch.setitem(ops.POLICIES, "cuda", ops.POLICIES["cuda"]._replace(plain_lm_head=plain))
        with ops.device_policy_as("cuda"):
            loss = linear_cross_entropy(h, w, y)
            results[plain] = (loss, *torch.autograd.grad(loss * 2.5, (h, w)))
            if plain:
                assert type(loss.grad_fn).__name__ == "NllLossBackward0"
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    low = linear_cross_entropy(h.float(), w.float(), y)
                assert low.dtype == torch.float32 and abs(low.item() - loss.item()) < 0.05 * loss.item()
    for chunked, plain in zip(results[False], results[True]):
        torch.testing.assert_close(plain, chunked, rtol=1e-10, atol=1e-12)
