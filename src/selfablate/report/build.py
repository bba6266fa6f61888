"""Assemble the report of a `selfablate reproduce` folder: tables, figures, report.html."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data.vocab import to_model_ids
from ..explain.explorer import write_explorer
from ..explain.run import explorer_model
from . import plots
from .html import write_html
from .results import write_results
from .table import aggregate, cell_name, load_json, model_metrics, write_tables


def _first_seed(names: list[str]) -> list[str]:
    """One model per grid cell (the lowest seed), for the figures that show single models."""
    seen, keep = set(), []
    for n in sorted(names, key=lambda n: int(n.rsplit("-s", 1)[1])):
        cell = cell_name(n)
        if cell not in seen:
            seen.add(cell)
            keep.append(n)
    return sorted(keep, key=names.index)


def _load_all(out: Path, names: list[str], sub: str) -> dict[str, Any]:
    found = {n: load_json(out / sub.format(n)) for n in names}
    return {n: r for n, r in found.items() if r is not None}


def story(cfg_data: str, n_tokens: int = 40):
    """The first n_tokens of the held-out split, as (tokens, labels)."""
    from ..data.dataset import tokenize_split
    from ..data.sources import resolve_source
    from ..data.tokenizer import gpt2_tokenizer

    raw = tokenize_split(resolve_source(cfg_data), "valid", progress=False)
    ids = [int(t) for t in raw[:n_tokens]]
    enc = gpt2_tokenizer()
    return ids, [repr(enc.decode([t]))[1:-1] for t in ids]


def figures(out: Path, names: list[str], per_model: dict[str, dict[str, float]], data: str) -> list[tuple[str, Path]]:
    import torch

    from ..checkpoint import load_checkpoint

    folder = out / "report"
    shown = _first_seed(names)
    evals = _load_all(out, shown, "eval/{}.json")
    circs = _load_all(out, shown, "circuits/{}/circuit.json")
    saes = {n: f["points"] for n, f in _load_all(out, shown, "sae/{}/frontier.json").items()}
    figs = [("Training curves", plots.training_curves({n: out / "models" / n for n in shown}, folder / "training_curves.png"))]
    if any("masks" in e for e in evals.values()):
        figs.append(("Unit selection frequency per layer", plots.selection_heatmaps(evals, folder / "selection_frequency.png")))
    ablating = [n for n in shown if not n.startswith("none")]
    if ablating:
        # The run folder, not its checkpoint/: the model the evaluations read (best/ under keep=best).
        model = load_checkpoint(out / "models" / ablating[0]).eval()
        ids, labels = story(data, min(40, model.cfg.n_ctx))
        tokens = to_model_ids(model, torch.tensor(ids, device="cpu"))
        figs.append((f"Masks of each token of a held-out story ({ablating[0]})",
                     plots.story_masks(model, tokens, labels, folder / "story_masks.png")))
    if circs:
        figs.append(("IOI circuits found by ACDC", plots.circuits(circs, folder / "circuits.png")))
    if saes:
        figs.append(("SAE L0-fidelity frontier", plots.sae_frontier(saes, folder / "sae_frontier.png")))
    explains = _load_all(out, shown, "explain/{}/explain.json")
    if any(e["config"]["ablation"] != "none" for e in explains.values()):
        figs.append(("N2G F1 of each clean MLP neuron against its selection frequency",
                     plots.n2g_vs_selection(explains, folder / "n2g_vs_selection.png")))
    if explains:
        write_explorer(folder / "explorer.html", {n: explorer_model(e) for n, e in explains.items()})
    if per_model:
        figs.append(("Sparsity against specialisation",
                     plots.sparsity_vs_specialisation({n: per_model[n] for n in shown if n in per_model},
                                                      folder / "sparsity_vs_specialisation.png")))
    return figs


def write_report(out: Path, results: Path | None = None) -> Path:
    """Tables (md, csv, tex), PNG figures, a self-contained report.html and the mask explorer
    (explorer.html, every model of the grid that has N2G explanations) in OUT/report/; with
    `results`, also the results page there (`report.results`)."""
    out = Path(out)
    meta = json.loads((out / "reproduce.json").read_text())
    names, preset = meta["models"], meta["config"]["preset"]
    per_model = {n: model_metrics(out, n) for n in names}
    cells = aggregate(per_model)
    folder = out / "report"
    where = "paper scale (meant for a GPU)" if preset == "paper" else "CPU scale, not the paper's"
    scale = f"preset {preset}, {where}"
    write_tables(cells, folder, scale)
    (folder / "per_model.json").write_text(json.dumps(per_model, indent=1) + "\n")
    figs = figures(out, names, per_model, meta["config"].get("data", ""))
    write_html(folder / "report.html", f"Self-ablating transformers: reproduction ({preset})",
               (folder / "table.md").read_text(), figs)
    if results is not None:
        write_results(out, meta, cells, Path(results))
    return folder
