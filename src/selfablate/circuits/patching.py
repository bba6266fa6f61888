"""Edge-level circuit discovery on the clean stream (as the paper evaluated), auto-circuit's graph.

Sources: the embedding, every attention head's output and every MLP's output. Destinations: each
head's query, key and value input, each MLP's input, and the final residual. A destination reads
the sum of the outputs of every source upstream of it; patching the edge (s -> d) replaces s's
contribution to d's input by s's output on the corrupt prompt. For the paper's model: 137
sources, 393 destinations, 23,981 edges.

Sources are numbered embed, then per layer its heads and then its MLP, so every destination reads
a *prefix* of the sources: layer l's heads read the first 1 + l (H + 1), its MLP H more, the final
residual all of them. The edge mask is one vector over all edges (1 = patched to corrupt), and a
single patched forward serves ACDC (a 0/1 mask), EAP (its gradient at 0) and EAP-IG (gradients
along 0 -> 1).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..model import SelfAblatingTransformer
from ..model.hooks import Stream


@dataclass(frozen=True)
class EdgeGraph:
    n_layers: int
    n_heads: int

    def sources_before_attn(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1)

    def sources_before_mlp(self, layer: int) -> int:
        return self.sources_before_attn(layer) + self.n_heads

    @property
    def n_sources(self) -> int:
        return self.sources_before_attn(self.n_layers)

    @cached_property
    def source_names(self) -> list[str]:
        names = ["embed"]
        for l in range(self.n_layers):
            names += [f"L{l}.H{h}" for h in range(self.n_heads)] + [f"L{l}.MLP"]
        return names

    @cached_property
    def groups(self) -> list[tuple[str, int, int, int]]:
        """(destination group, first edge index, rows, sources per row), in topological order:
        per layer its 3 * n_heads q/k/v inputs (rows ordered q heads, k heads, v heads), then its
        MLP input, then the final residual."""
        out, start = [], 0
        for l in range(self.n_layers):
            n = self.sources_before_attn(l)
            out.append((f"L{l}.attn", start, 3 * self.n_heads, n))
            start += 3 * self.n_heads * n
            out.append((f"L{l}.MLP", start, 1, self.sources_before_mlp(l)))
            start += self.sources_before_mlp(l)
        out.append(("final", start, 1, self.n_sources))
        return out

    @property
    def n_edges(self) -> int:
        _, start, rows, n = self.groups[-1]
        return start + rows * n

    def group_mask(self, mask: Tensor, group: int) -> Tensor:
        """The (rows, sources) block of the edge mask for one destination group."""
        _, start, rows, n = self.groups[group]
        return mask[start : start + rows * n].view(rows, n)

    @cached_property
    def edge_layers(self) -> list[int]:
        """For each edge, the layer its destination reads (n_layers for the final residual):
        patching it leaves everything before that layer clean."""
        return [gi // 2 for gi, (_, _, rows, n) in enumerate(self.groups) for _ in range(rows * n)]

    @cached_property
    def edge_names(self) -> list[tuple[str, str]]:
        """(source, destination) of every edge, in mask order."""
        names = []
        for group, _, rows, n in self.groups:
            for r in range(rows):
                dest = group if rows == 1 else f"{group.split('.')[0]}.H{r % self.n_heads}.{'qkv'[r // self.n_heads]}"
                names += [(self.source_names[s], dest) for s in range(n)]
        return names


def graph_of(model: SelfAblatingTransformer) -> EdgeGraph:
    return EdgeGraph(model.cfg.n_layers, model.cfg.n_heads)


class RunCache(NamedTuple):
    """What an unpatched run (clean or corrupt) leaves for patched runs to reuse."""

    sources: Tensor
    """(n_sources, B, T, D) every source's output."""
    prefix: Tensor | None = None
    """(n_sources + 1, B, T, D): prefix[k] = the sum of the first k sources (saves a sum per use)."""
    qkv: Tensor | None = None
    """(n_layers, 3 * n_heads, B, T, d_head) every head's query, key and value (rows: q heads, k heads,
    v heads), reused for a destination whose edges are all unpatched (clean) or all patched (corrupt)."""

    def sum(self, n: int) -> Tensor:
        return self.prefix[n] if self.prefix is not None else self.sources[:n].sum(0)


