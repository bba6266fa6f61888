"""Per-device choices of how to cut up work; the results are the same on every device."""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

import torch


class DevicePolicy(NamedTuple):
    """How work is cut up, and what the host may read, on one kind of device."""

    lm_head_rows: int
    """Rows per chunk at most. A CPU wants a chunk's logits in cache (256 rows measured best);
    a GPU wants few, large launches."""
    lm_head_elements: int
    """Logits per chunk at most (the memory a chunk holds: 4 bytes each in float32)."""
    head_align: int
    """Attention heads are zero-padded to a multiple of this for PyTorch's fused kernel (zeros
    change no dot product): 16 on a CPU (measured faster than 8 or 9), 8 on CUDA (flash's unit)."""
    two_stream_masked: bool
    """The ablated stream's attention as one fused call over [clean keys | own keys] with a mask
    (few operators, twice the keys), else a causal call over pos keys with a "self" key that
    carries each query's own-key score (half the keys, a dozen more small operators, which
    torch.compile fuses: measured faster on a CPU and, compiled, on an H200)."""
    host_reads_free: bool
    """Reading a tensor's value on the host costs no wait (a CPU): then the model checks token
    ranges, and the LM head tries each chunk's exp2 without the row max (two passes saved) and
    checks the sums' range. On a GPU each such read would stall the queue of launches."""
    topk_by_sort: bool = False
    """PyTorch's path takes each row's k winners from one stable sort of the row instead of
    topk(k + 1) and a pass for ties at the cut (the same winners, the same positions)."""
    flush_subnormal_grads: bool = False
    """The soft top-k's gradient has its entries below the dtype's smallest normal set to zero.
    They come from w (1 - w) far from a narrow cut times a small incoming gradient; on a CPU
    every product that reads one runs many times slower (subnormal arithmetic, worst on Intel's
    cores: docs/performance.md), on a GPU no slower. Each is below 1.2e-38 in float32: nothing a
    weight can learn from. The C kernels make no subnormal on the way either: the soft top-k's
    takes w below 2^-64 as 0, and the attention backward p below 2^-64 (peaked, unscaled
    attention), each below float32's resolution of the sum it belongs to."""
    plain_lm_head: bool = False
    """The LM head's loss as two plain operators, F.cross_entropy(h @ W.T), holding the (tokens,
    vocab) logits, for torch.compile to fuse (it writes its own softmax kernels), instead of the
    chunked head with its gradients computed in the forward pass (the same loss and gradients)."""
    triton_lm_head: bool = False
    """The LM head's loss and gradients from two Triton kernels that keep the logits in registers
    (`ops.triton_lm_head`: no (tokens, vocab) tensor is written, for one more GEMM's arithmetic),
    where Triton runs (CUDA) and the GEMMs are float32, bfloat16 or float16; the chunked head
    elsewhere. The same loss and gradients, to float32 rounding."""
    triton_attention: bool = False
    """Causal and two-stream attention from Triton kernels that pad a head only to 16 wide
    (`ops.triton_attention`), where Triton runs (CUDA), instead of PyTorch's fused attention, whose
    GPU kernels work in 64-wide tiles of the head. The same results, to float32 rounding (float32
    dots in TF32 where PyTorch's matmuls are: `runtime` turns that on for CUDA)."""


POLICIES = {
    "cpu": DevicePolicy(256, 1 << 24, 16, False, True, flush_subnormal_grads=True),
    "cuda": DevicePolicy(1 << 13, 1 << 28, 8, False, False),  # batch 24 x 256, GPT-2's vocabulary: 2 chunks, 1 GB
}
OTHER = DevicePolicy(1 << 11, 1 << 26, 8, True, False)
"""MPS and any other device."""

_as: str | None = None


def policy(device: torch.device | str) -> DevicePolicy:
    """The policy of a device type (or of the one `device_policy_as` stands in). While
    `torch.compile` traces, no host reads: a value read on the host would end the graph."""
    kind = _as or torch.device(device).type
    chosen = POLICIES.get(kind, OTHER)
    return chosen._replace(host_reads_free=False) if torch.compiler.is_compiling() else chosen


@contextlib.contextmanager
def device_policy_as(kind: str) -> Iterator[None]:
    """Apply another device type's policy here (a benchmark counts CUDA's launches on a CPU)."""
    global _as
    saved, _as = _as, kind
    try:
        yield
    finally:
        _as = saved
