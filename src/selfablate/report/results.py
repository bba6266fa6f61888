"""A reproduce folder's results as one Markdown page (what ran, the table, the figures, what the
numbers do and do not show), written where the user asks: `make demo` writes docs/results.md with
it, so the published results are always those of the last run, never hand-copied."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..files import write_text_atomically
from .table import Cell, load_json

FIGURES = (("selection_frequency.png", "Unit selection frequency per layer"),
           ("circuits.png", "IOI circuits found by ACDC"),
           ("sae_frontier.png", "SAE L0-fidelity frontier"),
           ("n2g_vs_selection.png", "N2G F1 of each clean MLP neuron against its selection frequency"))
"""The report's figures the results page shows (copied beside it); report.html has them all."""


def _what_ran(out: Path, config: dict[str, Any], names: list[str]) -> list[str]:
    """The run's settings, read back from its records (so the page cannot describe another run)."""
    header = json.loads((out / "models" / names[-1] / "checkpoint" / "config.json").read_text())
    m, t = header["model"], header["meta"]["train"]
    seq = t["seq_len"] or m["n_ctx"]
    tokens = t["max_steps"] * t["batch_size"] * seq
    vocab = f"a compact vocabulary of {m['vocab_size']:,} ids" if m["compact_vocab"] else "the GPT-2 vocabulary"
    ablated = [n for n in names if not n.startswith("none-")]
    return [
        f"- **Grid:** {len(names)} models ({', '.join(names)}): a baseline and a self-ablating model "
        f"(k_attn = k_mlp = k) for each ablation in {{{', '.join(config['ablations'])}}} and k in "
        f"{{{', '.join(map(str, config['ks']))}}}; seeds {{{', '.join(map(str, config['seeds']))}}}.",
        f"- **Model** (preset {config['preset']}): {m['n_layers']} layers x d_model {m['d_model']}, "
        f"{m['n_heads']} heads, d_mlp {m['d_mlp']}, context {m['n_ctx']}, {vocab}; init {m['init']}; "
        f"loss a = {m['coef_clean']:g}, b = {m['coef_ablated']:g}, c = {m['coef_recon']:g}, "
        f"T = {m['temperature_attn']:g}.",
        f"- **Training:** {t['max_steps']:,} steps of {t['batch_size']} x {seq} tokens = {_count(tokens)} "
        f"tokens per model; AdamW lr {t['lr']:g}, betas ({t['beta1']:g}, {t['beta2']:g}), warm-up "
        f"{t['warmup_steps']}, cosine to {t['min_lr_ratio']:g} x lr; the {t['keep']} checkpoint evaluated.",
        f"- **Evaluations:** perplexity on {_held_out(config)}; ACDC at tau {config['tau']:g} (and "
        f"{', '.join(f'{x:g}' for x in config['tau_sweep']) or 'no other tau'}) on {_prompts(out, names[-1])}; "
        f"{_sae(out, names[-1])}; {_n2g(out, names[-1])}."
        + ("" if ablated else " No self-ablating model in this grid."),
    ] + _start(header["meta"].get("init_from"), t["max_steps"])


def _start(source: dict[str, str] | None, steps: int) -> list[str]:
    """Where the grid's models started, when not from scratch (`reproduce --init-from`)."""
    if not source:
        return []
    return [f"- **Start:** every model from {source['source']} (weights sha256 {source['sha256'][:12]}...): the "
            f"baseline is that model as imported, not trained; each self-ablating model is it with new mask "
            f"heads, fine-tuned for {steps:,} steps."]


def _prompts(out: Path, name: str) -> str:
    circuit = load_json(out / "circuits" / name / "circuit.json")
    if circuit is None:
        return "IOI prompts (circuits not run)"
    c = circuit["circuit_config"]
    what = "the authors' IOI prompts" if c["prompts"] == "authors" else \
        "IOI prompts from the templates" if c["prompts"] == "templates" else f"the IOI prompts of {c['prompts']}"
    pairs = circuit.get("prompts", {}).get("discovery", c.get("pairs", "?"))
    return f"{what} ({pairs} pairs{', BOS first' if c.get('bos') else ''})"


def _sae(out: Path, name: str) -> str:
    runs = sorted((out / "sae" / name).glob("*/metrics.json"))
    if not runs:
        return "no SAE"
    t = json.loads(runs[0].read_text())["train"]
    coefs = ", ".join(p.parent.name for p in runs)
    what = f"an SAE ({t['expansion']}x, L1 coefficient {coefs})" if len(runs) == 1 else \
        f"SAEs ({t['expansion']}x, L1 coefficients {coefs})"
    return (f"{what} on the clean stream's `{t['hook']}`, {t['steps']:,} steps of {t['batch_tokens']:,} activations "
            f"at lr {t['lr']:g}")


