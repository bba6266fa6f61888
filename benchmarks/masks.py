"""The k-winners-take-all mask with the soft top-k's gradient, forward + backward, side by side.

At the paper's widths (attention units 128, neurons 512; k 32; batch 8 x 256 positions):
`masks.hard_topk_soft_grad_reference` (autograd through hard + soft - soft.detach()) against
`masks.hard_topk_soft_grad` (hand-written backward) with its winners from torch.topk (an unsorted
top-(k+1)) and from the C kernel (`csrc/topk.c`), which the model uses on a float32 CPU; and that
kernel without the CPU policy's `flush_subnormal_grads`, which makes it compute the subnormal w of
the entries far below the cut (slow on x86 cores: each is a microcode assist).

    python benchmarks/masks.py [--repeats 20]
"""

from __future__ import annotations

import torch

from selfablate.ops.masks import hard_topk_soft_grad, hard_topk_soft_grad_reference
from timing import interleaved_ms, on_backend, repeats_from_argv, unflushed

B, POS, K = 8, 256, 32


def main() -> None:
    repeats = repeats_from_argv(__doc__, 20)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {B} x {POS}, k {K}; "
          "forward + backward, median ms")
    for width in (128, 512):
        s = torch.randn(B, POS, width, requires_grad=True)
        g = torch.randn(B, POS, width)

        def timed(fn):
            return lambda: torch.autograd.grad(fn(s, K, 0.1, 1e-12), s, g)

        ms = interleaved_ms({"ref": on_backend("torch", timed(hard_topk_soft_grad_reference)),
                             "topk": on_backend("torch", timed(hard_topk_soft_grad)),
                             "kernel": timed(hard_topk_soft_grad),
                             "unflushed": unflushed(timed(hard_topk_soft_grad))}, repeats)
        print(f"width {width:>4}: autograd reference {ms['ref']:6.2f}   hand-written backward: torch.topk "
              f"{ms['topk']:6.2f} ({ms['ref'] / ms['topk']:.2f}x), C top-k {ms['kernel']:6.2f} "
              f"({ms['ref'] / ms['kernel']:.2f}x; without the flush {ms['unflushed']:6.2f})")


if __name__ == "__main__":
    main()
