"""Training: AdamW with warm-up + cosine decay, periodic held-out evaluation, atomic resumable
checkpoints, a JSONL metrics log."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed, runlock
from .checkpoint import find as find_checkpoint
from .checkpoint import (load_checkpoint, load_config, load_training_state, missing_parts, read_header,
                         remove_orphans, save_checkpoint)
from .config import Command, ModelConfig, TrainConfig, config_from_dict
from .data.dataset import TokenWindows, tokenize_split
from .data.sources import resolve_source
from .data.vocab import CompactVocab
from .errors import CheckpointError, ConfigError, DataError, DivergedError
from .eval.lm import LossEval, evaluate_loss
from .interop.hf import Source, load_source
from .metrics_log import MetricsLog
from .model import SelfAblatingTransformer
from .perf import keep_freed_memory
from .runtime import autocast_for, configure, require_fits, resolve_device, use_compile
from .step import (LOSS_FIELDS, Anchor, GraphedStep, StepMetrics, graphs_apply, load_optimizer_state, lr_at,
                   make_optimizer, train_step)

__all__ = ["LOSS_FIELDS", "StepMetrics", "TrainResult", "autocast_for", "lr_at", "make_optimizer", "train",
           "train_step"]

CHECKPOINT_DIR = "checkpoint"
BEST_DIR = "best"


class TrainResult(NamedTuple):
    checkpoint: Path
    steps: int
    """The step the checkpoint is at."""
    final_eval: LossEval | None
    """None on every process but rank 0 of a torchrun job."""
    trained: int = 0
    """Steps this call trained (0 when a resumed checkpoint was already at max_steps)."""


def check_tokens(batch: tuple[Tensor, Tensor], vocab_size: int) -> None:
    """Token ids in range, checked on the host before the batch goes to the device (there the
    check would make the host wait)."""
    x, y = batch
    if x.numel() and not (0 <= int(x.min()) and int(x.max()) < vocab_size and int(y.max()) < vocab_size):
        raise DataError(f"token ids must be in 0..{vocab_size - 1}")


class RunState(NamedTuple):
    model: SelfAblatingTransformer
    opt: torch.optim.AdamW
    data_rng: torch.Generator
    step: int
    lr_anchor: Anchor | None = None
    """Where a resume changed the run's length (`step.lr_at`), else None."""
    source: dict[str, str] | None = None
    """The pretrained model the run started from (--init-from: name and weights' sha256), else None."""


def start_from(model: SelfAblatingTransformer, source: Source) -> None:
    """The source's clean weights into `model`; its mask heads keep their fresh initialisation."""
    missing, unexpected = model.load_state_dict(source.model.state_dict(), strict=False)
    assert not unexpected and all("mask_head" in k for k in missing), (missing, unexpected)


def freeze_clean(model: SelfAblatingTransformer) -> None:
    """Every weight but the mask heads' stops learning (the optimiser skips it)."""
    for name, p in model.named_parameters():
        p.requires_grad_("mask_head" in name)


def refuse_incomplete(out: Path) -> None:
    """A run folder whose checkpoint/ or best/ holds files but not a whole checkpoint (a copy gone
    wrong, a partial sync) is neither resumed nor overwritten: one line says what is missing."""
    for sub, optimizer in ((CHECKPOINT_DIR, True), (BEST_DIR, False)):
        missing = missing_parts(out / sub, optimizer)
        if missing:
            raise CheckpointError(f"{out / sub} is not a complete checkpoint (no {', '.join(missing)}): "
                                  "restore it or move it away; nothing was written")