def prefix_sums(sources: Tensor) -> Tensor:
    """(n + 1, ...) with [k] = the sum of sources[:k]."""
    return torch.cat([torch.zeros_like(sources[:1]), sources.cumsum(0)])


def _bias_before(model: SelfAblatingTransformer, layer: int) -> Tensor:
    """The sum of out_proj biases of the layers before `layer` (head sources exclude them)."""
    return sum((b.attn.out_proj.bias for b in model.blocks[:layer]), model.wte.weight.new_zeros(()))


@torch.no_grad()
def cache_run(model: SelfAblatingTransformer, tokens: Tensor) -> tuple[Tensor, RunCache]:
    """One unpatched run: its final residual (B, T, D) and everything patched runs reuse."""
    graph = graph_of(model)
    final, sources = patched_forward(model, tokens, torch.zeros(graph.n_edges, dtype=model.wte.weight.dtype, device=tokens.device))
    prefix = prefix_sums(sources)
    rows = torch.arange(3 * model.cfg.n_heads, device=tokens.device)
    qkv = [_project(model, l, (prefix[graph.sources_before_attn(l)] + _bias_before(model, l)).expand(len(rows), *final.shape), rows)
           for l in range(model.cfg.n_layers)]
    return final, RunCache(sources, prefix, torch.stack(qkv))


def _patched(sources: list[Tensor], running: Tensor, corrupt: RunCache | None, block: Tensor, bias: Tensor) -> Tensor:
    """Inputs of a destination group: the sum of upstream sources (`running`, kept up to date by
    the caller), with patched edges moved to the corrupt sources. block (rows, n) mask; returns
    (rows, B, T, D)."""
    rows, n = block.shape
    resid = running + bias  # (B, T, D)
    if corrupt is not None and (block.requires_grad or not bool(((block == 0) | (block == 1)).all())):
        delta = corrupt.sources[:n] - torch.stack(sources[:n])  # (n, B, T, D)
        return resid + torch.einsum("rn,nbtd->rbtd", block.to(delta.dtype), delta)
    if corrupt is None or not bool(block.any()):
        return resid.expand(rows, *resid.shape)
    return _sparse_patch(sources, resid, corrupt, block.bool(), bias)


def _sparse_patch(sources: list[Tensor], resid: Tensor, corrupt: RunCache, pruned: Tensor, bias: Tensor) -> Tensor:
    """A 0/1 mask touching only its minority side per row: rows with few pruned edges add the
    pruned sources' deltas to the clean sum; rows with mostly pruned edges start from the corrupt
    sum and add back the kept sources' own outputs. Cost ~ min(pruned, kept) per row, which
    stays small through ACDC (upstream untouched, downstream mostly pruned)."""
    rows, n = pruned.shape
    mostly = pruned.sum(1) * 2 > n  # (rows,)
    out = resid.expand(rows, *resid.shape).clone()  # (rows, B, T, D)
    if bool(mostly.any()):
        out[mostly] = corrupt.sum(n) + bias
    r, src = torch.where(mostly.unsqueeze(1), ~pruned, pruned).nonzero(as_tuple=True)
    if len(r):
        own = torch.stack([sources[i] for i in src.tolist()])  # (m, B, T, D)
        sign = torch.where(mostly[r], -1.0, 1.0).to(own.dtype).view(-1, 1, 1, 1)
        out.index_add_(0, r, sign * (corrupt.sources[src] - own))
    return out


