"""The Triton kernels as ptxas builds them for a GPU, without one.

    python benchmarks/triton_kernels.py [--arch 90,80]

Compiles the kernels of `selfablate.ops.triton_jit` (the LM head's at d_model 128, the attention's
for the paper's 8-wide heads, padded to 16) ahead of time, with
Triton's compiler and the ptxas it ships, for each architecture (90: H100/H200, 80: A100), in
bfloat16 and float32 (TF32, as `runtime` sets CUDA's matmuls; exact float32 dots spill registers
in the attention's backward), with the tiles the modules pick, and prints each one's registers a thread,
spill stack (bytes a thread in local memory: slow) and shared memory a block. Run it after
changing a kernel or its tiles; `benchmarks/gpu.py --only lm-head,attention` times them on a GPU.
"""

from __future__ import annotations

import argparse
import inspect
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from selfablate.ops import triton_attention as TA
from selfablate.ops import triton_lm_head as TL
from selfablate.ops.triton_base import AVAILABLE, padded

if AVAILABLE:
    import triton
    import triton.backends.compiler

    from selfablate.ops import triton_jit as J

TYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}
FLOAT32_POINTERS = {"m_ptr", "z_ptr", "acc_ptr", "lse_ptr", "s_ptr", "gw_ptr", "delta_ptr"}
"""Sums and statistics, float32 whatever the inputs' dtype."""


class Build(NamedTuple):
    kernel: object
    constants: dict[str, object]
    warps: int
    stages: int


def builds(dtype: torch.dtype) -> list[tuple[str, Build]]:
    """Every kernel with the constants and launch shape its module uses for `dtype`."""
    t = TL.tiles(dtype)
    head = {"D": 128, "BM": t.rows, "BV": t.vocab, "PRECISION": "tf32", "UPCAST": False}
    out = [(k.fn.__name__, Build(k, head, t.warps, t.stages)) for k in (J.rows_kernel, J.vocab_kernel)]
    for rule in (False, True):
        attn = {"D": padded(8), "BLOCK": TA.BLOCK, "SELF": rule, "PRECISION": "tf32", "UPCAST": False}
        for k in (J.attention_forward, J.attention_backward_kv, J.attention_backward_q):
            out.append((f"{k.fn.__name__}{' (two-stream)' if rule else ''}", Build(k, attn, TA.WARPS, 3)))
    return out


def signature(kernel, constants: dict[str, object], dtype: torch.dtype) -> dict[str, str]:
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constants:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in FLOAT32_POINTERS else TYPES[dtype]
        else:
            sig[name] = "i32"
    return sig


def resources(build: Build, dtype: torch.dtype, arch: int) -> dict[str, int]:
    """Compile one kernel for sm_<arch>: its registers, spill stack and shared memory."""
    src = triton.compiler.ASTSource(fn=build.kernel, signature=signature(build.kernel, build.constants, dtype),
                                    constexprs=build.constants)
    compiled = triton.compile(src, target=triton.backends.compiler.GPUTarget("cuda", arch, 32),
                              options={"num_warps": build.warps, "num_stages": build.stages, "enable_fp_fusion": True})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
    fields = dict(f.split(":") for line in usage.splitlines() if "REG:" in line for f in line.split())
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"]), "shared": compiled.metadata.shared}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="90,80", help="comma-separated sm versions")
    args = p.parse_args()
    if not AVAILABLE:
        print("benchmarks/triton_kernels.py: Triton is not installed here; nothing built")
        return
    print(f"triton {triton.__version__}")
    print("arch   dtype     kernel                             warps  stages  registers  spill stack B  shared KiB")
    for arch in (int(a) for a in args.arch.split(",")):
        for dtype in TYPES:
            for name, build in builds(dtype):
                r = resources(build, dtype, arch)
                print(f"sm_{arch}  {str(dtype)[6:]:<9} {name:<34} {build.warps:>5}  {build.stages:>6}  "
                      f"{r['registers']:>9}  {r['stack']:>13}  {r['shared'] / 1024:>10.1f}")


if __name__ == "__main__":
    main()
