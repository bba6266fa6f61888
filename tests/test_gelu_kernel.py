"""csrc/gelu.c (the MLP's gelu_new on a float32 CPU) against PyTorch's in float64."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from selfablate.model import activations, kernels

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the kernel")


def test_gelu_kernel_is_as_accurate_as_pytorch_in_value_and_gradient(monkeypatch):
    x = torch.randn(3, 7, 37) * 4  # 777 elements: 48 vectors and a tail of 9
    x.view(-1)[:6] = torch.tensor([-200.0, -30.0, -1e-3, 0.0, 30.0, 200.0])
    g = torch.randn_like(x)
    x64 = x.double().requires_grad_()
    y64 = F.gelu(x64, approximate="tanh")
    (d64,) = torch.autograd.grad(y64, x64, g.double())
    errors = {}
    for use in (True, False):
        monkeypatch.setattr(kernels, "USE_KERNELS", use)
        x32 = x.clone().requires_grad_()
        y = activations.gelu_new(x32)
        (d,) = torch.autograd.grad(y, x32, g)
        errors[use] = [(y.double() - y64).abs().max().item(), (d.double() - d64).abs().max().item()]
    assert errors[True][0] <= 2 * errors[False][0] + 1e-7, errors
    assert errors[True][1] <= 3 * errors[False][1] + 1e-6, errors


def test_gelu_kernel_is_taken_for_float32_on_the_cpu_only(monkeypatch):
    calls = []
    real = activations._GeluNew.apply
    monkeypatch.setattr(activations._GeluNew, "apply", lambda *a: calls.append(1) or real(*a))
    activations.gelu_new(torch.randn(4, 16))
    activations.gelu_new(torch.randn(4, 16, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        activations.gelu_new(torch.randn(4, 16))
    assert len(calls) == 1
