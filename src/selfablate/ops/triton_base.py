"""What the Triton kernels' wrappers (`triton_lm_head`, `triton_attention`) share: whether Triton
is installed, where its kernels can run, and how they are launched. The kernels themselves are
in `triton_jit`.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (`TRITON_INTERPRET=1`, set
before Triton's kernels are defined, as the tests' conftest does): how the tests check them.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

AVAILABLE = importlib.util.find_spec("triton") is not None
"""Triton is installed (a CPU build of PyTorch brings none: PyTorch's paths serve). Found, not
imported: `triton_jit` imports it when a kernel first runs."""

LOG2E = 1.4426950408889634
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""What the kernels multiply: float64 stays with PyTorch's paths."""


def padded(width: int) -> int:
    """A tile's width for `width` columns: `tl.arange` and `tl.dot` want a power of two, at least 16."""
    return max(16, 1 << (width - 1).bit_length())


def kernels():
    """`triton_jit`, the module of every kernel, imported (with Triton) on the first launch."""
    from . import triton_jit

    return triton_jit


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(x: Tensor) -> bool:
    """Triton is here and x is on a GPU, or on any device under the interpreter."""
    return AVAILABLE and (x.is_cuda or interpreted())


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input precision: float32 in TF32 where PyTorch's own matmuls are (`runtime` allows
    it on CUDA), else exact; bfloat16 and float16 take no other."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def launch_options() -> dict[str, object]:
    """Every launch's: `triton_jit.dot`'s UPCAST under the interpreter; fused multiply-adds, said outright
    (Triton warns about its default)."""
    return {"UPCAST": interpreted(), "enable_fp_fusion": True}
