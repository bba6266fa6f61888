"""Circuit discovery on IOI: ACDC (exact edge patching), EAP and EAP with integrated gradients.

The faithfulness metric is the paper's: KL(p_clean || p_patched) of the next-token distribution
at each prompt's last position, averaged over prompts.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import ops
from ..errors import SelfAblateError
from ..model import SelfAblatingTransformer
from ..runtime import Captured, to_device
from .patching import (EdgeGraph, RunCache, cache_run, fixed_trials_final, graph_of, last_logprobs, patched_forward,
                       trials_final)
from .ioi import IOIBatch
from ..data.tokenizer import gpt2_tokenizer
from ..data.vocab import to_model_ids, unk_id


class CircuitTask(NamedTuple):
    """Everything the discovery methods need, computed once."""

    model: SelfAblatingTransformer
    graph: EdgeGraph
    clean: Tensor
    """(n, pos) model ids."""
    last: Tensor
    io: Tensor
    s: Tensor
    corrupt: RunCache
    """The corrupt prompts' unpatched run."""
    clean_run: RunCache
    """The clean prompts' unpatched run."""
    clean_logp: Tensor
    """(n, vocab) clean log-probabilities at the last positions."""
    clean_term: Tensor
    """(n,) sum_v p_clean log p_clean, the constant part of the KL."""
    clean_readout: Tensor
    """(n, d_model) W_U^T p_clean: sum_v p_clean(v) logit(v) = clean_readout . ln_final(x)."""


def check_answers(model: SelfAblatingTransformer, batch: IOIBatch) -> None:
    """Every answer must be a token of the model's vocabulary: a compact vocabulary maps the words
    its training data lacked to <unk>, whose logit says nothing about IOI."""
    unk = unk_id(model)
    if unk is None:
        return
    answers = torch.cat([batch.io, batch.s])
    missing = answers[to_model_ids(model, answers.to(model.wte.weight.device)).cpu() == unk].unique()
    if len(missing):
        words = ", ".join(repr(gpt2_tokenizer().decode([int(t)])) for t in missing[:5])
        raise SelfAblateError(f"{len(missing)} IOI answer(s) are not in this model's compact vocabulary (its training "
                              f"data lacked them): {words}; use prompts whose names the model has seen")


@torch.no_grad()
def make_task(model: SelfAblatingTransformer, batch: IOIBatch) -> CircuitTask:
    device = model.wte.weight.device
    ids = lambda t: to_model_ids(model, t.to(device))  # noqa: E731
    check_answers(model, batch)
    _, corrupt = cache_run(model, ids(batch.corrupt))
    final, clean = cache_run(model, ids(batch.clean))
    last = batch.last.to(device)
    logp = last_logprobs(model, final, last)
    p = logp.exp()
    return CircuitTask(model, graph_of(model), ids(batch.clean), last, ids(batch.io), ids(batch.s), corrupt, clean,
                       logp, (p * logp).sum(-1), p.to(model.wte.weight.dtype) @ model.wte.weight)


def kl_with_mask(task: CircuitTask, mask: Tensor, start_layer: int = 0) -> Tensor:
    """KL(p_clean || p_patched) at the last positions, mean over prompts, computed as
    sum p_c log p_c - sum p_c logit + logsumexp(logit): the middle term needs no logits."""
    final, _ = patched_forward(task.model, task.clean, mask, task.corrupt, start_layer, task.clean_run,
                               return_sources=False)
    return _kl_of_final(task, final)


def _kl_of_final(task: CircuitTask, final: Tensor) -> Tensor:
    """final (..., n, T, D) residuals -> (...) KL at the last positions, mean over the n prompts."""
    x = task.model.ln_final(final[..., torch.arange(len(task.last), device=final.device), task.last, :])  # (..., n, D)
    logits = task.model.unembed(x)
    lse = ops.at_least_fp32(logits).logsumexp(-1)
    return (task.clean_term - (task.clean_readout * x).sum(-1) + lse).mean(-1)


def trial_kls(task: CircuitTask, mask: Tensor, edges: list[int]) -> Tensor:
    """(m,) KL of each cumulative trial: mask plus edges[: i + 1] patched, i = 0 .. m - 1, in one
    batched pass from the lowest destination layer among the edges (`patching.trials_final`)."""
    start = min(task.graph.edge_layers[e] for e in edges)
    return _kl_of_final(task, trials_final(task.model, mask, edges, task.corrupt, task.clean_run, start))


def fixed_trial_kls(task: CircuitTask, mask: Tensor, tried: Tensor, start: int) -> Tensor:
    """`trial_kls` for the edges in the device tensor tried (m,), from layer `start`, through the
    dense pass (`patching.fixed_trials_final`) that a CUDA graph can record."""
    return _kl_of_final(task, fixed_trials_final(task.model, mask, tried, task.corrupt, task.clean_run, start))


