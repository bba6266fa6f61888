"""The three evaluations of a grid model on the device, for `benchmarks/gpu.py`'s table.

Each function takes the device, whether this is a --smoke run (a tiny model on the CPU) and a
scratch folder (`circuits` and `sae` also whether the command may replay CUDA graphs, its default;
ignored off CUDA), and returns a dict of figures plus "line", one sentence for the table. The
model is the paper's architecture (local ablation) with random weights nudged away from their
initialisation so that edges matter, saved as a checkpoint so that the commands' own entry points
run:

- `circuits`: `circuits.run.run_circuits` on the authors' prompts at tau 0.03 and no sweep (one
  threshold, as `selfablate circuits --prompts authors --sweep ""`), ACDC trying 32 edges a pass;
  with graphs, then the one-edge pass (ACDC's batch 1) timed on 64 edges spread over the graph,
  times the edge count, as an estimate of batch 1 (its full run is minutes on a GPU);
- `evaluate`: `eval.evaluate.evaluate_checkpoint` over 131,072 held-out tokens;
- `sae`: `sae.train.train_sae` at 4,096 activations a step, steps/s from the difference of a
  short and a long run (so the buffer's first fill and the set-up cancel).

On CUDA, host syncs are counted with `torch.cuda.set_sync_debug_mode` (each sync warns once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import tempfile
import time
import warnings
from pathlib import Path

import torch

from selfablate import ModelConfig, SelfAblatingTransformer, save_checkpoint
from selfablate.circuits import discovery
from selfablate.circuits.ioi import ioi_prompts
from selfablate.circuits.run import CircuitConfig, run_circuits
from selfablate.data.dataset import TokenWindows, tokenize_split
from selfablate.data.sources import resolve_source
from selfablate.data.vocab import token_lookup
from selfablate.eval.evaluate import EvalConfig, evaluate_checkpoint
from selfablate.sae.train import SAETrainConfig, train_sae

from random_model import nudged
from timing import sync

SMOKE_ARCH = dict(n_ctx=64, d_model=32, n_layers=2, n_heads=4, d_mlp=64, k_attn=8, k_mlp=8)
"""A tiny model with the GPT-2 vocabulary (the IOI prompts and the sample need it)."""


def nudged_model(device: torch.device, smoke: bool) -> SelfAblatingTransformer:
    """The paper's architecture (or SMOKE_ARCH), random, `nudged` away from its initialisation."""
    torch.manual_seed(0)
    cfg = ModelConfig(ablation="local", init="torch-default", **(SMOKE_ARCH if smoke else {}))
    with torch.device("cpu"):
        model = nudged(SelfAblatingTransformer(cfg))
    return model.to(device).eval()


@contextlib.contextmanager
def counted_syncs(device: torch.device):
    """Yields a one-item list that holds, on exit, the host syncs made inside (None off CUDA)."""
    count: list[int | None] = [None]
    if device.type != "cuda":
        yield count
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield count
        finally:
            torch.cuda.set_sync_debug_mode("default")
    count[0] = sum("synchroniz" in str(w.message) for w in caught)


def circuits(device: torch.device, smoke: bool, folder: Path, graphs: bool) -> dict:
    model = nudged_model(device, smoke)
    save_checkpoint(model, folder / "model")
    cfg = CircuitConfig(out=str(folder / "circuits"), prompts="authors", sweep=(), acdc_batch=32, progress=False,
                        cuda_graph=graphs)
    with counted_syncs(device) as syncs:
        r = run_circuits(str(folder / "model"), cfg, device)
    acdc, how = r["acdc"], "graphed" if r["acdc"]["cuda_graph"] else "eager"
    out = {"kept": acdc["edges"], "acdc_seconds": acdc["seconds"], "batch": acdc["batch"], "graphed": acdc["cuda_graph"],
           "command_seconds": r["seconds"], "eap_seconds": r["eap"]["seconds"], "syncs": syncs[0]}
    out["line"] = (f"circuits --prompts authors --sweep '': ACDC tau 0.03 at batch 32, {how}, {acdc['seconds']:.1f} s "
                   f"({acdc['edges']} kept), command {r['seconds']:.1f} s, host syncs {syncs[0]}")
    if graphs:
        out.update(one_edge_pass(model, device, smoke))
        out["line"] += (f"; one-edge pass over {out['edges']:,} edges {out['one_edge_pass_ms']:.2f} ms, so batch 1 "
                        f"about {out['batch1_estimate_seconds']:.0f} s")
    return out


