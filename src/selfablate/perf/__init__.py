"""Performance accounting (nominal model FLOPs for MFU, the machine's GEMM peak) and the
process-level allocator setting that training uses."""

from .allocator import keep_freed_memory
from .flops import gemm_peak_flops, gemm_peaks, train_flops_per_token

__all__ = ["gemm_peak_flops", "gemm_peaks", "keep_freed_memory", "train_flops_per_token"]
