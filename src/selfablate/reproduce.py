"""`selfablate reproduce`: the paper's experiment grid end to end, resumable.

A baseline and every (ablation, k) of the grid, for each seed; then, per model, the evaluations
(loss, masks, sparsity, specialisation, leakage), the IOI circuits and an SAE; then the report.
Every stage writes its result atomically and is skipped when that result exists, so an
interrupted run picks up where it stopped (training itself resumes from its checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple

from tqdm.auto import tqdm

from .config import (Arg, Command, Device, ModelConfig, TrainConfig, check_choice, check_lists, field_type, get_preset,
                     list_item_type, parse_list, require, require_finite)
from . import runlock
from .circuits.prompt_file import is_prompt_set, why_not_prompt_set
from .files import check_output_folder, write_text_atomically
from .errors import ConfigError, SelfAblateError


@dataclass(frozen=True)
class ReproduceConfig:
    """What `selfablate reproduce` runs."""

    out: str = "runs/reproduce"
    """Folder for models/, eval/, circuits/, sae/ and report/."""
    preset: str = "cpu-small"
    """Model and training preset (cpu-small, paper, tiny)."""
    data: str = ""
    """Training data (as for train); empty: the default."""
    ablations: tuple[Literal["local", "global", "both"], ...] = ("local", "global")
    """Self-ablating modes of the grid (a baseline is always trained)."""
    ks: tuple[int, ...] = (1, 2, 4, 8)
    """k values: k_attn = k_mlp = k for every self-ablating model."""
    seeds: tuple[int, ...] = (0,)
    """Training seeds; the report gives mean +/- std over them."""
    max_steps: int = 0
    """Optimiser steps per model; 0 keeps the preset's."""
    eval_max_tokens: int = 0
    """Evaluate on the first this many held-out tokens; 0: the whole split."""
    ioi_prompts: str = "auto"
    """IOI prompts for the circuits (as `circuits --prompts`): templates, authors (the authors'
    file and split, 128 pairs for discovery), a prompt file; auto: authors for the paper preset,
    templates otherwise."""
    circuit_prompts: int = 64
    """Template prompt pairs for the circuits (with templates)."""
    tau: float = 0.03
    """ACDC threshold (the paper: 0.03)."""
    tau_sweep: tuple[float, ...] = (0.003, 0.01, 0.1)
    """More ACDC thresholds for the faithfulness curve."""
    sae_layer: int = -2
    """SAE on blocks.<layer>.hook_mlp_out of the clean stream; negative counts from the end
    (-2: layer 6 of 8, the paper's)."""
    sae_steps: int = 0
    """SAE optimiser steps (of 4,096 activations); 0: the protocol's (the paper preset: the
    authors' SAE settings, 100k steps; otherwise 2,000)."""
    sae_eval_tokens: int = 32768
    """Held-out tokens for each SAE's metrics."""
    sae_sweep: tuple[float, ...] = ()
    """Extra L1 coefficients for an SAE frontier per model (empty: only 5)."""
    init_from: str = ""
    """Start every model from this pretrained model (as `train --init-from`: a GPT-Neo folder,
    hf:NAME or one of our checkpoints): the baseline is that model itself, imported and not
    trained, and each self-ablating model is it with new mask heads, fine-tuned for max_steps.
    The architecture is the source's; the preset gives the rest. Empty: every model from scratch."""
    explain_tokens: int = 131072
    """Training tokens searched for each MLP neuron's top examples by the N2G stage (`explain`); its
    graphs are scored on a quarter as many held-out tokens."""
    device: Device = "auto"
    """Device for every stage; auto: CUDA when available, else Apple's MPS, else the CPU."""
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """Training precision (as for train; the evaluations run in float32)."""
    accept_changed: bool = False
    """Go on with a grid folder whose record holds other settings (its finished stages are kept;
    the earlier settings stay in reproduce.json's history). Without it, such a run is refused."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        require_finite(self)
        check_lists(self)
        check_choice(self, "device")
        check_choice(self, "precision")
        require(all(k >= 1 for k in self.ks), f"every k must be >= 1, got {self.ks}")
        require(self.ioi_prompts == "auto" or is_prompt_set(self.ioi_prompts),
                f"ioi_prompts must be auto, templates, authors or a prompt file: {why_not_prompt_set(self.ioi_prompts)}")
        require(self.max_steps >= 0 and self.eval_max_tokens >= 0 and self.sae_steps >= 0 and self.sae_eval_tokens >= 1,
                "max_steps, eval_max_tokens and sae_steps must be >= 0, sae_eval_tokens >= 1")
        require(self.explain_tokens >= 1, f"explain_tokens must be >= 1, got {self.explain_tokens}")
        require(not self.init_from or self.init_from.startswith("hf:") or Path(self.init_from).exists(),
                f"init_from: {self.init_from} does not exist")
        model = get_preset(self.preset)[0]
        require(-model.n_layers <= self.sae_layer < model.n_layers,
                f"sae_layer must be in {-model.n_layers}..{model.n_layers - 1} for the {self.preset} preset's "
                f"{model.n_layers} layers, got {self.sae_layer}")
        require(all(s >= 0 for s in self.seeds), f"every seed must be >= 0, got {self.seeds}")
        require(self.tau >= 0 and all(t >= 0 for t in self.tau_sweep),
                f"tau and every tau of tau_sweep must be >= 0, got {self.tau} and {self.tau_sweep}")
        require(2 <= self.circuit_prompts <= 100_000, f"circuit_prompts must be in 2..100,000, got {self.circuit_prompts}")

    def sae_coefs(self) -> list[float]:
        return sorted({5.0, *self.sae_sweep})


class RunSpec(NamedTuple):
    """One model of the grid."""

    name: str
    """e.g. none-s0, local-k2-s0."""
    model: ModelConfig
    train: TrainConfig


def grid(cfg: ReproduceConfig) -> list[RunSpec]:
    """The baseline and each (ablation, k), per seed; k is checked against the layer widths."""
    model_base, train_base = get_preset(cfg.preset)
    root = Path(cfg.out) / "models"
    specs = []
    for seed in cfg.seeds:
        variants = [("none", {"ablation": "none"})] + [
            (f"{a}-k{k}", {"ablation": a, "k_attn": k, "k_mlp": k}) for a in cfg.ablations for k in cfg.ks]
        for name, changes in variants:
            model = dataclasses.replace(model_base, **changes)  # validates k against d_model and d_mlp
            train = dataclasses.replace(train_base, out=str(root / f"{name}-s{seed}"), data=cfg.data, seed=seed,
                                        resume=True, progress=False, max_steps=cfg.max_steps or train_base.max_steps,
                                        device=cfg.device, precision=cfg.precision, init_from=cfg.init_from)
            specs.append(RunSpec(f"{name}-s{seed}", model, train))
    return specs


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a stage's result exists completely or not at all."""
    write_text_atomically(path, json.dumps(obj, indent=1) + "\n")