def _project(model: SelfAblatingTransformer, layer: int, x: Tensor, rows: Tensor) -> Tensor:
    """Queries, keys or values of single heads: rows (r,) index q heads, then k heads, then v
    heads (0 .. 3H); x (r, B, T, D) their residual inputs -> (r, B, T, d_head)."""
    block, H, Dh = model.blocks[layer], model.cfg.n_heads, model.cfg.d_head
    attn = block.attn
    # An unpatched group's rows are one expanded tensor: normalise it once.
    h = block.ln_1(x[0]).expand_as(x) if x.stride(0) == 0 else block.ln_1(x)  # (r, B, T, D)
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).view(3 * H, Dh, -1)[rows]  # (r, Dh, D)
    return torch.einsum("rbtd,red->rbte", h, w)


def _heads(model: SelfAblatingTransformer, layer: int, qkv: Tensor, heads: Tensor) -> Tensor:
    """Outputs of some heads of one layer: heads (h,) indices, qkv (m, 3h, B, T, Dh) their queries,
    then keys, then values, for m trials (or (3h, B, T, Dh) for one) -> (m, h, B, T, D) (or
    (h, B, T, D)), without out_proj's bias (added to the residual separately)."""
    H, Dh = model.cfg.n_heads, model.cfg.d_head
    trials = qkv.dim() == 5
    qkv = qkv if trials else qkv.unsqueeze(0)  # (m, 3h, B, T, Dh)
    m, _, B, T, _ = qkv.shape
    # (m, 3h, B, T, Dh) -> (3, m * B, h, T, Dh): trials and prompts are one batch dimension.
    q, k, v = qkv.view(m, 3, len(heads), B, T, Dh).permute(1, 0, 3, 2, 4, 5).reshape(3, m * B, len(heads), T, Dh)
    band = ops.windowed_allowed(T, model.blocks[layer].attn.window, q.device)  # GPT-Neo's local layers
    z = F.scaled_dot_product_attention(q, k, v, attn_mask=band, is_causal=band is None, scale=1.0)  # (mB, h, T, Dh)
    w_o = model.blocks[layer].attn.out_proj.weight.view(-1, H, Dh)[:, heads]  # (D, h, Dh)
    out = torch.einsum("mbhte,dhe->mhbtd", z.view(m, B, len(heads), T, Dh), w_o)  # (m, h, B, T, D)
    return out if trials else out[0]


class _Reuse:
    """Reuse for 0/1 masks. A node all of whose input edges are patched outputs exactly its
    corrupt-run value, and a node with no patched input edge that reads only sources unchanged
    from the clean run outputs its clean-run value; neither is recomputed. Likewise for a single
    head's query, key or value. During ACDC almost every node downstream of the current
    destination is fully patched and almost every node at its layer untouched, so a trial
    recomputes a handful of projections and MLPs."""

    def __init__(self, corrupt: RunCache, clean: RunCache | None):
        self.corrupt, self.clean = corrupt, clean
        self.first_dirty = len(corrupt.sources)
        """Index of the first source whose output may differ from the clean run's."""

    def upstream_clean(self, n: int) -> bool:
        return self.clean is not None and n <= self.first_dirty

    def pick(self, first: int, patched: Tensor) -> tuple[list[Tensor | None], Tensor]:
        """patched (nodes, rows, n): the mask rows of the nodes whose outputs are sources
        first, first + 1, ... Returns their reused outputs (None: recompute) and the indices
        of the nodes to recompute."""
        full = patched.flatten(1).all(1).tolist()
        clean = (~patched.flatten(1).any(1)).tolist() if self.upstream_clean(patched.shape[-1]) else []
        out = [self.corrupt.sources[first + i] if f else self.clean.sources[first + i] if clean and clean[i] else None
               for i, f in enumerate(full)]
        changed = [i for i, o in enumerate(out) if o is None or full[i]]
        if changed:
            self.first_dirty = min(self.first_dirty, first + changed[0])
        todo = [i for i, o in enumerate(out) if o is None]
        return out, torch.tensor(todo, dtype=torch.long, device=patched.device)  # indexes device tensors

    def qkv(self, model: SelfAblatingTransformer, layer: int, rows: Tensor, block: Tensor,
            inputs: Callable[[Tensor], Tensor]) -> Tensor:
        """Projections of mask rows `rows` (block (r, n) their masks): cached where a row is
        all patched or all clean, computed from inputs(row subset) elsewhere."""
        no = torch.zeros_like(block[:, 0])
        full = block.all(1) if self.corrupt.qkv is not None else no
        none = ~block.any(1) if self.clean is not None and self.clean.qkv is not None and \
            self.upstream_clean(block.shape[1]) else no
        B, T, _ = self.corrupt.sources.shape[1:]
        out = self.corrupt.sources.new_empty(len(rows), B, T, model.cfg.d_head)  # (r, B, T, Dh)
        if bool(full.any()):
            out[full] = self.corrupt.qkv[layer, rows[full]]
        if bool(none.any()):
            out[none] = self.clean.qkv[layer, rows[none]]
        mixed = ~(full | none)
        if bool(mixed.any()):
            out[mixed] = _project(model, layer, inputs(mixed), rows[mixed])
        return out


