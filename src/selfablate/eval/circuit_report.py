"""`selfablate circuits`: IOI behaviour, ACDC at tau and over a tau sweep, EAP and EAP-IG, written
as circuit.json and circuit.svg."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..checkpoint import load_checkpoint, resolve
from ..config import require
from ..errors import ConfigError
from .circuits import EdgeGraph
from .discovery import CircuitTask, acdc, eap_ig_scores, eap_scores, kl_with_mask, make_task
from .ioi import ioi_behaviour, ioi_prompts


@dataclass(frozen=True)
class CircuitConfig:
    """Options of `selfablate circuits`."""

    out: str = "runs/circuits"
    """Folder for circuit.json, circuit.svg and circuit.png."""
    prompts: int = 64
    """IOI prompt pairs (the paper: 64)."""
    seed: int = 0
    """Seed of the prompt generator."""
    tau: float = 0.03
    """ACDC threshold on the KL increase (the paper: 0.03)."""
    sweep: str = "0.003,0.01,0.1"
    """More ACDC thresholds for the faithfulness-vs-edges curve (comma-separated; empty: none)."""
    ig_steps: int = 5
    """Integration steps of EAP-IG."""
    top_edges: int = 50
    """Edges per EAP ranking written out."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Device to run on."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        require(self.prompts >= 2, f"prompts must be >= 2, got {self.prompts}")
        require(self.tau >= 0, f"tau must be >= 0, got {self.tau}")
        require(self.ig_steps >= 1, f"ig_steps must be >= 1, got {self.ig_steps}")
        try:
            self.taus()
        except ValueError:
            raise ConfigError(f"sweep must be comma-separated numbers, got {self.sweep!r}") from None

    def taus(self) -> list[float]:
        return sorted({self.tau, *(float(t) for t in self.sweep.split(",") if t.strip())})


def behaviour(task: CircuitTask, batch) -> dict[str, Any]:
    """IOI logit difference, accuracy and p(IO) of the clean and the ablated stream."""
    with torch.no_grad():
        out = task.model(task.clean)
    rows = torch.arange(len(task.last), device=task.clean.device)
    res = {"clean": ioi_behaviour(out.logits_clean[rows, task.last], task.io, task.s)._asdict()}
    if out.logits_ablated is not None:
        res["ablated"] = ioi_behaviour(out.logits_ablated[rows, task.last], task.io, task.s)._asdict()
    return res


def faithfulness_auc(points: list[tuple[int, float]], n_edges: int, kl_empty: float) -> float:
    """Area under KL(circuit) / KL(empty circuit) against edges / all edges, with the end points
    (0 edges, KL of the fully patched model) and (all edges, 0) added; trapezoid rule. 0 would be
    a perfect circuit of no edges; lower is better."""
    pts = sorted({(0, kl_empty), (n_edges, 0.0), *points})
    xs = [n / n_edges for n, _ in pts]
    ys = [kl / kl_empty if kl_empty > 0 else 0.0 for _, kl in pts]
    return sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))


def ranked(graph: EdgeGraph, scores: torch.Tensor, top: int) -> list[dict[str, Any]]:
    order = scores.abs().argsort(descending=True)[:top].tolist()
    return [{"source": graph.edge_names[e][0], "dest": graph.edge_names[e][1], "score": float(scores[e])} for e in order]


