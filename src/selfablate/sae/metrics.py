"""SAE metrics (SAELens's definitions, checked against its source; formulas in the docstrings)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..runtime import wide


def l0(latents: Tensor) -> float:
    """Mean number of active latents per token: mean_t sum_i [f_ti > 0]."""
    return (latents > 0).float().sum(-1).mean().item()


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained: sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean_t x_t||^2.
    0 for a perfect reconstruction, 1 for predicting the mean. Explained variance = 1 - FVU."""
    x, x_hat = wide(x), wide(x_hat)
    return ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def ce_loss_score(ce_ablated: float, ce_sae: float, ce_clean: float) -> float:
    """(CE_ablation - CE_with_SAE) / (CE_ablation - CE_clean): 1 when splicing in the SAE costs
    nothing, 0 when it is as bad as ablating the activation (zero- or mean-ablation)."""
    return (ce_ablated - ce_sae) / (ce_ablated - ce_clean)


def density(latents: Tensor) -> Tensor:
    """Per latent, the fraction of tokens on which it is active: mean_t [f_ti > 0]. (d_sae,)"""
    return (latents > 0).float().mean(0)


def density_histogram(dens: Tensor, bins: int = 20, low: float = -6.0) -> dict[str, list]:
    """Histogram of log10(density) over latents in [low, 0]; dead latents are counted apart."""
    alive = dens[dens > 0]
    counts = torch.histc(alive.log10().clamp(min=low), bins=bins, min=low, max=0.0)
    edges = torch.linspace(low, 0.0, bins + 1, device="cpu")
    return {"log10_density_edges": edges.tolist(), "counts": counts.long().tolist(), "dead": int((dens == 0).sum())}