def _attention_sources(model: SelfAblatingTransformer, layer: int, sources: list[Tensor], running: Tensor,
                       corrupt: RunCache | None, block: Tensor, bias: Tensor, reuse: _Reuse | None) -> list[Tensor]:
    """The head outputs of one layer, block (3H, n) its q/k/v mask rows."""
    H, n = model.cfg.n_heads, block.shape[1]
    if reuse is None:
        qkv = _project(model, layer, _patched(sources, running, corrupt, block, bias), torch.arange(3 * H, device=block.device))
        return list(_heads(model, layer, qkv, torch.arange(H, device=block.device)))
    out, todo = reuse.pick(n, block.view(3, H, n).transpose(0, 1).bool())  # per head: (H, 3, n)
    if len(todo):
        rows = torch.cat([todo, todo + H, todo + 2 * H])
        sub = block[rows].bool()
        qkv = reuse.qkv(model, layer, rows, sub, lambda m: _patched(sources, running, corrupt, sub[m].to(block.dtype), bias))
        for h, o in zip(todo.tolist(), _heads(model, layer, qkv, todo)):
            out[h] = o
    return out


def _mlp_source(model: SelfAblatingTransformer, layer: int, sources: list[Tensor], running: Tensor,
                corrupt: RunCache | None, block: Tensor, bias: Tensor, reuse: _Reuse | None) -> Tensor:
    """The MLP output of one layer, block (1, n) its mask row."""
    if reuse is not None:
        (out,), _ = reuse.pick(block.shape[1], block.bool().unsqueeze(0))
        if out is not None:
            return out
    x = _patched(sources, running, corrupt, block, bias)[0]
    b = model.blocks[layer]
    return b.mlp(b.ln_2(x), Stream.CLEAN)


def patched_forward(model: SelfAblatingTransformer, tokens: Tensor, mask: Tensor,
                    corrupt: Tensor | RunCache | None = None, start_layer: int = 0,
                    clean: RunCache | None = None, return_sources: bool = True) -> tuple[Tensor, Tensor | None]:
    """The clean stream with edges patched: mask (n_edges,) in [0, 1], corrupt the corrupt
    prompt's source outputs (n_sources, B, T, D) or its RunCache (None: no patching). Returns the
    final residual (B, T, D), before ln_final, and (if return_sources) this run's source outputs.

    With start_layer > 0 (at most n_layers), the sources before that layer come from the clean
    run's cache (valid when no edge into an earlier layer is patched): only what is downstream is
    recomputed. A 0/1 mask without gradient also reuses whole nodes and single q/k/v (see _Reuse).
    """
    graph = graph_of(model)
    if isinstance(corrupt, Tensor):
        corrupt = RunCache(corrupt)
    first = graph.sources_before_attn(start_layer) if start_layer else 1
    sources = list(clean.sources[:first]) if start_layer else [model.embed(tokens)]
    running = clean.sum(first) if start_layer else sources[0]
    bias = _bias_before(model, start_layer)
    binary = corrupt is not None and not mask.requires_grad and bool(((mask == 0) | (mask == 1)).all())
    reuse = _Reuse(corrupt, clean) if binary else None
    for l in range(start_layer, model.cfg.n_layers):
        heads = _attention_sources(model, l, sources, running, corrupt, graph.group_mask(mask, 2 * l), bias, reuse)
        sources += heads
        running = running + torch.stack(heads).sum(0)
        bias = bias + model.blocks[l].attn.out_proj.bias
        sources.append(_mlp_source(model, l, sources, running, corrupt, graph.group_mask(mask, 2 * l + 1), bias, reuse))
        running = running + sources[-1]
    final = _patched(sources, running, corrupt, graph.group_mask(mask, len(graph.groups) - 1), bias)[0]
    return final, torch.stack(sources) if return_sources else None


