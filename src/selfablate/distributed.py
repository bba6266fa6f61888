"""Data-parallel training with torch.distributed (`torchrun --nproc_per_node N -m selfablate train`).

Each step every rank draws the same global batch (same seeded generator) and trains on its own
contiguous slice; DistributedDataParallel averages the gradients, so N processes take exactly
the step one process takes on the whole batch (`batch_size` is the global batch; each process
takes batch_size / N sequences, in `grad_accum` micro-batches). Rank 0 alone evaluates, logs and
writes checkpoints; the others wait for it at a barrier. gloo on CPU, NCCL on CUDA; reductions
run on the training device (NCCL reduces CUDA tensors only).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

from .errors import ConfigError
from .runtime import wide_dtype


class Dist(NamedTuple):
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: torch.device, batch_size: int, grad_accum: int = 1) -> tuple[Dist, torch.device]:
    """Join the torchrun job described by the environment (WORLD_SIZE, RANK, LOCAL_RANK), if any.
    Returns the job's Dist and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    if batch_size % (world * grad_accum):
        raise ConfigError(f"batch_size {batch_size} (the global batch) must be divisible by the {world} processes "
                          f"times grad_accum {grad_accum}")
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), world, local), device


def shard(batch: tuple[Tensor, Tensor], d: Dist) -> tuple[Tensor, Tensor]:
    """This rank's contiguous slice of the global batch."""
    if d.world == 1:
        return batch
    n = batch[0].shape[0] // d.world
    return batch[0][d.rank * n : (d.rank + 1) * n], batch[1][d.rank * n : (d.rank + 1) * n]


def wrap(model: torch.nn.Module, d: Dist, device: torch.device) -> torch.nn.Module:
    """The module to train: DDP around the model when distributed (it broadcasts rank 0's
    weights and averages gradients), else the model itself."""
    if d.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean(values: list[float | None], d: Dist, device: torch.device) -> list[float | None]:
    """Average scalars over the ranks (None stays None); every rank must call it. The reduction
    runs on `device`, the training device: NCCL reduces CUDA tensors only."""
    if d.world == 1:
        return values
    import torch.distributed as dist

    present = [v for v in values if v is not None]
    t = torch.tensor(present, dtype=wide_dtype(device), device=device)
    dist.all_reduce(t)
    it = iter((t / d.world).tolist())
    return [None if v is None else next(it) for v in values]


def finish(d: Dist) -> None:
    """Leave the job: destroy the process group (a process that exits with it alive may hang or warn)."""
    if d.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
