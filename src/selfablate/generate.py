"""Sampling from either stream, recording which units each generated token used."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .config import Arg, Command, Device, check_choice, require, require_finite
from .errors import SelfAblateError
from .model import SelfAblatingTransformer
from .data.vocab import to_gpt2_ids, to_model_ids, unk_id


class Generated(NamedTuple):
    """A sampled continuation."""

    tokens: list[int]
    """The prompt followed by the new tokens."""
    new_tokens: list[int]
    """Only the sampled tokens."""
    attn_units: list[list[list[int]]] | None
    """For each new token, per layer, the indices of the attention units its prediction kept
    (None for a baseline model)."""
    mlp_units: list[list[list[int]]] | None
    """Likewise for MLP neurons."""


def sample_next(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    """Sample one token id from logits (vocab,); temperature 0 means greedy."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def _units(mask: Tensor) -> list[list[int]]:
    """mask (n_layers, width) -> per layer the indices of kept units."""
    return [row.nonzero().flatten().tolist() for row in mask]


@torch.no_grad()
def generate(model: SelfAblatingTransformer, prompt: list[int], max_new_tokens: int,
             stream: Literal["clean", "ablated"] = "clean", temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0) -> Generated:
    """Autoregressive sampling from the clean or the ablated stream (no KV cache: the ablated
    stream's masks depend on the whole clean prefix, so each step re-runs the window)."""
    if stream == "ablated" and not model.cfg.self_ablating:
        raise ValueError("a baseline model has no ablated stream")
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    tokens = to_model_ids(model, torch.tensor(prompt, dtype=torch.long, device="cpu")).tolist()
    attn_units, mlp_units = [], []
    for _ in range(max_new_tokens):
        window = torch.tensor([tokens[-model.cfg.n_ctx:]], device=device)
        out = model(window)
        logits = (out.logits_ablated if stream == "ablated" else out.logits_clean)[0, -1].cpu()
        if not bool(torch.isfinite(logits).all()):
            raise SelfAblateError("the model's logits are not finite (a diverged checkpoint?): nothing to sample")
        if unk_id(model) is not None:
            logits[unk_id(model)] = float("-inf")  # <unk> stands for many tokens: never sample it
        tokens.append(sample_next(logits, temperature, top_k, gen))
        if out.attn_mask is not None:
            attn_units.append(_units(out.attn_mask[0, -1]))
            mlp_units.append(_units(out.mlp_mask[0, -1]))
    ablating = model.cfg.self_ablating
    tokens = to_gpt2_ids(model, torch.tensor(tokens, device=model.wte.weight.device)).tolist()
    return Generated(tokens, tokens[len(prompt):], attn_units if ablating else None, mlp_units if ablating else None)


@dataclass(frozen=True)
class GenerateOptions:
    """Options of `selfablate generate`."""

    prompt: str = "Once upon a time"
    """Text to continue."""
    max_new_tokens: int = 60
    """Tokens to sample."""
    stream: Literal["clean", "ablated"] = "clean"
    """Which stream's logits to sample from."""
    temperature: float = 0.8
    """Sampling temperature (0: greedy)."""
    top_k: int = 40
    """Sample among the top-k tokens only (0: all)."""
    seed: int = 0
    """Sampling seed."""
    show_units: bool = False
    """Print, for each new token, the units its prediction kept in every layer."""
    device: Device = "auto"
    """Device to run on."""

    def __post_init__(self) -> None:
        require_finite(self)
        require(self.prompt.strip() != "", "prompt must not be empty")
        require("<|endoftext|>" not in self.prompt, "prompt must not hold <|endoftext|> (the story separator)")
        require(1 <= self.max_new_tokens <= 100_000, f"max_new_tokens must be in 1..100,000 (one forward pass "
                                                        f"each), got {self.max_new_tokens}")
        require(math.isfinite(self.temperature) and self.temperature >= 0,
                f"temperature must be a finite number >= 0, got {self.temperature}")
        require(self.top_k >= 0, f"top_k must be >= 0 (0: all), got {self.top_k}")
        require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        check_choice(self, "stream")
        check_choice(self, "device")


def _command(opts: GenerateOptions, checkpoint: str) -> None:
    from .checkpoint import load_checkpoint
    from .data.tokenizer import gpt2_tokenizer
    from .runtime import resolve_device

    model = load_checkpoint(checkpoint, device=resolve_device(opts.device))
    if opts.stream == "ablated" and not model.cfg.self_ablating:
        raise SelfAblateError("this checkpoint is a baseline (ablation=none): it has no ablated stream")
    enc = gpt2_tokenizer()
    out = generate(model, enc.encode(opts.prompt), opts.max_new_tokens, opts.stream, opts.temperature,
                   opts.top_k or None, opts.seed)
    print(opts.prompt + enc.decode(out.new_tokens))
    if opts.show_units and out.attn_units is not None:
        print(format_units(enc, out))


def format_units(enc, out) -> str:
    """One line per generated token: per layer the kept attention units (a) and neurons (m)."""
    lines = []
    for tok, attn, mlp in zip(out.new_tokens, out.attn_units, out.mlp_units):
        layers = "  ".join(f"L{i} a{_short(a)} m{_short(m)}" for i, (a, m) in enumerate(zip(attn, mlp)))
        lines.append(f"{enc.decode([tok])!r:>14}  {layers}")
    return "\n".join(lines)


def _short(units: list[int], shown: int = 6) -> str:
    more = f",+{len(units) - shown}" if len(units) > shown else ""
    return "[" + ",".join(map(str, units[:shown])) + more + "]"


COMMAND = Command("generate", "sample text from the clean or ablated stream", _command, (GenerateOptions,),
                  (Arg("checkpoint", "checkpoint folder (or a run folder holding checkpoint/)"),))