def _n2g(out: Path, name: str) -> str:
    result = load_json(out / "explain" / name / "explain.json")
    if result is None:
        return "no N2G explanations"
    s, d = result["settings"], result["data"]
    return (f"Neuron-to-Graph explanations of every clean MLP neuron ({s['examples']} top examples from "
            f"{d['train_tokens']:,} training tokens, scored on {d['test_tokens']:,} held-out tokens, firing at "
            f"{s['fire']:g} of the neuron's largest activation)")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def _held_out(config: dict[str, Any]) -> str:
    n = config.get("eval_max_tokens", 0)
    return f"the first {n:,} held-out tokens" if n else "the whole held-out split"


def _range(cells: list[Cell], key: str, fmt: str, which: str) -> str | None:
    vals = [c.mean[key] for c in cells if key in c.mean and (c.name == "none") == (which == "baseline")]
    if not vals:
        return None
    lo, hi = fmt.format(min(vals)), fmt.format(max(vals))
    return lo if lo == hi else f"{lo}-{hi}"


def _reading(cells: list[Cell]) -> list[str]:
    """Statements that follow from the table alone (ranges and counts; no interpretation)."""
    lines = []
    for key, what, fmt in (("ppl_clean", "Clean perplexity", "{:.2f}"), ("ioi_accuracy", "IOI accuracy", "{:.2f}"),
                           ("ioi_edges", "ACDC edges at the paper's tau", "{:.0f}"),
                           ("ioi_edges_low_tau", "ACDC edges at the lowest tau", "{:.0f}"),
                           ("sae_l0", "SAE L0", "{:.2f}"), ("localisation", "Localisation (fraction of units for 90% of the loss "
                                                    "improvement)", "{:.3f}")):
        base, abl = _range(cells, key, fmt, "baseline"), _range(cells, key, fmt, "ablated")
        if base is not None or abl is not None:
            lines.append(f"- {what}: baseline {base or '-'}; self-ablating models {abl or '-'}.")
    accuracy = [c.mean["ioi_accuracy"] for c in cells if "ioi_accuracy" in c.mean]
    if accuracy and max(accuracy) < 0.75:
        lines.append(f"- The models barely do IOI (accuracy at most {max(accuracy):.2f}; 0.5 is chance): their "
                     "circuits are not comparable to the paper's 79-edge baseline circuit.")
    seeds = min((c.seeds for c in cells), default=0)
    if seeds < 2:
        lines.append("- One seed per model: the table has no spread over seeds, so no difference between rows "
                     "is established.")
    else:
        spread = np.nanmax([c.std.get("ppl_clean", np.nan) for c in cells])
        lines.append(f"- {seeds} seeds per model; the largest std of clean perplexity over seeds is {spread:.2f}.")
    return lines


def results_markdown(out: Path, config: dict[str, Any], names: list[str], cells: list[Cell],
                     table: str, figures: list[tuple[str, str]]) -> str:
    """The results page: what ran, the table (with the paper's rows), the figures, the reading."""
    lines = [f"# Results of `selfablate reproduce` (preset {config['preset']})", "",
             "Written by `selfablate report OUT --results FILE` from the run's own records (`make demo` writes "
             "this page); every number below is from that run.", "", "## What ran", "",
             *_what_ran(out, config, names), "", "## Table", "", table.strip(), "", "## Figures", ""]
    lines += [f"![{caption}]({rel})\n" for rel, caption in figures] or ["(none: the report has no figures)", ""]
    lines += ["## What the numbers show", "", *_reading(cells), "",
              f"The full report, with training curves, the masks of a held-out story and sparsity against "
              f"specialisation, is `{out / 'report' / 'report.html'}`."]
    return "\n".join(lines) + "\n"


def write_results(out: Path, meta: dict[str, Any], cells: list[Cell], dest: Path) -> Path:
    """Write the results page of reproduce folder `out` (its record `meta`, its report already
    built) to `dest`, its figures copied to `<dest stem>_figures/` beside it."""
    report = out / "report"
    fig_dir = dest.parent / f"{dest.stem}_figures"
    figures = []
    for name, caption in FIGURES:
        if (report / name).exists():
            fig_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(report / name, fig_dir / name)
            figures.append((f"{fig_dir.name}/{name}", caption))
    text = results_markdown(out, meta["config"], meta["models"], cells, (report / "table.md").read_text(), figures)
    return write_text_atomically(dest, text)
