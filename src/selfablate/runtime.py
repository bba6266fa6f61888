"""Where and in what precision work runs: the device, autocast, and per-device settings."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import torch

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when available, else Apple's MPS, else the CPU. A named device that this machine
    lacks is a one-line error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda requested but CUDA is not available")
    if name == "mps" and not _mps_available():
        raise ConfigError("device=mps requested but Apple's MPS is not available")
    if name not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}; got {name!r}")
    return torch.device(name)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def use_bf16(device: torch.device, precision: str) -> bool:
    """bf16 autocast when asked for, and by default (auto) on CUDA, whose tensor cores run bf16
    matmuls several times faster than float32; the CPU and MPS default to float32."""
    return precision == "bfloat16" or (precision == "auto" and device.type == "cuda")


def autocast_for(device: torch.device, precision: str, cache: bool = True):
    """A context-manager factory: bf16 autocast (`use_bf16`), else a no-op. The mask heads and
    the top-k run in float32 under it all the same (`model.layers.MaskHead`). cache=False: no
    cache of the weights' bf16 casts, which a CUDA graph needs (a cast cached while recording would
    not be redone in a replay, after the optimiser has changed the weight)."""
    if not use_bf16(device, precision):
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)


def use_compile(device: torch.device, compile: str) -> bool:
    """torch.compile when asked for, and by default (auto) on CUDA, where fusing the step's
    thousands of small operators pays for the compilation many times over; a CPU runs the C
    kernels instead."""
    return compile == "on" or (compile == "auto" and device.type == "cuda")


def configure(device: torch.device) -> None:
    """Per-device settings for a run: on CUDA, float32 matmuls on TF32 tensor cores (10 bits of
    mantissa in the products, float32 accumulation: what the bf16 default already gives up, at a
    fraction of the cost of exact float32)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without making the host wait: pinned and non-blocking on CUDA."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def wide_dtype(device: torch.device) -> torch.dtype:
    """The dtype of sums and statistics on `device`: float64, or float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def wide(t: torch.Tensor) -> torch.Tensor:
    """t in `wide_dtype` for sums and statistics."""
    return t.to(wide_dtype(t.device))


def available_bytes(device: torch.device) -> int:
    """Memory free for a run on `device`: the GPU's free memory on CUDA, else the host's available
    memory (MemAvailable; MPS shares it)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return 1 << 62  # unknown: no check


def require_fits(needed: float, device: torch.device, what: str) -> None:
    """A one-line ConfigError, before any work, when `needed` bytes cannot fit on `device`."""
    free = available_bytes(device)
    if needed > free:
        raise ConfigError(f"{what} needs about {needed / 2**30:,.1f} GiB, more than the {free / 2**30:,.1f} GiB "
                          f"free on {device.type}: choose smaller sizes")


def fused_if_possible(make: Callable[..., torch.optim.Optimizer], params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """make(params, **kwargs) with the fused kernel (one pass per tensor instead of one per
    operation), or without it on a device or dtype that lacks it."""
    try:
        return make(params, **kwargs, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return make(params, **kwargs)


class Captured:
    """`fn()` (no arguments: it reads fixed input buffers that the caller refills) run eagerly on a
    side stream for the first `warmup` calls, then recorded once as a CUDA graph, and replayed by
    every call after: one launch for all of fn's kernels. Returns fn's outputs, which from the
    capture on are fixed buffers that each replay rewrites (read or copy them before the next).

    The warm-up calls are real calls (their results count); they let cuBLAS, the allocator and
    lazily made state (an optimiser's moments) settle before recording. fn must read nothing
    back on the host, make no tensor from host data and keep every shape. Graphs given one
    `pool` share their temporary memory, which is safe because they are replayed one at a time
    and their outputs stay referenced here."""

    def __init__(self, fn: Callable[[], Any], device: torch.device, warmup: int = 1, pool: Any = None):
        self.fn, self.device, self.warmup, self.pool = fn, device, warmup, pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Any = None

    def __call__(self) -> Any:
        if self.graph is None and self.warmup > 0:
            self.warmup -= 1
            return self._on_side_stream()
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=self.pool):  # records; nothing runs
                self.outputs = self.fn()
        self.graph.replay()
        return self.outputs

    def _on_side_stream(self) -> Any:
        """Capture must not be the first use of a stream's kernels: warm up off the default stream."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = self.fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out