class Stage(NamedTuple):
    name: str
    result: Callable[[Path, RunSpec], Path]
    """Where the stage's result lives (it is done when this file exists)."""
    run: Callable[[ReproduceConfig, RunSpec], None]


def _checkpoint(spec: RunSpec) -> Path:
    """The model the evaluations use: best/ with keep=best, else checkpoint/ (`checkpoint.find`)."""
    return Path(spec.train.out)


def _train(cfg: ReproduceConfig, spec: RunSpec) -> None:
    from .train import train

    if cfg.init_from and not spec.model.self_ablating:
        return _import_baseline(cfg, spec)
    result = train(spec.model, spec.train)
    write_json(Path(spec.train.out) / "done.json", {"steps": result.steps, "val": result.final_eval._asdict()})


def _import_baseline(cfg: ReproduceConfig, spec: RunSpec) -> None:
    """With init_from, the baseline is the pretrained model as imported: what the self-ablating
    models started from, so that every comparison is with the model before self-ablation."""
    from .checkpoint import save_checkpoint
    from .interop.hf import load_source
    from .train import CHECKPOINT_DIR

    source = load_source(cfg.init_from)
    record = {"source": source.name, "sha256": source.sha256}
    meta = {"train": dataclasses.asdict(spec.train), "step": 0, "init_from": record}
    save_checkpoint(source.model, Path(spec.train.out) / CHECKPOINT_DIR, meta=meta)
    write_json(Path(spec.train.out) / "done.json", {"steps": 0, "imported": record})


