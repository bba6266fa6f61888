"""What N2G reads off a model: which units, their top-activating training positions, their
activations on held-out text, and a fast activation function for the pruning and replacement
batches."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..model import SelfAblatingTransformer, Stream
from .n2g import LastActivation


class Units(NamedTuple):
    """One layer's units of one kind in one stream."""

    kind: str
    """"mlp" (the MLP's neurons, hook_post) or "attn" (the attention context's d_model units, hook_z)."""
    stream: Stream
    layer: int

    @property
    def key(self) -> str:
        """A name for files and tables: mlp-clean-3."""
        return f"{self.kind}-{self.stream.name.lower()}-{self.layer}"

    @property
    def hook(self) -> str:
        name = "mlp.hook_post" if self.kind == "mlp" else "attn.hook_z"
        return f"blocks.{self.layer}.{name}{self.stream.value}"

    @property
    def mask_hook(self) -> str:
        """The hook of the ablated stream's mask of these units (the k kept at each position)."""
        return f"blocks.{self.layer}.hook_{self.kind}_mask"


def flat_units(x: Tensor) -> Tensor:
    """A hook's activation as (batch, pos, units): hook_z's (B, T, H, Dh) -> (B, T, d_model)."""
    return x.flatten(2)


def run_model(model: SelfAblatingTransformer, tokens: Tensor) -> None:
    """One forward pass for its hooks: both streams of a self-ablating model, the clean one else."""
    model(tokens, return_logits=False, return_masks=False)


class _Reached(Exception):
    """Raised by a hook to stop the forward pass once the wanted activation is read."""


def last_activation(model: SelfAblatingTransformer, units: Units) -> LastActivation:
    """tokens (batch, pos) -> the units' activations at the last position (batch, units). The pass
    stops at the units' layer: nothing after it can change them."""
    def fn(tokens: Tensor) -> Tensor:
        got: list[Tensor] = []

        def grab(x: Tensor, hp) -> None:
            got.append(flat_units(x)[:, -1])  # (batch, units)
            raise _Reached

        with torch.no_grad(), model.hooks([(units.hook, grab)]):
            try:
                run_model(model, tokens.to(model.wte.weight.device))
            except _Reached:
                pass
        return got[0]

    return fn


class TopExamples:
    """The n highest activations of every unit over a pass, and where they were (a flat position
    in the split), kept on the device."""

    def __init__(self, n: int, width: int, device: torch.device):
        self.values = torch.full((n, width), float("-inf"), device=device)
        self.where = torch.zeros((n, width), dtype=torch.long, device=device)

    def update(self, acts: Tensor, first: int) -> None:
        """acts (batch, pos, units) of the windows whose first token is flat position `first`."""
        flat = acts.reshape(-1, acts.shape[-1]).float()  # (batch * pos, units)
        where = torch.arange(first, first + len(flat), device=flat.device)[:, None].expand_as(flat)
        values = torch.cat([self.values, flat])
        top = values.topk(len(self.values), dim=0)
        self.values = top.values
        self.where = torch.cat([self.where, where]).gather(0, top.indices)


def top_examples(model: SelfAblatingTransformer, units: list[Units], windows: Tensor, n: int,
                 batch_size: int) -> dict[str, TopExamples]:
    """windows (n_windows, pos) of model ids -> each unit set's TopExamples, in one pass."""
    device = model.wte.weight.device
    found: dict[str, TopExamples] = {}
    first = [0]

    def keep(u: Units):
        def fn(x: Tensor, hp) -> None:
            acts = flat_units(x)
            found.setdefault(u.key, TopExamples(n, acts.shape[-1], device)).update(acts, first[0])
        return fn

    with torch.no_grad(), model.hooks([(u.hook, keep(u)) for u in units]):
        for i in range(0, len(windows), batch_size):
            first[0] = i * windows.shape[1]
            run_model(model, windows[i : i + batch_size].to(device))
    return found


class HeldOut(NamedTuple):
    """Every unit's activation on the held-out windows, and how often the ablated stream kept it."""

    acts: dict[str, Tensor]
    """key -> (n_windows, pos, units) float32 on the host."""
    kept: dict[str, Tensor]
    """key -> (units,) the fraction of positions whose mask kept the unit (self-ablating models)."""


def held_out(model: SelfAblatingTransformer, units: list[Units], windows: Tensor, batch_size: int) -> HeldOut:
    """One pass over windows (n_windows, pos) reading every unit set and, for a self-ablating
    model, each set's mask; one transfer to the host per batch and set."""
    device = model.wte.weight.device
    acts: dict[str, list[Tensor]] = {u.key: [] for u in units}
    kept: dict[str, Tensor] = {}
    hooks = [(u.hook, lambda x, hp, k=u.key: acts[k].append(flat_units(x).float().cpu())) for u in units]
    if model.cfg.self_ablating:
        def count(key: str):
            def fn(x: Tensor, hp) -> None:
                kept[key] = kept.get(key, 0) + (x > 0.5).flatten(0, 1).sum(0).double()  # (units,)
            return fn
        hooks += [(u.mask_hook, count(u.key)) for u in units]
    with torch.no_grad(), model.hooks(hooks):
        for i in range(0, len(windows), batch_size):
            run_model(model, windows[i : i + batch_size].to(device))
    positions = windows.numel()
    return HeldOut({k: torch.cat(v) for k, v in acts.items()}, {k: (v / positions).float().cpu() for k, v in kept.items()})


def token_view(model: SelfAblatingTransformer, windows: Tensor, show: int) -> list[list[dict[str, list]]]:
    """For each window (n_windows, pos), position and layer, the units a reader of the explorer
    sees: for a self-ablating model those the ablated stream kept there (its masks) with their
    ablated-stream activations; for a baseline the `show` most active of the clean stream.
    Returns [window][position] -> {"mlp-<layer>": [[unit, activation], ...], "attn-<layer>": ...}."""
    kinds = ("mlp", "attn")
    sets = [Units(k, Stream.ABLATED if model.cfg.self_ablating else Stream.CLEAN, l)
            for l in range(model.cfg.n_layers) for k in kinds]
    got: dict[str, Tensor] = {}
    hooks = [(u.hook, lambda x, hp, k=u.key: got.__setitem__(k, flat_units(x).float().cpu())) for u in sets]
    if model.cfg.self_ablating:
        hooks += [(u.mask_hook, lambda x, hp, k=u.key: got.__setitem__("mask " + k, x.float().cpu())) for u in sets]
    with torch.no_grad(), model.hooks(hooks):
        run_model(model, windows.to(model.wte.weight.device))
    view: list[list[dict[str, list]]] = [[{} for _ in range(windows.shape[1])] for _ in range(len(windows))]
    for u in sets:
        acts = got[u.key]  # (n_windows, pos, units)
        chosen = (got["mask " + u.key] > 0.5) if model.cfg.self_ablating else \
            torch.zeros_like(acts, dtype=torch.bool).scatter_(-1, acts.topk(min(show, acts.shape[-1]), -1).indices, True)
        for w, t, unit in torch.nonzero(chosen).tolist():
            view[w][t].setdefault(f"{u.kind}-{u.layer}", []).append([unit, round(float(acts[w, t, unit]), 3)])
    return view
