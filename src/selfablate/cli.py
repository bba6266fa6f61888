"""`selfablate <command>`: flags are generated from the config dataclasses (types, choices and
help text come from the fields and their docstrings), so there is no hand-kept flag list."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

from .config import PRESETS, ModelConfig, TrainConfig, field_docs, field_type, get_preset, literal_choices
from .errors import SelfAblateError
from .data.vocab import token_lookup

# -- flags from dataclasses -------------------------------------------------------------------


def add_fields(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One --flag per field of dataclass `cls`. Defaults are left unset (SUPPRESS) so that only
    what the user typed overrides the preset."""
    group = parser.add_argument_group(title)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        kind = field_type(cls, f.name)
        flag = "--" + f.name.replace("_", "-")
        # argparse formats help with %: a literal one (a docstring's "95%") must be doubled.
        help_text = f"{docs.get(f.name, '')} (default: {f.default})".replace("%", "%%")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif getattr(kind, "__origin__", None) is Literal:
            group.add_argument(flag, choices=literal_choices(cls, f.name), default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


def overrides(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}


def build(cls: type, ns: argparse.Namespace, base: Any = None) -> Any:
    """The dataclass from `base` (or its defaults) with the user's flags applied."""
    return dataclasses.replace(base, **overrides(ns, cls)) if base is not None else cls(**overrides(ns, cls))


# -- options of the smaller commands ----------------------------------------------------------


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
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Device to run on."""
    json: bool = False
    """Print the result as JSON."""


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
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Device to run on."""


# -- commands ---------------------------------------------------------------------------------


def cmd_train(ns: argparse.Namespace) -> None:
    from .train import train

    model_base, train_base = get_preset(ns.preset)
    model_cfg, train_cfg = build(ModelConfig, ns, model_base), build(TrainConfig, ns, train_base)
    result = train(model_cfg, train_cfg)
    if result.final_eval is None:  # a torchrun process other than rank 0
        return
    ablated = "" if result.final_eval.ablated is None else f", ablated {result.final_eval.ablated:.4f}"
    print(f"trained {result.steps} steps -> {result.checkpoint}; held-out loss: clean {result.final_eval.clean:.4f}{ablated}")


def cmd_eval_loss(ns: argparse.Namespace) -> None:
    from .checkpoint import load_checkpoint
    from .data.dataset import TokenWindows, tokenize_split
    from .data.sources import resolve_source
    from .eval.lm import evaluate_loss
    from .runtime import resolve_device

    opts = build(EvalLossOptions, ns)
    device = resolve_device(opts.device)
    model = load_checkpoint(ns.checkpoint, device=device)
    windows = TokenWindows(tokenize_split(resolve_source(opts.data), opts.split), model.cfg.n_ctx,
                           token_lookup(model))
    limit = opts.max_batches * opts.batch_size if opts.max_batches else None
    result = evaluate_loss(model, windows.sequential_batches(opts.batch_size, limit), device, progress=True,
                           total=windows.num_batches(opts.batch_size, limit))
    if opts.json:
        print(json.dumps({**result._asdict(), "ppl_clean": result.ppl_clean, "ppl_ablated": result.ppl_ablated}))
        return
    print(f"{opts.split}: {result.tokens} tokens; clean CE {result.clean:.4f} (ppl {result.ppl_clean:.2f})")
    if result.ablated is not None:
        print(f"{opts.split}: ablated CE {result.ablated:.4f} (ppl {result.ppl_ablated:.2f})")


def cmd_generate(ns: argparse.Namespace) -> None:
    from .checkpoint import load_checkpoint
    from .data.tokenizer import gpt2_tokenizer
    from .generate import generate
    from .runtime import resolve_device

    opts = build(GenerateOptions, ns)
    model = load_checkpoint(ns.checkpoint, device=resolve_device(opts.device))
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


def cmd_info(ns: argparse.Namespace) -> None:
    from .checkpoint import load_checkpoint, read_header, resolve

    folder = resolve(ns.checkpoint)
    header = read_header(folder)
    model = load_checkpoint(folder)
    meta = header.get("meta", {})
    print(f"checkpoint: {folder}")
    print(f"parameters: {model.num_params(False):,} ({model.num_params():,} non-embedding)")
    print(f"step: {meta.get('step', '?')}; held-out: {json.dumps(meta.get('val'))}")
    print("model: " + ", ".join(f"{k}={v}" for k, v in header["model"].items()))


def cmd_evaluate(ns: argparse.Namespace) -> None:
    from .eval.evaluate import EvalConfig, evaluate_many, format_summary

    cfg = build(EvalConfig, ns)
    rows = evaluate_many(ns.checkpoints, cfg)
    print(format_summary(rows))
    print(f"wrote {len(rows)} model JSON file(s) and summary.csv to {cfg.out}")


def cmd_circuits(ns: argparse.Namespace) -> None:
    from .report.circuits import CircuitConfig, write_circuits

    cfg = build(CircuitConfig, ns)
    r = write_circuits(ns.checkpoint, cfg)
    ioi = r["ioi"]["clean"]
    print(f"IOI (clean stream): logit diff {ioi['logit_diff']:.3f}, accuracy {ioi['accuracy']:.2f}")
    if "ablated" in r["ioi"]:
        a = r["ioi"]["ablated"]
        print(f"IOI (ablated stream): logit diff {a['logit_diff']:.3f}, accuracy {a['accuracy']:.2f}")
    print(f"ACDC tau={cfg.tau}: {r['acdc']['edges']} of {r['graph']['edges']} edges, KL {r['acdc']['kl']:.4f}, "
          f"{r['acdc']['seconds']:.0f} s; EAP over all edges {r['eap']['seconds']:.2f} s; "
          f"faithfulness AUC {r['faithfulness_auc']:.3f}")
    print(f"wrote circuit.json, circuit.svg and circuit.png to {cfg.out}")


def cmd_sae(ns: argparse.Namespace) -> None:
    from .sae.train import SAETrainConfig, run_sae_sweep, run_sae_train

    cfg = build(SAETrainConfig, ns)
    if ns.action == "train":
        m = run_sae_train(ns.checkpoint, cfg)["metrics"]
        print(f"SAE on {cfg.hook}: L0 {m['l0']:.2f}, FVU {m['fvu']:.3f}, CE-loss score {m['ce_loss_score_zero']:.3f} "
              f"(mean-ablation {m['ce_loss_score_mean']:.3f}), dead {m['dead_fraction']:.1%}; written to {cfg.out}")
        return
    try:
        values = [float(v) for v in ns.values.split(",") if v.strip()]
    except ValueError:
        raise SelfAblateError(f"--values must be comma-separated numbers, got {ns.values!r}") from None
    for row in run_sae_sweep(ns.checkpoint, cfg, values):
        print(json.dumps(row))


def cmd_reproduce(ns: argparse.Namespace) -> None:
    from .reproduce import ReproduceConfig, run_reproduce

    folder = run_reproduce(build(ReproduceConfig, ns))
    print((folder / "table.md").read_text())
    print(f"report: {folder / 'report.html'} (tables: table.md, table.csv, table.tex)")


def cmd_report(ns: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from .report.build import write_report

    meta = Path(ns.folder) / "reproduce.json"
    if not meta.exists():
        raise SelfAblateError(f"{ns.folder} is not a `selfablate reproduce` folder (no reproduce.json)")
    folder = write_report(Path(ns.folder), json.loads(meta.read_text())["config"]["preset"])
    print(f"report: {folder / 'report.html'}")


def _reproduce_config_cls() -> type:
    from .reproduce import ReproduceConfig

    return ReproduceConfig


def _sae_config_cls() -> type:
    from .sae.train import SAETrainConfig

    return SAETrainConfig


def _circuit_config_cls() -> type:
    from .circuits.run import CircuitConfig

    return CircuitConfig


def _eval_config_cls() -> type:
    from .eval.evaluate import EvalConfig

    return EvalConfig


# -- parser -----------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfablate", description="Train self-ablating transformers and evaluate their interpretability.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: list[tuple[str, str, Callable, list[tuple[type, str]], bool]] = [
        ("train", "train (or resume) a model", cmd_train, [(ModelConfig, "model"), (TrainConfig, "training")], False),
        ("eval-loss", "clean/ablated cross-entropy over a whole split", cmd_eval_loss, [(EvalLossOptions, "options")], True),
        ("generate", "sample text from the clean or ablated stream", cmd_generate, [(GenerateOptions, "options")], True),
        ("info", "describe a checkpoint", cmd_info, [], True),
        ("evaluate", "every evaluation (LM, masks, sparsity, specialisation, localisation, leakage)",
         cmd_evaluate, [(_eval_config_cls(), "evaluation")], False),
        ("circuits", "IOI behaviour and circuit discovery (ACDC, EAP, EAP-IG)", cmd_circuits,
         [(_circuit_config_cls(), "circuits")], True),
        ("sae", "train an SAE on a hook point (sae train), or a frontier of them (sae sweep)", cmd_sae,
         [(_sae_config_cls(), "sae")], False),
        ("reproduce", "the paper's grid end to end (train, evaluate, circuits, SAEs, report); resumable",
         cmd_reproduce, [(_reproduce_config_cls(), "reproduce")], False),
        ("report", "rebuild the report of a reproduce folder", cmd_report, [], False),
    ]
    for name, help_text, fn, classes, takes_checkpoint in commands:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if takes_checkpoint:
            p.add_argument("checkpoint", help="checkpoint folder (or a run folder holding checkpoint/)")
        if name == "sae":
            p.add_argument("action", choices=["train", "sweep"])
            p.add_argument("checkpoint", help="checkpoint or run folder")
            p.add_argument("--values", default="1,2,5,10", help="sweep: L1 coefficients (relu) or k values (topk)")
        if name == "report":
            p.add_argument("folder", help="the --out folder of `selfablate reproduce`")
        if name == "evaluate":
            p.add_argument("checkpoints", nargs="+", help="checkpoint or run folders")
        if name == "train":
            p.add_argument("--preset", default="cpu-small", help=f"one of {', '.join(PRESETS)} (default: cpu-small)")
        for cls, title in classes:
            add_fields(p, cls, title)
        p.set_defaults(func=fn)
    return parser


def _kernel_warnings_on_one_line() -> None:
    """The C kernels' warnings (no compiler, a failed build) as one line each, without a source line.
    Installed once per process: main() may run many times (tests), each would wrap the last."""
    from .ops.kernels import KernelWarning

    default = warnings.showwarning
    if getattr(default, "selfablate_one_line", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, KernelWarning):
            print(message, file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    show.selfablate_one_line = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def main(argv: Sequence[str] | None = None) -> int:
    ns = make_parser().parse_args(argv)
    _kernel_warnings_on_one_line()
    try:
        ns.func(ns)
    except SelfAblateError as e:
        print(f"selfablate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selfablate: interrupted (the last checkpoint is intact; continue with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
