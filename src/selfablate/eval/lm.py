"""Language-modelling evaluation: token-weighted cross-entropy of both streams."""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from typing import Iterable, Literal, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..config import Arg, Command, Device, check_choice, require
from ..model import SelfAblatingTransformer
from ..runtime import wide


class LossEval(NamedTuple):
    """Mean next-token cross-entropy (nats/token) over `tokens` predicted tokens."""

    clean: float
    ablated: float | None
    """None for a baseline model."""
    tokens: int

    @property
    def ppl_clean(self) -> float:
        return math.exp(self.clean)

    @property
    def ppl_ablated(self) -> float | None:
        return None if self.ablated is None else math.exp(self.ablated)


@torch.no_grad()
def evaluate_loss(model: SelfAblatingTransformer, batches: Iterable[tuple[Tensor, Tensor]],
                  device: torch.device | str = "cpu", autocast=contextlib.nullcontext,
                  progress: bool = False, total: int | None = None) -> LossEval:
    """Token-weighted mean CE of the clean and ablated streams over all given batches:
    CE = sum over every predicted token of -log p(target) / number of predicted tokens.
    (Each batch's mean is weighted by its token count; sums accumulate in float64.)"""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    # Sums stay on the device until the end (one read, not one per batch); MPS has no float64.
    sums = wide(torch.zeros(2, device=device))
    n = 0
    for x, y in tqdm(batches, desc="evaluating", total=total, disable=not progress, leave=False):
        x, y = x.to(device), y.to(device)
        with autocast():
            out = model(x, y, return_logits=False, return_masks=False)
        sums[0] += out.loss_clean.to(sums.dtype) * y.numel()
        if out.loss_ablated is not None:
            sums[1] += out.loss_ablated.to(sums.dtype) * y.numel()
        n += y.numel()
    model.train(was_training)
    clean, ablated = (sums / max(n, 1)).tolist()
    return LossEval(clean, ablated if model.cfg.self_ablating else None, n)


def unigram_entropy(tokens) -> float:
    """Entropy of the empirical unigram distribution, in nats: H = -sum_v p_v log p_v with
    p_v = count(v) / N. A model that ignores context can do no better on the same text."""
    import numpy as np

    counts = np.bincount(np.asarray(tokens, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


UNKNOWN_WARNING = 0.05
"""eval-loss warns when more than this share of the tokens are <unk> to the model."""


@dataclass(frozen=True)
class EvalLossOptions:
    """Options of `selfablate eval-loss`."""

    data: str = ""
    """Data source (as for train); empty: the default."""
    split: Literal["valid", "train"] = "valid"
    """Which split to evaluate."""
    batch_size: int = 32
    """Sequences per batch."""
    max_batches: int = 0
    """Stop after this many batches; 0 evaluates the whole split."""
    device: Device = "auto"
    """Device to run on."""
    json: bool = False
    """Print the result as JSON."""

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.max_batches >= 0, f"max_batches must be >= 0 (0: the whole split), got {self.max_batches}")
        check_choice(self, "split")
        check_choice(self, "device")


def _command(opts: EvalLossOptions, checkpoint: str) -> None:
    import json

    from ..checkpoint import load_checkpoint
    from ..data.dataset import TokenWindows, tokenize_split
    from ..data.sources import resolve_source
    from ..data.vocab import token_lookup, unknown_share
    from ..runtime import resolve_device

    device = resolve_device(opts.device)
    model = load_checkpoint(checkpoint, device=device)
    windows = TokenWindows(tokenize_split(resolve_source(opts.data), opts.split), model.cfg.n_ctx, token_lookup(model),
                           opts.split)
    limit = opts.max_batches * opts.batch_size if opts.max_batches else None
    unk = unknown_share(windows.lookup, windows.tokens[: None if limit is None else limit * model.cfg.n_ctx + 1])
    if unk > UNKNOWN_WARNING:
        print(f"selfablate: warning: {unk:.1%} of these tokens are <unk> to this model (its compact vocabulary, "
              "from its training data, lacks them): the loss is not comparable with other data's", file=sys.stderr)
    result = evaluate_loss(model, windows.sequential_batches(opts.batch_size, limit), device, progress=True,
                           total=windows.num_batches(opts.batch_size, limit))
    if opts.json:
        print(json.dumps({**result._asdict(), "ppl_clean": result.ppl_clean, "ppl_ablated": result.ppl_ablated,
                          "unk_share": unk}))
        return
    print(f"{opts.split}: {result.tokens} tokens ({unk:.1%} <unk>); clean CE {result.clean:.4f} "
          f"(ppl {result.ppl_clean:.2f})")
    if result.ablated is not None:
        print(f"{opts.split}: ablated CE {result.ablated:.4f} (ppl {result.ppl_ablated:.2f})")


COMMAND = Command("eval-loss", "clean/ablated cross-entropy over a whole split", _command, (EvalLossOptions,),
                  (Arg("checkpoint", "checkpoint folder (or a run folder holding checkpoint/)"),))
