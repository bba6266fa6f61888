"""The demo: a baseline, a local and a global self-ablating model at one preset, then their
clean and ablated losses over the whole held-out split."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .checkpoint import load_checkpoint
from .config import require, get_preset
from .data.dataset import TokenWindows, tokenize_split
from .data.sources import resolve_source
from .eval.lm import LossEval, evaluate_loss, unigram_entropy
from .train import autocast_for, resolve_device, train


@dataclass(frozen=True)
class DemoConfig:
    """What `selfablate demo` runs."""

    out: str = "runs/demo"
    """Folder for the models (one subfolder each) and demo.json."""
    data: str = ""
    """Training data (see `selfablate train --help`); empty: the default."""
    preset: str = "cpu-small"
    """Preset for all models."""
    ablations: str = "none,local,global"
    """Comma-separated ablation modes, one model each."""
    max_steps: int = 0
    """Optimiser steps per model; 0 keeps the preset's."""
    eval_batch_size: int = 32
    """Sequences per batch in the final evaluation (over the whole held-out split)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        modes = self.ablations.split(",")
        require(all(m in ("none", "local", "global", "both") for m in modes),
                 f"ablations must be a comma-separated subset of none,local,global,both; got {self.ablations!r}")
        require(self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}")
        require(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")


class DemoRow(NamedTuple):
    ablation: str
    val: LossEval
    train_seconds: float


def run_demo(cfg: DemoConfig) -> tuple[list[DemoRow], float]:
    """Train (or resume, or skip when finished) each model, evaluate it on all of valid.
    Returns the rows and the unigram entropy of the held-out split."""
    model_base, train_base = get_preset(cfg.preset)
    source = resolve_source(cfg.data)
    valid = tokenize_split(source, "valid", progress=cfg.progress)
    rows = []
    for mode in cfg.ablations.split(","):
        model_cfg = dataclasses.replace(model_base, ablation=mode)
        train_cfg = dataclasses.replace(train_base, out=str(Path(cfg.out) / mode), data=cfg.data, resume=True,
                                        progress=cfg.progress, max_steps=cfg.max_steps or train_base.max_steps)
        t0 = time.perf_counter()
        result = train(model_cfg, train_cfg)
        seconds = time.perf_counter() - t0
        model = load_checkpoint(result.checkpoint, device=resolve_device(train_cfg.device))
        windows = TokenWindows(valid, model_cfg.n_ctx, model.token_lookup())
        device = next(model.parameters()).device
        val = evaluate_loss(model, windows.sequential_batches(cfg.eval_batch_size), device,
                            autocast_for(device, train_cfg.precision), progress=cfg.progress,
                            total=windows.num_batches(cfg.eval_batch_size))
        rows.append(DemoRow(mode, val, seconds))
    entropy = unigram_entropy(valid)
    summary = {"preset": cfg.preset, "data": source.name, "unigram_entropy_valid": entropy,
               "models": [{"ablation": r.ablation, **r.val._asdict(), "train_seconds": r.train_seconds} for r in rows]}
    (Path(cfg.out) / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return rows, entropy


def format_demo(rows: list[DemoRow], entropy: float, preset: str) -> str:
    lines = [f"Held-out cross-entropy (nats/token) over the whole valid split, preset {preset} (CPU scale):",
             f"{'model':<8} {'clean':>8} {'ablated':>8} {'ppl clean':>10} {'ppl abl.':>9} {'tokens':>8} {'train s':>8}"]
    for r in rows:
        abl = "-" if r.val.ablated is None else f"{r.val.ablated:.3f}"
        ppl_abl = "-" if r.val.ppl_ablated is None else f"{r.val.ppl_ablated:.1f}"
        lines.append(f"{r.ablation:<8} {r.val.clean:>8.3f} {abl:>8} {r.val.ppl_clean:>10.1f} {ppl_abl:>9} "
                     f"{r.val.tokens:>8} {r.train_seconds:>8.0f}")
    lines.append(f"unigram entropy of the valid split: {entropy:.3f} nats/token")
    return "\n".join(lines)
