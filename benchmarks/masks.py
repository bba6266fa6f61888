"""The k-winners-take-all mask with the soft top-k's gradient, forward + backward, side by side.

At the paper's widths (attention units 128, neurons 512; k 32; batch 8 x 256 positions):
`masks.hard_topk_soft_grad_reference` (autograd through hard + soft - soft.detach()) against
`masks.hard_topk_soft_grad` (hand-written backward, unsorted top-(k+1)), which the model uses.

    python benchmarks/masks.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from selfablate.model.masks import hard_topk_soft_grad, hard_topk_soft_grad_reference

B, POS, K = 8, 256, 32


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {B} x {POS}, k {K}; forward + backward, median ms")
    for width in (128, 512):
        s = torch.randn(B, POS, width, requires_grad=True)
        g = torch.randn(B, POS, width)
        ms = [median_ms(lambda: torch.autograd.grad(fn(s, K, 0.1, 1e-12), s, g), args.repeats)
              for fn in (hard_topk_soft_grad_reference, hard_topk_soft_grad)]
        print(f"width {width:>4}: autograd reference {ms[0]:6.2f}   hand-written backward {ms[1]:6.2f}   ({ms[0] / ms[1]:.2f}x)")


if __name__ == "__main__":
    main()