def last_logprobs(model: SelfAblatingTransformer, final: Tensor, last: Tensor) -> Tensor:
    """log softmax of the logits at each prompt's last position: (n, vocab)."""
    x = model.ln_final(final[torch.arange(len(last), device=final.device), last])
    logits = model.unembed(x)
    return ops.at_least_fp32(logits).log_softmax(-1)


def kl_last(clean_logp: Tensor, logp: Tensor) -> Tensor:
    """Mean over prompts of KL(p_clean || p) at the last position: sum_v p_c (log p_c - log p)."""
    return (clean_logp.exp() * (clean_logp - logp)).sum(-1).mean()


class Trials(NamedTuple):
    """m ACDC trials from one mask: trial i patches what the mask patches plus edges[: i + 1]."""

    masks: Tensor
    """(m, n_edges) each trial's 0/1 mask."""
    shared: dict[int, tuple[Tensor, Tensor]] | None
    """For each destination group, the rows and sources (host-known) of the batch's edges from
    sources shared by all trials, as flat (trial * rows + row) and source indices. None: every
    trial reads the shared sources through its own mask (dense, the same shapes for any edges)."""


def trial_masks(mask: Tensor, tried: Tensor) -> Tensor:
    """(m, n_edges): trial i patches what `mask` patches plus tried[: i + 1], tried (m,) edge
    indices on the device. An edge repeated in tried counts from its first place (the max of
    its writes), so a short batch can be padded with copies of its last edge."""
    m = len(tried)
    steps = torch.ones(m, m, dtype=mask.dtype, device=mask.device).tril()  # [i, j] = 1: trial i patches tried[j]
    return mask.expand(m, -1).clone().scatter_reduce_(1, tried.expand(m, m), steps, "amax")


def cumulative_trials(graph: EdgeGraph, mask: Tensor, edges: list[int], first: int) -> Trials:
    """The trials' masks, and the increments to the shared sources (index < first) by group,
    worked out on the host from the edge indices (no device reads)."""
    m = len(edges)
    masks = trial_masks(mask, torch.tensor(edges, device=mask.device))
    starts = [start for _, start, _, _ in graph.groups]
    shared: dict[int, tuple[list[int], list[int]]] = {}
    for j, e in enumerate(edges):
        gi = bisect.bisect_right(starts, e) - 1
        _, start, rows, n = graph.groups[gi]
        row, src = divmod(e - start, n)
        if src < first:
            dest, srcs = shared.setdefault(gi, ([], []))
            dest += [i * rows + row for i in range(j, m)]
            srcs += [src] * (m - j)
    return Trials(masks, {gi: (torch.tensor(d, device=mask.device), torch.tensor(s, device=mask.device))
                          for gi, (d, s) in shared.items()})


