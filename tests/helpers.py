"""Models and configurations the tests share (tests import these; conftest wraps them as fixtures)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from selfablate import ModelConfig, SelfAblatingTransformer

ONE_BACKEND = pytest.mark.parametrize("backend", ["cpu"], indirect=True)
"""For a test in a module that runs on both backends (the `backend` fixture) whose subject does not
depend on the backend (a child process's messages, the learning-rate schedule, which checkpoint
is kept): the C kernels' run alone."""

SMALL = dict(vocab_size=97, n_ctx=12, d_model=16, n_layers=3, n_heads=4, d_mlp=32, k_attn=5, k_mlp=7)
"""The small model of the float64 references: three blocks (a middle one), odd vocabulary and k, so
that no size coincides with another and every path of the method runs."""


def small_config(**changes) -> ModelConfig:
    """`SMALL` with `changes` (any ModelConfig field)."""
    return ModelConfig(**{**SMALL, **changes})


def perturbed(cfg: ModelConfig, *, scale: float = 0.05, only: tuple[str, ...] = (), seed: int = 0,
              dtype: torch.dtype = torch.float64) -> SelfAblatingTransformer:
    """A model moved away from its initialisation, in eval mode: N(0, scale^2) noise added to every
    parameter, or to those whose name contains one of `only`. At init the mask heads score every
    unit alike and many weights are zero, so masks, edges and units would not all matter."""
    torch.manual_seed(seed)
    model = SelfAblatingTransformer(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not only or any(part in name for part in only):
                p.add_(torch.randn_like(p) * scale)
    return model


SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "allclose", "unique",
            "_unique2", "unique_consecutive", "repeat_interleave", "masked_scatter_"}
"""aten operators whose result the host needs, or whose output size depends on the data."""
FROM_HOST = {"lift_fresh", "lift_fresh_copy", "_pin_memory"}
"""aten operators that make a tensor from Python data (on CUDA: a host-to-device copy)."""


class Recorder(TorchDispatchMode):
    """Every aten operator run inside, with its output shapes: what a CUDA graph records. A
    captured call must run the same list every time, with nothing in `SYNC_OPS` or `FROM_HOST`."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = tuple(tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        self.calls.append((func.overloadpacket.__name__, shapes))
        return out