def start_or_resume(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device,
                    capturable: bool = False, source: Source | None = None) -> RunState:
    """A fresh model (with `source`'s clean weights, if given), or the one in cfg.out when resuming;
    refuses to overwrite earlier work. capturable: the optimiser can be part of a CUDA graph
    (`step.GraphedStep`)."""
    ckpt = Path(cfg.out) / CHECKPOINT_DIR
    refuse_incomplete(Path(cfg.out))
    exists = find_checkpoint(ckpt) is not None
    if exists and not cfg.resume:
        raise CheckpointError(f"{cfg.out} already holds a checkpoint: pass --resume to continue it, "
                              "or choose another --out")
    torch.manual_seed(cfg.seed)
    data_rng = torch.Generator().manual_seed(cfg.seed)
    if not exists:
        with torch.device("cpu"):  # the same initial weights on every device (CPU's generator)
            model = SelfAblatingTransformer(model_cfg)
        if source is not None:
            start_from(model, source)
        if cfg.freeze_clean:
            freeze_clean(model)
        model = model.to(device)
        record = {"source": source.name, "sha256": source.sha256} if source else None
        return RunState(model, make_optimizer(model, cfg, capturable), data_rng, 0, source=record)
    model = load_checkpoint(ckpt, device=device, expect=model_cfg)
    if cfg.freeze_clean:
        freeze_clean(model)
    opt = make_optimizer(model, cfg, capturable)
    state = load_training_state(ckpt)
    if not state:
        raise CheckpointError(f"checkpoint {ckpt} has no optimiser state to resume from")
    load_optimizer_state(opt, state["optimizer"])
    ts = state["train_state"]
    data_rng.set_state(ts["data_rng"])
    torch.set_rng_state(ts["torch_rng"])
    step = int(ts["step"])
    return RunState(model, opt, data_rng, step, resumed_anchor(ckpt, ts, step, cfg),
                    read_header(ckpt)["meta"].get("init_from"))


def resumed_anchor(ckpt: Path, ts: dict[str, Any], step: int, cfg: TrainConfig) -> Anchor | None:
    """The run's schedule anchor, moved to `step` when this resume changes max_steps: from there the
    rate falls from where it had reached to the floor at the new end, never jumping back up."""
    anchor = ts.get("lr_anchor")
    anchor = None if anchor is None else (int(anchor[0]), float(anchor[1]))
    saved_max = int(ts.get("max_steps") or read_header(ckpt)["meta"].get("train", {}).get("max_steps", cfg.max_steps))
    if saved_max == cfg.max_steps or step >= cfg.max_steps:
        return anchor
    lr = lr_at(step, dataclasses.replace(cfg, max_steps=saved_max), anchor)
    if lr <= cfg.lr * cfg.min_lr_ratio:
        print(f"selfablate: warning: {ckpt.parent} had finished its schedule; its added steps train at the floor "
              f"rate {lr:g} (lr x min_lr_ratio)", file=sys.stderr)
    return step, lr


def keep_best(run: RunState, step: int, cfg: TrainConfig, evaluation: LossEval) -> None:
    """With keep=best: write the model to OUT/best when its held-out a·CE(clean) + b·CE(ablated)
    beats the one recorded there (so a resumed run remembers its best)."""
    mc = run.model.cfg
    objective = mc.coef_clean * evaluation.clean + (mc.coef_ablated * evaluation.ablated if evaluation.ablated else 0.0)
    folder = Path(cfg.out) / BEST_DIR
    if find_checkpoint(folder) is not None and objective >= read_header(folder)["meta"].get("objective", math.inf):
        return
    if math.isfinite(objective) and all(bool(torch.isfinite(p).all()) for p in run.model.parameters()):
        save_checkpoint(run.model, folder, meta={"step": step, "objective": objective, "val": evaluation._asdict(),
                                                 "init_from": run.source})


def _last_good(cfg: TrainConfig) -> str:
    folder = find_checkpoint(Path(cfg.out) / CHECKPOINT_DIR)
    return f"the last good checkpoint, {folder}, is intact" if folder else "no checkpoint was written"


def check_finite(m: StepMetrics, cfg: TrainConfig) -> None:
    """Stop on a non-finite loss or gradient norm (a read step's), naming the step."""
    values = {"loss": m.loss, "gradient norm": m.grad_norm}
    bad = [f"{name} {v}" for name, v in values.items() if v is not None and not math.isfinite(v)]
    if bad:
        raise DivergedError(f"training diverged at step {m.step} ({', '.join(bad)}); {_last_good(cfg)}")


