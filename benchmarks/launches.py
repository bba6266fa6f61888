"""GPU-shaped cost of a training step, counted on the CPU: operator launches and host syncs.

Nobody here can time a GPU, but two things that decide a small model's speed on one can be
counted anywhere: how many operators a step launches (each is a kernel launch on CUDA, a few
microseconds of fixed cost that a 128-wide model cannot hide) and how many times the host waits
for the device (a sync stalls the launch queue). This runs one paper-shape training step
(`selfablate.train.train_step`, batch 24 x 256, the paper's architecture) on the PyTorch path,
the one CUDA takes (no C kernels, no oneDNN), with the LM head's chunking as it is on CUDA, and
counts, under a TorchDispatchMode, every aten operator that is not a view or an allocation
(launches) and every operator that makes the host wait for its result (syncs: a tensor read as a
Python number or bool, nonzero, masked_select, ...), plus reads of a tensor into Python
(`tolist`, `numpy`, `cpu`), caught under a TorchFunctionMode.

    python benchmarks/launches.py [--batch 24] [--ablation local] [--log-step] [--recon 0]

A step that logs (`--log-step`) reads its losses and gradient norm, so it syncs; others must not.
"""

from __future__ import annotations

import argparse
import collections
import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from selfablate import ModelConfig, SelfAblatingTransformer
from selfablate.config import TrainConfig
from selfablate.train import autocast_for, make_optimizer, train_step

NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
             "_to_copy_meta", "set_", "resize_", "alias", "_unsafe_view", "unsqueeze_", "squeeze_", "t_",
             "record_stream", "_has_compatible_shallow_copy_type"}
"""aten operators that only allocate or relabel memory (views are recognised by their schema)."""
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "allclose", "unique",
            "_unique2", "unique_consecutive", "repeat_interleave", "masked_scatter_", "_assert_async_msg_meta"}
"""aten operators whose result the host needs (or whose output size depends on the data)."""
SYNC_METHODS = {"tolist", "numpy", "cpu"}
"""Tensor methods that hand a device tensor's data to Python without an aten operator on a CPU
(item, bool and int go through `_local_scalar_dense`, counted above)."""


class Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.launches: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.syncs[name] += 1
        if not (func.is_view or name in NO_LAUNCH):
            self.launches[name] += 1
        return func(*args, **(kwargs or {}))


class MethodCounter(TorchFunctionMode):
    def __init__(self, syncs: collections.Counter):
        super().__init__()
        self.syncs = syncs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS and args and isinstance(args[0], torch.Tensor):
            self.syncs["Tensor." + name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def torch_path():
    """The path CUDA takes, on this CPU: PyTorch's operators only, the LM head chunked as on CUDA."""
    from selfablate import ops

    with ops.use_backend("torch"), ops.device_policy_as("cuda"):
        yield


def count_step(ablation: str, batch: int, pos: int, log_step: bool, recon: float) -> Counter:
    cfg = ModelConfig(ablation=ablation, coef_recon=recon)
    torch.manual_seed(0)
    model = SelfAblatingTransformer(cfg).train()
    tcfg = TrainConfig(warmup_steps=1)
    opt = make_optimizer(model, tcfg)
    data = (torch.randint(0, cfg.vocab_size, (batch, pos)), torch.randint(0, cfg.vocab_size, (batch, pos)))
    device, autocast = torch.device("cpu"), autocast_for(torch.device("cpu"), "float32")
    train_step(model, opt, data, 0, tcfg, device, autocast)  # warm-up: the optimiser's state exists
    counter = Counter()
    with torch_path(), counter, MethodCounter(counter.syncs):
        m = train_step(model, opt, data, 1, tcfg, device, autocast)
        if log_step:
            m.read()  # what the trainer does at a logging step
    return counter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--pos", type=int, default=256)
    p.add_argument("--ablation", default="all", help="none, local, global, or all")
    p.add_argument("--log-step", action="store_true", help="count a step that logs (reads its losses)")
    p.add_argument("--recon", type=float, default=ModelConfig.coef_recon,
                   help="the reconstruction loss's weight c (the paper's runs: 0; default: the config's)")
    p.add_argument("--top", type=int, default=8, help="show the most launched operators")
    args = p.parse_args()
    print(f"torch {torch.__version__}; one training step at batch {args.batch} x {args.pos}, the paper's "
          f"architecture, PyTorch path (as on CUDA); {'a logging' if args.log_step else 'a non-logging'} step")
    for ablation in (("none", "local", "global") if args.ablation == "all" else (args.ablation,)):
        c = count_step(ablation, args.batch, args.pos, args.log_step, args.recon)
        top = ", ".join(f"{n} {k}" for n, k in c.launches.most_common(args.top))
        syncs = ", ".join(f"{n} {k}" for n, k in c.syncs.most_common()) or "none"
        print(f"{ablation:>7}: {sum(c.launches.values()):5d} operator launches, {sum(c.syncs.values())} host syncs "
              f"({syncs})\n         most launched: {top}")


if __name__ == "__main__":
    main()