def _trial_inputs(graph: EdgeGraph, trials: Trials, group: int, base: Tensor, own: list[Tensor],
                  running: Tensor, d_shared: Tensor, corrupt: RunCache) -> Tensor:
    """Inputs (m, rows, B, T, D) of one destination group in every trial: each trial's running sum
    of sources plus, for each patched edge, corrupt minus own output of its source. The shared
    sources' part is one product with the mask before the batch (`base`, the same for every
    trial) plus the batch's own edges; the sources the trials recompute go through each trial's
    mask. running (m, B, T, D) includes the biases."""
    _, start, rows, n = graph.groups[group]
    first, m = len(d_shared), len(running)
    per_trial = trials.masks[:, start : start + rows * n].view(m, rows, n)  # each trial's mask of this group
    if trials.shared is None:  # dense: each trial's own mask over the shared sources too
        x = running.unsqueeze(1) + torch.einsum("mrs,sbtd->mrbtd", per_trial[..., :first], d_shared)  # (m, rows, B, T, D)
    else:
        block = base[start : start + rows * n].view(rows, n)
        x = running.unsqueeze(1) + torch.einsum("rs,sbtd->rbtd", block[:, :first], d_shared[:n])  # (m, rows, B, T, D)
    if trials.shared is not None and group in trials.shared:
        dest, src = trials.shared[group]
        x = x.flatten(0, 1).index_add(0, dest, d_shared[src]).view_as(x)
    if n > first:
        delta = corrupt.sources[first:n].unsqueeze(1) - torch.stack(own[: n - first])  # (n - first, m, B, T, D)
        x = x + torch.einsum("mrs,smbtd->mrbtd", per_trial[..., first:], delta)
    return x


@torch.no_grad()
def trials_final(model: SelfAblatingTransformer, mask: Tensor, edges: list[int], corrupt: RunCache,
                 clean: RunCache, start_layer: int) -> Tensor:
    """Final residuals (m, B, T, D), before ln_final, of the m cumulative trials of `edges` on top
    of `mask` (see `cumulative_trials`), all in one pass: the same arithmetic as `patched_forward`
    for each trial's mask, but dense, with trials as a batch dimension. Every edge into a layer
    before start_layer must be unpatched in every trial, so those sources are the clean run's."""
    graph = graph_of(model)
    trials = cumulative_trials(graph, mask, edges, graph.sources_before_attn(start_layer))
    return _trials_final(model, trials, mask, corrupt, clean, start_layer)


@torch.no_grad()
def fixed_trials_final(model: SelfAblatingTransformer, mask: Tensor, tried: Tensor, corrupt: RunCache,
                       clean: RunCache, start_layer: int) -> Tensor:
    """`trials_final` for the edges in the device tensor tried (m,), dense (`Trials.shared` None):
    the same operators on the same shapes for any mask and edges, nothing read on the host, so a
    CUDA graph can record it once per start layer."""
    return _trials_final(model, Trials(trial_masks(mask, tried), None), mask, corrupt, clean, start_layer)


def _trials_final(model: SelfAblatingTransformer, trials: Trials, mask: Tensor, corrupt: RunCache,
                  clean: RunCache, start_layer: int) -> Tensor:
    graph = graph_of(model)
    first = graph.sources_before_attn(start_layer)
    m = len(trials.masks)
    d_shared = corrupt.sources[:first] - clean.sources[:first]  # (first, B, T, D)
    running = (clean.sum(first) + _bias_before(model, start_layer)).expand(m, *d_shared.shape[1:])  # (m, B, T, D)
    own: list[Tensor] = []  # the sources from `first` on, each (m, B, T, D)
    H = model.cfg.n_heads
    for l in range(start_layer, model.cfg.n_layers):
        x = _trial_inputs(graph, trials, 2 * l, mask, own, running, d_shared, corrupt)  # (m, 3H, B, T, D)
        qkv = _project(model, l, x.flatten(0, 1), torch.arange(3 * H, device=x.device).repeat(m))
        heads = _heads(model, l, qkv.view(*x.shape[:2], *qkv.shape[1:]), torch.arange(H, device=x.device))  # (m, H, B, T, D)
        own += list(heads.unbind(1))
        running = running + heads.sum(1) + model.blocks[l].attn.out_proj.bias
        x = _trial_inputs(graph, trials, 2 * l + 1, mask, own, running, d_shared, corrupt)[:, 0]  # (m, B, T, D)
        b = model.blocks[l]
        own.append(b.mlp(b.ln_2(x), Stream.CLEAN))
        running = running + own[-1]
    return _trial_inputs(graph, trials, len(graph.groups) - 1, mask, own, running, d_shared, corrupt)[:, 0]
