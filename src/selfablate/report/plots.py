"""The report's figures, as PNG files (matplotlib, Agg backend: no screen needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .circuits import EDGE_COLOURS, edge_geometry, node_xy  # noqa: E402


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def training_curves(models: dict[str, Path], path: Path) -> Path:
    """Training CE of the clean (solid) and ablated (dashed) stream against step, one colour per
    model (logged every log_interval steps), with the held-out evaluations as dots."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, folder) in enumerate(models.items()):
        rows, colour = _jsonl(folder / "metrics.jsonl"), f"C{i % 10}"
        steps = [r for r in rows if "loss_clean" in r]
        ax.plot([r["step"] for r in steps], [r["loss_clean"] for r in steps], color=colour, label=name, lw=1)
        abl = [r for r in steps if r.get("loss_ablated") is not None]
        if abl:
            ax.plot([r["step"] for r in abl], [r["loss_ablated"] for r in abl], color=colour, ls="--", lw=1)
        val = [r for r in rows if "val_loss_clean" in r]
        ax.scatter([r["step"] for r in val], [r["val_loss_clean"] for r in val], color=colour, s=12, zorder=3)
    ax.set(xlabel="step", ylabel="CE (nats/token)", title="Training CE (dashed: ablated stream; dots: held-out clean)")
    ax.set_ylim(top=min(ax.get_ylim()[1], 7.0))
    ax.legend(fontsize=7)
    return _save(fig, path)


def selection_heatmaps(evals: dict[str, dict[str, Any]], path: Path) -> Path:
    """Per layer, how often each attention unit and neuron is selected (units sorted by frequency)."""
    named = [(n, e["masks"]) for n, e in evals.items() if "masks" in e]
    fig, axes = plt.subplots(len(named), 2, figsize=(9, 1.2 + 1.3 * len(named)), squeeze=False)
    for row, (name, masks) in zip(axes, named):
        for ax, kind in zip(row, ("attn", "mlp")):
            freq = -np.sort(-np.asarray(masks[kind]["selection_frequency"]), axis=1)  # (n_layers, width)
            im = ax.imshow(freq, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set(title=f"{name}: {kind} units, k={masks[kind]['k']}", ylabel="layer", xlabel="unit (sorted)")
            ax.title.set_fontsize(8)
    fig.colorbar(im, ax=axes, shrink=0.6, label="selection frequency")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def story_masks(model: Any, tokens: torch.Tensor, labels: list[str], path: Path) -> Path:
    """The mask of every token of one story: rows tokens, columns every layer's attention units
    then every layer's neurons (white: kept)."""
    with torch.no_grad():
        out = model(tokens.view(1, -1))
    attn = out.attn_mask[0].flatten(1).float().cpu().numpy()  # (pos, n_layers * d_model)
    mlp = out.mlp_mask[0].flatten(1).float().cpu().numpy()  # (pos, n_layers * d_mlp)
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.16 * len(labels) + 1.5), gridspec_kw={"width_ratios": [1, 2]})
    for ax, m, title, width in ((axes[0], attn, "attention units", model.cfg.d_model),
                                (axes[1], mlp, "neurons", model.cfg.d_mlp)):
        ax.imshow(m, aspect="auto", cmap="gray", interpolation="nearest")
        for l in range(1, model.cfg.n_layers):
            ax.axvline(l * width - 0.5, color="red", lw=0.6)
        ax.set(title=f"{title} (red: layer boundaries)", xlabel="unit")
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
    return _save(fig, path)


def _shown_circuit(r: dict[str, Any]) -> tuple[float, list[dict[str, Any]]]:
    """The circuit at the main tau, or, when that is empty (a model that barely does the task),
    at the lowest tau of the sweep that keeps an edge."""
    if r["acdc"]["circuit"]:
        return r["acdc"]["tau"], r["acdc"]["circuit"]
    kept = sorted((s for s in r.get("sweep", []) if s.get("circuit")), key=lambda s: s["tau"])
    return (kept[0]["tau"], kept[0]["circuit"]) if kept else (r["acdc"]["tau"], [])


