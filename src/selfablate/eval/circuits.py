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

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model import SelfAblatingTransformer


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


def _patched(sources: list[Tensor], running: Tensor, corrupt: Tensor | None, block: Tensor, bias: Tensor) -> Tensor:
    """Inputs of a destination group: the sum of upstream sources (`running`, kept up to date by
    the caller), with patched edges moved to the corrupt sources. block (rows, n) mask; returns
    (rows, B, T, D)."""
    rows, n = block.shape
    resid = running + bias  # (B, T, D)
    if corrupt is not None and (block.requires_grad or not bool(((block == 0) | (block == 1)).all())):
        delta = corrupt[:n] - torch.stack(sources[:n])  # (n, B, T, D)
        return resid + torch.einsum("rn,nbtd->rbtd", block.to(delta.dtype), delta)
    if corrupt is None or not bool(block.any()):
        return resid.expand(rows, *resid.shape)
    return _sparse_patch(sources, resid, corrupt, block.bool(), bias)


def _sparse_patch(sources: list[Tensor], resid: Tensor, corrupt: Tensor, pruned: Tensor, bias: Tensor) -> Tensor:
    """A 0/1 mask touching only its minority side per row: rows with few pruned edges add the
    pruned sources' deltas to the clean sum; rows with mostly pruned edges start from the corrupt
    sum and add back the kept sources' own outputs. Cost ~ min(pruned, kept) per row, which
    stays small through ACDC (upstream untouched, downstream mostly pruned)."""
    rows, n = pruned.shape
    mostly = pruned.sum(1) * 2 > n  # (rows,)
    base = torch.where(mostly.view(-1, 1, 1, 1), (corrupt[:n].sum(0) + bias).unsqueeze(0), resid.unsqueeze(0))
    out = base.expand(rows, *resid.shape).clone()  # (rows, B, T, D)
    r, src = torch.where(mostly.unsqueeze(1), ~pruned, pruned).nonzero(as_tuple=True)
    if len(r):
        own = torch.stack([sources[i] for i in src.tolist()])  # (m, B, T, D)
        sign = torch.where(mostly[r], -1.0, 1.0).to(own.dtype).view(-1, 1, 1, 1)
        out.index_add_(0, r, sign * (corrupt[src] - own))
    return out


def _heads(model: SelfAblatingTransformer, layer: int, x: Tensor) -> Tensor:
    """Per-head outputs of one attention layer whose q, k, v of each head read their own input.
    x (3H, B, T, D) -> (H, B, T, D), without out_proj's bias (added to the residual separately)."""
    block = model.blocks[layer]
    attn, H, Dh = block.attn, model.cfg.n_heads, model.cfg.d_head
    # An unpatched group's rows are one expanded tensor: normalise it once.
    h = block.ln_1(x[0]).expand_as(x) if x.stride(0) == 0 else block.ln_1(x)  # (3H, B, T, D)
    proj = lambda w, part: torch.einsum("hbtd,hed->bhte", part, w.weight.view(H, Dh, -1))  # noqa: E731
    q, k, v = proj(attn.q_proj, h[:H]), proj(attn.k_proj, h[H : 2 * H]), proj(attn.v_proj, h[2 * H :])  # (B, H, T, Dh)
    z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)  # (B, H, T, Dh)
    w_o = attn.out_proj.weight.view(-1, H, Dh)  # (D, H, Dh)
    return torch.einsum("bhte,dhe->hbtd", z, w_o)  # (H, B, T, D)


def patched_forward(model: SelfAblatingTransformer, tokens: Tensor, mask: Tensor,
                    corrupt: Tensor | None = None, start_layer: int = 0,
                    clean_sources: Tensor | None = None, clean_prefix: Tensor | None = None,
                    return_sources: bool = True) -> tuple[Tensor, Tensor | None]:
    """The clean stream with edges patched: mask (n_edges,) in [0, 1], corrupt (n_sources, B, T, D)
    the corrupt prompt's source outputs (None: no patching). Returns the final residual
    (B, T, D), before ln_final, and (if return_sources) this run's source outputs.

    With start_layer > 0, the sources before that layer are taken from clean_sources (valid
    when no edge into an earlier layer is patched), their sum from clean_prefix[n] (the sum of
    the first n clean sources) if given: only what is downstream is recomputed.
    """
    graph = graph_of(model)
    first = graph.sources_before_attn(start_layer) if start_layer else 1
    sources = list(clean_sources[:first]) if start_layer else [model.embed(tokens)]
    running = clean_prefix[first] if clean_prefix is not None and start_layer else torch.stack(sources).sum(0)
    bias = sum((b.attn.out_proj.bias for b in model.blocks[:start_layer]),
               torch.zeros((), dtype=sources[0].dtype, device=tokens.device))
    for l in range(start_layer, model.cfg.n_layers):
        block = model.blocks[l]
        heads = _heads(model, l, _patched(sources, running, corrupt, graph.group_mask(mask, 2 * l), bias))
        sources += list(heads)
        running = running + heads.sum(0)
        bias = bias + block.attn.out_proj.bias
        x = _patched(sources, running, corrupt, graph.group_mask(mask, 2 * l + 1), bias)[0]
        sources.append(block.mlp.fc_out(F.gelu(block.mlp.fc_in(block.ln_2(x)), approximate="tanh")))
        running = running + sources[-1]
    final = _patched(sources, running, corrupt, graph.group_mask(mask, len(graph.groups) - 1), bias)[0]
    return final, torch.stack(sources) if return_sources else None


def last_logprobs(model: SelfAblatingTransformer, final: Tensor, last: Tensor) -> Tensor:
    """log softmax of the logits at each prompt's last position: (n, vocab)."""
    x = model.ln_final(final[torch.arange(len(last)), last])
    logits = model.unembed(x)
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)


def kl_last(clean_logp: Tensor, logp: Tensor) -> Tensor:
    """Mean over prompts of KL(p_clean || p) at the last position: sum_v p_c (log p_c - log p)."""
    return (clean_logp.exp() * (clean_logp - logp)).sum(-1).mean()
