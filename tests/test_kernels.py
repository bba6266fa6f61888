"""ops.kernels: the C transpose, and the fallbacks where the kernels do not apply."""

import shutil

import pytest
import torch

from selfablate.ops import kernels

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the kernels")


@needs_cc
@pytest.mark.parametrize("shape", [(1, 1), (33, 65), (2048, 128), (128, 1000), (31, 32)])
def test_transposed_equals_the_strided_copy(shape, monkeypatch):
    calls = []
    real = kernels._transpose_library
    monkeypatch.setattr(kernels, "_transpose_library", lambda: calls.append(1) or real())
    x = torch.randn(*shape)
    out = kernels.transposed(x)
    assert calls and out.is_contiguous() and torch.equal(out, x.T)


def test_transposed_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    monkeypatch.setattr(kernels, "_transpose_library", lambda: pytest.fail("kernel taken"))
    for x in (torch.randn(5, 7, dtype=torch.float64), torch.randn(7, 5).T, torch.randn(3, 8)[:, ::2]):
        out = kernels.transposed(x)
        assert out.is_contiguous() and torch.equal(out, x.T)


@needs_cc
def test_reconstruction_loss_kernel_is_as_accurate_as_autograd(monkeypatch, set_backend):
    """csrc/recon.c against F.normalize + F.mse_loss in float64, in value and gradients, with a
    zero row and a row whose norm is below F.normalize's eps (the clamp's branch)."""
    from selfablate.ops import reconstruction_loss

    g = torch.Generator().manual_seed(0)
    clean = [torch.randn(2, 9, 48, generator=g, dtype=torch.float64) for _ in range(3)]
    ablated = [torch.randn(2, 9, 48, generator=g, dtype=torch.float64) for _ in range(3)]
    clean[0][0, 0] = 0.0
    ablated[1][1, 2] = 1e-13
    ref_in = [x.clone().requires_grad_() for x in clean + ablated]
    ref = reconstruction_loss(ref_in[:3], ref_in[3:]) * 2.5
    ref_grads = torch.autograd.grad(ref, ref_in)
    errors = {}
    for use in (True, False):
        set_backend("cpu" if use else "torch")
        xs = [x.float().requires_grad_() for x in clean + ablated]
        loss = reconstruction_loss(xs[:3], xs[3:]) * 2.5
        grads = torch.autograd.grad(loss, xs)
        errors[use] = [abs(loss.item() - ref.item())] + [
            ((a.double() - b).abs() / (b.abs().max() + 1e-30)).max().item() for a, b in zip(grads, ref_grads)]
    assert errors[True][0] <= 2 * errors[False][0] + 1e-7, errors
    for fast, slow in zip(errors[True][1:], errors[False][1:]):
        assert fast <= 4 * slow + 1e-6, errors


def test_reconstruction_loss_kernel_is_taken_for_float32_on_the_cpu(monkeypatch):
    from selfablate.ops import recon as losses

    calls = []
    real = losses._NormalizedMSE.apply
    monkeypatch.setattr(losses._NormalizedMSE, "apply", lambda *a: calls.append(1) or real(*a))
    x, y = torch.randn(3, 16), torch.randn(3, 16)
    losses.reconstruction_loss([x], [y])
    losses.reconstruction_loss([x.double()], [y.double()])
    assert len(calls) == (1 if shutil.which("cc") else 0)


def test_a_failing_compiler_is_reported_with_its_reason(tmp_path, monkeypatch):
    """A compiler that fails after a long command line: the warning carries its error line."""
    import warnings

    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\necho " + "x" * 400 + " >&2\necho 'fatal error: the reason' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("SELFABLATE_KERNEL_CACHE", str(tmp_path / "cache"))
    kernels._compiler.cache_clear()
    kernels.load.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert kernels.load("transpose") is None
        assert any("fatal error: the reason" in str(w.message) for w in caught), [str(w.message) for w in caught]
    finally:
        kernels._compiler.cache_clear()
        kernels.load.cache_clear()
