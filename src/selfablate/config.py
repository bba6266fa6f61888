"""Typed, frozen configuration for the model and for training, and the named presets.

Every field carries a docstring (the string literal under it); the CLI builds its flags and help
text from these dataclasses (see `selfablate.cli`), so there is no second, hand-kept flag list.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, NamedTuple

from .errors import ConfigError

Ablation = Literal["none", "local", "global", "both"]
MaskFn = Literal["hard", "soft"]
Device = Literal["auto", "cpu", "cuda", "mps"]
"""Where a command runs: auto is CUDA when available, else Apple's MPS, else the CPU."""


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def require_finite(cfg: Any) -> None:
    """Every float field of a config dataclass is a finite number (nan and inf pass no range check)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float):
            require(math.isfinite(value), f"{f.name} must be a finite number, got {value}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a GPT-Neo-style self-ablating transformer (defaults: the paper's model)."""

    vocab_size: int = 50257
    """Vocabulary size (GPT-2 BPE: 50257). With compact_vocab, set from the training data."""
    compact_vocab: bool = False
    """Keep only the GPT-2 ids that occur in the training split, plus one <unk> id (an exact
    remap of the training tokens; the LM head shrinks about 5x on TinyStories)."""
    n_ctx: int = 256
    """Context length: the number of learned position embeddings."""
    d_model: int = 128
    """Width of the residual stream; also the number of attention units per layer."""
    n_layers: int = 8
    """Number of transformer blocks."""
    n_heads: int = 16
    """Attention heads per block; d_head = d_model / n_heads."""
    d_mlp: int = 512
    """MLP hidden width: the number of neurons per layer."""
    ln_eps: float = 1e-5
    """LayerNorm epsilon."""
    attention_window: tuple[int, ...] = ()
    """Per layer, GPT-Neo's local attention: query t sees the keys t - window < j <= t (0: every
    earlier key, as in a global layer). Empty: every layer global (the paper's model); set by
    importing a GPT-Neo model whose layers alternate global and local."""
    init: Literal["gpt-neo", "torch-default"] = "gpt-neo"
    """gpt-neo: weights and embeddings N(0, init_std), biases zero; torch-default: the authors' model,
    where each module keeps PyTorch's own initialisation (Linear U(+-1/sqrt(fan_in)) for weights and
    biases, position Embedding N(0, 1)) and the tied embedding is their LM head's Linear(d_model,
    vocab): U(+-1/sqrt(d_model)) (docs/usage.md tables every parameter)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of weights and embeddings (init=gpt-neo)."""
    ablation: Ablation = "local"
    """Mask head: none (baseline), local (per block, from the block input), global (from the final
    clean residual), or both (the two scores added)."""
    k_attn: int = 32
    """Attention units kept per layer and token (1..d_model)."""
    k_mlp: int = 32
    """MLP neurons kept per layer and token (1..d_mlp)."""
    mask_fn: MaskFn = "hard"
    """hard: exact k-winners-take-all forward with the soft top-k's gradient (straight-through);
    soft: the soft top-k in the forward pass too."""
    temperature_attn: float = 0.1
    """Soft top-k temperature for attention units, relative to the gap between the k-th and
    (k+1)-th scores."""
    temperature_mlp: float = 0.1
    """Soft top-k temperature for MLP neurons."""
    topk_eps: float = 1e-12
    """Added to the soft top-k's denominator D = T (s_(k) - s_(k+1)) + eps (the paper's)."""
    topk_gap_floor: float = 0.01
    """The soft top-k's gap s_(k) - s_(k+1) is floored at this fraction of the row's mean gap between
    neighbouring scores, so that a tie at the cut does not make the gradient 1/eps (rows above the
    floor keep the paper's formula; 0 gives it everywhere; see `ops.masks.widen_cut`)."""
    coef_clean: float = 1.0
    """Loss weight a of the clean stream's cross-entropy."""
    coef_ablated: float = 0.1
    """Loss weight b of the ablated stream's cross-entropy."""
    coef_recon: float = 0.1
    """Loss weight c of the reconstruction loss (clean vs ablated residuals)."""

    def __post_init__(self) -> None:
        require_finite(self)
        for name in ("vocab_size", "n_ctx", "d_model", "n_layers", "n_heads", "d_mlp"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.d_model % self.n_heads == 0,
                 f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        check_choice(self, "ablation")
        check_choice(self, "init")
        check_choice(self, "mask_fn")
        require(1 <= self.k_attn <= self.d_model,
                 f"k_attn must be in 1..d_model={self.d_model}, got {self.k_attn}")
        require(1 <= self.k_mlp <= self.d_mlp,
                 f"k_mlp must be in 1..d_mlp={self.d_mlp}, got {self.k_mlp}")
        for name in ("temperature_attn", "temperature_mlp", "ln_eps", "init_std"):
            require(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("coef_clean", "coef_ablated", "coef_recon", "topk_eps", "topk_gap_floor"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        check_lists(self)
        require(len(self.attention_window) in (0, self.n_layers) and all(w >= 0 for w in self.attention_window),
                f"attention_window must be empty or one window >= 0 per layer ({self.n_layers}), "
                f"got {self.attention_window}")

    def window(self, layer: int) -> int:
        """Layer `layer`'s attention window (0: global)."""
        return self.attention_window[layer] if self.attention_window else 0

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def self_ablating(self) -> bool:
        return self.ablation != "none"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, data and bookkeeping of a training run."""

    out: str = "runs/model"
    """Output folder: checkpoint, metrics.jsonl and the final model."""
    data: str = ""
    """Training data: a folder with train.txt/valid.txt (or TinyStories-train.txt/-valid.txt, or
    .txt.xz), a .jsonl/.parquet file, or hf:roneneldan/TinyStories. Empty: $SELFABLATE_DATA, else
    the TinyStories sample bundled with the package (1.5 M training tokens)."""
    batch_size: int = 24
    """Sequences per optimiser step, over all processes (the global batch): under torchrun each of
    N processes takes batch_size / N of them, in grad_accum micro-batches."""
    seq_len: int = 0
    """Tokens per sequence; 0 means the model's n_ctx."""
    max_steps: int = 400_000
    """Optimiser steps."""
    lr: float = 1.4e-3
    """Peak learning rate (AdamW)."""
    mask_head_lr_scale: float = 1.0
    """The mask heads' learning rate as a multiple of lr (warm-up and schedule apply alike): new
    heads on a pretrained model (init_from) may learn faster than the weights they read; 0 holds
    them at their initialisation."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr * min_lr_ratio."""
    warmup_steps: int = 1000
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay (applied to matrices only, not to biases, LayerNorms or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    seed: int = 0
    """Seed for initialisation and data order."""
    eval_interval: int = 1000
    """Evaluate on the held-out split every this many steps (and at the end)."""
    eval_batches: int = 20
    """Batches of held-out windows per periodic evaluation."""
    log_interval: int = 10
    """Write a metrics line every this many steps."""
    checkpoint_interval: int = 1000
    """Save a resumable checkpoint every this many steps (and at the end)."""
    keep: Literal["last", "best"] = "last"
    """The model the run's evaluations use: the last one (checkpoint/), or (best) the one with the
    lowest held-out a·CE(clean) + b·CE(ablated) at an evaluation, kept in best/ beside it."""
    resume: bool = False
    """Continue from the checkpoint in `out` if there is one."""
    init_from: str = ""
    """Start from a pretrained model instead of from scratch: a folder saved by GPT-Neo's
    save_pretrained, hf:NAME (e.g. hf:roneneldan/TinyStories-33M; extra hf), or one of our
    checkpoints. Its architecture and clean weights are kept; the mask heads are new (this run's
    init). Empty: from scratch."""
    freeze_clean: bool = False
    """Train the mask heads only: every clean weight (which the ablated stream shares) stays as it
    was (with init_from: the pretrained model's, bit for bit)."""
    device: Device = "auto"
    """auto: CUDA when available, else Apple's MPS, else the CPU."""
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bf16 autocast on CUDA (the mask heads and top-k stay float32), float32 elsewhere."""
    grad_accum: int = 1
    """Micro-batches per optimiser step: each process's share of batch_size is split into this
    many forward/backward passes whose gradients add up (less memory, the same step)."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the model as one graph: fewer, fused kernels, for a minute of compilation at
    the first step. auto: on CUDA (with the CUDA graph, measured about twice the graph's speed at
    the paper's shape), off elsewhere (on a CPU the C kernels are faster)."""
    cuda_graph: bool = True
    """On CUDA, in one process: capture the whole training step (forward, backward, clipping,
    AdamW) once as a CUDA graph and replay it, one launch a step instead of thousands
    (`selfablate.step.GraphedStep`). Ignored elsewhere and under torchrun."""
    logger: Literal["none", "wandb", "tensorboard"] = "none"
    """Extra metrics sink besides metrics.jsonl (optional extras)."""
    progress: bool = True
    """Show a progress bar with the live loss."""
    keep_freed_memory: bool = True
    """On glibc, keep freed memory in the process instead of handing it back to the OS, so the
    step's large temporaries are not page-faulted in afresh every step (see `perf.allocator`;
    the process then holds on to its peak memory)."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "eval_interval", "eval_batches",
                     "log_interval", "checkpoint_interval", "grad_accum"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.seq_len >= 0, f"seq_len must be >= 0, got {self.seq_len}")
        require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        require_finite(self)
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(self.mask_head_lr_scale >= 0, f"mask_head_lr_scale must be >= 0, got {self.mask_head_lr_scale}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1), got {getattr(self, name)}")
        require(self.batch_size % self.grad_accum == 0,
                f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}")
        require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        require(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        for name in ("device", "precision", "logger", "keep", "compile"):
            check_choice(self, name)


def check_choice(cfg: Any, name: str) -> None:
    choices = literal_choices(type(cfg), name)
    value = getattr(cfg, name)
    require(value in choices, f"{name} must be one of {', '.join(choices)}; got {value!r}")


def literal_choices(cls: type, name: str) -> tuple[str, ...]:
    """The allowed values of a `Literal[...]` field (or of a list field's `Literal[...]` items)."""
    hint = _type_hints(cls)[name]
    hint = list_item_type(hint) or hint
    return tuple(getattr(hint, "__args__", ()))


# ---------------------------------------------------------------------------------------------
# List-valued fields: typed `tuple[X, ...]` (frozen), written "2,8" on the command line and [2, 8]
# in JSON; parsed and checked here, in one place, for every config and command.


def list_item_type(kind: Any) -> Any:
    """The item type X of a list-valued field `tuple[X, ...]`, else None."""
    args = typing.get_args(kind)
    return args[0] if typing.get_origin(kind) is tuple and len(args) == 2 and args[1] is Ellipsis else None


def parse_list(item: Any, text: str) -> tuple:
    """A list as typed on the command line: comma-separated items ("2,8" -> (2, 8); "" -> ()).
    Raises ValueError naming the item that is not an `item`."""
    base = str if typing.get_origin(item) is Literal else item
    try:
        return tuple(base(part.strip()) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated {base.__name__} values, got {text!r}") from None


def check_lists(cfg: Any) -> None:
    """Every list-valued field of a frozen config holds items of its type (a Python list or a JSON
    array becomes a tuple; ints are accepted as floats; `Literal` items must be among its choices)."""
    for f in dataclasses.fields(cfg):
        item = list_item_type(field_type(type(cfg), f.name))
        if item is None:
            continue
        value = getattr(cfg, f.name)
        require(isinstance(value, (list, tuple)), f"{f.name} must be a list, got {value!r}")
        choices = typing.get_args(item) if typing.get_origin(item) is Literal else None
        ok = _item_check(item, choices)
        bad = [v for v in value if not ok(v)]
        if bad:
            kind = f"one of {', '.join(choices)}" if choices else "a finite number" if item is float else \
                f"of type {item.__name__}"
            raise ConfigError(f"every item of {f.name} must be {kind}; got {bad[0]!r}")
        object.__setattr__(cfg, f.name, tuple(float(v) if item is float else v for v in value))


def _item_check(item: Any, choices: tuple | None) -> Callable[[Any], bool]:
    if choices is not None:
        return lambda v: v in choices
    if item is float:  # bool is an int in Python, but true/false is not a number here
        return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return lambda v: isinstance(v, item) and not (item is int and isinstance(v, bool))


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_type(cls: type, name: str) -> Any:
    return _type_hints(cls)[name]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: {field name: the string literal under it}
    ({} when the source is unavailable, e.g. a frozen application: help text is then terse)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build a config dataclass from a dict, naming unknown keys in a one-line error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    require(not unknown, f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    for name, value in values.items():
        kind = field_type(cls, name)
        if list_item_type(kind) is not None:  # checked item by item in the config's check_lists
            continue
        kinds = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}.get(kind)
        # bool is an int in Python: an int field holding true/false is still the wrong type
        wrong = kinds is not None and (not isinstance(value, kinds) or (kind is not bool and isinstance(value, bool)))
        require(not wrong, f"{cls.__name__}.{name} must be of type {kind.__name__}, got {value!r}")
    return cls(**values)


# ---------------------------------------------------------------------------------------------
# Commands: each module that owns a command registers it beside its code as `COMMAND = Command(...)`;
# `selfablate.cli` builds one parser from them, the flags from the options' dataclass fields.


class Arg(NamedTuple):
    """A command-line argument that is not a dataclass field: a positional, or a lone flag."""

    name: str
    help: str
    nargs: str | None = None
    choices: tuple[str, ...] | None = None
    default: str | None = None
    """Given (a flag's default), the argument is the option --<name>; else it is positional."""
    item: type | None = None
    """Given, the argument is a list of this type, typed comma-separated (see `parse_list`)."""


class Command(NamedTuple):
    """One `selfablate <name>` command."""

    name: str
    help: str
    run: Callable[..., None]
    """Called as run(*options, **args): the options built from the flags, then the args by name."""
    options: tuple[type, ...] = ()
    """Config dataclasses whose fields become --flags."""
    args: tuple[Arg, ...] = ()
    preset: bool = False
    """A --preset names the options' defaults (`PRESETS`)."""
    base: Callable[[Any], tuple | None] | None = None
    """Given, base(parsed flags) may return the options' defaults instead of the preset's (train
    --resume: the run's own settings), refusing flags that may not change them."""


# ---------------------------------------------------------------------------------------------
# Presets: small named functions returning (ModelConfig, TrainConfig).

Preset = Callable[[], tuple[ModelConfig, TrainConfig]]


def paper() -> tuple[ModelConfig, TrainConfig]:
    """The authors' protocol for their paper-scale runs (8 x 128, 16 heads): a = b = 0.5, c = 0,
    T = 1.0, PyTorch's default initialisation; AdamW (betas 0.9, 0.999, no weight decay), batch 24,
    lr 1.4e-3, cosine to 0 without warm-up, gradient clipping at 1, float32, the best held-out
    checkpoint kept. 400k steps: about 2.5 B tokens, meant for a GPU."""
    model = ModelConfig(coef_clean=0.5, coef_ablated=0.5, coef_recon=0.0, temperature_attn=1.0, temperature_mlp=1.0,
                        init="torch-default")
    train = TrainConfig(batch_size=24, lr=1.4e-3, max_steps=400_000, warmup_steps=0, min_lr_ratio=0.0, beta2=0.999,
                        weight_decay=0.0, grad_clip=1.0, precision="float32", keep="best")
    return model, train


def cpu_small() -> tuple[ModelConfig, TrainConfig]:
    """A few-minute CPU run per model: 4 layers x 64 wide, context 128, a compact vocabulary
    (the LM head dominates at this width), 600 steps of 16 x 128 tokens (about one pass over the
    shared 1.5 M-token sample): 2 to 5 minutes of training per model on 2 cores."""
    model = ModelConfig(n_ctx=128, d_model=64, n_layers=4, n_heads=8, d_mlp=256, k_attn=16, k_mlp=32,
                        compact_vocab=True)
    train = TrainConfig(batch_size=16, lr=3e-3, max_steps=600, warmup_steps=50, eval_interval=200,
                        eval_batches=8, checkpoint_interval=200, log_interval=10)
    return model, train


def tiny() -> tuple[ModelConfig, TrainConfig]:
    """A seconds-long run for tests and smoke checks."""
    model = ModelConfig(n_ctx=32, d_model=32, n_layers=2, n_heads=4, d_mlp=64, k_attn=8, k_mlp=16)
    train = TrainConfig(batch_size=8, lr=3e-3, max_steps=20, warmup_steps=2, eval_interval=10,
                        eval_batches=2, checkpoint_interval=10, log_interval=5)
    return model, train


PRESETS: dict[str, Preset] = {"paper": paper, "cpu-small": cpu_small, "tiny": tiny}


def get_preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    require(name in PRESETS, f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
