"""Loss functions of self-ablation training (pure functions). The third term, the reconstruction
loss, is an operation with a fast path: `ops.reconstruction_loss`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .. import ops


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy in nats: -1/N sum_i log softmax(logits_i)[targets_i].

    logits (B, T, V), targets (B, T); targets equal to -100 are ignored.
    """
    return F.cross_entropy(ops.at_least_fp32(logits).flatten(0, 1), targets.flatten(), ignore_index=-100)


def combined_loss(ce_clean: Tensor, ce_ablated: Tensor, recon: Tensor, a: float, b: float, c: float) -> Tensor:
    """The training objective: a * CE(clean) + b * CE(ablated) + c * reconstruction."""
    return a * ce_clean + b * ce_ablated + c * recon
