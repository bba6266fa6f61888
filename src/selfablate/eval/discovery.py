"""Circuit discovery on IOI: ACDC (exact edge patching), EAP and EAP with integrated gradients.

The faithfulness metric is the paper's: KL(p_clean || p_patched) of the next-token distribution
at each prompt's last position, averaged over prompts.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..model import SelfAblatingTransformer
from .circuits import EdgeGraph, graph_of, kl_last, last_logprobs, patched_forward
from .ioi import IOIBatch


class CircuitTask(NamedTuple):
    """Everything the discovery methods need, computed once."""

    model: SelfAblatingTransformer
    graph: EdgeGraph
    clean: Tensor
    """(n, pos) model ids."""
    last: Tensor
    io: Tensor
    s: Tensor
    corrupt_sources: Tensor
    """(n_sources, n, pos, d_model) source outputs on the corrupt prompts."""
    clean_sources: Tensor
    clean_prefix: Tensor
    """(n_sources + 1, n, pos, d_model): clean_prefix[k] = sum of the first k clean sources."""
    clean_logp: Tensor
    """(n, vocab) clean log-probabilities at the last positions."""


@torch.no_grad()
def make_task(model: SelfAblatingTransformer, batch: IOIBatch) -> CircuitTask:
    ids = lambda t: model.to_model_ids(t.to(model.wte.weight.device))  # noqa: E731
    graph = graph_of(model)
    zeros = torch.zeros(graph.n_edges, dtype=model.wte.weight.dtype, device=model.wte.weight.device)
    _, corrupt = patched_forward(model, ids(batch.corrupt), zeros)
    final, clean_sources = patched_forward(model, ids(batch.clean), zeros)
    last = batch.last.to(final.device)
    prefix = torch.cat([torch.zeros_like(clean_sources[:1]), clean_sources.cumsum(0)])
    return CircuitTask(model, graph, ids(batch.clean), last, ids(batch.io), ids(batch.s), corrupt, clean_sources,
                       prefix, last_logprobs(model, final, last))


def kl_with_mask(task: CircuitTask, mask: Tensor, start_layer: int = 0) -> Tensor:
    final, _ = patched_forward(task.model, task.clean, mask, task.corrupt_sources, start_layer, task.clean_sources,
                               task.clean_prefix, return_sources=False)
    return kl_last(task.clean_logp, last_logprobs(task.model, final, task.last))


def logit_diff_with_mask(task: CircuitTask, mask: Tensor) -> Tensor:
    final, _ = patched_forward(task.model, task.clean, mask, task.corrupt_sources, return_sources=False)
    logp = last_logprobs(task.model, final, task.last)
    rows = torch.arange(len(task.last))
    return (logp[rows, task.io] - logp[rows, task.s]).mean()


def _mask_gradient(task: CircuitTask, metric: Callable[[CircuitTask, Tensor], Tensor], at: float) -> Tensor:
    mask = torch.full((task.graph.n_edges,), at, dtype=task.clean_logp.dtype, device=task.clean.device,
                      requires_grad=True)
    metric(task, mask).backward()
    return mask.grad.detach()


def eap_scores(task: CircuitTask) -> Tensor:
    """Edge attribution patching: the first-order change of the IO-S logit difference when an
    edge is patched, d metric / d mask_e at mask = 0 = (corrupt_s - clean_s) . d metric / d input_d.
    (The KL's gradient vanishes at the clean run, its minimum, so EAP uses the logit difference.)"""
    return -_mask_gradient(task, logit_diff_with_mask, 0.0)


def eap_ig_scores(task: CircuitTask, steps: int = 5) -> Tensor:
    """EAP with integrated gradients of the KL along mask = a * 1, a from 0 to 1 (midpoint rule):
    score_e = mean_k d KL / d mask_e at a_k = (k + 1/2) / steps. Scores sum to about
    KL(all edges patched) - KL(none) (completeness)."""
    return sum(_mask_gradient(task, kl_with_mask, (k + 0.5) / steps) for k in range(steps)) / steps


class ACDCResult(NamedTuple):
    mask: Tensor
    """(n_edges,) 1 = pruned (patched to corrupt), 0 = kept in the circuit."""
    delta_kl: Tensor
    """(n_edges,) the KL increase measured when each edge was tried."""
    kl: float
    """KL of the final circuit."""


@torch.no_grad()
def acdc(task: CircuitTask, tau: float, progress: bool = False) -> ACDCResult:
    """ACDC (Conmy et al. 2023) with exact edge patching: visit destinations in reverse
    topological order and, for each incoming edge, patch it; keep it patched (prune it) if the
    KL rises by less than tau. Only the layers from the destination's onward are recomputed."""
    g = task.graph
    mask = torch.zeros(g.n_edges, dtype=task.clean_logp.dtype, device=task.clean.device)
    delta = torch.zeros_like(mask)
    current = kl_with_mask(task, mask).item()
    bar = tqdm(total=g.n_edges, desc=f"ACDC tau={tau}", disable=not progress, leave=False)
    for gi in reversed(range(len(g.groups))):
        _, start, rows, n = g.groups[gi]
        # Group gi reads layer gi // 2 (the final residual: past the last layer); everything
        # before that layer is still the clean run, so recomputation starts there.
        first_layer = min(gi // 2, task.model.cfg.n_layers - 1)
        for r in reversed(range(rows)):
            for src in reversed(range(n)):
                e = start + r * n + src
                mask[e] = 1.0
                kl = kl_with_mask(task, mask, start_layer=first_layer).item()
                delta[e] = kl - current
                if kl - current < tau:
                    current = kl
                else:
                    mask[e] = 0.0
                bar.update(1)
    bar.close()
    return ACDCResult(mask, delta, current)
