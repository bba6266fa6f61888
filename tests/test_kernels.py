"""model.kernels: the C transpose, and the fallbacks where the kernels do not apply."""

import shutil

import pytest
import torch

from selfablate.model import kernels

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
