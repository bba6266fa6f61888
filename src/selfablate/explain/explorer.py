"""The mask explorer: one self-contained HTML page (data inlined, no server, works offline).

Held-out windows as tokens; clicking a token shows, per layer, the units the ablated stream kept
there (a baseline: its most active units) with their activations; clicking a unit shows its
Neuron-to-Graph explanation: scores, top examples with each token's importance, and its graph.
A menu switches between the models of a grid.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import write_text_atomically


def explorer_html(models: dict[str, dict[str, Any]]) -> str:
    """The page for models {name: `explain.run.explorer_model` of its explain.json}."""
    # Inside <script>, "</" would end the element early; "<\/" is the same JSON string.
    data = json.dumps(models, separators=(",", ":")).replace("</", "<\\/")
    return PAGE.replace("/*DATA*/", data)


def write_explorer(path: str | Path, models: dict[str, dict[str, Any]]) -> Path:
    return write_text_atomically(path, explorer_html(models))


PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>selfablate: mask explorer</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1em;color:#222}
#tokens{max-width:60em;line-height:1.9}
.tok{white-space:pre-wrap;padding:1px 0;border-radius:3px;cursor:pointer}
.tok:hover,.tok.sel{outline:2px solid #36c}
.unit{cursor:pointer;color:#14c;margin-right:.4em;white-space:nowrap}
.unit.sel{background:#fd6}
#panes{display:flex;gap:2em;align-items:flex-start}
#token,#unit{flex:1;min-width:20em}
table{border-collapse:collapse}td,th{padding:2px 6px;border-bottom:1px solid #ddd;text-align:left}
.imp{white-space:pre-wrap;border-radius:2px}
svg text{font:12px monospace}
</style></head><body>
<h1>Mask explorer</h1>
<p>Model <select id="model"></select> Window <select id="story"></select>
<span id="about"></span></p>
<div id="summary"></div>
<div id="tokens"></div>
<div id="panes"><div id="token"><p>Click a token.</p></div><div id="unit"><p>Click a unit.</p></div></div>
<script type="application/json" id="data">/*DATA*/</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const $ = id => document.getElementById(id);
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const fmt = v => v === null || v === undefined ? "-" : Number(v).toFixed(3);
let model = null;

function choose(name) {
  model = DATA[name];
  const c = model.config;
  $("about").textContent = `ablation ${c.ablation}, k_attn ${c.k_attn}, k_mlp ${c.k_mlp}, ${c.n_layers} layers`;
  $("story").innerHTML = model.stories.map((s, i) => `<option value="${i}">${i}</option>`).join("");
  $("summary").innerHTML = "<table><tr><th>units</th><th>scored</th><th>dead</th><th>N2G F1 mean</th><th>95% interval</th></tr>" +
    Object.entries(model.summary).map(([k, s]) => `<tr><td>${esc(k)}</td><td>${s.scored}</td><td>${s.dead}</td>` +
      `<td>${fmt(s.f1_mean)}</td><td>${s.f1_ci95 ? fmt(s.f1_ci95[0]) + "-" + fmt(s.f1_ci95[1]) : "-"}</td></tr>`).join("") + "</table>";
  showStory(0);
  $("token").innerHTML = "<p>Click a token.</p>";
  $("unit").innerHTML = "<p>Click a unit.</p>";
}

function showStory(i) {
  const story = model.stories[i];
  $("tokens").innerHTML = story.tokens.map((t, p) => `<span class="tok" data-pos="${p}">${esc(t)}</span>`).join("");
  $("tokens").dataset.story = i;
}

function showToken(pos) {
  const story = model.stories[$("tokens").dataset.story];
  document.querySelectorAll(".tok.sel").forEach(e => e.classList.remove("sel"));
  document.querySelector(`.tok[data-pos="${pos}"]`).classList.add("sel");
  const kept = model.config.ablation !== "none";
  let html = `<h2>Token ${pos}: <code>${esc(story.tokens[pos])}</code></h2><p>${kept ?
    "Units the ablated stream kept here, with their activations." : "The most active units (a baseline keeps every unit)."}</p><table>`;
  for (let l = 0; l < model.config.n_layers; l++) {
    for (const kind of ["attn", "mlp"]) {
      const units = (story.units[pos][`${kind}-${l}`] || []).slice().sort((a, b) => b[1] - a[1]);
      html += `<tr><th>layer ${l} ${kind}</th><td>` + units.map(([u, a]) =>
        `<span class="unit" data-key="${kind}-clean-${l}" data-unit="${u}">${u} (${a.toFixed(2)})</span>`).join(" ") + "</td></tr>";  // spaces: a long row wraps
    }
  }
  $("token").innerHTML = html + "</table>";
}

function showUnit(key, u) {
  document.querySelectorAll(".unit.sel").forEach(e => e.classList.remove("sel"));
  document.querySelectorAll(`.unit[data-key="${key}"][data-unit="${u}"]`).forEach(e => e.classList.add("sel"));
  const units = model.units[key];
  let html = `<h2 id="unit-title">${esc(key)} unit ${u}</h2>`;
  if (!units) { $("unit").innerHTML = html + "<p>Not explained (run explain with --attention for attention units).</p>"; return; }
  const r = units[u];
  html += `<table id="unit-scores"><tr><th>F1</th><td>${fmt(r.f1)}</td></tr><tr><th>precision</th><td>${fmt(r.precision)}</td></tr>` +
    `<tr><th>recall</th><td>${fmt(r.recall)}</td></tr><tr><th>largest activation</th><td>${fmt(r.max)}</td></tr>` +
    `<tr><th>kept by the masks</th><td>${r.kept === null ? "-" : (100 * r.kept).toFixed(1) + "%"}</td></tr></table>`;
  // One line per example: a newline token shows as a visible mark.
  html += "<h3>Top examples (pruned; red: important tokens)</h3>" + r.examples.map(e => "<div>" + e.tokens.map((t, j) =>
    `<span class="imp" style="background:rgba(220,40,40,${Math.max(0, Math.min(1, e.importance[j])).toFixed(2)})">${esc(t.replace(/\n/g, "\u21b5"))}</span>`).join("") +
    ` <small>${e.activation.toFixed(2)}</small></div>`).join("");
  html += "<h3>Graph (the activating token on the right; * any token)</h3>" + drawGraph(r.graph);
  $("unit").innerHTML = html;
}

function drawGraph(roots) {
  if (!roots.length) return "<p>No graph: the unit never activated on the training text.</p>";
  const W = 110, H = 24, nodes = [], edges = [];
  let row = 0;
  function place(n, depth) {  // depth 0 = the activating token; leaves take one row each
    const kids = n.c.map(c => place(c, depth + 1));
    const y = kids.length ? (kids[0].y + kids[kids.length - 1].y) / 2 : row++;
    const me = {n, depth, y};
    nodes.push(me);
    kids.forEach(k => edges.push([k, me]));
    return me;
  }
  roots.forEach(r => place(r, 0));
  const depth = Math.max(...nodes.map(n => n.depth)) + 1;
  const x = d => (depth - 1 - d) * W + 4, y = r => r * H + 4;
  let svg = `<svg class="graph" width="${depth * W + 8}" height="${row * H + 8}">`;
  edges.forEach(([a, b]) => svg += `<line x1="${x(a.depth) + W - 20}" y1="${y(a.y) + 9}" x2="${x(b.depth)}" y2="${y(b.y) + 9}" stroke="#999"/>`);
  nodes.forEach(({n, depth: d, y: r}) => {
    const label = n.t === null ? "*" : n.t.replace(/\n/g, "\u21b5");  // a newline token as a visible mark
    svg += `<g class="node"><rect x="${x(d)}" y="${y(r)}" width="${W - 20}" height="18" rx="3" fill="${d === 0 ? "#fde2b8" : "#e8eef8"}"` +
      ` stroke="${n.v === null ? "#bbb" : "#c33"}" stroke-width="${n.v === null ? 1 : 2}"/>` +
      `<text x="${x(d) + 4}" y="${y(r) + 13}">${esc(label.slice(0, 11))}${n.v === null ? "" : " " + n.v.toFixed(2)}</text></g>`;
  });
  return svg + "</svg>";
}

$("model").innerHTML = Object.keys(DATA).map(n => `<option>${esc(n)}</option>`).join("");
$("model").onchange = e => choose(e.target.value);
$("story").onchange = e => showStory(+e.target.value);
$("tokens").onclick = e => { const t = e.target.closest(".tok"); if (t) showToken(+t.dataset.pos); };
document.body.addEventListener("click", e => { const u = e.target.closest(".unit"); if (u) showUnit(u.dataset.key, +u.dataset.unit); });
choose(Object.keys(DATA)[0]);
</script></body></html>
"""
