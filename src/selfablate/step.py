"""One optimiser step: run as it comes (eager), or captured once as a CUDA graph and replayed.

A paper-shape step is about two thousand small kernels and well under a millisecond of arithmetic
on a large GPU, so launching the kernels, not running them, sets the pace of an eager step. A CUDA
graph records the whole step (forward, backward, gradient clipping and AdamW) once and replays it
with one launch: the inputs are copied into fixed buffers, the learning rate lives in a device
tensor, and nothing in the step reads a value back on the host or changes shape.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from .config import TrainConfig
from .runtime import Captured, fused_if_possible, to_device


class StepMetrics(NamedTuple):
    """One optimiser step's numbers: 0-dim tensors on the training device as a step returns them
    (reading them would make the host wait for the device), floats after `read`."""

    step: int
    lr: float
    loss: Any
    loss_clean: Any
    loss_ablated: Any
    """None for a baseline."""
    loss_recon: Any
    grad_norm: Any
    """None without gradient clipping."""

    def read(self) -> "StepMetrics":
        """The same numbers as Python floats: one transfer from the device for all of them."""
        names = [f for f in LOSS_FIELDS + ("grad_norm",) if getattr(self, f) is not None]
        values = torch.stack([getattr(self, f).detach().float() for f in names]).tolist()
        return self._replace(**dict(zip(names, values)))


LOSS_FIELDS = ("loss", "loss_clean", "loss_ablated", "loss_recon")
"""StepMetrics fields averaged over the ranks before logging."""


Anchor = tuple[int, float]
"""(step, learning rate) where a resumed run's length changed: from there the schedule is a cosine
from that rate to the floor at the new max_steps, so the rate never jumps."""


def lr_at(step: int, cfg: TrainConfig, anchor: Anchor | None = None) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine decay to lr * min_lr_ratio at max_steps.
    With an anchor (s0, lr0) and step >= s0: lr0 -> the floor by a cosine over s0..max_steps."""
    floor = cfg.lr * cfg.min_lr_ratio
    if anchor is not None and step >= anchor[0]:
        s0, lr0 = anchor
        progress = min(1.0, (step - s0) / max(1, cfg.max_steps - s0))
        return floor + (lr0 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, capturable: bool = False) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not biases, LayerNorms or the embeddings). With
    cfg.mask_head_lr_scale other than 1, the mask heads get two groups of their own (decayed and
    not) whose `lr_scale` multiplies the rate; at 1 the groups are the two a state saved before
    has. capturable: its state and step counts on the device, so that a CUDA graph can hold its step."""
    scale = cfg.mask_head_lr_scale
    params: dict[tuple[float, bool], list[torch.nn.Parameter]] = {(1.0, True): [], (1.0, False): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:  # frozen (train --freeze-clean)
            continue
        decay = p.dim() >= 2 and not name.startswith(("wte", "wpe"))
        params.setdefault((scale if "mask_head" in name else 1.0, decay), []).append(p)
    groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": s, "lr": cfg.lr * s}
              for (s, decay), ps in params.items()]
    return fused_if_possible(torch.optim.AdamW, groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), capturable=capturable)


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a saved AdamW state into opt, keeping opt's own implementation flags (fused,
    capturable), its groups' rate scales and a float learning rate: a state saved by a CUDA-graph
    run (capturable, its learning rate a device tensor) resumes anywhere, and the other way round."""
    own = [{k: g[k] for k in ("fused", "capturable", "foreach", "lr_scale") if k in g} for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, flags in zip(opt.param_groups, own):
        group.update(flags)
        group["lr"] = float(group["lr"])


def _forward_backward_update(model: torch.nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
                             cfg: TrainConfig, autocast: Callable) -> tuple[list[Tensor | None], Tensor | None]:
    """Gradients of cfg.grad_accum micro-batches of (x, y) on the device, clipped, then AdamW at the
    learning rate already in opt's groups. Returns each LOSS_FIELDS value averaged over the
    micro-batches, and the gradient norm before clipping (None without clipping): device tensors."""
    opt.zero_grad(set_to_none=True)  # first: a CUDA graph's backward then writes its own gradients
    n = cfg.grad_accum
    sums: list[Tensor | None] = [None] * len(LOSS_FIELDS)
    for i, (xm, ym) in enumerate(zip(x.chunk(n), y.chunk(n))):
        # DDP averages gradients across processes after the last micro-batch only.
        sync = i == n - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync(), autocast():
            out = model(xm, ym, return_logits=False, return_masks=False)
        (out.loss / n).backward()
        for j, f in enumerate(LOSS_FIELDS):
            v = getattr(out, f)
            if v is not None:
                sums[j] = v.detach() / n if sums[j] is None else sums[j] + v.detach() / n
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
    opt.step()
    return sums, grad_norm


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: tuple[Tensor, Tensor], step: int,
               cfg: TrainConfig, device: torch.device, autocast, anchor: Anchor | None = None) -> StepMetrics:
    """One optimiser step on this process's batch, in cfg.grad_accum micro-batches, at `lr_at`'s
    rate. Nothing here reads a value back from the device: the metrics stay tensors until someone
    reads them."""
    lr = lr_at(step, cfg, anchor)
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    x, y = (to_device(t, device) for t in batch)
    sums, grad_norm = _forward_backward_update(model, opt, x, y, cfg, autocast)
    return StepMetrics(step + 1, lr, *sums, grad_norm)


