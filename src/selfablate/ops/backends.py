"""The process's backend: `cpu` (C kernels and oneDNN where they apply) or `torch` (PyTorch only)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from ..errors import ConfigError

BACKENDS = ("torch", "cpu")
ENV = "SELFABLATE_BACKEND"

_chosen: str | None = None


def _from_environment() -> str:
    name = os.environ.get(ENV, "").strip() or "cpu"
    if name not in BACKENDS:
        raise ConfigError(f"${ENV} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def backend() -> str:
    """The backend in force: chosen from $SELFABLATE_BACKEND on first use, or by `use_backend`.
    While `torch.compile` traces, always `torch`: the C kernels and oneDNN's private op are opaque
    to the compiler (each would break the graph), and the compiler fuses PyTorch's operators itself."""
    global _chosen
    if torch.compiler.is_compiling():
        return "torch"
    if _chosen is None:
        _chosen = _from_environment()
    return _chosen


def select(name: str) -> str:
    """Make `name` the backend from now on; returns the one it replaces."""
    global _chosen
    if name not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    saved, _chosen = backend(), name
    return saved


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with another backend (tests and benchmarks compare them this way)."""
    saved = select(name)
    try:
        yield
    finally:
        select(saved)
