"""The report's table: one row per grid cell (mean +/- std over seeds) in the paper's layout
(IOI edges, SAE L0 and CE score, perplexity, L1 sparsity) plus our extra metrics; written as
Markdown, CSV and LaTeX beside the paper's own numbers."""

from __future__ import annotations

import csv
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

COLUMNS: tuple[tuple[str, str, str], ...] = (
    # key, header, format
    ("ioi_edges", "IOI edges (ACDC)", "{:.0f}"),
    ("ioi_edges_low_tau", "IOI edges, lowest tau", "{:.0f}"),
    ("sae_l0", "SAE L0", "{:.2f}"),
    ("sae_ce_score", "SAE CE score", "{:.3f}"),
    ("ppl_clean", "ppl clean", "{:.2f}"),
    ("ppl_ablated", "ppl ablated", "{:.2f}"),
    ("weight_l1", "L1 sparsity", "{:.4f}"),
    ("faithfulness_auc", "faithfulness AUC", "{:.3f}"),
    ("ioi_accuracy", "IOI accuracy", "{:.2f}"),
    ("localisation", "localisation", "{:.3f}"),
    ("selectivity", "selectivity", "{:.3f}"),
    ("n2g_f1", "N2G F1", "{:.3f}"),
    ("probe_mask_share", "probe: mask share", "{:.2f}"),
)
"""IOI edges at the paper's tau (0.03) and at the lowest tau of the sweep (0.003 by default: small
models that barely do IOI keep no edge at 0.03); localisation: fraction of units needed for 90% of
the loss improvement; N2G F1: mean F1 of the clean stream's MLP neurons' Neuron-to-Graph
explanations on held-out text (with one seed, its 95% bootstrap interval over neurons); probe: share
of the clean residual's decodable next-token information the mask bits carry."""


def model_metrics(out: Path, name: str) -> dict[str, float]:
    """The headline numbers of one trained model, read from its stage results (missing: absent)."""
    m: dict[str, float] = {}
    ev = load_json(out / "eval" / f"{name}.json")
    if ev:
        m["ppl_clean"] = ev["lm"]["clean"]["ppl"]
        if "ablated" in ev["lm"]:
            m["ppl_ablated"] = ev["lm"]["ablated"]["ppl"]
        m["weight_l1"] = ev["sparsity"]["weight_l1_paper"]
        m["localisation"] = ev["localisation"]["fraction"]
        m["selectivity"] = float(np.mean(ev["specialisation"]["mean_selectivity"]))
        m["hoyer"] = float(np.mean(ev["sparsity"]["mlp_activations"]["hoyer"]))
        if ev.get("leakage", {}).get("mask_share_of_residual_gain") is not None:  # None: the probe did not learn
            m["probe_mask_share"] = ev["leakage"]["mask_share_of_residual_gain"]
    circ = load_json(out / "circuits" / name / "circuit.json")
    if circ:
        m["ioi_edges"] = circ["acdc"]["edges"]
        m["ioi_edges_low_tau"] = min(circ["sweep"], key=lambda r: r["tau"])["edges"]
        m["faithfulness_auc"] = circ["faithfulness_auc"]
        m["ioi_accuracy"] = circ["ioi"]["clean"]["accuracy"]
    n2g = load_json(out / "explain" / name / "explain.json")
    if n2g and n2g["summary"].get("mlp-clean", {}).get("f1_mean") is not None:
        s = n2g["summary"]["mlp-clean"]
        m["n2g_f1"], (m["n2g_f1_lo"], m["n2g_f1_hi"]) = s["f1_mean"], s["f1_ci95"]
    sae = load_json(out / "sae" / name / "frontier.json")
    if sae:
        at5 = min(sae["points"], key=lambda p: abs(p["l1_coef"] - 5.0))
        m["sae_l0"], m["sae_ce_score"] = at5["l0"], at5["ce_loss_score_zero"]
    return m


def load_json(path: Path) -> dict[str, Any] | None:
    """A stage's JSON result, or None when the stage has not run."""
    return json.loads(path.read_text()) if path.exists() else None


