"""Performance accounting: nominal model FLOPs (for MFU) and the machine's GEMM peak."""

from .flops import gemm_peak_flops, train_flops_per_token

__all__ = ["gemm_peak_flops", "train_flops_per_token"]