def save_run(run: RunState, step: int, cfg: TrainConfig, extra: dict[str, Any]) -> Path:
    """Save a resumable checkpoint, unless a weight is not finite (then nothing replaces the last one)."""
    if not all(bool(torch.isfinite(p).all()) for p in run.model.parameters()):
        raise DivergedError(f"a weight is not finite at step {step}: not saved; {_last_good(cfg)}")
    meta = {"train": dataclasses.asdict(cfg), "step": step, "init_from": run.source, **extra}
    state = {"step": step, "data_rng": run.data_rng.get_state(), "torch_rng": torch.get_rng_state(),
             "max_steps": cfg.max_steps, "lr_anchor": run.lr_anchor}
    return save_checkpoint(run.model, Path(cfg.out) / CHECKPOINT_DIR, meta=meta, optimizer=run.opt, train_state=state)


class RunData(NamedTuple):
    """The training data as the model sees it."""

    model_cfg: ModelConfig
    """The model config, with vocab_size set from the data for a compact vocabulary."""
    vocab: CompactVocab | None
    train: TokenWindows
    valid: TokenWindows


def load_data(model_cfg: ModelConfig, cfg: TrainConfig, cache_dir: Path | None = None) -> RunData:
    seq_len = cfg.seq_len or model_cfg.n_ctx
    if seq_len > model_cfg.n_ctx:
        raise ConfigError(f"seq_len {seq_len} exceeds the model's n_ctx {model_cfg.n_ctx}")
    source = resolve_source(cfg.data)
    train_tokens = tokenize_split(source, "train", cache_dir, cfg.progress)
    valid_tokens = tokenize_split(source, "valid", cache_dir, cfg.progress)
    vocab = CompactVocab.from_tokens(train_tokens) if model_cfg.compact_vocab else None
    if vocab is not None:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab.size)
    lookup = None if vocab is None else vocab.lookup()
    return RunData(model_cfg, vocab, TokenWindows(train_tokens, seq_len, lookup, "train"),
                   TokenWindows(valid_tokens, seq_len, lookup, "valid"))


def attach_vocab(model: SelfAblatingTransformer, vocab: CompactVocab | None, resumed: bool) -> None:
    """Give a new model its compact vocabulary; check a resumed one still fits the data."""
    if vocab is None:
        return
    ids = torch.from_numpy(vocab.ids).to(model.vocab_ids.device)
    if resumed and not torch.equal(model.vocab_ids, ids):
        raise CheckpointError("the checkpoint's compact vocabulary differs from the training data's")
    model.vocab_ids.copy_(ids)


def _trainee(model: SelfAblatingTransformer, cfg: TrainConfig, dist: distributed.Dist,
             device: torch.device) -> torch.nn.Module:
    """What the optimiser steps through: the model, compiled if asked (one graph: nothing in the
    model's training path breaks it), in DDP under torchrun."""
    module = torch.compile(model, fullgraph=True) if use_compile(device, cfg.compile) else model
    return distributed.wrap(module, dist, device)


Stepper = Callable[[tuple[Tensor, Tensor], int], StepMetrics]
"""(this process's batch, step) -> the step's metrics."""


def _stepper(trainee: torch.nn.Module, run: RunState, cfg: TrainConfig, graphed: bool,
             device: torch.device) -> Stepper:
    """The run's steps: captured once as a CUDA graph and replayed (`step.GraphedStep`), or eager."""
    if graphed:
        return GraphedStep(trainee, run.opt, cfg, device, autocast_for(device, cfg.precision, cache=False),
                           anchor=run.lr_anchor)
    autocast = autocast_for(device, cfg.precision)
    return lambda batch, step: train_step(trainee, run.opt, batch, step, cfg, device, autocast, run.lr_anchor)


def _log_step(m: StepMetrics, dist: distributed.Dist, device: torch.device, log: MetricsLog | None, bar,
              tokens_per_s: float) -> StepMetrics:
    """Read a logged step's numbers (the one wait for the device), averaged over the processes."""
    m = m.read()
    m = m._replace(**dict(zip(LOSS_FIELDS, distributed.mean([getattr(m, f) for f in LOSS_FIELDS], dist, device))))
    bar.set_postfix(loss=f"{m.loss_clean:.3f}", **({} if m.loss_ablated is None else {"abl": f"{m.loss_ablated:.3f}"}))
    if log:
        log.write({**m._asdict(), "tokens_per_s": tokens_per_s})
    return m


