"""Attention at the paper's shape (batch 8, 16 heads, pos 256, d_head 8), forward + backward, side by side.

(a) the clean stream's causal call and (b) the ablated stream's self-key call
(`layers.attend_self_ablated`, d_head + 1 wide), each with head dims as they are and zero-padded
to a multiple of 16 (`layers.HEAD_ALIGN`, what the model uses).

    python benchmarks/attention.py [--repeats 10]
"""

from __future__ import annotations

import torch

from selfablate.model import layers
from selfablate.model.hooks import HookPoint
from timing import interleaved_ms, patched, repeats_from_argv

B, H, POS, DH = 8, 16, 256, 8


def main() -> None:
    repeats = repeats_from_argv(__doc__, 10)
    torch.manual_seed(0)
    # (B, H, T, Dh) views of (B, T, H, Dh) tensors, as the model's projections give them.
    q, k, v, k_own, v_own = (torch.randn(B, POS, H, DH).transpose(1, 2).requires_grad_() for _ in range(5))
    grad = torch.randn(B, H, POS, DH)
    calls = {
        "clean (causal)": (lambda: layers.attend(q, k, v, None, HookPoint()), (q, k, v)),
        "ablated (self key)": (lambda: layers.attend_self_ablated(q, layers.KV(k, v), layers.KV(k_own, v_own)),
                               (q, k, v, k_own, v_own)),
    }
    align = layers.HEAD_ALIGN
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {B}, {H} heads, pos {POS}, d_head {DH}; "
          "forward + backward, median ms")
    for name, (fn, inputs) in calls.items():
        timed = lambda: torch.autograd.grad(fn(), inputs, grad)  # noqa: E731
        ms = interleaved_ms({a: patched(layers, "HEAD_ALIGN", a, timed) for a in (1, align)},
                            repeats)
        print(f"{name:<20} unpadded {ms[1]:6.1f}   padded to x{align} {ms[align]:6.1f}   ({ms[1] / ms[align]:.2f}x)")


if __name__ == "__main__":
    main()
