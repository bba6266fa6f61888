"""Loss functions of self-ablation training (pure functions)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy in nats: -1/N sum_i log softmax(logits_i)[targets_i].

    logits (B, T, V), targets (B, T); targets equal to -100 are ignored.
    """
    return F.cross_entropy(_at_least_fp32(logits).flatten(0, 1), targets.flatten(), ignore_index=-100)


def reconstruction_loss(clean: Sequence[Tensor], ablated: Sequence[Tensor]) -> Tensor:
    """Mean over the given residuals of the MSE between L2-normalised clean and ablated vectors:

        1/|R| sum_r mean_{b,t,d} (x_c/||x_c|| - x_a/||x_a||)^2

    The residuals are each block's output and the final LayerNorm's output (n_layers + 1 terms),
    as in the paper. The clean side is not detached: both streams are pulled together.
    """
    if len(clean) != len(ablated) or not clean:
        raise ValueError("reconstruction_loss needs the same, non-zero number of clean and ablated residuals")
    terms = [F.mse_loss(F.normalize(_at_least_fp32(c), dim=-1), F.normalize(_at_least_fp32(a), dim=-1))
             for c, a in zip(clean, ablated)]
    return sum(terms) / len(terms)  # type: ignore[return-value]


def combined_loss(ce_clean: Tensor, ce_ablated: Tensor, recon: Tensor, a: float, b: float, c: float) -> Tensor:
    """The training objective: a * CE(clean) + b * CE(ablated) + c * reconstruction."""
    return a * ce_clean + b * ce_ablated + c * recon


def _at_least_fp32(x: Tensor) -> Tensor:
    """Losses are reduced in float32 (or float64) even under bf16 autocast."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
