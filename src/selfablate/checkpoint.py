"""Checkpoints: a folder with config.json + model.safetensors (+ optimizer.pt for resuming).

A checkpoint folder is written whole into a temporary sibling and then renamed into place, so a
crash mid-write never leaves a half-written checkpoint: the previous one survives (as NAME.old
for the instant between the two renames, which `load_checkpoint` also accepts).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import Arg, Command, ModelConfig, config_from_dict
from .errors import CheckpointError, ConfigError
from .files import umask
from .model import SelfAblatingTransformer

FORMAT = "selfablate-checkpoint"
VERSION = 1
CONFIG, WEIGHTS, OPTIMIZER = "config.json", "model.safetensors", "optimizer.pt"


def save_checkpoint(model: SelfAblatingTransformer, path: str | os.PathLike, *,
                    meta: dict[str, Any] | None = None, optimizer: torch.optim.Optimizer | None = None,
                    train_state: dict[str, Any] | None = None) -> Path:
    """Write model (and optionally optimiser and trainer state) atomically to folder `path`.

    meta: JSON-able extras stored in config.json (training config, step, metrics).
    train_state: anything torch.save can store (RNG states, data sampler state), kept beside
    the optimiser state in optimizer.pt.
    """
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    header = {"format": FORMAT, "version": VERSION, "model": dataclasses.asdict(model.cfg), "meta": meta or {}}

    def write(tmp: Path) -> None:
        (tmp / CONFIG).write_text(json.dumps(header, indent=2) + "\n")
        save_file(weights, str(tmp / WEIGHTS))
        if optimizer is not None:
            torch.save({"optimizer": optimizer.state_dict(), "train_state": train_state or {}}, tmp / OPTIMIZER)

    try:
        return _write_dir_atomically(Path(path), write)
    except (OSError, SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"could not write the checkpoint {path} ({_write_error(e)}); the previous one, "
                              "if any, is intact") from None


def _write_error(e: BaseException) -> str:
    """Why a write failed, in words: torch.save reports a full disk as a short write in its zip
    writer ("enforce fail at inline_container.cc ... unexpected pos"), which says nothing to a user."""
    short_write = isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "file write failed" in str(e))
    if short_write or (isinstance(e, OSError) and e.errno == errno.ENOSPC):
        return "the disk is full, or the file system refused the write"
    return _first_line(e)


def remove_orphans(folder: str | os.PathLike) -> None:
    """Delete the temporary folders that a process killed in the middle of a save left in
    `folder` (call it holding the folder's lock: then no save is in progress)."""
    for tmp in Path(folder).glob(".*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _write_dir_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    mask = umask()
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, 0o666 & ~mask)  # mkstemp-style private modes are not wanted here
        os.chmod(tmp, 0o777 & ~mask)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def find(path: str | os.PathLike) -> Path | None:
    """The checkpoint folder to read: `path`, or a run folder's `best/` (kept with --keep best)
    else its `checkpoint/`, or its .old twin if a swap was interrupted; None when there is none."""
    path = Path(path)
    if not (path / CONFIG).exists():  # a run folder: its best/, else its checkpoint/ (or their .old twins)
        subs = [path / sub for sub in ("best", "checkpoint")]
        path = next((p for p in subs if p.is_dir() or p.with_name(p.name + ".old").is_dir()), path)
    old = path.with_name(path.name + ".old")
    return next((p for p in (path, old) if (p / CONFIG).exists()), None)


def missing_parts(folder: str | os.PathLike, optimizer: bool = True) -> list[str]:
    """What a folder that exists and holds files lacks of a complete checkpoint (config.json and
    model.safetensors, and optimizer.pt if `optimizer`); [] for a complete one, or for a folder
    that is absent or empty (nothing there to lose)."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        return []
    wanted = (CONFIG, WEIGHTS) + ((OPTIMIZER,) if optimizer else ())
    return [name for name in wanted if not (folder / name).is_file()]


def resolve(path: str | os.PathLike) -> Path:
    """Like `find`, but a missing checkpoint is a one-line CheckpointError."""
    found = find(path)
    if found is not None:
        return found
    path = Path(path)
    why = f"{CONFIG} not found" if path.is_dir() else "a file, not a checkpoint folder" if path.exists() \
        else "no such folder"
    raise CheckpointError(f"no checkpoint at {path} ({why})")


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a checkpoint, checked for format."""
    folder = resolve(path)
    try:
        header = json.loads((folder / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint {folder}: {CONFIG} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or "model" not in header:
        raise CheckpointError(f"{folder} is not a selfablate checkpoint ({CONFIG} lacks format={FORMAT!r})")
    if not isinstance(header["model"], dict):
        raise CheckpointError(f"corrupt checkpoint {folder}: the model config in {CONFIG} is not an object")
    return header


def load_config(path: str | os.PathLike) -> ModelConfig:
    try:
        return config_from_dict(ModelConfig, read_header(path)["model"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path} has an invalid model config: {e}") from None


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    expect: ModelConfig | None = None) -> SelfAblatingTransformer:
    """Load a model from a checkpoint folder. With `expect`, the checkpoint's architecture must
    equal it (else a one-line CheckpointError naming the first difference)."""
    folder = resolve(path)
    cfg = load_config(folder)
    if expect is not None and expect != cfg:
        diff = next(f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(expect, f.name))
        raise CheckpointError(f"checkpoint {folder} has another architecture: {diff}="
                              f"{getattr(cfg, diff)!r}, expected {getattr(expect, diff)!r}")
    try:
        weights = load_file(str(folder / WEIGHTS), device=str(device))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} has no {WEIGHTS}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint {folder}: {WEIGHTS} is unreadable ({_first_line(e)})") from None
    with torch.device("cpu"):  # not the default device, which may be anything
        model = SelfAblatingTransformer(cfg)
    model = model.to(device)
    _load_weights(model, weights, folder)
    return model


def _load_weights(model: SelfAblatingTransformer, weights: dict[str, torch.Tensor], folder: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(f"checkpoint {folder} does not fit its config ({what}; "
                              f"{len(missing)} missing, {len(unexpected)} unexpected tensors)")
    for name, t in weights.items():
        if t.shape != expected[name].shape:
            raise CheckpointError(f"checkpoint {folder} does not fit its config: {name} has shape "
                                  f"{tuple(t.shape)}, expected {tuple(expected[name].shape)}")
    model.load_state_dict(weights)


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """The optimiser and trainer state saved beside the weights ({} if there is none)."""
    file = resolve(path) / OPTIMIZER
    if not file.exists():
        return {}
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a damaged pickle/zip
        raise CheckpointError(f"corrupt checkpoint {file.parent}: {OPTIMIZER} is unreadable ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _command(checkpoint: str) -> None:
    import json

    folder = resolve(checkpoint)
    header = read_header(folder)
    model = load_checkpoint(folder)
    meta = header.get("meta", {})
    print(f"checkpoint: {folder}")
    print(f"parameters: {model.num_params(False):,} ({model.num_params():,} non-embedding)")
    print(f"step: {meta.get('step', '?')}; held-out: {json.dumps(meta.get('val'))}")
    print("model: " + ", ".join(f"{k}={v}" for k, v in header["model"].items()))


COMMAND = Command("info", "describe a checkpoint", _command,
                  args=(Arg("checkpoint", "checkpoint folder (or a run folder holding checkpoint/)"),))
