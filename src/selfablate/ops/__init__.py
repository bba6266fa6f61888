"""How the model's operations are computed, chosen once per process.

Two backends compute the same operations: `torch` (plain PyTorch on any device and dtype: the
reference, and the path CUDA and MPS take) and `cpu` (C kernels and oneDNN GEMMs for float32 CPU
tensors outside autocast; anything else falls through to PyTorch's operators). The backend is
`cpu` unless `$SELFABLATE_BACKEND` says `torch`; tests and benchmarks switch it with
`use_backend`. How work is cut up for a device (the LM head's chunks) is its `DevicePolicy`.
"""

from .backends import BACKENDS, backend, select, use_backend
from .policy import POLICIES, DevicePolicy, device_policy_as, policy

__all__ = ["BACKENDS", "POLICIES", "DevicePolicy", "backend", "select", "device_policy_as", "policy", "use_backend"]
