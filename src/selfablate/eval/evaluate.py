"""`selfablate evaluate`: every evaluation family for one or more checkpoints.

Writes DIR/<model>.json per model and DIR/summary.csv with one row per model. Each JSON records
the model's config, the checkpoint and a SHA-256 of the evaluation tokens, so numbers can be traced.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import load_checkpoint, resolve
from .. import runlock
from ..interop.transformer_lens import weight_l1_tl
from ..config import Arg, Command, Device, require, require_finite
from ..files import write_text_atomically
from ..data.dataset import TokenWindows, tokenize_split
from ..data.sources import resolve_source
from ..data.tokenizer import gpt2_tokenizer
from ..model import SelfAblatingTransformer
from . import metrics as M
from .collect import TOKEN_CLASSES, ActivationAccumulator, LossAccumulator, MaskAccumulator, classify_token, run_batch
from .localisation import localisation
from .probe import leakage_probe
from ..data.vocab import to_gpt2_ids, token_lookup


MAX_BOOTSTRAP = 100_000
"""The most bootstrap resamples `evaluate` takes (see EvalConfig.bootstrap)."""


@dataclass(frozen=True)
class EvalConfig:
    """Options of `selfablate evaluate`."""

    out: str = "runs/eval"
    """Folder for <model>.json and summary.csv."""
    data: str = ""
    """Data source (as for train); empty: the default."""
    split: Literal["valid", "train"] = "valid"
    """Held-out split to evaluate on."""
    batch_size: int = 32
    """Sequences per batch."""
    max_tokens: int = 0
    """Evaluate only the first this many tokens of the split; 0: the whole split."""
    bootstrap: int = 1000
    """Bootstrap resamples (over sequences) for the 95% intervals (at most 100,000: each draws one
    index per sequence, and the interval's own Monte Carlo error is negligible long before)."""
    seed: int = 0
    """Seed for random-mask controls, bootstrap and probes."""
    top_examples: int = 20
    """Top-activating positions kept per neuron (for its token entropy; 5 are written out)."""
    frequent_tokens: int = 1000
    """Selectivity is measured over the mean activation on this many most frequent token ids."""
    activation_eps: float = 0.01
    """|activation| below this counts as near zero."""
    probe_positions: int = 10000
    """Positions used by the leakage probe (half to train it, half to test it)."""
    probe_classes: int = 512
    """Next-token classes of the probe (the most frequent ones; the rest share one class)."""
    localisation_tokens: int = 8192
    """Held-out tokens used for attribution and the localisation search (at most max_tokens, when set)."""
    localisation_target: float = 0.9
    """Fraction of the clean loss improvement the kept units must recover."""
    device: Device = "auto"
    """Device to run on."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        require_finite(self)
        for name in ("batch_size", "bootstrap", "top_examples", "frequent_tokens", "probe_classes", "localisation_tokens"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.top_examples <= 10_000, f"top_examples must be at most 10,000 (kept per neuron), got "
                                             f"{self.top_examples}")
        require(self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}")
        require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        require(self.bootstrap <= MAX_BOOTSTRAP, f"bootstrap must be at most {MAX_BOOTSTRAP:,}, got {self.bootstrap}")
        require(self.probe_positions >= 2, f"probe_positions must be >= 2 (half train the probe, half test it), "
                                           f"got {self.probe_positions}")
        require(self.activation_eps >= 0, f"activation_eps must be >= 0, got {self.activation_eps}")
        require(0 < self.localisation_target <= 1, "localisation_target must be in (0, 1]")


def token_class_table(model: SelfAblatingTransformer) -> torch.Tensor:
    """TOKEN_CLASSES index of every model id."""
    enc = gpt2_tokenizer()
    gpt2_ids = to_gpt2_ids(model, torch.arange(model.cfg.vocab_size, device=model.wte.weight.device)).tolist()
    return torch.tensor([classify_token(enc.decode([i])) for i in gpt2_ids], dtype=torch.long, device="cpu")


class ProbeCollector:
    """Mask bits, random-mask bits, current and next token at evenly strided positions."""

    def __init__(self, stride: int):
        self.stride, self.parts = stride, {"mask": [], "random": [], "current": [], "target": [], "residual": []}

    def update(self, x, y, attn, mlp, r_attn, r_mlp, residual) -> None:
        pick = slice(0, None, self.stride)
        flat = lambda a, m: torch.cat([a.flatten(2), m.flatten(2)], dim=-1).flatten(0, 1)[pick].bool()  # noqa: E731
        self.parts["mask"].append(flat(attn, mlp))
        self.parts["random"].append(flat(r_attn, r_mlp))
        self.parts["current"].append(x.flatten()[pick])
        self.parts["target"].append(y.flatten()[pick])
        self.parts["residual"].append(residual.flatten(0, 1)[pick])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything collected, on the host (one transfer a part)."""
        return {k: torch.cat(v).cpu() for k, v in self.parts.items()}


def one_pass(model: SelfAblatingTransformer, windows: TokenWindows, cfg: EvalConfig, n_windows: int) -> dict:
    """Runs every batch once through the model and the random-mask control; returns accumulators."""
    L, mc = model.cfg.n_layers, model.cfg
    ids = np.asarray(windows.tokens[: n_windows * windows.seq_len + 1])
    ids = ids if windows.lookup is None else windows.lookup[ids]
    frequent = np.argsort(-np.bincount(ids, minlength=mc.vocab_size))[: cfg.frequent_tokens]
    classes = token_class_table(model)
    loss = LossAccumulator()
    device = next(model.parameters()).device
    acts = ActivationAccumulator(L, mc.d_mlp, frequent, mc.vocab_size, cfg.top_examples, cfg.activation_eps, device)
    masks = {"attn": MaskAccumulator(L, mc.d_model, classes, device), "mlp": MaskAccumulator(L, mc.d_mlp, classes, device)}
    probe = ProbeCollector(max(1, n_windows * windows.seq_len // cfg.probe_positions))
    # the random-mask control is drawn on the device (the same numbers as before on the CPU)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    total = windows.num_batches(cfg.batch_size, n_windows)
    batches = windows.sequential_batches(cfg.batch_size, n_windows)
    for i, (x, y) in enumerate(tqdm(batches, total=total, desc="evaluating", disable=not cfg.progress, leave=False)):
        v = run_batch(model, x.to(device), y.to(device), gen)
        loss.update(v)
        acts.update(v.tokens, v.mlp_post, i * cfg.batch_size * windows.seq_len)
        if mc.self_ablating:
            masks["attn"].update(v.tokens, v.attn_mask, v.random_attn_mask)
            masks["mlp"].update(v.tokens, v.mlp_mask, v.random_mlp_mask)
            probe.update(x, y, v.attn_mask, v.mlp_mask, v.random_attn_mask, v.random_mlp_mask, v.final_clean)
    return {"loss": loss, "acts": acts, "masks": masks if mc.self_ablating else None,
            "probe": probe if mc.self_ablating else None}


def evaluate_checkpoint(path: str | Path, cfg: EvalConfig, device: torch.device) -> dict[str, Any]:
    t0 = time.perf_counter()
    folder = resolve(path)
    model = load_checkpoint(folder, device=device).eval()
    source = resolve_source(cfg.data)
    raw = tokenize_split(source, cfg.split, progress=cfg.progress)
    windows = TokenWindows(raw, model.cfg.n_ctx, token_lookup(model))
    n_windows = windows.num_sequential()
    if cfg.max_tokens:
        n_windows = max(1, min(n_windows, cfg.max_tokens // model.cfg.n_ctx))
    used = np.asarray(raw[: n_windows * model.cfg.n_ctx + 1])
    acc = one_pass(model, windows, cfg, n_windows)
    enc = gpt2_tokenizer()
    named = list(model.named_parameters())
    result: dict[str, Any] = {
        "checkpoint": str(folder), "config": dataclasses.asdict(model.cfg),
        "data": {"source": source.name, "split": cfg.split, "tokens": int(len(used) - 1),
                 "sha256": hashlib.sha256(used.tobytes()).hexdigest()},
        "eval_config": dataclasses.asdict(cfg),
        "lm": acc["loss"].result(cfg.bootstrap, cfg.seed),
        "sparsity": {"weight_l1_paper": weight_l1_tl(model), "weight_l1_all": M.weight_l1_all(named),
                     "weight_l1_nonembedding": M.weight_l1_nonembedding(named),
                     "activation_eps": cfg.activation_eps, "mlp_activations": acc["acts"].sparsity()},
        "specialisation": acc["acts"].specialisation(raw, enc.decode, model.cfg.n_layers),
    }
    if acc["masks"] is not None:
        result["masks"] = {"attn": acc["masks"]["attn"].result(model.cfg.k_attn),
                           "mlp": acc["masks"]["mlp"].result(model.cfg.k_mlp), "token_classes": list(TOKEN_CLASSES)}
        p = acc["probe"].tensors()
        result["leakage"] = leakage_probe(p["mask"], p["random"], p["current"], p["target"], p["residual"],
                                          cfg.probe_classes, seed=cfg.seed)
    loc_tokens = min(cfg.localisation_tokens, cfg.max_tokens or cfg.localisation_tokens)
    loc_batches = list(windows.sequential_batches(cfg.batch_size, max(1, loc_tokens // model.cfg.n_ctx)))
    loc_batches = [(x.to(device), y.to(device)) for x, y in loc_batches]
    result["localisation"] = localisation(model, loc_batches, cfg.localisation_target)._asdict()
    result["seconds"] = time.perf_counter() - t0
    return result


def summary_row(name: str, r: dict[str, Any]) -> dict[str, Any]:
    """The scalar headline numbers of one model's evaluation (layer lists averaged)."""
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    cfg, lm, sp = r["config"], r["lm"], r["sparsity"]
    row: dict[str, Any] = {"model": name, "ablation": cfg["ablation"], "k_attn": cfg["k_attn"], "k_mlp": cfg["k_mlp"],
                           "n_layers": cfg["n_layers"], "d_model": cfg["d_model"], "tokens": r["data"]["tokens"]}
    for stream, vals in lm.items():
        row |= {f"ce_{stream}": vals["ce"], f"ce_{stream}_lo": vals["ce_ci95"][0], f"ce_{stream}_hi": vals["ce_ci95"][1],
                f"ppl_{stream}": vals["ppl"]}
    row |= {"weight_l1_paper": sp["weight_l1_paper"], "weight_l1_nonembedding": sp["weight_l1_nonembedding"]}
    row |= {f"mlp_{k}": mean(v) for k, v in sp["mlp_activations"].items()}
    row |= {"top_token_entropy": mean(r["specialisation"]["mean_top_token_entropy"]),
            "selectivity": mean(r["specialisation"]["mean_selectivity"])}
    for kind, m in r.get("masks", {}).items():
        if kind != "token_classes":
            row |= {f"{kind}_mask_dead": mean(m["dead_fraction"]), f"{kind}_mask_entropy": mean(m["entropy"]),
                    f"{kind}_mask_persistence": mean(m["persistence"])}
    if "leakage" in r:
        for probe, vals in r["leakage"]["probes"].items():
            row[f"probe_ce_{probe}"] = vals["ce"]
    loc = r["localisation"]
    row |= {"localisation_units": loc["units_needed"], "localisation_fraction": loc["fraction"],
            "data_sha256": r["data"]["sha256"][:16], "checkpoint": r["checkpoint"], "seconds": r["seconds"]}
    return row


def model_names(paths: list[str]) -> list[str]:
    """Readable unique names: the run folder's name (not 'checkpoint'), numbered if repeated."""
    names = []
    for p in paths:
        folder = resolve(p)
        base = folder.parent.name if folder.name in ("checkpoint", "checkpoint.old") else folder.name
        names.append(base if base not in names else f"{base}-{len(names)}")
    return names


def evaluate_many(paths: list[str], cfg: EvalConfig) -> list[dict[str, Any]]:
    """Evaluate each checkpoint; write DIR/<name>.json and DIR/summary.csv. Returns summary rows."""
    from ..runtime import resolve_device

    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    with runlock.exclusive(out):  # one writer per folder
        rows = []
        for name, path in zip(model_names(paths), paths):
            result = evaluate_checkpoint(path, cfg, device)
            write_text_atomically(out / f"{name}.json", json.dumps(result, indent=1) + "\n")
            rows.append(summary_row(name, result))
        write_summary(out, [r["model"] for r in rows])
    return rows


def write_summary(out: Path, first: list[str]) -> None:
    """DIR/summary.csv: a row for every model evaluation in DIR, those named in `first` first and
    in that order, then those of earlier runs by name."""
    files = {f.stem: f for f in out.glob("*.json")}
    rows = []
    for f in [files[n] for n in first if n in files] + [files[n] for n in sorted(files) if n not in first]:
        try:
            result = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # not one of ours
        if isinstance(result, dict) and {"lm", "config", "sparsity", "localisation"} <= result.keys():
            rows.append(summary_row(f.stem, result))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(out / "summary.csv", table.getvalue())


def format_summary(rows: list[dict[str, Any]]) -> str:
    cols = [("model", "{}"), ("ce_clean", "{:.3f}"), ("ce_ablated", "{:.3f}"), ("ce_random_mask", "{:.3f}"),
            ("weight_l1_paper", "{:.4f}"), ("mlp_hoyer", "{:.3f}"), ("selectivity", "{:.3f}"),
            ("localisation_fraction", "{:.3f}"), ("probe_ce_mask", "{:.3f}"), ("probe_ce_random_mask", "{:.3f}")]
    lines = ["  ".join(f"{c:>14}" for c, _ in cols)]
    for row in rows:
        lines.append("  ".join(f"{fmt.format(row[c]) if c in row else '-':>14}" for c, fmt in cols))
    return "\n".join(lines)


def _command(cfg: EvalConfig, checkpoints: list[str]) -> None:
    rows = evaluate_many(checkpoints, cfg)
    print(format_summary(rows))
    print(f"wrote {len(rows)} model JSON file(s) and summary.csv to {cfg.out}")


COMMAND = Command("evaluate", "every evaluation (LM, masks, sparsity, specialisation, localisation, leakage)",
                  _command, (EvalConfig,), (Arg("checkpoints", "checkpoint or run folders", nargs="+"),))