def train(model_cfg: ModelConfig, cfg: TrainConfig, cache_dir: Path | None = None) -> TrainResult:
    """Train (or resume) a model; returns the checkpoint folder and the final held-out losses.
    Under torchrun, trains data-parallel (see `distributed`): rank 0 alone evaluates, logs and
    checkpoints (the other ranks' final_eval is None)."""
    if cfg.keep_freed_memory:
        keep_freed_memory()
    dist, device = distributed.init(resolve_device(cfg.device), cfg.batch_size, cfg.grad_accum)
    try:
        source = None
        if cfg.init_from and find_checkpoint(Path(cfg.out) / CHECKPOINT_DIR) is None:  # a resumed run has its own
            source = load_source(cfg.init_from)
            model_cfg = source.architecture(model_cfg)
        if cfg.freeze_clean and not model_cfg.self_ablating:
            raise ConfigError("--freeze-clean with --ablation none leaves nothing to train")
        require_fits(training_bytes(model_cfg, cfg), device, "this model and batch")  # before the folder is touched
        # One writer per run folder (rank 0 writes for the job); what a killed save left is removed.
        with runlock.exclusive(cfg.out) if dist.main else contextlib.nullcontext():
            if dist.main:
                remove_orphans(cfg.out)
            return _train(model_cfg, cfg, cache_dir, dist, device, source)
    finally:
        distributed.finish(dist)


def training_bytes(model_cfg: ModelConfig, cfg: TrainConfig) -> float:
    """A lower bound of a run's memory: float32 weights, gradients and AdamW's two moments (16 bytes
    a parameter, the mask heads counted), and a step's activations (both streams' residuals, MLP
    and attention contexts of every layer, kept for the backward pass), and the held-out batches."""
    d, L, mlp = model_cfg.d_model, model_cfg.n_layers, model_cfg.d_mlp
    params = (model_cfg.vocab_size + model_cfg.n_ctx) * d + L * (4 * d * d + 2 * d * mlp + 2 * d * (d + mlp))
    tokens = cfg.batch_size * (cfg.seq_len or model_cfg.n_ctx)
    activations = 4 * tokens * 2 * L * (6 * d + 3 * mlp)
    held_out = 16 * cfg.eval_batches * tokens
    return 16 * params + activations + held_out


def _train(model_cfg: ModelConfig, cfg: TrainConfig, cache_dir: Path | None, dist: distributed.Dist,
           device: torch.device, source: Source | None = None) -> TrainResult:
    configure(device)
    autocast = autocast_for(device, cfg.precision)
    data = load_data(model_cfg, cfg, cache_dir)
    eval_set = data.valid.spread_batches(cfg.batch_size, cfg.eval_batches)
    graphed = graphs_apply(device, dist.world, cfg.cuda_graph)
    run = start_or_resume(data.model_cfg, cfg, device, capturable=graphed, source=source)
    start = run.step
    attach_vocab(run.model, data.vocab, resumed=run.step > 0)
    stepper = _stepper(_trainee(run.model, cfg, dist, device), run, cfg, graphed, device)
    log = MetricsLog(Path(cfg.out), cfg.logger, keep_until=run.step, config={
        "model": dataclasses.asdict(data.model_cfg), "train": dataclasses.asdict(cfg)}) if dist.main else None
    evaluate = functools.partial(evaluate_loss, run.model, eval_set, device, autocast)
    evaluation = None
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="training", disable=not (cfg.progress and dist.main),
               dynamic_ncols=True)
    t0, tokens_seen = time.perf_counter(), 0
    for step in range(run.step, cfg.max_steps):
        batch = data.train.random_batch(cfg.batch_size, run.data_rng)
        check_tokens(batch, data.model_cfg.vocab_size)
        m = stepper(distributed.shard(batch, dist), step)
        tokens_seen += batch[0].numel()
        bar.update(1)
        done, saving = m.step == cfg.max_steps, m.step % cfg.checkpoint_interval == 0
        if m.step % cfg.log_interval == 0 or done or saving:  # read, so checked, before any save
            check_finite(_log_step(m, dist, device, log, bar, tokens_seen / (time.perf_counter() - t0)), cfg)
        if dist.main and (m.step % cfg.eval_interval == 0 or done):
            evaluation = evaluate()
            if log:
                log.write({"step": m.step, "val_loss_clean": evaluation.clean, "val_loss_ablated": evaluation.ablated})
            if cfg.keep == "best":
                keep_best(run, m.step, cfg, evaluation)
        if saving or done:
            if dist.main:
                save_run(run, m.step, cfg, {"val": evaluation._asdict() if evaluation else None})
            distributed.barrier(dist)
    bar.close()
    if log:
        log.close()
    if evaluation is None and dist.main:  # resumed a finished run: nothing left to do but report
        evaluation = evaluate()
    return TrainResult(Path(cfg.out) / CHECKPOINT_DIR, max(start, cfg.max_steps), evaluation,
                       max(0, cfg.max_steps - start))


