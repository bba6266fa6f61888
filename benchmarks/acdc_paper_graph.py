"""Time ACDC and EAP on the paper's edge graph (8 layers x 16 heads: 23,981 edges, 64 IOI prompts).

No paper-scale trained model exists on a CPU machine, so the model is the paper architecture with
random weights perturbed away from their initialisation (so that edges matter), and tau is 1% of
the KL of the fully patched model: this measures the algorithm's speed, not a circuit.

    python benchmarks/acdc_paper_graph.py [--checkpoint DIR] [--tau T]
"""

import argparse
import time

import torch

from selfablate import ModelConfig, SelfAblatingTransformer, load_checkpoint
from selfablate.circuits.discovery import acdc, eap_scores, kl_with_mask, make_task
from selfablate.circuits.ioi import ioi_prompts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="")
    p.add_argument("--tau", type=float, default=0.0, help="0: 1%% of the fully patched KL")
    p.add_argument("--prompts", type=int, default=64)
    args = p.parse_args()
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint).eval()
    else:
        torch.manual_seed(0)
        model = SelfAblatingTransformer(ModelConfig(ablation="none")).eval()
        with torch.no_grad():
            for name, w in model.named_parameters():
                if "blocks" in name:
                    w.add_(torch.randn_like(w) * 0.1)
    task = make_task(model, ioi_prompts(args.prompts))
    kl_all = kl_with_mask(task, torch.ones(task.graph.n_edges)).item()
    tau = args.tau or kl_all / 100
    t0 = time.perf_counter()
    eap_scores(task)
    print(f"EAP over {task.graph.n_edges} edges: {time.perf_counter() - t0:.2f} s")
    t0 = time.perf_counter()
    r = acdc(task, tau, progress=True)
    kept = int((r.mask == 0).sum())
    print(f"ACDC tau={tau:.4g} (KL all patched {kl_all:.4g}): {kept} edges kept, KL {r.kl:.4g}, "
          f"{time.perf_counter() - t0:.0f} s for {task.graph.n_edges} edges")


if __name__ == "__main__":
    main()
