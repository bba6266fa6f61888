"""Models and configurations the tests share (tests import these; conftest wraps them as fixtures)."""

from __future__ import annotations

import pytest
import torch

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
