"""TransformerLens-style named hook points.

A `HookPoint` is an identity module placed where an activation is worth reading or editing.
Hooks are plain PyTorch forward hooks: a hook returning a tensor replaces the activation.
Every hook point exists twice, once per stream: `blocks.3.attn.hook_z` (clean) and
`blocks.3.attn.hook_z_ablated` (ablated).
"""

from __future__ import annotations

import contextlib
import enum
from typing import Callable, Sequence

from torch import Tensor, nn


class Stream(enum.Enum):
    """The two residual streams; the value is the suffix of the stream's hook names."""

    CLEAN = ""
    ABLATED = "_ablated"


class HookPoint(nn.Module):
    """Identity; a place to attach forward hooks."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    @property
    def active(self) -> bool:
        """True when a hook is attached (lets callers skip work nobody will read)."""
        return bool(self._forward_hooks)


def add_hook_points(module: nn.Module, *names: str) -> None:
    """Give `module` a clean and an ablated hook point for each name."""
    for name in names:
        for stream in Stream:
            module.add_module(name + stream.value, HookPoint())


def hook(module: nn.Module, name: str, stream: Stream) -> HookPoint:
    """The hook point `name` of `module` for `stream`."""
    return module.get_submodule(name + stream.value)  # type: ignore[return-value]


HookFn = Callable[[Tensor, HookPoint], "Tensor | None"]
"""A hook: fn(activation, hook_point) -> a replacement activation, or None to keep it."""


class HookedModule(nn.Module):
    """Mixin: named access to every HookPoint below this module, TransformerLens style."""

    def setup_hooks(self) -> None:
        """Call at the end of __init__: gives every hook point its full name."""
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name

    def hook_points(self) -> dict[str, HookPoint]:
        return {n: m for n, m in self.named_modules() if isinstance(m, HookPoint)}

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]]):
        """Attach hooks for the duration of a `with` block.

        Each entry is (name or name filter, fn); fn(activation, hook_point) may return a tensor
        to replace the activation.
        """
        points = self.hook_points()
        handles = []
        try:
            for selector, fn in fwd_hooks:
                names = [n for n in points if selector(n)] if callable(selector) else [selector]
                for name in names:
                    if name not in points:
                        raise KeyError(f"no hook point named {name!r}")
                    handles.append(points[name].register_forward_hook(_adapt(fn)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def run_with_cache(self, *args, names: Callable[[str], bool] | Sequence[str] | None = None, **kwargs):
        """Run forward and return (output, {hook name: activation}) for the selected hook points."""
        selectors = list(self.hook_points()) if names is None else [names] if callable(names) else list(names)
        cache: dict[str, Tensor] = {}

        def store(x: Tensor, hp: HookPoint) -> None:
            cache[hp.name] = x.detach()

        with self.hooks([(s, store) for s in selectors]):
            out = self(*args, **kwargs)
        return out, cache



def _adapt(fn: HookFn):
    def forward_hook(module: nn.Module, inputs: tuple, output: Tensor):
        return fn(output, module)  # type: ignore[arg-type]

    return forward_hook
