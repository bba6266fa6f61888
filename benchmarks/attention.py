"""Attention at the paper's shape (batch 8, 16 heads, pos 256, d_head 8), forward + backward, side by side.

(a) the clean stream's causal attention and (b) the ablated stream's two-stream rule, each through
the compiled CPU kernel (`selfablate.ops.cpu_attention`, what the model uses on a float32 CPU) and
through PyTorch's fused kernel as the model called it before: head dims zero-padded to a multiple of
16 (the CPU's `ops.DevicePolicy.head_align`), and for (b) one extra "self" key
(`ops.attention._attend_with_self_key`). Then the kernel on peaked attention (queries and keys 4x
larger, as unscaled scores grow in training, and a gradient of 1e-6): its backward with and without
the CPU policy's `flush_subnormal_grads`, which takes p below 2^-64 as 0 so that no subnormal float
is made.

    python benchmarks/attention.py [--repeats 10] [--d-head 8]
"""

from __future__ import annotations

import torch

from selfablate import ops
from selfablate.ops import cpu_attention
from timing import interleaved_ms, on_backend, parser_with_repeats, unflushed

B, H, POS = 8, 16, 256


def main() -> None:
    p = parser_with_repeats(__doc__, 10)
    p.add_argument("--d-head", type=int, default=8)
    args = p.parse_args()
    dh = args.d_head
    torch.manual_seed(0)
    # (B, H, T, Dh) views of (B, T, H, Dh) tensors, as the model's projections give them.
    q, k, v, k_own, v_own = (torch.randn(B, POS, H, dh).transpose(1, 2).requires_grad_() for _ in range(5))
    grad = torch.randn(B, H, POS, dh)
    calls = {
        "clean (causal)": (lambda: ops.causal_attention(q, k, v), (q, k, v)),
        "ablated (two-stream)": (lambda: ops.two_stream_attention(q, k, v, k_own, v_own), (q, k, v, k_own, v_own)),
    }
    if not cpu_attention.available(dh):
        raise SystemExit(f"the CPU attention kernel is not available for d_head {dh} (see the warning)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {B}, {H} heads, pos {POS}, "
          f"d_head {dh}; forward + backward, median ms over {args.repeats}")
    for name, (fn, inputs) in calls.items():
        timed = lambda: torch.autograd.grad(fn(), inputs, grad)  # noqa: E731
        ms = interleaved_ms({"kernel": timed, "pytorch": on_backend("torch", timed)},
                            args.repeats)
        print(f"{name:<22} kernel {ms['kernel']:6.2f}   pytorch fused {ms['pytorch']:6.2f}   "
              f"({ms['pytorch'] / ms['kernel']:.2f}x)")
    peaked = [(x.detach() * 4).requires_grad_() for x in (q, k)]
    timed = lambda: torch.autograd.grad(ops.causal_attention(*peaked, v), [*peaked, v], grad * 1e-6)  # noqa: E731
    ms = interleaved_ms({"flush": timed, "none": unflushed(timed)}, args.repeats)
    print(f"{'peaked, clean':<22} kernel {ms['flush']:6.2f}   without the flush {ms['none']:6.2f}   "
          f"({ms['none'] / ms['flush']:.2f}x)")


if __name__ == "__main__":
    main()
