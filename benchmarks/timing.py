"""Side-by-side timing for the micro-benchmarks: contenders alternate call by call, so that a
machine that speeds up or slows down mid-run (these shared cores do) affects all of them alike."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU is always done)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_ms(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each contender, after one warm-up call each."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def patched(obj: object, name: str, value: object, fn: Callable[[], object]) -> Callable[[], object]:
    """fn, run with obj.name (or obj[name], for a dict) set to value and restored after: a variant
    of a library path to time beside the real one."""
    get, put = ((obj.__getitem__, obj.__setitem__) if isinstance(obj, dict)
                else (lambda n: getattr(obj, n), lambda n, v: setattr(obj, n, v)))

    def run() -> object:
        saved = get(name)
        put(name, value)
        try:
            return fn()
        finally:
            put(name, saved)

    return run


def on_backend(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn, run on the `selfablate.ops` backend `name` (`torch`: PyTorch's operators only)."""
    from selfablate import ops

    def run() -> object:
        with ops.use_backend(name):
            return fn()

    return run


def unflushed(fn: Callable[[], object]) -> Callable[[], object]:
    """fn with the CPU policy's `flush_subnormal_grads` off: the C kernels then compute the
    subnormal floats that the policy keeps out (each a microcode assist on x86 cores)."""
    from selfablate import ops

    return patched(ops.POLICIES, "cpu", ops.POLICIES["cpu"]._replace(flush_subnormal_grads=False), fn)


def parser_with_repeats(doc: str | None, default: int) -> argparse.ArgumentParser:
    """The micro-benchmarks' parser: --repeats (timed calls per contender), and room for more."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=default)
    return p


def repeats_from_argv(doc: str | None, default: int) -> int:
    """--repeats, for the micro-benchmarks that take no other option."""
    return parser_with_repeats(doc, default).parse_args().repeats