def _evaluate(cfg: ReproduceConfig, spec: RunSpec) -> None:
    from .eval.evaluate import EvalConfig, evaluate_checkpoint
    from .runtime import resolve_device

    ecfg = EvalConfig(out="", data=cfg.data, max_tokens=cfg.eval_max_tokens, progress=False, device=cfg.device)
    result = evaluate_checkpoint(_checkpoint(spec), ecfg, resolve_device(cfg.device))
    write_json(Path(cfg.out) / "eval" / f"{spec.name}.json", result)


def _circuits(cfg: ReproduceConfig, spec: RunSpec) -> None:
    from .report.circuits import CircuitConfig, write_circuits

    prompts = cfg.ioi_prompts if cfg.ioi_prompts != "auto" else "authors" if cfg.preset == "paper" else "templates"
    ccfg = CircuitConfig(out=str(Path(cfg.out) / "circuits" / spec.name), prompts=prompts, pairs=cfg.circuit_prompts,
                         tau=cfg.tau, sweep=cfg.tau_sweep, progress=False, device=cfg.device)
    write_circuits(str(_checkpoint(spec)), ccfg)


def sae_hook(cfg: ReproduceConfig, spec: RunSpec) -> str:
    from .checkpoint import read_header

    # With init_from the layers are the source's, which the trained checkpoint holds.
    n_layers = read_header(_checkpoint(spec))["model"]["n_layers"] if cfg.init_from else spec.model.n_layers
    layer = cfg.sae_layer % n_layers
    return f"blocks.{layer}.hook_mlp_out"


def _sae(cfg: ReproduceConfig, spec: RunSpec) -> None:
    from .sae.train import SAETrainConfig, paper_protocol, run_sae_sweep

    scfg = SAETrainConfig(out=str(Path(cfg.out) / "sae" / spec.name), hook=sae_hook(cfg, spec), data=cfg.data,
                          eval_tokens=cfg.sae_eval_tokens, progress=False, device=cfg.device)
    scfg = paper_protocol(scfg) if cfg.preset == "paper" else scfg
    scfg = dataclasses.replace(scfg, steps=cfg.sae_steps or scfg.steps)
    run_sae_sweep(str(_checkpoint(spec)), scfg, cfg.sae_coefs())


