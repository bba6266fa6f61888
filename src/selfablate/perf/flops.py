"""Nominal training FLOPs per token and the measured float32 GEMM peak.

Model FLOPs count the work the method requires, not what an implementation happens to do
(recomputation in the chunked LM head is not credited): a matmul of (m, k) by (k, n) is 2mkn,
training is 3x the forward (forward, and twice that for the backward).
"""

from __future__ import annotations

import time
from typing import Literal

import torch

from ..config import ModelConfig
from ..ops.onednn import linear, onednn_available, pack


def forward_flops_per_token(cfg: ModelConfig, pos: int | None = None) -> float:
    """One stream: per layer q, k, v, out (4 d^2), MLP (2 d d_mlp), attention scores and values
    over the causal half of pos keys (2 * 2 * pos/2 * d); then the tied LM head (d * vocab)."""
    T = pos or cfg.n_ctx
    d = cfg.d_model
    per_layer = 2 * (4 * d * d + 2 * d * cfg.d_mlp) + 2 * 2 * (T / 2) * d
    return cfg.n_layers * per_layer + 2 * d * cfg.vocab_size


def mask_head_flops_per_token(cfg: ModelConfig) -> float:
    """Local heads (one per layer) and the global head both map d_model to every layer's
    d_model + d_mlp scores."""
    one = 2 * cfg.d_model * cfg.n_layers * (cfg.d_model + cfg.d_mlp)
    return {"none": 0, "local": one, "global": one, "both": 2 * one}[cfg.ablation]


def train_flops_per_token(cfg: ModelConfig, pos: int | None = None) -> float:
    """3 x forward: the clean stream, plus (self-ablating) the mask heads and the ablated
    stream, whose queries see pos/2 clean keys plus their own (counted as one more stream)."""
    fwd = forward_flops_per_token(cfg, pos)
    if cfg.self_ablating:
        fwd = 2 * fwd + mask_head_flops_per_token(cfg)
    return 3 * fwd


def _best_seconds(fn, repeats: int, cuda: bool) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_peak_flops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32,
                    backend: Literal["torch.mm", "onednn"] = "torch.mm") -> float:
    """The best FLOP/s of an (n x n) @ (n x n) matmul on the CPU (or the current CUDA device),
    through torch.mm or (CPU, float32) oneDNN, whose weight packing is left out of the time."""
    cuda = torch.cuda.is_available() and backend == "torch.mm"
    device = "cuda" if cuda else "cpu"
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    if backend == "onednn":  # a @ b = linear(a, b^T); MKL behind torch.mm runs AVX2 only on AMD
        packed = pack(b.T.contiguous())
        fn = lambda: linear(a, packed)  # noqa: E731
    else:
        fn = lambda: a @ b  # noqa: E731
    return 2 * n**3 / _best_seconds(fn, repeats, cuda)


def gemm_peaks(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """float32 GEMM FLOP/s per available backend: torch.mm, and oneDNN on a CPU that has it.
    MFU is fairly taken against the highest: the machine can do at least that."""
    peaks = {"torch.mm": gemm_peak_flops(n, repeats)}
    if not torch.cuda.is_available() and onednn_available():
        peaks["onednn"] = gemm_peak_flops(n, repeats, backend="onednn")
    return peaks
