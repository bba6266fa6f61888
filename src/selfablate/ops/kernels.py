"""C kernels for the CPU (`csrc/*.c`), compiled on first use and loaded with ctypes.

Each source is compiled with the machine's C compiler (`$CC`, else `cc`), `-march=native` and
OpenMP into a cache directory (`$SELFABLATE_KERNEL_CACHE`, else `~/.cache/selfablate/kernels`),
keyed by its source, flags, compile-time constants and CPU, so it is built once per machine. The kernels'
OpenMP calls go to the libgomp PyTorch has loaded (the same soname), so they run on PyTorch's
own threads: with threads of their own the attention kernel ran 1.5-2x slower inside a training
step, as PyTorch's idle threads spin for a while after each of its kernels. Without a compiler,
or if a build fails, `load` returns None with one `KernelWarning`, and callers keep PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from .backends import backend

CSRC = Path(__file__).with_name("csrc")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-signed-zeros", "-fno-trapping-math",
         "-shared", "-fPIC")
"""No -ffast-math: the kernels' exp rounds with a float32 addition that reassociation would drop."""
OPENMP = ("-fopenmp",)
"""Tried first; a compiler without OpenMP builds single-threaded kernels instead."""

def cache_dir() -> Path:
    return Path(os.environ.get("SELFABLATE_KERNEL_CACHE") or Path.home() / ".cache" / "selfablate" / "kernels")


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor()


def _compile(source: Path, flags: tuple[str, ...], tag: str, compiler: str) -> Path:
    """Compile source (once per source, flags, compiler and CPU) and return the library's path."""
    headers = [h.read_text() for h in sorted(CSRC.glob("*.h"))]
    parts = (source.read_text(), *headers, compiler, *flags, platform.machine(), _cpu_identity())
    key = hashlib.sha256(b"\0".join(s.encode() for s in parts)).hexdigest()[:16]
    path = cache_dir() / f"{tag}-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *flags, f"-I{CSRC}", str(source), "-o", tmp, "-lm"], check=True,
                           capture_output=True, text=True, timeout=120)
            os.replace(tmp, path)  # atomic: a concurrent build or reader never sees half a file
        finally:
            Path(tmp).unlink(missing_ok=True)
    return path


class KernelWarning(UserWarning):
    """A C kernel is not available; PyTorch's kernels run instead."""


@functools.cache
def _compiler() -> str | None:
    """$CC, else cc, when it is on the PATH; else None, with one warning for all the kernels."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        warnings.warn(f"selfablate: no C compiler ({compiler}), so the CPU kernels are off and PyTorch's run "
                      "instead (a paper-scale training step about 1.6x slower)", KernelWarning, stacklevel=4)
        return None
    return compiler


@functools.cache
def load(name: str, **defines: int) -> ctypes.CDLL | None:
    """csrc/<name>.c compiled with -D<KEY>=<value> for each define, or None when there is no
    compiler (`_compiler` warns once) or it cannot be built or loaded (warned once per kernel)."""
    compiler = _compiler()
    if compiler is None:
        return None
    consts = tuple(f"-D{k}={v}" for k, v in sorted(defines.items()))
    tag = "-".join([name, *(f"{k.lower()}{v}" for k, v in sorted(defines.items()))])
    try:
        try:
            path = _compile(CSRC / f"{name}.c", (*FLAGS, *OPENMP, *consts), tag, compiler)
        except subprocess.CalledProcessError:
            path = _compile(CSRC / f"{name}.c", (*FLAGS, *consts), tag, compiler)
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        lines = (getattr(e, "stderr", None) or str(e)).strip().splitlines() or [""]
        # The reason, not the start of a long command line: the first line that says "error", else the last.
        reason = next((ln for ln in lines if "error" in ln.lower()), lines[-1]).strip()[:300]
        warnings.warn(f"selfablate: the C kernel {tag} is unavailable ({reason}); using PyTorch's",
                      KernelWarning, stacklevel=3)
        return None


P, I, L, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
"""The C types of the kernels' signatures: pointer, int, long, float."""


def library(name: str, argtypes: dict[str, list], restypes: dict[str, type] | None = None,
            **defines: int) -> ctypes.CDLL | None:
    """`load(name, **defines)` with its functions' argument (and result) types set, or None."""
    lib = load(name, **defines)
    if lib is not None:
        for fn, types in argtypes.items():
            getattr(lib, fn).argtypes = types
        for fn, restype in (restypes or {}).items():
            getattr(lib, fn).restype = restype
    return lib


def float32_cpu(*tensors: torch.Tensor) -> bool:
    """All float32 on the CPU, outside autocast: what the C kernels and the oneDNN GEMMs take."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu"))


def on_cpu_float32(*tensors: torch.Tensor) -> bool:
    """Whether the kernels may take these tensors: the `cpu` backend and `float32_cpu`."""
    return backend() == "cpu" and float32_cpu(*tensors)


def pointers(*tensors: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> list[int | None]:
    """The operands' addresses for a C kernel (None stays None), after checking that each is a
    contiguous CPU tensor of `dtype`: a kernel handed anything else (a CUDA or meta tensor made
    where the caller forgot `device=`, a strided view) would read memory that is not there and
    take the process down, so the check is made at every call, and fails with an exception."""
    for t in tensors:
        if t is not None and not (t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous()
                                  and t.layout == torch.strided):
            raise RuntimeError(f"selfablate: a C kernel was handed a {t.dtype} {t.layout} tensor on "
                               f"{t.device} (contiguous: {t.is_contiguous()}); it takes contiguous {dtype} "
                               "CPU tensors only")
    return [None if t is None else t.data_ptr() for t in tensors]


def threads() -> int:
    """The kernels' OpenMP thread count: PyTorch's."""
    return torch.get_num_threads()


@functools.cache
def _transpose_library() -> ctypes.CDLL | None:
    return library("transpose", {"transpose": [P, P, L, L, I]})


def transposed(x: torch.Tensor) -> torch.Tensor:
    """x.T.contiguous() for a 2-D x; for a contiguous float32 CPU x through csrc/transpose.c, which
    copies in cache-sized tiles where PyTorch's strided copy walks memory with a large stride."""
    if not (on_cpu_float32(x) and x.dim() == 2 and x.is_contiguous()) or _transpose_library() is None:
        return x.T.contiguous()
    out = x.new_empty(x.shape[1], x.shape[0])  # new_*: on x's device whatever the default device
    _transpose_library().transpose(*pointers(x, out), x.shape[0], x.shape[1], threads())
    return out