class Cell(NamedTuple):
    """One grid cell: its name (model without the seed), seeds and per-metric mean and std."""

    name: str
    seeds: int
    mean: dict[str, float]
    std: dict[str, float]


def cell_name(model: str) -> str:
    return re.sub(r"-s\d+$", "", model)


def aggregate(per_model: dict[str, dict[str, float]]) -> list[Cell]:
    """Group models by cell (name without -s<seed>), mean and sample std over seeds (std 0 for one)."""
    groups: dict[str, list[dict[str, float]]] = {}
    for model, metrics in per_model.items():
        groups.setdefault(cell_name(model), []).append(metrics)
    cells = []
    for name, runs in groups.items():
        keys = sorted({k for r in runs for k in r})
        vals = {k: np.array([r[k] for r in runs if k in r], dtype=float) for k in keys}
        cells.append(Cell(name, len(runs), {k: float(v.mean()) for k, v in vals.items()},
                          {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in vals.items()}))
    return cells


def paper_rows() -> dict[str, Any]:
    return json.loads(resources.files("selfablate.report").joinpath("paper.json").read_text())


def _fmt(cell: Cell, key: str, fmt: str, pm: str) -> str:
    if key not in cell.mean:
        return "-"
    text = fmt.format(cell.mean[key])
    if cell.seeds > 1:
        return text + f"{pm}{fmt.format(cell.std[key])}"
    if f"{key}_lo" in cell.mean:  # one model: its own interval
        return text + f" [{fmt.format(cell.mean[f'{key}_lo'])}, {fmt.format(cell.mean[f'{key}_hi'])}]"
    return text


def _paper_fmt(row: dict[str, Any], key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    return "-".join(fmt.format(x) for x in v) if isinstance(v, list) else fmt.format(v)


def markdown(cells: list[Cell], scale: str) -> str:
    head = ["model", "seeds"] + [h for _, h, _ in COLUMNS]
    lines = [f"Scale: {scale}. Mean +/- std over seeds.", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for c in cells:
        lines.append("| " + " | ".join([c.name, str(c.seeds)] + [_fmt(c, k, f, " ± ") for k, _, f in COLUMNS]) + " |")
    paper = paper_rows()
    for row in paper["rows"]:
        lines.append("| " + " | ".join([row["model"], "-"] + [_paper_fmt(row, k, f) for k, _, f in COLUMNS]) + " |")
    lines += ["", f"Paper rows: {paper['scale']}. {paper['note']} Not comparable in absolute terms to this run's scale."]
    return "\n".join(lines) + "\n"


def latex(cells: list[Cell], scale: str) -> str:
    esc = lambda s: s.replace("_", r"\_").replace("%", r"\%")  # noqa: E731
    lines = [r"\begin{tabular}{l" + "r" * (len(COLUMNS) + 1) + "}", r"\toprule",
             " & ".join(["model", "seeds"] + [esc(h) for _, h, _ in COLUMNS]) + r" \\", r"\midrule"]
    for c in cells:
        lines.append(" & ".join([esc(c.name), str(c.seeds)] + [_fmt(c, k, f, r" $\pm$ ") for k, _, f in COLUMNS]) + r" \\")
    lines.append(r"\midrule")
    for row in paper_rows()["rows"]:
        lines.append(" & ".join([esc(row["model"]), "-"] + [_paper_fmt(row, k, f).replace("-", "--") if k in row else "-"
                                                            for k, _, f in COLUMNS]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", f"% scale: {scale}"]
    return "\n".join(lines) + "\n"


def write_tables(cells: list[Cell], folder: Path, scale: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "table.md").write_text(markdown(cells, scale))
    (folder / "table.tex").write_text(latex(cells, scale))
    keys = [k for k, _, _ in COLUMNS]
    with open(folder / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "seeds", "scale"] + [x for k in keys for x in (k, f"{k}_std")])
        for c in cells:
            w.writerow([c.name, c.seeds, scale] + [x for k in keys for x in (c.mean.get(k, ""), c.std.get(k, ""))])
        for row in paper_rows()["rows"]:
            w.writerow([row["model"], "", "paper"] + [x for k in keys for x in (_paper_fmt(row, k, "{}") if k in row else "", "")])