def _explain(cfg: ReproduceConfig, spec: RunSpec) -> None:
    from .explain.run import ExplainConfig, explain_checkpoint

    explain_checkpoint(str(_checkpoint(spec)), ExplainConfig(
        out=str(Path(cfg.out) / "explain" / spec.name), data=cfg.data, train_tokens=cfg.explain_tokens,
        test_tokens=max(1, cfg.explain_tokens // 4), progress=False, device=cfg.device))


STAGES = (
    Stage("train", lambda out, s: Path(s.train.out) / "done.json", _train),
    Stage("evaluate", lambda out, s: out / "eval" / f"{s.name}.json", _evaluate),
    Stage("circuits", lambda out, s: out / "circuits" / s.name / "circuit.json", _circuits),
    Stage("sae", lambda out, s: out / "sae" / s.name / "frontier.json", _sae),
    Stage("explain", lambda out, s: out / "explain" / s.name / "explain.json", _explain),
)


IGNORED = ("progress", "out", "accept_changed", "device")
"""Settings that do not change what a grid computes."""


def _not_a_record(meta: Path) -> ConfigError:
    return ConfigError(f"{meta} is not a reproduce record (corrupt JSON or no config); move it away to start a "
                       "new grid there")


def read_record(meta: Path) -> dict[str, Any]:
    """The grid's record in `meta` ({} when there is none yet); a corrupt one is a one-line error."""
    if not meta.exists():
        return {}
    try:
        rec = json.loads(meta.read_text())
        assert isinstance(rec["config"], dict)
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
        raise _not_a_record(meta) from None
    return rec


def changed_settings(meta: Path, cfg: ReproduceConfig, rec: dict[str, Any] | None = None) -> list[str]:
    """The settings that differ from those the grid in `meta`'s folder was run with (its record
    `rec`, read from `meta` when not given), as "name: old -> new"; a corrupt record is a one-line
    error."""
    rec = read_record(meta) if rec is None else rec
    if not rec:
        return []
    new = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as the record holds it: lists, not tuples
    # A setting the record lacks did not exist when it was written: that grid ran with its default.
    defaults = json.loads(json.dumps({f.name: getattr(ReproduceConfig, f.name) for f in dataclasses.fields(cfg)}))
    old = defaults | dict(rec["config"])
    try:
        for name, value in old.items():  # records of older versions wrote lists as "2,8"
            if isinstance(value, str) and isinstance(new.get(name), list):
                old[name] = list(parse_list(list_item_type(field_type(ReproduceConfig, name)), value))
    except ValueError:
        raise _not_a_record(meta) from None
    return [f"{k}: {old[k]!r} -> {v!r}" for k, v in new.items() if k not in IGNORED and old[k] != v]


def record(meta: Path, cfg: ReproduceConfig, names: list[str]) -> None:
    """Write the grid's record, refusing changed settings unless accepted; accepted ones keep
    the earlier settings in the record's history (never rewritten silently)."""
    rec = read_record(meta)
    changed = changed_settings(meta, cfg, rec)
    if changed and not cfg.accept_changed:
        raise ConfigError(f"{meta.parent} holds a grid run with other settings ({'; '.join(changed)}): pass "
                          "--accept-changed to keep its finished stages and go on with these, or choose another --out")
    history = rec.get("history", [])
    if changed:
        history.append(rec["config"])
        print(f"selfablate: warning: {'; '.join(changed)}: finished stages are kept (delete a stage's folder to "
              "redo it); the earlier settings stay in reproduce.json's history", file=sys.stderr)
    write_json(meta, {"config": dataclasses.asdict(cfg), "models": names, "history": history})


def run_reproduce(cfg: ReproduceConfig) -> Path:
    """Run every missing stage of every model, then write the report. Returns the report folder.
    Holds the folder's lock throughout: one reproduce per folder."""
    out = Path(cfg.out)
    with runlock.exclusive(out):
        return _run(cfg, out)


def _run(cfg: ReproduceConfig, out: Path) -> Path:
    from .report.build import write_report

    specs = grid(cfg)
    record(out / "reproduce.json", cfg, [s.name for s in specs])
    todo = [(spec, stage) for spec in specs for stage in STAGES]
    bar = tqdm(todo, desc="reproduce", disable=not cfg.progress, dynamic_ncols=True)
    for spec, stage in bar:
        bar.set_postfix_str(f"{stage.name} {spec.name}")
        if not stage.result(out, spec).exists():
            stage.run(cfg, spec)
    return write_report(out)


def _command(cfg: ReproduceConfig) -> None:
    folder = run_reproduce(cfg)
    print((folder / "table.md").read_text())
    print(f"report: {folder / 'report.html'} (tables: table.md, table.csv, table.tex)")


def _report_command(folder: str, results: str) -> None:
    """Rebuild the report of a reproduce folder (and, given a path, its results page)."""
    from .report.build import write_report

    meta = Path(folder) / "reproduce.json"
    if not meta.exists():
        raise SelfAblateError(f"{folder} is not a `selfablate reproduce` folder (no reproduce.json)")
    if results:
        check_output_folder(Path(results).parent)
    with runlock.exclusive(folder):  # not while a reproduce writes there
        written = write_report(Path(folder), Path(results) if results else None)
    print(f"report: {written / 'report.html'}" + (f"; results page: {results}" if results else ""))


COMMAND = Command("reproduce", "the paper's grid end to end (train, evaluate, circuits, SAEs, N2G explanations, report); resumable",
                  _command, (ReproduceConfig,))
REPORT_COMMAND = Command("report", "rebuild the report of a reproduce folder", _report_command,
                         args=(Arg("folder", "the --out folder of `selfablate reproduce`"),
                               Arg("results", "also write the results page (Markdown, figures beside it) to this "
                                   "file, e.g. docs/results.md", default="")))