def run_circuits(checkpoint: str, cfg: CircuitConfig, device: torch.device) -> dict[str, Any]:
    t0 = time.perf_counter()
    model = load_checkpoint(checkpoint, device=device).eval()
    batch = ioi_prompts(cfg.prompts, cfg.seed)
    task = make_task(model, batch)
    g = task.graph
    with torch.no_grad():
        kl_empty = kl_with_mask(task, torch.ones(g.n_edges, device=task.clean.device)).item()
    runs = {}
    for tau in cfg.taus():
        t = time.perf_counter()
        r = acdc(task, tau, cfg.progress)
        kept = (r.mask == 0).nonzero().flatten().tolist()
        runs[tau] = {"tau": tau, "edges": len(kept), "kl": r.kl, "seconds": time.perf_counter() - t,
                     "circuit": [{"source": g.edge_names[e][0], "dest": g.edge_names[e][1],
                                  "delta_kl": float(r.delta_kl[e])} for e in kept]}
    t = time.perf_counter()
    eap = eap_scores(task)
    eap_seconds = time.perf_counter() - t
    ig = eap_ig_scores(task, cfg.ig_steps)
    main = runs[cfg.tau]
    return {
        "checkpoint": str(resolve(checkpoint)), "config": dataclasses.asdict(model.cfg),
        "circuit_config": dataclasses.asdict(cfg), "scale_note": "edge graph of this checkpoint's architecture",
        "graph": {"sources": g.n_sources, "edges": g.n_edges}, "ioi": behaviour(task, batch),
        "prompts_sample": batch.texts[:4], "kl_all_edges_patched": kl_empty,
        "acdc": {"tau": cfg.tau, "edges": main["edges"], "kl": main["kl"], "seconds": main["seconds"],
                 "circuit": main["circuit"]},
        "sweep": list(runs.values()),
        "faithfulness_auc": faithfulness_auc([(r["edges"], r["kl"]) for r in runs.values()], g.n_edges, kl_empty),
        "eap": {"seconds": eap_seconds, "top": ranked(g, eap, cfg.top_edges)},
        "eap_ig": {"steps": cfg.ig_steps, "sum": float(ig.sum()), "top": ranked(g, ig, cfg.top_edges)},
        "seconds": time.perf_counter() - t0,
    }


def node_xy(name: str, n_layers: int, n_heads: int) -> tuple[float, float]:
    """Drawing position: the embedding at the bottom, per layer a row of heads with its MLP to
    their right, the final residual at the top."""
    width = 60 * (n_heads + 1)
    if name == "embed":
        return width / 2, 60 + 120 * n_layers + 60
    if name == "final":
        return width / 2, 30
    layer, rest = name.split(".", 1)
    y = 60 + 120 * (n_layers - 1 - int(layer[1:]))
    if rest.startswith("MLP"):  # right of the layer's heads, half a row above them
        return 30 + 60 * n_heads, y + 30
    return 30 + 60 * int(rest.split(".")[0][1:]), y + 60


EDGE_COLOURS = {"q": "#d62728", "k": "#2ca02c", "v": "#1f77b4", "": "#555"}
"""Edge colour by what it feeds: a head's query, key or value, or ("") an MLP or the final residual."""


def edge_geometry(edge: dict[str, Any], n_layers: int, n_heads: int) -> tuple[tuple[float, float], tuple[float, float], str]:
    """A circuit edge's drawing: source position, destination node position and what it feeds
    ("q", "k", "v", or "" for an MLP or the final residual)."""
    dest = edge["dest"]
    kind = dest[-1] if dest[-2:] in (".q", ".k", ".v") else ""
    return node_xy(edge["source"], n_layers, n_heads), node_xy(dest[:-2] if kind else dest, n_layers, n_heads), kind


def circuit_svg(result: dict[str, Any]) -> str:
    """The ACDC circuit: heads and MLPs by layer, kept edges coloured by destination (q/k/v/MLP/final)."""
    L, H = result["config"]["n_layers"], result["config"]["n_heads"]
    width, height = 60 * (H + 1), 120 * L + 180
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="10">',
             f'<text x="5" y="14">ACDC circuit, tau={result["acdc"]["tau"]}: {result["acdc"]["edges"]} of {result["graph"]["edges"]} edges</text>']
    for e in result["acdc"]["circuit"]:
        (x1, y1), (x2, y2), kind = edge_geometry(e, L, H)
        parts.append(f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="{EDGE_COLOURS[kind]}" stroke-opacity="0.7"/>')
    names = ["embed", "final"] + [f"L{l}.H{h}" for l in range(L) for h in range(H)] + [f"L{l}.MLP" for l in range(L)]
    for n in names:
        x, y = node_xy(n, L, H)
        label = n.split(".")[-1] if "." in n else n
        parts.append(f'<circle cx="{x}" cy="{y}" r="9" fill="white" stroke="black"/>'
                     f'<text x="{x}" y="{y + 3}" text-anchor="middle" font-size="7">{label}</text>')
    for l in range(L):
        parts.append(f'<text x="2" y="{60 + 120 * (L - 1 - l) + 64}">L{l}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def write_circuits(checkpoint: str, cfg: CircuitConfig) -> dict[str, Any]:
    from ..runtime import resolve_device

    result = run_circuits(checkpoint, cfg, resolve_device(cfg.device))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "circuit.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "circuit.svg").write_text(circuit_svg(result))
    from ..report.plots import circuits as draw_circuits

    draw_circuits({Path(checkpoint).name: result}, out / "circuit.png")
    return result
