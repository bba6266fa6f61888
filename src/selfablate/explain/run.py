"""`selfablate explain RUN`: Neuron-to-Graph explanations of every unit, scored on held-out text.

Writes OUT/explain.json (per unit: graph, top examples, scores; per layer and per model: the F1
distribution with a bootstrap interval), OUT/explain.csv (a row per unit) and OUT/explorer.html.
Each layer's result is kept in OUT/layers/ as it is finished, so an interrupted run resumes there.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import runlock
from ..checkpoint import load_checkpoint, resolve
from ..config import Arg, Command, Device, require, require_finite
from ..data.dataset import TokenWindows, tokenize_split
from ..data.sources import resolve_source
from ..data.tokenizer import EOT, gpt2_tokenizer
from ..data.vocab import to_gpt2_ids, to_model_ids, token_lookup
from ..errors import ConfigError
from ..eval.evaluate import MAX_BOOTSTRAP
from ..eval.metrics import bootstrap_ci
from ..files import write_text_atomically
from ..model import SelfAblatingTransformer, Stream
from . import n2g
from .collect import HeldOut, TopExamples, Units, held_out, last_activation, top_examples
from .explorer import write_explorer

FORMAT = "selfablate-explain-v1"


@dataclass(frozen=True)
class ExplainConfig:
    """Options of `selfablate explain`."""

    out: str = ""
    """Folder for explain.json, explain.csv and explorer.html; empty: RUN/explain."""
    data: str = ""
    """Data source (as for train); empty: the default."""
    examples: int = 20
    """Top-activating training positions per unit that become its graph (N2G's default)."""
    train_tokens: int = 131072
    """Training-split tokens searched for the top examples."""
    test_tokens: int = 32768
    """Held-out (valid split) tokens the graphs are scored on."""
    context: int = 24
    """Tokens of an example's text, the activating one included, before pruning."""
    keep: float = 0.5
    """Pruning keeps the shortest context whose activation is at least this fraction of the full one's."""
    important: float = 0.75
    """A token is important (a literal node, not a wildcard) when replacing it removes at least this
    fraction of the activation."""
    fire: float = 0.5
    """A unit fires where its activation is at least this fraction of its largest training activation."""
    attention: bool = False
    """Also explain every attention unit (the d_model channels of the context before out_proj)."""
    ablated: bool = False
    """Also explain the ablated stream's units (a self-ablating model's)."""
    batch_size: int = 512
    """Sequences per forward pass of the pruning and replacement batches (held-out passes: a tenth)."""
    bootstrap: int = 1000
    """Bootstrap resamples (over units) for the 95% interval of the mean F1."""
    seed: int = 0
    """Seed of the bootstrap."""
    show: int = 5
    """Pruned examples written out per unit (with their tokens' importances; at most `examples`)."""
    stories: int = 8
    """Held-out windows shown in explorer.html (at most those scored)."""
    device: Device = "auto"
    """Device to run on."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        require_finite(self)
        for name in ("examples", "train_tokens", "test_tokens", "context", "batch_size", "bootstrap", "stories"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.examples <= 1000, f"examples must be at most 1,000 per unit, got {self.examples}")
        require(self.context <= 256, f"context must be at most 256 tokens, got {self.context}")
        for name in ("keep", "important", "fire"):
            require(0 < getattr(self, name) <= 1, f"{name} must be in (0, 1], got {getattr(self, name)}")
        require(self.seed >= 0 and self.show >= 0, "seed and show must be >= 0")
        require(self.bootstrap <= MAX_BOOTSTRAP, f"bootstrap must be at most {MAX_BOOTSTRAP:,}, got {self.bootstrap}")

    def fingerprint(self) -> dict[str, Any]:
        """The settings a layer's result depends on (a resumed run must match them)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("out", "attention", "ablated", "device", "progress", "stories", "bootstrap", "seed")}


def unit_sets(model: SelfAblatingTransformer, cfg: ExplainConfig) -> list[Units]:
    kinds = ["mlp"] + (["attn"] if cfg.attention else [])
    streams = [Stream.CLEAN] + ([Stream.ABLATED] if cfg.ablated else [])
    if cfg.ablated and not model.cfg.self_ablating:
        raise ConfigError("--ablated: this model has no ablated stream (ablation=none)")
    return [Units(k, s, l) for s in streams for k in kinds for l in range(model.cfg.n_layers)]


# -- one layer --------------------------------------------------------------------------------


def examples_of(top: TopExamples, windows: torch.Tensor, context: int) -> n2g.Examples:
    """Each unit's top positions with a positive activation, as contexts of `context` tokens
    ending at the position (cut at the window's start: the model saw nothing before it)."""
    values, where = top.values.cpu(), top.where.cpu()  # (n, units) each
    rank, unit = torch.nonzero(values > 0, as_tuple=True)  # rank-major: each unit's best first
    pos = where[rank, unit]
    w, t = pos // windows.shape[1], pos % windows.shape[1]
    idx = t[:, None] + torch.arange(1 - context, 1, device=t.device)  # (n, context) positions in the window
    ctx = windows[w[:, None], idx.clamp(min=0)]  # (n, context)
    return n2g.Examples(unit, torch.where(idx >= 0, ctx, -1), values[rank, unit])


def explain_units(model: SelfAblatingTransformer, units: Units, top: TopExamples, train: torch.Tensor,
                  test: torch.Tensor, test_acts: torch.Tensor, kept: torch.Tensor | None,
                  cfg: ExplainConfig, names: list[str]) -> dict[str, Any]:
    """N2G for every unit of one set: prune and weigh its examples (all units' at once), build
    its graph and score it on the held-out windows."""
    fn = last_activation(model, units)
    ex = examples_of(top, train, cfg.context)
    length, _ = n2g.prune(fn, ex, cfg.keep, cfg.batch_size)
    pruned = [ex.context[i, cfg.context - m :] for i, m in enumerate(length.tolist())]
    replacement = int(to_model_ids(model, torch.tensor([EOT], device="cpu"))[0])
    imp = n2g.importance(fn, pruned, ex.unit, replacement, cfg.batch_size)
    unit_max = top.values[0].float().cpu()  # (units,) each unit's largest training activation
    rows: dict[int, list[int]] = {}
    for i, u in enumerate(ex.unit.tolist()):
        rows.setdefault(u, []).append(i)
    test_ids = test.numpy()
    out = []
    for u in range(len(unit_max)):
        record: dict[str, Any] = {"unit": u, "max": float(unit_max[u]),
                                  "kept": None if kept is None else float(kept[u])}
        if u not in rows:  # never positive on the training text: nothing to explain
            out.append(record | {"graph": [], "examples": [], **_scores_json(None)})
            continue
        mine = rows[u]
        patterns = [n2g.pattern(pruned[i].tolist(), imp[i].tolist(), cfg.important) for i in mine]
        graph = n2g.build_graph(patterns, [float(ex.activation[i] / unit_max[u]) for i in mine])
        s = n2g.scores(n2g.predict(graph, test_ids), test_acts[..., u].numpy(), float(unit_max[u]), cfg.fire)
        shown = [{"tokens": [names[t] for t in pruned[i].tolist()], "importance": [round(float(v), 3) for v in imp[i]],
                  "activation": round(float(ex.activation[i]), 4)} for i in mine[: cfg.show]]
        out.append(record | {"graph": graph_json(graph, names)["c"], "examples": shown, **_scores_json(s)})
    return {"key": units.key, "kind": units.kind, "stream": units.stream.name.lower(), "layer": units.layer,
            "units": out}


def graph_json(node: dict, names: list[str]) -> dict:
    """A trie with readable tokens: t the token's text (None: any token), id its model id."""
    tok = node["t"]
    return {"t": None if tok is None or tok == n2g.WILDCARD else names[tok], "id": tok,
            "v": None if node["v"] is None else round(node["v"], 4), "c": [graph_json(c, names) for c in node["c"]]}


def _scores_json(s: n2g.Scores | None) -> dict[str, Any]:
    if s is None:
        return {"precision": None, "recall": None, "f1": None, "fires": 0, "predicted": 0}
    clean = lambda v: None if math.isnan(v) else round(v, 4)  # noqa: E731  (JSON has no NaN)
    return {"precision": clean(s.precision), "recall": clean(s.recall), "f1": clean(s.f1),
            "fires": s.fires, "predicted": s.predicted}


def distribution(f1: list[float | None], n_units: int, dead: int, cfg: ExplainConfig) -> dict[str, Any]:
    """Mean F1 over the units that fire or are predicted to (others have no F1), its bootstrap
    95% interval over units, the median and quartiles, and the counts."""
    v = np.array([x for x in f1 if x is not None], dtype=np.float64)
    if not len(v):
        return {"units": n_units, "scored": 0, "dead": dead, "f1_mean": None, "f1_ci95": None,
                "f1_quartiles": None}
    lo, hi = bootstrap_ci(v, n_resamples=cfg.bootstrap, seed=cfg.seed)
    return {"units": n_units, "scored": len(v), "dead": dead, "f1_mean": float(v.mean()), "f1_ci95": [lo, hi],
            "f1_quartiles": [float(q) for q in np.quantile(v, [0.25, 0.5, 0.75])]}


def summarise(layers: list[dict], cfg: ExplainConfig) -> None:
    """Gives each layer's record its F1 distribution ("summary")."""
    for layer in layers:
        units = layer["units"]
        layer["summary"] = distribution([u["f1"] for u in units], len(units), sum(not u["graph"] for u in units), cfg)


def model_summary(layers: list[dict], cfg: ExplainConfig) -> dict[str, Any]:
    """The F1 distribution over all units of each (kind, stream), e.g. "mlp-clean"."""
    groups: dict[str, list[dict]] = {}
    for layer in layers:
        groups.setdefault(f"{layer['kind']}-{layer['stream']}", []).extend(layer["units"])
    return {k: distribution([u["f1"] for u in us], len(us), sum(not u["graph"] for u in us), cfg)
            for k, us in groups.items()}


# -- a run ------------------------------------------------------------------------------------


def first_windows(model: SelfAblatingTransformer, source, split: str, tokens: int, progress: bool) -> torch.Tensor:
    """The split's first tokens // n_ctx windows (at least one) as model ids, (n_windows, n_ctx)."""
    windows = TokenWindows(tokenize_split(source, split, progress=progress), model.cfg.n_ctx, token_lookup(model), split)
    n = max(1, min(windows.num_sequential(), tokens // model.cfg.n_ctx))
    return next(windows.sequential_batches(n, n))[0]


def default_out(path: str) -> Path:
    """RUN/explain, RUN being the run folder (not its checkpoint/ or best/)."""
    folder = resolve(path)
    run = folder.parent if folder.name.removesuffix(".old") in ("checkpoint", "best") else folder
    return run / "explain"


def token_names(model: SelfAblatingTransformer) -> list[str]:
    """Every model id's text."""
    enc = gpt2_tokenizer()
    ids = to_gpt2_ids(model, torch.arange(model.cfg.vocab_size, device=model.wte.weight.device)).tolist()
    names = [enc.decode([i]) for i in ids]
    if model.cfg.compact_vocab:
        names[-1] = "<unk>"
    return names


def _layer_path(out: Path, units: Units) -> Path:
    return out / "layers" / f"{units.key}.json"


def _finished(out: Path, units: Units, stamp: dict) -> dict | None:
    """A layer's earlier result, if it was made from the same model, data and settings."""
    try:
        layer = json.loads(_layer_path(out, units).read_text())
    except (OSError, ValueError):
        return None
    return layer if isinstance(layer, dict) and layer.get("stamp") == stamp else None


def explain_checkpoint(path: str, cfg: ExplainConfig) -> dict[str, Any]:
    """N2G for every unit set of one model; writes OUT/layers/*.json as each is done, then
    explain.json, explain.csv and explorer.html. Returns explain.json's content."""
    from ..interop.hf import weights_sha256
    from ..runtime import resolve_device

    t0 = time.perf_counter()
    out = Path(cfg.out) if cfg.out else default_out(path)
    model = load_checkpoint(resolve(path), device=resolve_device(cfg.device)).eval()
    sets = unit_sets(model, cfg)
    source = resolve_source(cfg.data)
    train = first_windows(model, source, "train", cfg.train_tokens, cfg.progress)
    test = first_windows(model, source, "valid", cfg.test_tokens, cfg.progress)
    data = {"source": source.name, "train_tokens": train.numel(), "test_tokens": test.numel(),
            "sha256": hashlib.sha256(train.numpy().tobytes() + test.numpy().tobytes()).hexdigest()}
    stamp = {"format": FORMAT, "weights_sha256": weights_sha256(model), "data": data, "settings": cfg.fingerprint()}
    names = token_names(model)
    with runlock.exclusive(out):
        layers = {u.key: _finished(out, u, stamp) for u in sets}
        todo = [u for u in sets if layers[u.key] is None]
        if todo:
            passes = max(1, cfg.batch_size // 10)
            tops = top_examples(model, todo, train, cfg.examples, passes)
            held: HeldOut = held_out(model, todo, test, passes)
            for u in tqdm(todo, desc="explaining", disable=not cfg.progress, leave=False):
                layer = explain_units(model, u, tops[u.key], train, test, held.acts[u.key], held.kept.get(u.key),
                                      cfg, names) | {"stamp": stamp}
                write_text_atomically(_layer_path(out, u), json.dumps(layer) + "\n")
                layers[u.key] = layer
        ordered = [{k: v for k, v in layers[u.key].items() if k != "stamp"} for u in sets]
        summarise(ordered, cfg)
        result = {"format": FORMAT, "checkpoint": str(resolve(path)), "config": dataclasses.asdict(model.cfg),
                  "weights_sha256": stamp["weights_sha256"], "data": data, "settings": dataclasses.asdict(cfg),
                  "summary": model_summary(ordered, cfg), "layers": ordered,
                  "stories": stories_json(model, test[: cfg.stories], names), "seconds": time.perf_counter() - t0}
        write_results(out, result)
    return result


def stories_json(model: SelfAblatingTransformer, windows: torch.Tensor, names: list[str]) -> list[dict]:
    """The explorer's held-out windows: their tokens and, per position, the units shown there."""
    from .collect import token_view

    view = token_view(model, windows, show=max(model.cfg.k_mlp, 8))
    return [{"tokens": [names[t] for t in w.tolist()], "units": v} for w, v in zip(windows, view)]


def write_results(out: Path, result: dict[str, Any]) -> None:
    """explain.json, explain.csv (a row per unit) and explorer.html."""
    write_text_atomically(out / "explain.json", json.dumps(result) + "\n")
    table = io.StringIO()
    fields = ["kind", "stream", "layer", "unit", "max", "kept", "f1", "precision", "recall", "fires", "predicted"]
    writer = csv.DictWriter(table, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for layer in result["layers"]:
        for u in layer["units"]:
            writer.writerow({k: layer[k] for k in ("kind", "stream", "layer")} | u)
    write_text_atomically(out / "explain.csv", table.getvalue())
    write_explorer(out / "explorer.html", {model_label(result): explorer_model(result)})


def model_label(result: dict[str, Any]) -> str:
    """A model's name in the explorer: its run folder's."""
    folder = Path(result["checkpoint"])
    return (folder.parent if folder.name.removesuffix(".old") in ("checkpoint", "best") else folder).name


def explorer_model(result: dict[str, Any]) -> dict[str, Any]:
    """What the explorer shows of one model's explain.json."""
    c = result["config"]
    return {"config": {k: c[k] for k in ("ablation", "k_attn", "k_mlp", "n_layers", "d_model", "d_mlp")},
            "summary": result["summary"], "stories": result["stories"],
            "units": {layer["key"]: layer["units"] for layer in result["layers"]}}


def format_summary(result: dict[str, Any]) -> str:
    lines = [f"{'units':>14}  {'scored':>6}  {'dead':>5}  {'F1 mean':>8}  {'95% interval':>15}  {'median':>6}"]
    for key, s in result["summary"].items():
        if s["f1_mean"] is None:
            lines.append(f"{key:>14}  {s['scored']:>6}  {s['dead']:>5}  {'-':>8}")
            continue
        lo, hi = s["f1_ci95"]
        lines.append(f"{key:>14}  {s['scored']:>6}  {s['dead']:>5}  {s['f1_mean']:>8.3f}  {f'{lo:.3f}-{hi:.3f}':>15}  "
                     f"{s['f1_quartiles'][1]:>6.3f}")
    return "\n".join(lines)


def _command(cfg: ExplainConfig, run: str) -> None:
    result = explain_checkpoint(run, cfg)
    print(format_summary(result))
    out = Path(cfg.out) if cfg.out else default_out(run)
    print(f"wrote explain.json, explain.csv and explorer.html to {out} ({result['seconds']:.0f} s)")


COMMAND = Command("explain", "Neuron-to-Graph explanations of every unit, scored on held-out text; the mask explorer",
                  _command, (ExplainConfig,), (Arg("run", "a run or checkpoint folder"),))