def circuits(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """The ACDC circuits side by side: heads (circles) and MLPs (squares) by layer, the embedding
    at the bottom and the final residual at the top; kept edges coloured by what they feed."""
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 5.5), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        L, H = r["config"]["n_layers"], r["config"]["n_heads"]
        tau, edges = _shown_circuit(r)
        for e in edges:
            (x1, y1), (x2, y2), kind = edge_geometry(e, L, H)
            ax.plot([x1, x2], [y1, y2], color=EDGE_COLOURS[kind], alpha=0.7, lw=1.2)
        heads = np.array([node_xy(f"L{l}.H{h}", L, H) for l in range(L) for h in range(H)])
        other = np.array([node_xy(n, L, H) for n in ["embed", "final"] + [f"L{l}.MLP" for l in range(L)]])
        ax.scatter(heads[:, 0], heads[:, 1], s=25, facecolor="white", edgecolor="black", zorder=3)
        ax.scatter(other[:, 0], other[:, 1], s=45, marker="s", facecolor="#ddd", edgecolor="black", zorder=3)
        for label in ["embed", "final"]:
            x, y = node_xy(label, L, H)
            ax.annotate(label, (x, y), xytext=(8, -3), textcoords="offset points", fontsize=7)
        for l in range(L):
            ax.annotate(f"L{l}", node_xy(f"L{l}.H0", L, H), xytext=(-22, -3), textcoords="offset points", fontsize=7)
        ax.set_title(f"{name}: {len(edges)} edges at tau={tau:g}", fontsize=9)
        ax.invert_yaxis()
        ax.axis("off")
    fig.legend(handles=[plt.Line2D([], [], color=c, label=f"-> {k or 'MLP / final'}") for k, c in EDGE_COLOURS.items()],
               loc="lower center", ncol=4, fontsize=8)
    return _save(fig, path)


def sae_frontier(frontiers: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """SAE CE-loss score against L0, one line per model (one point per L1 coefficient)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in frontiers.items():
        pts = sorted(points, key=lambda p: p["l0"])
        ax.plot([p["l0"] for p in pts], [p["ce_loss_score_zero"] for p in pts], marker="o", label=name)
    ax.set(xlabel="L0 (active latents per token)", ylabel="CE-loss score", title="SAE frontier")
    ax.legend(fontsize=7)
    return _save(fig, path)


def sparsity_vs_specialisation(per_model: dict[str, dict[str, float]], path: Path) -> Path:
    """Does sparsity buy specialisation? Hoyer sparsity of clean MLP activations against neuron
    selectivity, and the fraction of units needed to localise the loss (lower: more localised)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, key, label in ((axes[0], "selectivity", "neuron selectivity"),
                           (axes[1], "localisation", "units needed (fraction)")):
        for name, m in per_model.items():
            if "hoyer" in m and key in m:
                ax.scatter(m["hoyer"], m[key])
                ax.annotate(name, (m["hoyer"], m[key]), fontsize=7)
        ax.set(xlabel="Hoyer sparsity of MLP activations", ylabel=label)
    return _save(fig, path)


def n2g_vs_selection(explains: dict[str, dict[str, Any]], path: Path) -> Path:
    """Each clean MLP neuron's N2G F1 against how often the masks kept it, one panel per
    self-ablating model (a baseline keeps every neuron; its F1 distribution is the grey histogram)."""
    ablating = {n: e for n, e in explains.items() if e["config"]["ablation"] != "none"}
    baseline = [u["f1"] for e in explains.values() if e["config"]["ablation"] == "none"
                for layer in e["layers"] if layer["key"].startswith("mlp-clean") for u in layer["units"] if u["f1"] is not None]
    fig, axes = plt.subplots(1, max(1, len(ablating)), figsize=(3.6 * max(1, len(ablating)), 3.4), squeeze=False)
    for ax, (name, e) in zip(axes[0], ablating.items()):
        layers = [l for l in e["layers"] if l["key"].startswith("mlp-clean")]
        for layer in layers:
            pts = np.array([(u["kept"], u["f1"]) for u in layer["units"] if u["f1"] is not None and u["kept"] is not None])
            if len(pts):
                ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.6, label=f"layer {layer['layer']}")
        ax.set(title=name, xlabel="selection frequency", ylabel="N2G F1", ylim=(-0.02, 1.02))
        ax.title.set_fontsize(9)
        if baseline:
            inset = ax.inset_axes([0.62, 0.62, 0.35, 0.33])
            inset.hist(baseline, bins=20, range=(0, 1), color="grey")
            inset.set_title("baseline F1", fontsize=7)
            inset.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=7, loc="upper left")
    return _save(fig, path)
