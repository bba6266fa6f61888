"""What the Triton kernels (`triton_lm_head`, `triton_attention`) share: Triton where it is
installed, where its kernels can run, and a dot product that its interpreter computes right.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (`TRITON_INTERPRET=1`, set
before Triton's kernels are defined, as the tests' conftest does): how the tests check them.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of PyTorch does not bring Triton; PyTorch's paths serve
    triton = tl = dot = BASE2 = None

LOG2E = 1.4426950408889634
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""What the kernels multiply: float64 stays with PyTorch's paths."""


def padded(width: int) -> int:
    """A tile's width for `width` columns: `tl.arange` and `tl.dot` want a power of two, at least 16."""
    return max(16, 1 << (width - 1).bit_length())


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(x: Tensor) -> bool:
    """Triton is here and x is on a GPU, or on any device under the interpreter."""
    return triton is not None and (x.is_cuda or interpreted())


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input precision: float32 in TF32 where PyTorch's own matmuls are (`runtime` allows
    it on CUDA), else exact; bfloat16 and float16 take no other."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def launch_options() -> dict[str, object]:
    """Every launch's: `dot`'s UPCAST under the interpreter; fused multiply-adds, said outright
    (Triton warns about its default)."""
    return {"UPCAST": interpreted(), "enable_fp_fusion": True}


if triton is not None:
    BASE2: tl.constexpr = tl.constexpr(LOG2E)
    """log2(e) inside the kernels, which take their scores in base 2 (exp2 is the GPU's native exp)."""

    @triton.jit
    def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """a @ b with float32 accumulation. UPCAST (the interpreter, whose dot multiplies bfloat16's
        raw bits) multiplies float32 copies: bfloat16 products are exact in float32 either way."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=PRECISION)