def one_edge_pass(model: SelfAblatingTransformer, device: torch.device, smoke: bool) -> dict:
    """ACDC's one-edge pass (batch 1, eager) timed on 64 edges spread over the graph."""
    task = discovery.make_task(model, ioi_prompts(8 if smoke else 64))
    n = task.graph.n_edges
    mask = torch.zeros(n, dtype=task.clean_logp.dtype, device=device)
    picks = torch.linspace(0, n - 1, min(64, n)).long().tolist()
    discovery.trial_kls(task, mask, picks[:1])  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for e in picks:
        discovery.trial_kls(task, mask, [e])
    sync(device)
    one_edge = (time.perf_counter() - t0) / len(picks)
    return {"edges": n, "one_edge_pass_ms": one_edge * 1e3, "batch1_estimate_seconds": one_edge * n}


def evaluate(device: torch.device, smoke: bool, folder: Path) -> dict:
    save_checkpoint(nudged_model(device, smoke), folder / "model")
    tokens = 4096 if smoke else 131072
    cfg = EvalConfig(out=str(folder / "eval"), max_tokens=tokens, progress=False)
    t0 = time.perf_counter()
    with counted_syncs(device) as syncs:
        r = evaluate_checkpoint(folder / "model", cfg, device)
    seconds = time.perf_counter() - t0
    out = {"tokens": r["data"]["tokens"], "seconds": seconds, "syncs": syncs[0]}
    out["line"] = f"evaluate --max-tokens {tokens}: {seconds:.1f} s, host syncs {syncs[0]}"
    return out


def sae(device: torch.device, smoke: bool, folder: Path, graphs: bool) -> dict:
    model = nudged_model(device, smoke)
    windows = TokenWindows(tokenize_split(resolve_source(""), "train", progress=False), model.cfg.n_ctx,
                           token_lookup(model))
    short, extra = (5, 20) if smoke else (50, 1000)
    base = SAETrainConfig(out=str(folder / "sae"), hook=f"blocks.{3 * model.cfg.n_layers // 4}.hook_mlp_out",
                          progress=False, cuda_graph=graphs)
    seconds = []
    for steps in (short, short + extra):
        t0 = time.perf_counter()
        with counted_syncs(device) as syncs:
            train_sae(model, windows, dataclasses.replace(base, steps=steps))
        sync(device)
        seconds.append(time.perf_counter() - t0)
    rate = extra / max(seconds[1] - seconds[0], 1e-9)
    out = {"steps_per_s": rate, "batch_tokens": base.batch_tokens, "seconds": seconds, "syncs_long_run": syncs[0]}
    how = "graphed" if graphs and device.type == "cuda" else "eager"
    out["line"] = (f"sae train, {base.batch_tokens} activations a step, {how}: {rate:,.0f} steps/s "
                   f"({short} and {short + extra} steps: {seconds[0]:.1f} s, {seconds[1]:.1f} s; "
                   f"host syncs in the longer run {syncs[0]})")
    return out


def run(name: str, device: torch.device, smoke: bool, graphs: bool = True) -> dict:
    """One of circuits, evaluate, sae, in a scratch folder; graphs=False: the command's eager path."""
    with tempfile.TemporaryDirectory() as tmp:
        fns = {"circuits": functools.partial(circuits, graphs=graphs), "evaluate": evaluate,
               "sae": functools.partial(sae, graphs=graphs)}
        return fns[name](device, smoke, Path(tmp))