def _command(model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    result = train(model_cfg, cfg)
    if result.final_eval is None:  # a torchrun process other than rank 0
        return
    ablated = "" if result.final_eval.ablated is None else f", ablated {result.final_eval.ablated:.4f}"
    what = (f"trained {result.trained} steps" if result.trained else
            f"nothing to train ({result.checkpoint} is at step {result.steps}, not below --max-steps {cfg.max_steps})")
    print(f"{what} -> {result.checkpoint}; held-out loss: clean {result.final_eval.clean:.4f}{ablated}")


RESUME_MAY_CHANGE = frozenset({"out", "resume", "max_steps", "eval_interval", "eval_batches", "log_interval",
                               "checkpoint_interval", "device", "precision", "grad_accum", "compile", "cuda_graph",
                               "logger", "progress", "keep_freed_memory"})
"""What a resumed run may change: how long it runs, how often it reports and saves, and where and
how its steps are computed; not what it learns from (model, data, optimiser, seed, batch)."""


def saved_settings(folder: Path) -> tuple[ModelConfig, TrainConfig]:
    """The model and training settings a run's checkpoint was written with. Fields this version
    does not know are dropped; `compile` saved as a bool by earlier versions becomes on/off."""
    train_meta = dict(read_header(folder)["meta"].get("train") or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    train_meta = {k: v for k, v in train_meta.items() if k in known}
    if isinstance(train_meta.get("compile"), bool):
        train_meta["compile"] = "on" if train_meta["compile"] else "off"
    try:
        return load_config(folder), config_from_dict(TrainConfig, train_meta)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {folder} holds training settings this version cannot read ({e})") from None


def resumed_settings(flags: Any) -> tuple[ModelConfig, TrainConfig] | None:
    """train --resume of a run that has a checkpoint: its own settings, with the flags typed beside
    --resume applied where they may change (`RESUME_MAY_CHANGE`); any other flag that differs from
    the run's is refused in one line naming it. None (the preset's defaults) otherwise."""
    out = Path(getattr(flags, "out", TrainConfig.out))
    folder = find_checkpoint(out / CHECKPOINT_DIR) if getattr(flags, "resume", False) else None
    if folder is None:
        return None
    saved = saved_settings(folder)
    for cfg in saved:
        for f in dataclasses.fields(cfg):
            typed = getattr(flags, f.name, getattr(cfg, f.name))
            if f.name not in RESUME_MAY_CHANGE and typed != getattr(cfg, f.name):
                raise ConfigError(f"--{f.name.replace('_', '-')} {typed} differs from the run's {getattr(cfg, f.name)}: "
                                  f"a resumed run keeps its settings (it may change {', '.join(sorted(RESUME_MAY_CHANGE - {'out', 'resume'}))})")
    return saved


COMMAND = Command("train", "train (or resume) a model", _command, (ModelConfig, TrainConfig), preset=True,
                  base=resumed_settings)
