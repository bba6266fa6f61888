"""Metrics sinks: a JSONL file always, plus wandb or tensorboard when asked for (optional extras)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, DataError

METRICS_FILE = "metrics.jsonl"


def _wandb(out: Path, config: dict[str, Any]) -> tuple[Callable[[dict], None], Callable[[], None]]:
    try:
        import wandb
    except ImportError:
        raise ConfigError("logger=wandb needs `pip install 'selfablate[wandb]'`") from None
    run = wandb.init(project="selfablate", dir=str(out), config=config, name=out.name)
    return (lambda m: run.log({k: v for k, v in m.items() if v is not None}, step=m["step"])), run.finish


def _tensorboard(out: Path, config: dict[str, Any]) -> tuple[Callable[[dict], None], Callable[[], None]]:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("logger=tensorboard needs `pip install 'selfablate[tensorboard]'`") from None
    writer = SummaryWriter(str(out / "tensorboard"))

    def log(m: dict) -> None:
        for k, v in m.items():
            if k != "step" and isinstance(v, (int, float)):
                writer.add_scalar(k, v, m["step"])

    return log, writer.close


EXTRA_SINKS = {"wandb": _wandb, "tensorboard": _tensorboard}


class MetricsLog:
    """Appends one JSON object per line to OUT/metrics.jsonl.

    keep_until: on resume, lines written after the resumed checkpoint's step (by the
    interrupted run) are dropped, so the log describes exactly the training that happened.
    """

    def __init__(self, out: Path, extra: str = "none", keep_until: int = 0, config: dict | None = None):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / METRICS_FILE
        kept = []
        if keep_until and self.path.exists():
            kept = [json.dumps(m) for m in read_metrics(out) if m.get("step", 0) <= keep_until]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.extra = EXTRA_SINKS[extra](out, config or {}) if extra in EXTRA_SINKS else None

    def write(self, metrics: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.extra:
            self.extra[0](metrics)

    def close(self) -> None:
        if self.extra:
            self.extra[1]()


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """The lines of OUT/metrics.jsonl. A torn last line (what a crash or a full disk leaves) is
    dropped with a warning; a torn line before the last is an error."""
    path = Path(out) / METRICS_FILE
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise DataError(f"{path} line {i + 1} is not JSON (only a torn last line is tolerated)") from None
            warnings.warn(f"selfablate: dropped the torn last line of {path}", stacklevel=2)
    return records
