"""`selfablate circuits`: IOI behaviour, ACDC at tau and over a tau sweep, EAP and EAP-IG, as one
result dict (`report.circuits` writes it out with its drawings)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..checkpoint import load_checkpoint, resolve
from ..config import Device, check_lists, require, require_finite
from ..data.vocab import to_model_ids
from ..model import SelfAblatingTransformer
from .patching import EdgeGraph
from .discovery import acdc, check_answers, eap_ig_scores, eap_scores, kl_with_mask, make_task
from .ioi import IOIBatch, ioi_behaviour, ioi_prompts
from .prompt_file import is_prompt_set, load_prompt_file, why_not_prompt_set


@dataclass(frozen=True)
class CircuitConfig:
    """Options of `selfablate circuits`."""

    out: str = "runs/circuits"
    """Folder for circuit.json, circuit.svg and circuit.png."""
    prompts: str = "templates"
    """IOI prompts: templates (generated from TinyStories-style templates), authors (the paper
    authors' 1,000 prompts, shipped), or the path of a prompt file in auto-circuit's format."""
    pairs: int = 64
    """Prompt pairs generated from the templates."""
    seed: int = 0
    """Seed of the template generator."""
    split: tuple[int, ...] = (128, 128)
    """Prompt pairs of a prompt file for discovery (train) and for behaviour on unseen prompts
    (test), after auto-circuit's shuffle (the authors': 128, 128)."""
    batch: int = 64
    """Prompt pairs of a prompt file's train split that discovery reads: the first batch, as
    auto-circuit's ACDC reads only the first batch of its loader (the authors: 64 of 128)."""
    bos: bool = False
    """Start every prompt with <|endoftext|>. The authors' loader prepends it, but their
    TransformerLens model masks it as padding, so without it is their protocol."""
    tau: float = 0.03
    """ACDC threshold on the KL increase (the paper: 0.03)."""
    sweep: tuple[float, ...] = (0.003, 0.01, 0.1)
    """More ACDC thresholds for the faithfulness-vs-edges curve (empty: none)."""
    acdc_batch: int = 0
    """Edges ACDC tries in one batched pass, speculating that each is pruned (the same edges as one
    at a time; see `discovery.acdc`). 0: one on the CPU, whose one-edge pass skips every node the
    patch cannot change, and 32 on a GPU, where a small pass costs its kernel launches."""
    cuda_graph: bool = True
    """On CUDA: record ACDC's batched pass once per start layer as a CUDA graph and replay it
    (`discovery.FixedShapeTrials`), one launch a pass. Ignored elsewhere."""
    ig_steps: int = 5
    """Integration steps of EAP-IG."""
    top_edges: int = 50
    """Edges per EAP ranking written out."""
    device: Device = "auto"
    """Device to run on."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        require_finite(self)
        check_lists(self)
        require(all(t >= 0 for t in self.sweep), f"every tau of sweep must be >= 0, got {self.sweep}")
        require(self.pairs >= 2 and self.batch >= 2, f"pairs and batch must be >= 2, got {self.pairs}, {self.batch}")
        require(self.pairs <= 100_000, f"pairs must be at most 100,000 (ACDC patches every edge over all of "
                                       f"them), got {self.pairs}")
        require(len(self.split) == 2 and self.split[0] >= 2 and self.split[1] >= 0,
                f"split must be two numbers, train >= 2 and test >= 0; got {self.split}")
        require(is_prompt_set(self.prompts), f"prompts must be templates, authors or a prompt file: "
                                             f"{why_not_prompt_set(self.prompts)}")
        require(self.tau >= 0, f"tau must be >= 0, got {self.tau}")
        require(1 <= self.ig_steps <= 1000, f"ig_steps must be in 1..1000 (a backward pass each), got {self.ig_steps}")
        require(self.top_edges >= 1, f"top_edges must be >= 1, got {self.top_edges}")
        require(0 <= self.acdc_batch <= 1024, f"acdc_batch must be in 0..1024 (0: by device), got {self.acdc_batch}")
        require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")

    def taus(self) -> list[float]:
        return sorted({self.tau, *self.sweep})

    def acdc_batch_on(self, device: torch.device) -> int:
        return self.acdc_batch or (1 if device.type == "cpu" else 32)


def behaviour(model: SelfAblatingTransformer, batch: IOIBatch) -> dict[str, Any]:
    """IOI logit difference, accuracy and p(IO) of the clean and the ablated stream: one forward
    pass (no circuit task, whose patching caches this does not need)."""
    check_answers(model, batch)
    device = model.wte.weight.device
    ids = lambda t: to_model_ids(model, t.to(device))  # noqa: E731
    with torch.no_grad():
        out = model(ids(batch.clean))
    rows, last, io, s = torch.arange(len(batch.last), device=device), batch.last.to(device), ids(batch.io), ids(batch.s)
    res = {"clean": ioi_behaviour(out.logits_clean[rows, last], io, s)._asdict()}
    if out.logits_ablated is not None:
        res["ablated"] = ioi_behaviour(out.logits_ablated[rows, last], io, s)._asdict()
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


def prompt_batches(cfg: CircuitConfig) -> tuple[IOIBatch, IOIBatch | None]:
    """The prompts circuits are found on (of a prompt file: the first batch of its train split), and
    held-out ones (a prompt file's test split)."""
    if cfg.prompts == "templates":
        return ioi_prompts(cfg.pairs, cfg.seed, bos=cfg.bos), None
    split = load_prompt_file(cfg.prompts, (cfg.split[0], cfg.split[1]), cfg.bos)
    return split.train.rows(0, cfg.batch), split.test


def run_circuits(checkpoint: str, cfg: CircuitConfig, device: torch.device) -> dict[str, Any]:
    t0 = time.perf_counter()
    model = load_checkpoint(checkpoint, device=device).eval()
    batch, test = prompt_batches(cfg)
    task = make_task(model, batch)
    g = task.graph
    with torch.no_grad():
        kl_empty = kl_with_mask(task, torch.ones(g.n_edges, device=task.clean.device)).item()
    runs, trials = {}, cfg.acdc_batch_on(task.clean.device)
    graphed = cfg.cuda_graph and device.type == "cuda"
    for tau in cfg.taus():
        t = time.perf_counter()
        r = acdc(task, tau, cfg.progress, batch=trials, fixed_shape=graphed)
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
        "graph": {"sources": g.n_sources, "edges": g.n_edges}, "ioi": behaviour(model, batch),
        "ioi_test": behaviour(model, test) if test is not None and len(test.texts) else None,
        "prompts": {"discovery": len(batch.texts), "held_out": len(test.texts) if test is not None else 0},
        "prompts_sample": batch.texts[:4], "kl_all_edges_patched": kl_empty,
        "acdc": {"tau": cfg.tau, "edges": main["edges"], "kl": main["kl"], "seconds": main["seconds"], "batch": trials,
                 "cuda_graph": graphed,
                 "circuit": main["circuit"]},
        "sweep": list(runs.values()),
        "faithfulness_auc": faithfulness_auc([(r["edges"], r["kl"]) for r in runs.values()], g.n_edges, kl_empty),
        "eap": {"seconds": eap_seconds, "top": ranked(g, eap, cfg.top_edges)},
        "eap_ig": {"steps": cfg.ig_steps, "sum": float(ig.sum()), "top": ranked(g, ig, cfg.top_edges)},
        "seconds": time.perf_counter() - t0,
    }
