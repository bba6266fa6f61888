"""Pure metric functions. Each docstring gives the formula; tests check them on hand-computed cases.

Conventions: masks are 0/1 tensors (..., n_layers, width); activations are (n_tokens, width).
Entropies are in nats.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# -- masks ------------------------------------------------------------------------------------


def selection_frequency(masks: Tensor) -> Tensor:
    """f[l, u] = fraction of tokens whose mask keeps unit u of layer l.
    masks (n_tokens, n_layers, width) -> (n_layers, width)."""
    return masks.float().mean(dim=0)


def dead_fraction(freq: Tensor) -> Tensor:
    """Per layer, the fraction of units never selected: mean_u [f[l, u] == 0]. (n_layers,)"""
    return (freq == 0).float().mean(dim=-1)


def always_on_fraction(freq: Tensor) -> Tensor:
    """Per layer, the fraction of units selected for every token: mean_u [f[l, u] == 1]."""
    return (freq == 1).float().mean(dim=-1)


def mask_entropy(freq: Tensor) -> Tensor:
    """Entropy of where a layer's selections go: p_u = f_u / sum_v f_v, H = -sum_u p_u log p_u.

    log(width) when every unit is chosen equally often; log(k) when the same k units always are.
    (n_layers, width) -> (n_layers,)."""
    p = freq / freq.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return -(p * p.clamp_min(1e-30).log()).sum(dim=-1)


def persistence(masks: Tensor) -> Tensor:
    """How often a unit selected at token t is selected again at t+1:
    sum_{b,t,u} m[b,t,l,u] m[b,t+1,l,u] / sum_{b,t,u} m[b,t,l,u], over t < T-1.
    masks (batch, pos, n_layers, width) -> (n_layers,). Random masks of k of w units give k/w."""
    a, b = masks[:, :-1].float(), masks[:, 1:].float()
    return (a * b).sum(dim=(0, 1, 3)) / a.sum(dim=(0, 1, 3)).clamp_min(1e-30)


# -- activation sparsity ----------------------------------------------------------------------


def near_zero_fraction(x: Tensor, eps: float = 1e-2) -> Tensor:
    """Fraction of entries with |x| < eps, per row. (n, width) -> (n,)"""
    return (x.abs() < eps).float().mean(dim=-1)


def hoyer_sparsity(x: Tensor) -> Tensor:
    """Hoyer (2004): (sqrt(n) - ||x||_1 / ||x||_2) / (sqrt(n) - 1), per row; 0 for a constant
    vector, 1 for a one-hot one. (n_rows, n) -> (n_rows,)"""
    n = x.shape[-1]
    ratio = x.abs().sum(-1) / x.norm(dim=-1).clamp_min(1e-30)
    return (math.sqrt(n) - ratio) / (math.sqrt(n) - 1)


def gini(x: Tensor) -> Tensor:
    """Gini coefficient of |x| per row (Hurley & Rickard 2009): with c_(1) <= ... <= c_(n) sorted,
    G = sum_i (2i - n - 1) c_(i) / (n sum_i c_(i)); 0 for equal entries, 1 - 1/n for one-hot."""
    c = x.abs().sort(dim=-1).values
    n = c.shape[-1]
    i = torch.arange(1, n + 1, dtype=c.dtype, device=c.device)
    return ((2 * i - n - 1) * c).sum(-1) / (n * c.sum(-1).clamp_min(1e-30))


def kurtosis(x: Tensor) -> Tensor:
    """Pearson kurtosis per row: E[(x - mu)^4] / sigma^4 (population moments; 3 for a Gaussian,
    1.8 for a uniform, large for heavy tails). (n_rows, n) -> (n_rows,)"""
    d = x - x.mean(dim=-1, keepdim=True)
    m2 = (d**2).mean(-1)
    return (d**4).mean(-1) / (m2**2).clamp_min(1e-30)


# -- weights ----------------------------------------------------------------------------------


def weight_l1_all(named_params: list[tuple[str, Tensor]], tied_embedding: str = "wte.weight") -> float:
    """Mean |w| over every parameter of our model (mask heads included), the tied embedding
    counted twice (as embedding and as unembedding)."""
    total = count = 0.0
    for name, p in named_params:
        times = 2 if name == tied_embedding else 1
        total += times * p.detach().abs().sum().item()
        count += times * p.numel()
    return total / count


def weight_l1_nonembedding(named_params: list[tuple[str, Tensor]]) -> float:
    """Mean |w| over the weight matrices of the blocks only (no embeddings, biases, LayerNorms
    or mask heads): the sparsity of the computation itself."""
    mats = [p for n, p in named_params if p.dim() >= 2 and n.startswith("blocks.") and "mask_head" not in n]
    return sum(p.detach().abs().sum().item() for p in mats) / sum(p.numel() for p in mats)


# -- specialisation ---------------------------------------------------------------------------


def token_entropy(token_ids: np.ndarray | list[int]) -> float:
    """Entropy of the empirical distribution of token ids: -sum_v p_v log p_v, p_v = count_v / n.
    0 when a neuron's top activations are all one token; log(n) when all differ."""
    _, counts = np.unique(np.asarray(token_ids), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def selectivity_index(class_means: Tensor) -> Tensor:
    """Per unit: (mu_max - mu_rest) / (mu_max + mu_rest), where mu_max is the unit's largest mean
    activation over classes (e.g. tokens) and mu_rest the mean over the other classes.
    class_means (n_classes, n_units) of non-negative values -> (n_units,); 0 = unselective,
    1 = responds to one class only."""
    top = class_means.max(dim=0).values
    rest = (class_means.sum(dim=0) - top) / max(1, class_means.shape[0] - 1)
    return (top - rest) / (top + rest).clamp_min(1e-30)


def bootstrap_ci(values: np.ndarray, weights: np.ndarray | None = None, n_resamples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of a weighted mean sum(w v) / sum(w), resampling items
    (e.g. sequences) with replacement."""
    rng = np.random.default_rng(seed)
    v = np.asarray(values, dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    idx = rng.integers(0, len(v), size=(n_resamples, len(v)))
    means = (v[idx] * w[idx]).sum(1) / w[idx].sum(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
