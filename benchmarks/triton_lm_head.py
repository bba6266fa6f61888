"""The Triton LM head's two kernels as ptxas builds them for a GPU, without one.

    python benchmarks/triton_lm_head.py [--arch 90,80] [--d-model 128]

Compiles `selfablate.ops.triton_lm_head`'s kernels ahead of time (Triton's compiler and the ptxas
it ships) for each architecture (90: H100/H200, 80: A100), in bfloat16 and float32 (TF32), with
the tiles `triton_lm_head.tiles` picks, and prints each one's registers a thread, spill stack
(bytes a thread in local memory: slow) and shared memory a block. Run it after changing the
kernels or their tiles; `benchmarks/gpu.py --only lm-head` times them on a GPU.
"""

from __future__ import annotations

import argparse
import inspect
import subprocess
import tempfile
from pathlib import Path

import torch

try:
    import triton
    from triton.backends.compiler import GPUTarget
except ImportError:
    triton = None

from selfablate.ops import triton_lm_head as T

TYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def signature(kernel, dtype: torch.dtype) -> dict[str, str]:
    """Triton's signature of a kernel: h and w in the GEMMs' dtype, other pointers float32, ints
    32-bit, the capitalised arguments compile-time constants."""
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in ("h_ptr", "w_ptr"):
            sig[name] = TYPES[dtype]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "constexpr" if name.isupper() else "i32"
    return sig


def resources(kernel, dtype: torch.dtype, arch: int, d_model: int) -> dict[str, int]:
    """Compile one kernel for sm_<arch>; its registers, spill stack and shared memory."""
    t = T.tiles(dtype)
    consts = {"D": T._padded(d_model), "BM": t.rows, "BV": t.vocab, "PRECISION": "tf32", "UPCAST": False}
    src = triton.compiler.ASTSource(fn=kernel, signature=signature(kernel, dtype), constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": t.warps, "num_stages": t.stages, "enable_fp_fusion": True})
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
    p.add_argument("--d-model", type=int, default=128)
    args = p.parse_args()
    if triton is None:
        print("benchmarks/triton_lm_head.py: Triton is not installed here; nothing built")
        return
    print(f"triton {triton.__version__}; d_model {args.d_model} (padded to {T._padded(args.d_model)})")
    print("arch  dtype     kernel          tiles (BM x BV, warps, stages)  registers  spill stack B  shared KiB")
    for arch in (int(a) for a in args.arch.split(",")):
        for dtype in TYPES:
            t = T.tiles(dtype)
            for kernel in (T._rows_kernel, T._vocab_kernel):
                r = resources(kernel, dtype, arch, args.d_model)
                print(f"sm_{arch} {str(dtype)[6:]:<9} {kernel.fn.__name__:<15} {t.rows:>3} x {t.vocab:<3} {t.warps} warps "
                      f"{t.stages} stages       {r['registers']:>9}  {r['stack']:>13}  {r['shared'] / 1024:>10.1f}")


if __name__ == "__main__":
    main()
