"""Time ACDC and EAP on the paper's edge graph (8 layers x 16 heads: 23,981 edges, 64 IOI prompts).

No paper-scale trained model exists on a CPU machine, so the model is the paper architecture with
random weights perturbed away from their initialisation (so that edges matter), and tau is 1% of
the KL of the fully patched model: this measures the algorithm's speed, not a circuit.

`--batch 1,32` runs ACDC once per batch size (edges tried per pass, `acdc(..., batch=)`) and checks
that every run keeps the first run's edges; each pass reads its KLs back to the host once, so the
passes column is also the count of host reads. `--layers`/`--heads` shrink the graph.

`--launches 32` counts instead, on PyTorch's path (`benchmarks/launches.py`'s counter), the aten
operators of one batched pass of 32 edges into each layer: the eager pass (what CUDA launches one
by one) and the dense pass that CUDA records once as a graph and replays in one launch
(`discovery.fixed_trial_kls`). The counts do not depend on the prompts, so few will do.

    python benchmarks/acdc_paper_graph.py [--checkpoint DIR] [--tau T] [--batch 1,32] [--layers 8 --heads 16]
    python benchmarks/acdc_paper_graph.py --launches 32 --prompts 4
"""

import argparse
import dataclasses
import time

import torch

from selfablate import ModelConfig, SelfAblatingTransformer, load_checkpoint
from selfablate.circuits import discovery
from selfablate.circuits.discovery import acdc, eap_scores, fixed_trial_kls, kl_with_mask, make_task, trial_kls
from selfablate.circuits.ioi import ioi_prompts

from launches import Counter, MethodCounter, torch_path
from random_model import nudged


def counted_acdc(task, tau: float, batch: int):
    """ACDC, its time and its passes (calls of the batched or one-edge KL)."""
    inner, calls = discovery._trial_kls, [0]

    def counting(*a):
        calls[0] += 1
        return inner(*a)

    discovery._trial_kls = counting
    try:
        t0 = time.perf_counter()
        r = acdc(task, tau, progress=False, batch=batch)
        return r, time.perf_counter() - t0, calls[0]
    finally:
        discovery._trial_kls = inner


def pass_launches(task, batch: int) -> None:
    """Print, per start layer, the operators and host reads of one pass of `batch` edges into it."""
    print(f"one pass of {batch} edges into each layer: aten operators and host reads, PyTorch's path")
    mask = torch.zeros(task.graph.n_edges, dtype=task.clean_logp.dtype)
    layers = task.graph.edge_layers
    for start in range(task.model.cfg.n_layers):
        edges = [e for e in reversed(range(task.graph.n_edges)) if layers[e] == start][-batch:]
        tried = torch.tensor(edges)
        counts = {}
        for name, fn in (("eager", lambda: trial_kls(task, mask, edges).tolist()),
                         ("dense", lambda: fixed_trial_kls(task, mask, tried, start).tolist())):
            c = Counter()
            with torch_path(), c, MethodCounter(c.syncs):
                fn()
            counts[name] = (sum(c.launches.values()), sum(c.syncs.values()))
        (e_ops, e_reads), (d_ops, d_reads) = counts["eager"], counts["dense"]
        print(f"  start layer {start}: eager {e_ops} operators, {e_reads} host read(s); dense {d_ops} operators "
              f"recorded once, replayed as 1 graph launch, {d_reads} host read(s)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="")
    p.add_argument("--tau", type=float, default=0.0, help="0: 1%% of the fully patched KL")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch", default="1", help="comma-separated ACDC batch sizes")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--launches", type=int, default=0, help="count one pass of this many edges instead of timing")
    args = p.parse_args()
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint).eval()
    else:
        torch.manual_seed(0)
        cfg = dataclasses.replace(ModelConfig(ablation="none"), n_layers=args.layers, n_heads=args.heads)
        model = nudged(SelfAblatingTransformer(cfg)).eval()
    task = make_task(model, ioi_prompts(args.prompts))
    if args.launches:
        return pass_launches(task, args.launches)
    kl_all = kl_with_mask(task, torch.ones(task.graph.n_edges)).item()
    tau = args.tau or kl_all / 100
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {model.cfg.n_layers} layers x "
          f"{model.cfg.n_heads} heads: {task.graph.n_edges} edges, {args.prompts} prompts")
    t0 = time.perf_counter()
    eap_scores(task)
    print(f"EAP over {task.graph.n_edges} edges: {time.perf_counter() - t0:.2f} s")
    first = None
    for batch in (int(b) for b in args.batch.split(",")):
        r, seconds, passes = counted_acdc(task, tau, batch)
        kept = r.mask == 0
        first = kept if first is None else first
        same = "same edges" if torch.equal(kept, first) else f"{int((kept != first).sum())} edges differ"
        print(f"ACDC tau={tau:.4g} (KL all patched {kl_all:.4g}), batch {batch}: {int(kept.sum())} edges kept, "
              f"KL {r.kl:.4g}, {passes} passes, {seconds:.1f} s ({same} as batch {args.batch.split(',')[0]})")


if __name__ == "__main__":
    main()
