"""Sampling from either stream, recording which units each generated token used."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .model import SelfAblatingTransformer
from .data.vocab import to_gpt2_ids, to_model_ids, unk_id


class Generated(NamedTuple):
    """A sampled continuation."""

    tokens: list[int]
    """The prompt followed by the new tokens."""
    new_tokens: list[int]
    """Only the sampled tokens."""
    attn_units: list[list[list[int]]] | None
    """For each new token, per layer, the indices of the attention units its prediction kept
    (None for a baseline model)."""
    mlp_units: list[list[list[int]]] | None
    """Likewise for MLP neurons."""


def sample_next(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    """Sample one token id from logits (vocab,); temperature 0 means greedy."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def _units(mask: Tensor) -> list[list[int]]:
    """mask (n_layers, width) -> per layer the indices of kept units."""
    return [row.nonzero().flatten().tolist() for row in mask]


@torch.no_grad()
def generate(model: SelfAblatingTransformer, prompt: list[int], max_new_tokens: int,
             stream: Literal["clean", "ablated"] = "clean", temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0) -> Generated:
    """Autoregressive sampling from the clean or the ablated stream (no KV cache: the ablated
    stream's masks depend on the whole clean prefix, so each step re-runs the window)."""
    if stream == "ablated" and not model.cfg.self_ablating:
        raise ValueError("a baseline model has no ablated stream")
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    tokens = to_model_ids(model, torch.tensor(prompt, dtype=torch.long, device="cpu")).tolist()
    attn_units, mlp_units = [], []
    for _ in range(max_new_tokens):
        window = torch.tensor([tokens[-model.cfg.n_ctx:]], device=device)
        out = model(window)
        logits = (out.logits_ablated if stream == "ablated" else out.logits_clean)[0, -1].cpu()
        if unk_id(model) is not None:
            logits[unk_id(model)] = float("-inf")  # <unk> stands for many tokens: never sample it
        tokens.append(sample_next(logits, temperature, top_k, gen))
        if out.attn_mask is not None:
            attn_units.append(_units(out.attn_mask[0, -1]))
            mlp_units.append(_units(out.mlp_mask[0, -1]))
    ablating = model.cfg.self_ablating
    tokens = to_gpt2_ids(model, torch.tensor(tokens, device=model.wte.weight.device)).tolist()
    return Generated(tokens, tokens[len(prompt):], attn_units if ablating else None, mlp_units if ablating else None)
