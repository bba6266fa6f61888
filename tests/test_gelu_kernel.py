"""csrc/gelu.c (the MLP's gelu_new, times the unit mask, on a float32 CPU) against PyTorch's in float64."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from selfablate.ops import activations

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the kernel")


@pytest.mark.parametrize("masked", [False, True])
def test_gelu_kernel_is_as_accurate_as_pytorch_in_value_and_gradients(masked, monkeypatch, set_backend):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 37, generator=gen) * 4  # 777 elements: 48 vectors and a tail of 9
    x.view(-1)[:6] = torch.tensor([-200.0, -30.0, -1e-3, 0.0, 30.0, 200.0])
    m = torch.rand(x.shape, generator=gen) if masked else None
    g = torch.randn(x.shape, generator=gen)
    x64 = [x.double().requires_grad_()] + ([m.double().requires_grad_()] if masked else [])
    y64 = F.gelu(x64[0], approximate="tanh") * (x64[1] if masked else 1)
    ref = torch.autograd.grad(y64, x64, g.double())
    errors = {}
    for use in (True, False):
        set_backend("cpu" if use else "torch")
        xs = [x.clone().requires_grad_()] + ([m.clone().requires_grad_()] if masked else [])
        y = activations.gelu_new(*xs)
        grads = torch.autograd.grad(y, xs, g)
        errors[use] = [(y.double() - y64).abs().max().item()] + [
            (a.double() - b).abs().max().item() for a, b in zip(grads, ref)]
    assert errors[True][0] <= 2 * errors[False][0] + 1e-7, errors
    for fast, slow in zip(errors[True][1:], errors[False][1:]):
        assert fast <= 3 * slow + 1e-6, errors


def test_gelu_kernel_skips_the_mask_gradient_when_the_mask_needs_none():
    x = torch.randn(40, requires_grad=True)
    m = torch.rand(40)
    (dx,) = torch.autograd.grad(activations.gelu_new(x, m).sum(), x)
    ref_x = x.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad((F.gelu(ref_x, approximate="tanh") * m.double()).sum(), ref_x)
    torch.testing.assert_close(dx.double(), ref, rtol=1e-5, atol=1e-6)


def test_gelu_kernel_is_taken_for_float32_on_the_cpu_only(monkeypatch):
    calls = []
    real = activations._GeluNew.apply
    monkeypatch.setattr(activations._GeluNew, "apply", lambda *a: calls.append(1) or real(*a))
    activations.gelu_new(torch.randn(4, 16))
    activations.gelu_new(torch.randn(4, 16), torch.rand(4, 16))
    activations.gelu_new(torch.randn(4, 16, dtype=torch.float64))
    activations.gelu_new(torch.randn(4, 16), torch.rand(4, 1))  # a broadcast mask: PyTorch's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        activations.gelu_new(torch.randn(4, 16))
    assert len(calls) == 2