class GraphedStep:
    """`train_step` as a CUDA graph: the first `warmup` calls run eagerly on a side stream (real
    steps, which also let cuBLAS and the allocator settle), the next one captures the whole step
    and every call from then on replays it.

    Needs a capturable optimiser (`make_optimizer(..., capturable=True)`) and an autocast without
    its weight cache (a cached cast made in one replay would be stale in the next). The model and
    the batch shape must stay the same; evaluation and checkpointing run outside, between calls.
    """

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig,
                 device: torch.device, autocast: Callable, warmup: int = 3, anchor: Anchor | None = None):
        self.model, self.opt, self.cfg, self.device, self.autocast = model, opt, cfg, device, autocast
        self.anchor = anchor
        # One device tensor per rate scale, which the graph reads and each call refills.
        self.lrs = {s: torch.tensor(cfg.lr * s, dtype=torch.float32, device=device)
                    for s in {g.get("lr_scale", 1.0) for g in opt.param_groups}}
        for group in opt.param_groups:
            group["lr"] = self.lrs[group.get("lr_scale", 1.0)]
        self.inputs: tuple[Tensor, Tensor] | None = None
        self.captured = Captured(self._run, device, warmup)

    def __call__(self, batch: tuple[Tensor, Tensor], step: int) -> StepMetrics:
        lr = lr_at(step, self.cfg, self.anchor)
        for scale, rate in self.lrs.items():
            rate.fill_(lr * scale)
        if self.inputs is None:
            self.inputs = tuple(torch.empty_like(t, device=self.device) for t in batch)  # type: ignore[assignment]
        for static, t in zip(self.inputs, batch):
            static.copy_(t.pin_memory(), non_blocking=True)
        sums, grad_norm = self.captured()
        return StepMetrics(step + 1, lr, *sums, grad_norm)

    def _run(self) -> tuple[list[Tensor | None], Tensor | None]:
        return _forward_backward_update(self.model, self.opt, *self.inputs, self.cfg, self.autocast)  # type: ignore[misc]


def graphs_apply(device: torch.device, world: int, wanted: bool) -> bool:
    """Whether a run's steps are captured as a CUDA graph: asked for (the default), on CUDA, and
    in a single process (DDP's gradient hooks would need warming up and capturing with it)."""
    return wanted and device.type == "cuda" and world == 1
