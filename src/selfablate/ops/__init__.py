"""The operations the model needs, each with one signature, and how they are computed.

Two backends compute them: `torch` (plain PyTorch on any device and dtype: the reference, and the
path CUDA and MPS take) and `cpu` (C kernels and oneDNN GEMMs for float32 CPU tensors outside
autocast; anything else falls through to PyTorch's operators). The backend is `cpu` unless
`$SELFABLATE_BACKEND` says `torch`, chosen once per process; tests and benchmarks switch it with
`use_backend`. How work is cut up for a device (the LM head's chunks, the attention's form) is its
`DevicePolicy`.
"""

from .activations import gelu_new
from .attention import (causal_attention, masked_attention, self_ablated_allowed, two_stream_attention,
                        windowed_allowed)
from .backends import BACKENDS, backend, select, use_backend
from .lm_head import linear_cross_entropy, per_token_cross_entropy
from .masks import MASK_FUNCTIONS, hard_topk, hard_topk_soft_grad, soft_topk, topk_winners
from .onednn import Linear, linears
from .policy import POLICIES, DevicePolicy, device_policy_as, policy
from .recon import at_least_fp32, reconstruction_loss

__all__ = ["BACKENDS", "MASK_FUNCTIONS", "POLICIES", "DevicePolicy", "Linear", "at_least_fp32", "backend", "causal_attention",
           "device_policy_as", "gelu_new", "hard_topk", "hard_topk_soft_grad", "linear_cross_entropy",
           "linears", "masked_attention", "per_token_cross_entropy", "policy", "reconstruction_loss", "select",
           "self_ablated_allowed", "soft_topk", "topk_winners", "two_stream_attention", "use_backend",
           "windowed_allowed"]
