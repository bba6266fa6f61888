"""The LM head + cross-entropy at the paper's shape (2048 rows, d_model 128, vocab 50257), side by side.

Prints the time of a forward + backward of (a) plain `F.cross_entropy(h @ W.T, y)` and (b) our
chunked `linear_cross_entropy`, (c) the same with a fresh logits tensor per chunk instead of one
reused buffer, and exp vs exp2 on one (vocab, 128) chunk: the measurements behind its design.

    python benchmarks/lm_head.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from selfablate.model import fused as fused_module
from selfablate.model.fused import chunk_rows_for, linear_cross_entropy

ROWS, D, VOCAB = 2048, 128, 50257


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    w = (torch.randn(VOCAB, D) * 0.02).requires_grad_()
    h = torch.randn(ROWS, D).requires_grad_()
    y = torch.randint(0, VOCAB, (ROWS,))
    plain = median_ms(lambda: torch.autograd.grad(F.cross_entropy(h @ w.T, y), (h, w)), args.repeats)
    fused = median_ms(lambda: torch.autograd.grad(linear_cross_entropy(h, w, y), (h, w)), args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {ROWS} rows x {D} -> {VOCAB}, forward + backward")
    print(f"plain F.cross_entropy(h @ W.T)   {plain:8.1f} ms")
    print(f"chunked linear_cross_entropy     {fused:8.1f} ms   ({plain / fused:.2f}x)")
    reuse = fused_module._logits_buffer
    fused_module._logits_buffer = lambda *a: None  # a fresh (vocab, rows) tensor per chunk
    try:
        fresh = median_ms(lambda: torch.autograd.grad(linear_cross_entropy(h, w, y), (h, w)), args.repeats)
    finally:
        fused_module._logits_buffer = reuse
    print(f"  ... without the reused buffer  {fresh:8.1f} ms   (the buffer: {fresh / fused:.2f}x)")

    rows = chunk_rows_for(VOCAB)
    hc, wd = h.detach()[:rows], w.detach()
    logits = wd @ hc.T  # (vocab, rows)
    exp, exp2 = median_ms(lambda: logits.exp(), args.repeats), median_ms(lambda: logits.exp2(), args.repeats)
    print(f"one ({VOCAB}, {rows}) chunk: exp {exp:.2f} ms, exp2 {exp2:.2f} ms ({exp / exp2:.1f}x)")

if __name__ == "__main__":
    main()
