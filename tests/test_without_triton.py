"""Triton is optional: without it (a CPU build of PyTorch brings none) nothing but its kernels is missing."""

import subprocess
import sys


def test_without_triton_the_package_works_and_the_switches_fall_back():
    """A CPU build of PyTorch brings no Triton: the package imports, and with both switches on a
    step takes PyTorch's paths (run in a fresh process where importing triton fails)."""
    script = """
import sys
sys.modules["triton"] = None  # import triton raises ImportError
import torch
from selfablate import ModelConfig, SelfAblatingTransformer, ops
from selfablate.ops import triton_base
assert not triton_base.AVAILABLE
cfg = ModelConfig(vocab_size=97, n_ctx=16, d_model=32, n_layers=2, n_heads=4, d_mlp=64, k_attn=8, k_mlp=16)
ops.POLICIES["cpu"] = ops.POLICIES["cpu"]._replace(triton_attention=True, triton_lm_head=True)
x = torch.randint(0, 97, (2, 16))
SelfAblatingTransformer(cfg)(x, x, return_logits=False).loss.backward()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_importing_the_package_does_not_import_triton():
    """Triton (a quarter of a second to import) is imported when a Triton kernel first runs, not
    with the package, whose commands mostly never launch one."""
    script = "import sys; import selfablate.cli, selfablate.ops; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