class FixedShapeTrials:
    """ACDC's batched passes at one fixed shape: `fixed_trial_kls` over `size` tried edges, read
    from fixed buffers that each call refills. `graphed` (CUDA): each start layer's pass is
    recorded once as a CUDA graph (`runtime.Captured`, one shared memory pool) and replayed, so a
    pass is one launch and one host read. Otherwise the same arithmetic runs eagerly: slower than
    `_trial_kls` (it recomputes what the sparse path reuses), but what CUDA replays, so a CPU can
    check it. A batch of fewer than `size` edges is padded with copies of its last edge (its extra
    trials repeat the last one and are not read)."""

    def __init__(self, task: CircuitTask, size: int, graphed: bool):
        self.task, self.size, self.graphed, device = task, size, graphed, task.clean.device
        self.mask = torch.zeros(task.graph.n_edges, dtype=task.clean_logp.dtype, device=device)
        self.tried = torch.zeros(size, dtype=torch.long, device=device)
        self.passes: dict[int, Callable[[], Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if graphed else None

    def __call__(self, mask: Tensor, edges: list[int]) -> list[float]:
        start = min(self.task.graph.edge_layers[e] for e in edges)
        self.mask.copy_(mask)
        padded = edges + edges[-1:] * (self.size - len(edges))
        self.tried.copy_(to_device(torch.tensor(padded), self.tried.device))
        if start not in self.passes:
            kls = functools.partial(fixed_trial_kls, self.task, self.mask, self.tried, start)
            self.passes[start] = Captured(kls, self.mask.device, pool=self.pool) if self.graphed else kls
        return self.passes[start]()[: len(edges)].tolist()


def logit_diff_with_mask(task: CircuitTask, mask: Tensor) -> Tensor:
    final, _ = patched_forward(task.model, task.clean, mask, task.corrupt, return_sources=False)
    logp = last_logprobs(task.model, final, task.last)
    rows = torch.arange(len(task.last), device=logp.device)
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
def acdc(task: CircuitTask, tau: float, progress: bool = False, order: Sequence[int] | None = None,
         batch: int = 1, fixed_shape: bool = False) -> ACDCResult:
    """ACDC (Conmy et al. 2023) with exact edge patching: visit edges in reverse topological
    order (or in `order`: every edge index once, destinations' layers never increasing, e.g.
    auto-circuit's) and patch each; keep it patched (prune it) if the KL rises by less than tau.
    Only the layers from the destination's onward are recomputed.

    batch > 1 tries the next `batch` edges in one batched pass, speculating that each is pruned:
    trial i patches edges 1..i on top of the current circuit, so KL_i - KL_(i-1) is exactly the
    increase ACDC measures for edge i once edges 1..i-1 are pruned. The decisions are taken in
    order up to the first kept edge; the trials after it assumed it pruned, so the next batch
    starts behind it. The same edges as batch 1 (up to rounding), in about n_edges / batch +
    kept passes instead of n_edges: what a GPU needs, where one small pass costs its launches.
    fixed_shape: every pass tries `batch` edges at one shape (`FixedShapeTrials`), which CUDA
    records once as a graph and replays; elsewhere it runs eagerly, the same arithmetic."""
    g = task.graph
    mask = torch.zeros(g.n_edges, dtype=task.clean_logp.dtype, device=task.clean.device)
    delta = [0.0] * g.n_edges
    current = kl_with_mask(task, mask).item()
    layers = g.edge_layers
    if order is not None and (sorted(order) != list(range(g.n_edges)) or
                              any(layers[a] < layers[b] for a, b in zip(order, order[1:]))):
        raise SelfAblateError("an ACDC order must list every edge once, destinations' layers never increasing")
    todo = list(reversed(range(g.n_edges))) if order is None else list(order)
    graphed = task.clean.device.type == "cuda"
    trial_kls_of = FixedShapeTrials(task, batch, graphed) if fixed_shape else functools.partial(_trial_kls, task)
    with tqdm(total=g.n_edges, desc=f"ACDC tau={tau:.3g}", disable=not progress, leave=False) as bar:
        while todo:
            edges = todo[:batch]
            pruned, current = _decide(edges, trial_kls_of(mask, edges), current, tau, delta)
            if pruned:
                mask[torch.tensor(pruned, device=mask.device)] = 1.0
            decided = len(pruned) + (len(pruned) < len(edges))  # the first kept edge ends the batch
            todo = todo[decided:]
            bar.update(decided)
    return ACDCResult(mask, torch.tensor(delta, dtype=mask.dtype, device=mask.device), current)


def _trial_kls(task: CircuitTask, mask: Tensor, edges: list[int]) -> list[float]:
    """The KL of each cumulative trial (one host read). One edge takes the sparse path, which
    reuses every node its patch cannot change."""
    if len(edges) > 1:
        return trial_kls(task, mask, edges).tolist()
    trial = mask.clone()
    trial[edges[0]] = 1.0
    # Everything before the destination's layer is still the clean run: start there.
    return [kl_with_mask(task, trial, start_layer=task.graph.edge_layers[edges[0]]).item()]


def _decide(edges: list[int], kls: list[float], current: float, tau: float,
            delta: list[float]) -> tuple[list[int], float]:
    """ACDC's rule over cumulative trials, in order: prune edge i if KL_i - KL_(i-1) < tau (KL_0
    the current circuit's); stop at the first kept edge. Returns the pruned edges and the KL."""
    pruned = []
    for e, kl in zip(edges, kls):
        delta[e] = kl - current
        if kl - current >= tau:
            break
        pruned.append(e)
        current = kl
    return pruned, current
