"""The LM head + cross-entropy at the paper's shape (2048 rows, d_model 128, vocab 50257), side by side.

Prints the time of a forward + backward of (a) plain `F.cross_entropy(h @ W.T, y)` and (b) our
chunked `linear_cross_entropy` (its oneDNN path, on a float32 CPU that has it), (c) its torch.mm
path, (d) that with a fresh logits tensor per chunk instead of one reused buffer, (e) with every
chunk's softmax shifted by its max (as on CUDA), and exp vs exp2 on one (vocab, rows) chunk: the
measurements behind its design; and the GFLOP/s of the torch.mm path's three GEMMs per chunk
beside the machine's float32 peak through torch.mm and oneDNN.

    python benchmarks/lm_head.py [--repeats 5]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfablate import ops
from selfablate.ops import lm_head as fused_module
from selfablate.ops import onednn
from selfablate.ops.lm_head import chunk_rows_for, linear_cross_entropy
from selfablate.perf import gemm_peaks
from timing import interleaved_ms, on_backend, patched, repeats_from_argv

ROWS, D, VOCAB = 2048, 128, 50257


def main() -> None:
    repeats = repeats_from_argv(__doc__, 5)
    torch.manual_seed(0)
    w = (torch.randn(VOCAB, D) * 0.02).requires_grad_()
    h = torch.randn(ROWS, D).requires_grad_()
    y = torch.randint(0, VOCAB, (ROWS,))
    fused = lambda: torch.autograd.grad(linear_cross_entropy(h, w, y), (h, w))  # noqa: E731
    mm = on_backend("torch", fused)  # the torch.mm path (other dtypes, autocast, CUDA)
    ms = interleaved_ms({"plain": lambda: torch.autograd.grad(F.cross_entropy(h @ w.T, y), (h, w)),
                         "fused": fused, "mm": mm,
                         # the torch.mm path with a fresh (vocab, rows) logits tensor per chunk, not one buffer
                         "fresh": patched(fused_module, "_logits_buffer", lambda *a: None, mm),
                         # every chunk's softmax shifted by its max (as on CUDA), not tried unshifted first
                         "shifted": patched(ops.POLICIES, "cpu", ops.POLICIES["cpu"]._replace(host_reads_free=False),
                                            fused)}, repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {ROWS} rows x {D} -> {VOCAB}, forward + backward")
    print(f"plain F.cross_entropy(h @ W.T)   {ms['plain']:8.1f} ms")
    print(f"chunked linear_cross_entropy     {ms['fused']:8.1f} ms   ({ms['plain'] / ms['fused']:.2f}x)"
          + ("" if onednn.use_onednn(h, w) else "   (no oneDNN here: the torch.mm path)"))
    print(f"  ... through torch.mm           {ms['mm']:8.1f} ms   (oneDNN: {ms['mm'] / ms['fused']:.2f}x)")
    print(f"  ... and without its buffer     {ms['fresh']:8.1f} ms   (the buffer: {ms['fresh'] / ms['mm']:.2f}x)")
    print(f"  ... always max-shifted         {ms['shifted']:8.1f} ms   "
          f"(unshifted exp2: {ms['shifted'] / ms['fused']:.2f}x)")

    rows = chunk_rows_for(VOCAB)
    hc, wd = h.detach()[:rows], w.detach()
    logits = wd @ hc.T  # (vocab, rows)
    buf = torch.empty_like(logits)
    ms = interleaved_ms({"copy": lambda: buf.copy_(logits), "exp": lambda: buf.copy_(logits).exp_(),
                         "exp2": lambda: buf.copy_(logits).exp2_()}, 5 * repeats)
    exp, exp2 = ms["exp"] - ms["copy"], ms["exp2"] - ms["copy"]
    print(f"one ({VOCAB}, {rows}) chunk, in place: exp {exp:.2f} ms, exp2 {exp2:.2f} ms ({exp / exp2:.1f}x)")

    # The torch.mm path's three GEMMs per chunk (two with a 128-wide dimension) against the peaks.
    probs, grad_w = torch.rand_like(logits), torch.zeros_like(wd)
    ms = interleaved_ms({"logits W @ h^T": lambda: torch.mm(wd, hc.T, out=buf),
                         "grad_h P^T @ W": lambda: probs.T @ wd,
                         "grad_W += P @ h": lambda: grad_w.addmm_(probs, hc)}, 5 * repeats)
    flop = 2 * VOCAB * D * rows
    print("its GEMMs, GFLOP/s: " + ", ".join(f"{name} {flop / t / 1e6:.0f}" for name, t in ms.items())
          + "; float32 peak (2048^3) " + ", ".join(f"{b} {f / 1e9:.0f}" for b, f in gemm_peaks().items()))


if __name__ == "__main__":
    main()
