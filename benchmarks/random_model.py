"""Random models for the benchmarks and cross-checks that have no trained checkpoint to read."""

from __future__ import annotations

import torch


@torch.no_grad()
def nudged(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """model, each block parameter moved by N(0, scale^2) in place, from torch's global generator.

    At initialisation many units are near-symmetric and many edges change nothing, so a circuit
    search or an SAE on such a model measures little; moved away from it, edges and features
    matter while the model stays random."""
    for name, w in model.named_parameters():
        if "blocks" in name:
            w.add_(torch.randn_like(w) * scale)
    return model
