"""The optional compact vocabulary: its speed-up, and the loss it trains to.

1. Speed: the local self-ablating training step at the paper's architecture (batch 8 x 256) with
   GPT-2's 50257 ids and with the compact vocabulary of the shared TinyStories sample (the ids that
   occur in train.txt, plus <unk>), interleaved round by round.
2. Loss: the `cpu-small` preset (local, 4 x 64) trained twice on the same data in the same order,
   once over GPT-2's ids and once over the compact ones; held-out cross-entropy of both streams and
   the training speed of each. The remap itself is exact (tests/test_vocab.py); this shows what it
   does to training. Targets that the compact vocabulary maps to <unk> are counted as that class.

    python benchmarks/compact_vocab.py [--steps 200] [--rounds 3]     # about 4 minutes; 600 steps: 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from selfablate.config import get_preset
from selfablate.data.sources import resolve_source
from selfablate.data.dataset import tokenize_split
from selfablate.data.vocab import CompactVocab
from selfablate.train import train
from timing import interleaved_ms
from train_step import BATCH, POS, ours


def speed(vocab_size: int, rounds: int) -> None:
    steps = {"full (50257 ids)": ours("local"),
             f"compact ({vocab_size} ids)": ours("local", vocab_size=vocab_size, compact_vocab=True)}
    ms = interleaved_ms(steps, rounds)
    (full, f), (compact, c) = ((name, BATCH * POS / (t / 1e3)) for name, t in ms.items())
    print(f"paper architecture, local step, batch {BATCH} x {POS}: {full} {f:.0f} tok/s, {compact} {c:.0f} tok/s "
          f"({c / f:.2f}x; medians of {rounds} alternating steps)")


def trained_loss(compact: bool, steps: int, work: Path) -> dict[str, float]:
    model_cfg, cfg = get_preset("cpu-small")
    model_cfg = dataclasses.replace(model_cfg, compact_vocab=compact)
    out = work / ("compact" if compact else "full")
    cfg = dataclasses.replace(cfg, out=str(out), max_steps=steps, eval_interval=steps, checkpoint_interval=steps,
                              eval_batches=16, progress=False)
    t0 = time.perf_counter()
    result = train(model_cfg, cfg, cache_dir=work / "cache")
    seconds = time.perf_counter() - t0
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tok_s = next(r["tokens_per_s"] for r in reversed(last) if "tokens_per_s" in r)
    return {"clean": result.final_eval.clean, "ablated": result.final_eval.ablated, "tok_s": tok_s, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="cpu-small training steps per model")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_tokens = tokenize_split(resolve_source(""), "train", work / "cache", False)
        vocab = CompactVocab.from_tokens(train_tokens)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; compact vocabulary of the shared "
              f"sample's train split: {vocab.size - 1} ids + <unk>")
        speed(vocab.size, args.rounds)
        runs = {name: trained_loss(name == "compact", args.steps, work) for name in ("full", "compact")}
    print(f"cpu-small, local, {args.steps} steps of 16 x 128 tokens, same seed and data order; held-out CE (nats/token):")
    for name, r in runs.items():
        print(f"  {name:<8} clean {r['clean']:.4f}  ablated {r['ablated']:.4f}   training {r['tok_s']:.0f} tok/s "
              f"({r['seconds']:.0f} s in all)")
    f, c = runs["full"], runs["compact"]
    print(f"  compact - full: clean {c['clean'] - f['clean']:+.4f}, ablated {c['ablated'] - f['ablated']:+.4f}; "
          f"speed {c['tok_s'] / f['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
