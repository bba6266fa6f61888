"""Localisation: how few units (ranked by attribution) keep most of the clean model's loss
improvement over ablating everything."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..model import SelfAblatingTransformer, Stream
from ..ops.lm_head import per_token_cross_entropy


def unit_attributions(model: SelfAblatingTransformer, batches: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Attribution patching towards zero: score(u) = mean over tokens |a_u * dCE_clean/da_u| for
    every attention unit (hook_z, flattened to d_model) and MLP neuron (hook_post) of the clean
    stream. Returns (n_layers, d_model) and (n_layers, d_mlp)."""
    L = model.cfg.n_layers
    names = [f"blocks.{i}.attn.hook_z" for i in range(L)] + [f"blocks.{i}.mlp.hook_post" for i in range(L)]
    totals = {n: 0.0 for n in names}
    count = 0
    for x, y in batches:
        acts: dict[str, Tensor] = {}

        def keep(t: Tensor, hp) -> None:
            t.retain_grad()
            acts[hp.name] = t

        with model.hooks([(n, keep) for n in names]):
            model(x, y, return_logits=False).loss_clean.backward()
        for n in names:
            a = acts[n]
            totals[n] = totals[n] + (a * a.grad).flatten(start_dim=2).abs().sum(dim=(0, 1)).detach()  # (units,)
        count += y.numel()
    model.zero_grad(set_to_none=True)
    attn = torch.stack([totals[f"blocks.{i}.attn.hook_z"] for i in range(L)]) / count
    mlp = torch.stack([totals[f"blocks.{i}.mlp.hook_post"] for i in range(L)]) / count
    return attn, mlp


@torch.no_grad()
def ce_with_units(model: SelfAblatingTransformer, batches: list[tuple[Tensor, Tensor]],
                  attn_keep: Tensor, mlp_keep: Tensor) -> float:
    """Mean clean-stream CE when only the kept units (0/1, (n_layers, width)) are active
    everywhere, the rest zero-ablated."""
    total = n = 0.0
    for x, y in batches:
        B, T = x.shape
        a = attn_keep.expand(B, T, *attn_keep.shape)  # (B, T, L, d_model)
        m = mlp_keep.expand(B, T, *mlp_keep.shape)  # (B, T, L, d_mlp)
        final = model.run_stream(model.embed(x), Stream.CLEAN, a, m).final
        total += per_token_cross_entropy(final, model.wte.weight, y).sum().item()
        n += y.numel()
    return total / n


class Localisation(NamedTuple):
    units_needed: int
    """Fewest top-attributed units whose CE recovers `target` of the full model's improvement."""
    total_units: int
    fraction: float
    target: float
    ce_all_units: float
    ce_no_units: float
    ce_at_units_needed: float
    tokens: int
    """Held-out tokens the attributions and every CE above were measured on."""


def localisation(model: SelfAblatingTransformer, batches: list[tuple[Tensor, Tensor]], target: float = 0.9) -> Localisation:
    """Binary search for the smallest n such that keeping the n units with the largest attribution
    gives CE_none - CE(n) >= target * (CE_none - CE_all). (Assumes the recovered fraction grows
    with n, as it does in practice; the CE at the answer is reported so it can be checked.)"""
    attn, mlp = unit_attributions(model, batches)
    scores = torch.cat([attn.flatten(), mlp.flatten()])
    order = scores.argsort(descending=True)
    total = scores.numel()

    def keep(n: int) -> tuple[Tensor, Tensor]:
        bits = torch.zeros(total, device=scores.device)
        bits[order[:n]] = 1.0
        return bits[: attn.numel()].view_as(attn), bits[attn.numel() :].view_as(mlp)

    ce_all = ce_with_units(model, batches, *keep(total))
    ce_none = ce_with_units(model, batches, *keep(0))
    goal = ce_none - target * (ce_none - ce_all)
    lo, hi = 0, total
    while lo < hi:
        mid = (lo + hi) // 2
        if ce_with_units(model, batches, *keep(mid)) <= goal:
            hi = mid
        else:
            lo = mid + 1
    return Localisation(lo, total, lo / total, target, ce_all, ce_none, ce_with_units(model, batches, *keep(lo)),
                        sum(y.numel() for _, y in batches))
