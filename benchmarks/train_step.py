"""Training-step throughput at the paper's architecture, measured side by side in one run.

Contenders (8 layers x 128, 16 heads, d_mlp 512, vocab 50257, context 256, batch 8 x 256 tokens,
AdamW, float32, this machine's threads): (a) our baseline, (b) our local and (c) our global
self-ablating model, each a full `selfablate.train.train_step`; (d) `transformers`'
GPTNeoForCausalLM of the same shape (the clean half of the work only); (e) the float32 GEMM peak,
through torch.mm and (CPU) through oneDNN, which on AMD CPUs runs AVX-512 at full width where
torch.mm's MKL does not (2.2x on this machine's Zen 5 cores): MFU is taken against the higher, and
printed against torch.mm's too.
Each contender lives in a worker process of its own, and the workers take turns, round by round;
the median over rounds is reported. Each turn starts with untimed warm-up steps: GPT-Neo, which
maps and frees about 1.5 GB a step for its logits, runs up to 2x slower for the first few steps
after another process has run (ours barely change), so timing it right after a switch would
understate what it does in a training run of its own. Every worker keeps freed memory in the
process (`selfablate.perf.keep_freed_memory`, which `selfablate train` applies). Peak memory is
each worker's own high-water mark (VmHWM) and its rise over the RSS after set-up.

    python benchmarks/train_step.py [--rounds 4] [--warmup 3] [--steps 3]     # needs `pip install transformers`
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from selfablate import ModelConfig, SelfAblatingTransformer
from selfablate.config import TrainConfig
from selfablate.perf import gemm_peaks, keep_freed_memory, train_flops_per_token
from selfablate.train import autocast_for, make_optimizer, train_step

from gpt_neo import gpt_neo_step

BATCH, POS = 8, 256
ORIGINAL = {"local": 180.0, "global": 135.0}  # the original research code, tokens/s, as reported to this project (not measured here)


def ours(ablation: str, **model_kw):
    """A full training step of our model at the paper's architecture (model_kw overrides)."""
    cfg = ModelConfig(ablation=ablation, **model_kw)
    model = SelfAblatingTransformer(cfg).train()
    tcfg = TrainConfig(warmup_steps=1)
    opt = make_optimizer(model, tcfg)
    batch = (torch.randint(0, cfg.vocab_size, (BATCH, POS)), torch.randint(0, cfg.vocab_size, (BATCH, POS)))
    steps = iter(range(10**9))
    autocast = autocast_for(torch.device("cpu"), "float32")
    return lambda: train_step(model, opt, batch, next(steps), tcfg, torch.device("cpu"), autocast)


def gpt_neo():
    return gpt_neo_step(ModelConfig(n_ctx=POS), BATCH, POS)


CONTENDERS = {"baseline": lambda: ours("none"), "local": lambda: ours("local"), "global": lambda: ours("global"),
              "gpt-neo": gpt_neo}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """VmHWM, the high-water mark of this process's own memory (ru_maxrss would carry over the
    parent's peak across fork + exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def worker(name: str) -> None:
    """Serve one contender: after set-up and a warm-up step, each line "N" on stdin runs N steps
    and answers their seconds; end of input answers the memory figures."""
    keep_freed_memory()  # as `selfablate train` does (TrainConfig.keep_freed_memory); the same for GPT-Neo
    step = CONTENDERS[name]()
    setup = rss_mb()
    step()
    print("ready", flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter()
        for _ in range(int(line)):
            step()
        print(time.perf_counter() - t0, flush=True)
    print(json.dumps({"setup_mb": setup, "peak_mb": peak_rss_mb()}), flush=True)


class Worker:
    """The parent's handle on one contender's worker process."""

    def __init__(self, name: str):
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", name], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.expect("ready")

    def expect(self, word: str) -> None:
        line = self.proc.stdout.readline().strip()
        if line != word:
            raise RuntimeError(f"worker said {line!r} instead of {word!r}")

    def run(self, steps: int) -> float:
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> dict[str, float]:
        self.proc.stdin.close()
        memory = json.loads(self.proc.stdout.readline())
        self.proc.wait()
        return memory


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each turn")
    p.add_argument("--steps", type=int, default=3, help="timed steps per contender per round")
    p.add_argument("--worker", default="")
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {BATCH} x {POS} tokens, paper architecture; "
          f"each turn {args.warmup} warm-up + {args.steps} timed steps")
    workers = {name: Worker(name) for name in CONTENDERS}
    speeds: dict[str, list[float]] = {n: [] for n in workers}
    peaks: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for backend, flops in gemm_peaks().items():
            peaks.setdefault(backend, []).append(flops)
        for name, w in workers.items():
            w.run(args.warmup)
            speeds[name].append(args.steps * BATCH * POS / w.run(args.steps))
        print(f"round {r + 1}: " + ", ".join(f"{n} {s[-1]:.0f} tok/s" for n, s in speeds.items()), flush=True)
    memory = {name: w.close() for name, w in workers.items()}
    peak = {backend: statistics.median(p) for backend, p in peaks.items()}
    best = max(peak.values())
    neo = statistics.median(speeds["gpt-neo"])
    print(f"\nfloat32 GEMM peak (2048^3 matmul, median of {args.rounds}): "
          + ", ".join(f"{backend} {flops / 1e9:.1f} GFLOP/s" for backend, flops in peak.items())
          + "; MFU is against the highest, MFU(mm) against torch.mm's")
    print(f"{'contender':<10} {'tok/s':>8} {'vs GPT-Neo':>11} {'MFLOP/tok':>10} {'MFU':>6} {'MFU(mm)':>8} "
          f"{'peak RSS MB':>12} {'step +MB':>9}")
    for name, s in speeds.items():
        tps = statistics.median(s)
        cfg = ModelConfig(ablation={"baseline": "none", "gpt-neo": "none"}.get(name, name))
        flops = train_flops_per_token(cfg, POS)
        mem = memory[name]
        print(f"{name:<10} {tps:>8.0f} {tps / neo:>10.2f}x {flops / 1e6:>10.1f} {tps * flops / best:>6.1%} "
              f"{tps * flops / peak['torch.mm']:>8.1%} {mem['peak_mb']:>12.0f} {mem['peak_mb'] - mem['setup_mb']:>9.0f}")
    for name, ref in ORIGINAL.items():
        print(f"{name} vs the original research code's {ref:.0f} tok/s (a reported figure, not measured here): "
              f"{statistics.median(speeds[name]) / ref:.2f}x")


if __name__ == "__main__":
    main()
