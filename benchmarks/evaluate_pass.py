"""The evaluation pass's host traffic, counted on the CPU: how often `selfablate evaluate` makes
the host wait for the device while it reads held-out text.

On a GPU each such read (a tensor handed to Python or copied to the host, a value read as a number)
stalls the launch queue until the device catches up; with a small model that, not arithmetic, sets
the pace. This runs `eval.evaluate.one_pass` (the forward passes, the random-mask control, and every
accumulator's update) on a randomly initialised model of a preset over the bundled sample's held-out
split, on the PyTorch path CUDA takes, and counts, with `benchmarks/launches.py`'s counters, host
syncs and reads per batch, then the time of the same pass on this CPU.

    python benchmarks/evaluate_pass.py [--preset cpu-small] [--tokens 16384] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from selfablate import SelfAblatingTransformer
from selfablate.config import get_preset
from selfablate.data.dataset import TokenWindows, tokenize_split
from selfablate.data.sources import resolve_source
from selfablate.data.vocab import token_lookup
from selfablate.eval.evaluate import EvalConfig, one_pass

from launches import Counter, MethodCounter, torch_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    mc = get_preset(args.preset)[0]
    torch.manual_seed(0)
    model = SelfAblatingTransformer(mc).eval()
    raw = tokenize_split(resolve_source(""), "valid", progress=False)
    windows = TokenWindows(raw, mc.n_ctx, token_lookup(model))
    n_windows = min(windows.num_sequential(), args.tokens // mc.n_ctx)
    cfg = EvalConfig(out="", batch_size=args.batch_size, progress=False)
    batches = windows.num_batches(cfg.batch_size, n_windows)
    counter = Counter()
    with torch_path(), counter, MethodCounter(counter.syncs):
        one_pass(model, windows, cfg, n_windows)
    t0 = time.perf_counter()
    one_pass(model, windows, cfg, n_windows)
    seconds = time.perf_counter() - t0
    syncs = ", ".join(f"{n} {k}" for n, k in counter.syncs.most_common()) or "none"
    print(f"torch {torch.__version__}; evaluate's pass over {n_windows * mc.n_ctx:,} held-out tokens "
          f"({batches} batches of {cfg.batch_size} x {mc.n_ctx}), a random {args.preset} model, {mc.ablation}")
    print(f"host syncs and reads: {sum(counter.syncs.values())} ({sum(counter.syncs.values()) / batches:.1f} a batch): "
          f"{syncs}")
    print(f"operator launches: {sum(counter.launches.values()):,}; time on this CPU: {seconds:.2f} s")


if __name__ == "__main__":
    main()
