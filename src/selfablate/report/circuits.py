"""A circuit's drawings (SVG, and the PNG of `plots.circuits`) and the `selfablate circuits` outputs."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .. import runlock
from ..circuits.run import CircuitConfig, run_circuits
from ..config import Arg, Command


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
    """Run the circuits on a checkpoint and write circuit.svg, circuit.png and, last, circuit.json
    (what marks the stage done) into cfg.out, each file whole (written beside, then renamed): a
    run killed in between leaves no circuit.json, and is redone."""
    from ..runtime import resolve_device

    out = Path(cfg.out)
    with runlock.exclusive(out):  # one writer per folder, before any compute
        result = run_circuits(checkpoint, cfg, resolve_device(cfg.device))
        _write(out, checkpoint, result)
    return result


def _write(out: Path, checkpoint: str, result: dict[str, Any]) -> None:
    from .plots import circuits as draw_circuits

    tmp = Path(tempfile.mkdtemp(prefix=".circuit.tmp-", dir=out))
    try:
        (tmp / "circuit.svg").write_text(circuit_svg(result))
        draw_circuits({Path(checkpoint).name: result}, tmp / "circuit.png")
        (tmp / "circuit.json").write_text(json.dumps(result, indent=1) + "\n")
        for name in ("circuit.svg", "circuit.png", "circuit.json"):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _command(cfg: CircuitConfig, checkpoint: str) -> None:
    r = write_circuits(checkpoint, cfg)
    n = r["prompts"]
    print(f"prompts: {cfg.prompts}, {n['discovery']} pairs for discovery" +
          (f", {n['held_out']} held out" if n["held_out"] else ""))
    for split in ("ioi", "ioi_test"):
        for stream, b in (r[split] or {}).items():
            print(f"IOI ({stream} stream{', held-out prompts' if split == 'ioi_test' else ''}): "
                  f"logit diff {b['logit_diff']:.3f}, accuracy {b['accuracy']:.2f}")
    print(f"ACDC tau={cfg.tau}: {r['acdc']['edges']} of {r['graph']['edges']} edges, KL {r['acdc']['kl']:.4f}, "
          f"{r['acdc']['seconds']:.0f} s; EAP over all edges {r['eap']['seconds']:.2f} s; "
          f"faithfulness AUC {r['faithfulness_auc']:.3f}")
    print(f"wrote circuit.json, circuit.svg and circuit.png to {cfg.out}")


COMMAND = Command("circuits", "IOI behaviour and circuit discovery (ACDC, EAP, EAP-IG)", _command, (CircuitConfig,),
                  (Arg("checkpoint", "checkpoint folder (or a run folder holding checkpoint/)"),))
