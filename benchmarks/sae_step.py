"""SAE training's GPU-shaped cost, counted on the CPU: operator launches and host syncs per step.

`sae.train.train_sae` on a random model of the paper's architecture (its clean
`blocks.6.hook_mlp_out`, 16x expansion, 4,096 activations a step) over the bundled sample, on the
PyTorch path CUDA takes, counted with `benchmarks/launches.py`'s counters over --steps steps
(refills of the activation buffer included), then timed on this CPU. Syncs are also given by
the line that made them: on CUDA, Adam's step counters and the window sampler's indices live on the
host, so their reads (counted here, where everything is on the host) do not wait for the GPU.

    python benchmarks/sae_step.py [--steps 64]
"""

from __future__ import annotations

import argparse
import collections
import time
import traceback

import torch

from selfablate import ModelConfig, SelfAblatingTransformer
from selfablate.data.dataset import TokenWindows, tokenize_split
from selfablate.data.sources import resolve_source
from selfablate.data.vocab import token_lookup
from selfablate.sae.train import SAETrainConfig, train_sae

from launches import SYNC_METHODS, SYNC_OPS, Counter, MethodCounter, torch_path

SITES: collections.Counter[str] = collections.Counter()
"""Host syncs and reads by the innermost selfablate or torch.optim line that made them."""


def note_site() -> None:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "selfablate" in frame.filename or "torch/optim" in frame.filename:
            SITES[f"{frame.filename.split('/')[-1]}:{frame.lineno} ({frame.name})"] += 1
            return


class SiteCounter(Counter):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNC_OPS:
            note_site()
        return super().__torch_dispatch__(func, types, args, kwargs)


class SiteMethodCounter(MethodCounter):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in SYNC_METHODS and args and isinstance(args[0], torch.Tensor):
            note_site()
        return super().__torch_function__(func, types, args, kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args()
    torch.manual_seed(0)
    model = SelfAblatingTransformer(ModelConfig(ablation="local")).eval()
    windows = TokenWindows(tokenize_split(resolve_source(""), "train", progress=False), model.cfg.n_ctx,
                           token_lookup(model))
    cfg = SAETrainConfig(hook="blocks.6.hook_mlp_out", steps=args.steps, progress=False)
    counter = SiteCounter()
    with torch_path(), counter, SiteMethodCounter(counter.syncs):
        train_sae(model, windows, cfg)
    t0 = time.perf_counter()
    train_sae(model, windows, cfg)
    seconds = time.perf_counter() - t0
    syncs = ", ".join(f"{n} {k}" for n, k in counter.syncs.most_common()) or "none"
    launches = sum(counter.launches.values())
    print(f"torch {torch.__version__}; train_sae, {args.steps} steps of {cfg.batch_tokens} activations "
          f"(pool {cfg.pool_tokens:,}), paper architecture, random weights")
    print(f"host syncs and reads: {sum(counter.syncs.values())} ({sum(counter.syncs.values()) / args.steps:.2f} a step): {syncs}")
    print("  by line: " + ", ".join(f"{n} {site}" for site, n in SITES.most_common(6)))
    print(f"operator launches: {launches:,} ({launches / args.steps:.0f} a step); top: "
          + ", ".join(f"{n} {k}" for k, n in counter.launches.most_common(8)))
    print(f"time on this CPU: {seconds:.2f} s ({args.steps / seconds:.1f} steps/s, buffer fills included)")


if __name__ == "__main__":
    main()
