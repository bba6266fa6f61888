"""Activations of one hook point, streamed through a shuffled buffer (never all stored)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..data.dataset import TokenWindows
from ..errors import SelfAblateError
from ..model import SelfAblatingTransformer, Stream
from ..runtime import to_device


def check_hook(model: SelfAblatingTransformer, hook: str) -> None:
    """One line, before any compute, for a hook an SAE cannot be trained on."""
    if hook not in model.hook_points():
        raise SelfAblateError(f"no hook point named {hook!r} (the model has {model.cfg.n_layers} layers; "
                              f"e.g. blocks.{model.cfg.n_layers - 1}.hook_mlp_out or its _ablated twin)")
    if hook.endswith(("_mask", "_mask_ablated")):
        raise SelfAblateError(f"{hook} is a 0/1 unit mask, not an activation: train SAEs on activations "
                              "(e.g. hook_mlp_out, mlp.hook_post, hook_resid_post)")
    if not model.cfg.self_ablating and (hook.endswith(Stream.ABLATED.value) or hook.endswith("_scores")):
        raise SelfAblateError(f"{hook} never fires in a baseline model (ablation=none): it has no ablated "
                              "stream or mask scores")


@torch.no_grad()
def hook_activations(model: SelfAblatingTransformer, tokens: Tensor, hook: str) -> Tensor:
    """(batch, pos) tokens -> (batch * pos, width) activations at `hook` (heads flattened).
    Clean-stream hooks run only the clean stream; the ablated stream costs a full forward."""
    store: dict[str, Tensor] = {}
    with model.hooks([(hook, lambda x, hp: store.__setitem__("x", x))]):
        if hook.endswith(Stream.ABLATED.value) or "_mask" in hook or "_scores" in hook:
            model(tokens, return_logits=False)
        else:
            model.run_stream(model.embed(tokens), Stream.CLEAN)
    x = store["x"]
    return x.reshape(x.shape[0] * x.shape[1], -1)  # (batch * pos, width)


class ActivationBuffer:
    """Random windows -> activations -> a shuffled pool; batches are drawn from the pool and it is
    refilled (and reshuffled) whenever half of it has been used."""

    def __init__(self, model: SelfAblatingTransformer, windows: TokenWindows, hook: str, seqs_per_fill: int,
                 pool_tokens: int, generator: torch.Generator):
        check_hook(model, hook)
        self.model, self.windows, self.hook = model, windows, hook
        self.seqs, self.pool_tokens, self.gen = seqs_per_fill, pool_tokens, generator
        self.device = next(model.parameters()).device
        self.pool = torch.empty(0, device=self.device)
        self._refill()

    def _refill(self, at_least: int = 0) -> None:
        """Top the pool up to pool_tokens activations, and to at_least: a batch is never short
        (a CUDA graph of the step reads a fixed shape)."""
        parts = [self.pool]
        have = len(self.pool)
        while have < max(self.pool_tokens, at_least):
            x, _ = self.windows.random_batch(self.seqs, self.gen)
            acts = hook_activations(self.model, to_device(x, self.device), self.hook).float()
            parts.append(acts)
            have += len(acts)
        pool = torch.cat([p for p in parts if p.numel()])
        # The order is drawn on the host (the same on every device), then copied without a wait.
        self.pool = pool[to_device(torch.randperm(len(pool), generator=self.gen, device="cpu"), pool.device)]

    def next(self, n: int) -> Tensor:
        if len(self.pool) < max(n, self.pool_tokens // 2):
            self._refill(n)
        batch, self.pool = self.pool[:n], self.pool[n:]
        return batch
