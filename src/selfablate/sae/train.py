"""Training an SAE on a model's activations, and evaluating it where it sits in the model."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from ..checkpoint import load_checkpoint
from ..config import Arg, Command, Device, check_choice, require, require_finite
from ..errors import ConfigError, DivergedError
from ..data.dataset import TokenWindows, tokenize_split
from ..data.sources import resolve_source
from ..data.vocab import token_lookup
from .. import runlock
from ..files import write_text_atomically
from ..model import SelfAblatingTransformer, Stream
from ..ops.lm_head import chunk_rows_for
from ..runtime import Captured, fused_if_possible, require_fits, resolve_device, wide_dtype
from . import metrics as M
from .buffer import ActivationBuffer, check_hook, hook_activations
from .model import SAE, SAEConfig, sae_loss, save_sae


@dataclass(frozen=True)
class SAETrainConfig:
    """Options of `selfablate sae train`."""

    out: str = "runs/sae"
    """Folder for cfg.json, sae.safetensors and metrics.json."""
    hook: str = ""
    """Hook point to read (any, either stream: append _ablated for the ablated stream); empty:
    blocks.<3L/4>.hook_mlp_out of an L-layer model (the paper's layer 6 of 8)."""
    data: str = ""
    """Data source (as for train); empty: the default."""
    kind: Literal["relu", "topk"] = "relu"
    """relu + L1 (the paper's) or TopK."""
    expansion: int = 16
    """d_sae = expansion x the hook's width (the paper: 16)."""
    k: int = 32
    """Latents per token for topk."""
    l1_coef: float = 5.0
    """L1 coefficient (relu; the paper: 5), warmed up linearly."""
    l1_warmup: float = 0.05
    """Fraction of steps over which the L1 coefficient rises from 0."""
    steps: int = 2000
    """Optimiser steps (the paper: 100k of 4096 tokens)."""
    batch_tokens: int = 4096
    """Activations per step."""
    lr: float = 4e-4
    """Adam learning rate (decays linearly over the last 20% of steps)."""
    pool_tokens: int = 131072
    """Activations held in the shuffled buffer."""
    input_scaling: Literal["unit", "sqrt_d", "none"] = "sqrt_d"
    """Scale inputs to expected norm sqrt(d_in) (SAELens's expected_average_only_in, which the
    paper's L1 coefficient of 5 presumes), 1, or not at all. With norm 1 and coefficient 5 every
    latent dies (measured on a demo checkpoint: L0 0.29)."""
    b_dec_init: Literal["mean", "zeros"] = "mean"
    """Decoder bias at the start: the (scaled) mean activation, so the SAE models deviations from
    it, or zeros (the paper authors' SAELens setting)."""
    subtract_b_dec: bool = True
    """Subtract the decoder bias from the input before encoding (SAELens's apply_b_dec_to_input;
    the authors: False)."""
    eval_tokens: int = 32768
    """Held-out tokens for the final metrics."""
    seed: int = 0
    """Seed for initialisation and data order."""
    device: Device = "auto"
    """Device to run on."""
    cuda_graph: bool = True
    """On CUDA: capture the training step (forward, backward, Adam, decoder normalisation) once as
    a CUDA graph and replay it (`SAEStep`). Ignored elsewhere."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        require_finite(self)
        for name in ("expansion", "k", "steps", "batch_tokens", "pool_tokens", "eval_tokens"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.lr > 0 and self.l1_coef >= 0, "lr must be > 0 and l1_coef >= 0")
        require(0 <= self.l1_warmup <= 1, f"l1_warmup must be in [0, 1], got {self.l1_warmup}")
        require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        for name in ("kind", "input_scaling", "device", "b_dec_init"):
            check_choice(self, name)


def paper_protocol(cfg: SAETrainConfig) -> SAETrainConfig:
    """`cfg` with the paper authors' SAELens settings (their utils/sae.py): ReLU + L1 coefficient 5
    warmed up over 5% of the steps, 16x expansion, lr 1e-5 (constant, then a linear decay over the
    last 20%), decoder bias zeros and not subtracted from the input, inputs normalised to expected
    norm sqrt(d_in), 100k steps of 4,096 activations, a buffer of 64 x 16 contexts of 256, seed 42."""
    return dataclasses.replace(cfg, kind="relu", expansion=16, l1_coef=5.0, l1_warmup=0.05, lr=1e-5, steps=100_000,
                               batch_tokens=4096, pool_tokens=64 * 16 * 256, input_scaling="sqrt_d",
                               b_dec_init="zeros", subtract_b_dec=False, seed=42)


def input_scale(acts: torch.Tensor, mode: str) -> float:
    """The factor that gives the activations the chosen expected norm (1 or sqrt(d_in))."""
    target = {"unit": 1.0, "sqrt_d": acts.shape[-1] ** 0.5, "none": None}[mode]
    return 1.0 if target is None else target / acts.norm(dim=-1).mean().item()


def train_sae(model: SelfAblatingTransformer, windows: TokenWindows, cfg: SAETrainConfig) -> SAE:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = next(model.parameters()).device
    # A pool larger than all the activations the run will draw only costs time.
    pool = min(cfg.pool_tokens, cfg.steps * cfg.batch_tokens)
    buffer = ActivationBuffer(model, windows, cfg.hook, max(1, 4096 // windows.seq_len), pool, gen)
    d_in = buffer.pool.shape[-1]
    # Weights, gradients and Adam's moments of both matrices, and a batch's latents a few times over.
    require_fits(4 * (4 * 2 * cfg.expansion * d_in * d_in + 3 * cfg.batch_tokens * cfg.expansion * d_in), device,
                 f"an SAE of {cfg.expansion} x {d_in} latents")
    scfg = SAEConfig(d_in, cfg.expansion * d_in, cfg.kind, cfg.k, cfg.hook, input_scale(buffer.pool, cfg.input_scaling),
                     cfg.subtract_b_dec)
    with torch.device("cpu"):  # the same initial weights on every device
        sae = SAE(scfg)
    sae = sae.to(device)
    if cfg.b_dec_init == "mean":
        with torch.no_grad():  # start the decoder bias at the (scaled) mean: the SAE then models deviations
            sae.b_dec.copy_(buffer.pool.mean(0) * scfg.scale)
    step_fn = SAEStep(sae, cfg.batch_tokens, cfg.lr, device, graphed=cfg.cuda_graph and device.type == "cuda")
    warm, decay_from = max(1, int(cfg.l1_warmup * cfg.steps)), int(0.8 * cfg.steps)
    bar = tqdm(range(cfg.steps), desc=f"SAE {cfg.hook}", disable=not cfg.progress, dynamic_ncols=True)
    for step in bar:
        lr = cfg.lr * min(1.0, (cfg.steps - step) / max(1, cfg.steps - decay_from))
        mse, l1 = step_fn(buffer.next(cfg.batch_tokens), lr, cfg.l1_coef * min(1.0, (step + 1) / warm))
        if step % 50 == 0 or step == cfg.steps - 1:
            mse_value, l1_value = check_sae_finite(sae, step + 1, mse, l1)
            bar.set_postfix(mse=f"{mse_value:.4f}", l1=f"{l1_value:.2f}")
    return sae


def sae_update(sae: SAE, opt: torch.optim.Optimizer, x: torch.Tensor, l1_coef: float | torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One Adam step of `sae` on activations x (batch, d_in) at the rate in opt's group, then unit
    decoder rows. Returns (mse, l1) as device tensors: nothing is read back."""
    opt.zero_grad(set_to_none=True)  # first: a CUDA graph's backward then writes its own gradients
    loss, mse, l1 = sae_loss(sae, x, l1_coef)
    loss.backward()
    opt.step()
    sae.normalise_decoder()
    return mse.detach(), l1.detach()


class SAEStep:
    """SAE training steps, eager or (graphed) captured once as a CUDA graph and replayed
    (`runtime.Captured`): a step of 4,096 activations is a few dozen small kernels, which a GPU
    runs faster than the host can launch them one by one. Graphed, the batch is copied into a
    fixed buffer and the learning rate and L1 coefficient live in device tensors, which each call
    refills; Adam is capturable (its step counts on the device)."""

    def __init__(self, sae: SAE, batch_tokens: int, lr: float, device: torch.device, graphed: bool):
        self.graphed = graphed
        rate: float | torch.Tensor = torch.tensor(lr, device=device) if graphed else lr
        self.opt = fused_if_possible(torch.optim.Adam, sae.parameters(), lr=rate, betas=(0.9, 0.999),
                                     capturable=graphed)
        if graphed:
            self.x = torch.empty(batch_tokens, sae.cfg.d_in, device=device)
            self.coef = torch.zeros((), device=device)
            self.captured = Captured(lambda: sae_update(sae, self.opt, self.x, self.coef), device, warmup=3)
        self.sae = sae

    def __call__(self, x: torch.Tensor, lr: float, l1_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on x at rate lr: (mse, l1) device tensors (graphed: buffers the next call rewrites)."""
        if not self.graphed:
            self.opt.param_groups[0]["lr"] = lr
            return sae_update(self.sae, self.opt, x, l1_coef)
        self.opt.param_groups[0]["lr"].fill_(lr)
        self.coef.fill_(l1_coef)
        self.x.copy_(x)
        return self.captured()


def check_sae_finite(sae: SAE, step: int, mse: torch.Tensor, l1: torch.Tensor) -> tuple[float, float]:
    """A diverged SAE is an error, never a result (its metrics would read FVU nan, 100% dead).
    Returns (mse, l1) as numbers, read with the weights' check in one host transfer."""
    weights_finite = torch.stack([torch.isfinite(p).all() for p in sae.parameters()]).all()
    mse, l1, finite = torch.stack([mse.detach().float(), l1.detach().float(), weights_finite.float()]).tolist()
    if not (math.isfinite(mse) and finite):
        raise DivergedError(f"the SAE diverged by step {step} (reconstruction error {mse}, or a weight not "
                            "finite): try a lower --lr; nothing was written")
    return mse, l1


def default_hook(model: SelfAblatingTransformer) -> str:
    """blocks.<3L/4>.hook_mlp_out: three quarters of the way up, the paper's layer 6 of 8."""
    return f"blocks.{3 * model.cfg.n_layers // 4}.hook_mlp_out"


def _final_hook(hook: str) -> str:
    return "ln_final.hook_normalized" + (Stream.ABLATED.value if hook.endswith(Stream.ABLATED.value) else "")


@torch.no_grad()
def _final(model: SelfAblatingTransformer, x: torch.Tensor, hook: str, replace=None) -> torch.Tensor:
    """The final normalised residual (B, T, D) of the hook's stream, optionally with the hook's
    activation replaced: the LM head's input, without the (B, T, vocab) logits."""
    final: dict[str, torch.Tensor] = {}
    hooks = [(_final_hook(hook), lambda t, hp: final.__setitem__("x", t))]
    if replace is not None:
        hooks.append((hook, lambda t, hp: replace(t)))
    with model.hooks(hooks):
        model(x, return_logits=False)
    return final["x"]


def _ce_and_kl(model: SelfAblatingTransformer, ref: torch.Tensor, finals: dict[str, torch.Tensor], y: torch.Tensor,
               ce: dict[str, torch.Tensor], kl: dict[str, torch.Tensor]) -> None:
    """Adds to ce["clean"] and to each variant's ce and kl their sums over the batch:
    CE = -log p(y) and KL(p_ref || p) = sum_v p_ref (log p_ref - log p), per token. Rows go through
    the LM head in chunks (`ops.lm_head.chunk_rows_for`), the reference's log-probabilities once
    per chunk for every variant, so no (tokens, vocab) tensor is ever held."""
    rows = chunk_rows_for(model.cfg.vocab_size, ref.device)
    ref, y = ref.flatten(0, -2), y.flatten()  # (N, D), (N,)
    finals = {k: f.flatten(0, -2) for k, f in finals.items()}
    logp = lambda h: model.unembed(h).float().log_softmax(-1)  # noqa: E731  (rows, vocab)
    for i in range(0, len(y), rows):
        target = y[i : i + rows, None]
        lp_ref = logp(ref[i : i + rows])
        p_ref = lp_ref.exp()
        ce["clean"] -= lp_ref.gather(-1, target).sum()
        for name, f in finals.items():
            lp = logp(f[i : i + rows])
            ce[name] -= lp.gather(-1, target).sum()
            kl[name] += (p_ref * (lp_ref - lp)).sum()


@torch.no_grad()
def evaluate_sae(model: SelfAblatingTransformer, sae: SAE, windows: TokenWindows, n_tokens: int,
                 top: int = 5, decode=None) -> dict[str, Any]:
    """Reconstruction, sparsity and downstream metrics of `sae` spliced into `model`, on the first
    n_tokens of the held-out windows. Zero- and mean-ablation of the hook are the baselines.
    With `decode` (GPT-2 ids -> text), each latent's top examples are given as token and context."""
    hook, device = sae.cfg.hook, next(model.parameters()).device
    batches = [(x.to(device), y.to(device)) for x, y in windows.sequential_batches(8, max(1, n_tokens // windows.seq_len))]
    acts = torch.cat([hook_activations(model, x, hook).float() for x, _ in batches])  # (N, d_in)
    out = sae(acts)
    mean = acts.mean(0)
    splice = lambda t: sae(t.float()).recon.to(t.dtype).view_as(t)  # noqa: E731
    variants = {"sae": splice, "zero": torch.zeros_like, "mean": lambda t: mean.to(t.dtype).expand(t.shape[:-1] + (-1,)).reshape(t.shape)}
    # Sums stay on the device (float64; float32 on MPS) and are read once, after every batch.
    zero = lambda: torch.zeros((), dtype=wide_dtype(device), device=device)  # noqa: E731
    ce = {k: zero() for k in ("clean", *variants)}
    kl = {k: zero() for k in variants}
    for x, y in batches:
        _ce_and_kl(model, _final(model, x, hook), {k: _final(model, x, hook, fn) for k, fn in variants.items()}, y, ce, kl)
    n = sum(y.numel() for _, y in batches)
    ce, kl = {k: v.item() / n for k, v in ce.items()}, {k: v.item() / n for k, v in kl.items()}
    dens = M.density(out.latents)
    top_vals, top_pos = out.latents.topk(min(top, len(acts)), dim=0)  # (top, d_sae)
    return {
        "tokens": n, "l0": M.l0(out.latents), "fvu": M.fvu(acts, out.recon), "explained_variance": 1 - M.fvu(acts, out.recon),
        "ce_clean": ce["clean"], "ce_with_sae": ce["sae"], "ce_zero_ablation": ce["zero"], "ce_mean_ablation": ce["mean"],
        "ce_loss_score_zero": M.ce_loss_score(ce["zero"], ce["sae"], ce["clean"]),
        "ce_loss_score_mean": M.ce_loss_score(ce["mean"], ce["sae"], ce["clean"]),
        "kl_with_sae": kl["sae"], "kl_zero_ablation": kl["zero"], "kl_div_score": (kl["zero"] - kl["sae"]) / kl["zero"],
        "dead_fraction": (dens == 0).float().mean().item(), "dense_fraction": (dens > 0.1).float().mean().item(),
        "density_histogram": M.density_histogram(dens),
        "top_examples": _examples(windows, top_vals.T, top_pos.T, decode),
    }


def _examples(windows: TokenWindows, values: torch.Tensor, positions: torch.Tensor, decode, context: int = 10) -> list:
    """Per latent, its top activations as (activation, token, preceding context). Position p of the
    sequential held-out windows is token p of the split."""
    if decode is None:
        return [[{"activation": float(v), "position": int(p)} for v, p in zip(vs, ps)] for vs, ps in zip(values, positions)]
    raw = windows.tokens
    return [[{"activation": float(v), "token": decode([int(raw[p])]), "context": decode([int(t) for t in raw[max(0, p - context):p]])}
             for v, p in zip(vs.tolist(), ps.tolist()) if v > 0] for vs, ps in zip(values, positions)]


def run_sae_train(checkpoint: str, cfg: SAETrainConfig) -> dict[str, Any]:
    """Train one SAE on `checkpoint`'s activations, evaluate it, write OUT/{cfg.json, sae.safetensors,
    metrics.json}; one writer per OUT folder."""
    with runlock.exclusive(cfg.out):
        return _sae_train(checkpoint, cfg)


def _sae_train(checkpoint: str, cfg: SAETrainConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    model = load_checkpoint(checkpoint, device=resolve_device(cfg.device)).eval()
    cfg = cfg if cfg.hook else dataclasses.replace(cfg, hook=default_hook(model))
    check_hook(model, cfg.hook)
    refuse_other_sae(Path(cfg.out), str(checkpoint), cfg.hook)
    source = resolve_source(cfg.data)
    lookup = token_lookup(model)
    train_w = TokenWindows(tokenize_split(source, "train", progress=cfg.progress), model.cfg.n_ctx, lookup, "train")
    valid_w = TokenWindows(tokenize_split(source, "valid", progress=cfg.progress), model.cfg.n_ctx, lookup, "valid")
    sae = train_sae(model, train_w, cfg)
    from ..data.tokenizer import gpt2_tokenizer

    metrics = evaluate_sae(model, sae, valid_w, cfg.eval_tokens, decode=gpt2_tokenizer().decode)
    result = {"checkpoint": str(checkpoint), "sae": dataclasses.asdict(sae.cfg), "train": dataclasses.asdict(cfg),
              "metrics": metrics, "seconds": time.perf_counter() - t0}
    save_sae(sae, cfg.out, meta={"checkpoint": str(checkpoint), "train": dataclasses.asdict(cfg)})
    write_text_atomically(Path(cfg.out) / "metrics.json", json.dumps(result, indent=1) + "\n")
    return result


def refuse_other_sae(out: Path, checkpoint: str, hook: str) -> None:
    """An SAE folder holding the SAE of another checkpoint or hook is not replaced: one line."""
    try:
        done = json.loads((out / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return
    theirs = (done.get("checkpoint"), done.get("sae", {}).get("hook"))
    if theirs != (checkpoint, hook):
        raise ConfigError(f"{out} holds the SAE of {theirs[0]} on {theirs[1]}; choose another --out "
                          f"(not replaced by one of {checkpoint} on {hook})")


def run_sae_sweep(checkpoint: str, cfg: SAETrainConfig, values: list[float]) -> list[dict[str, Any]]:
    """The L0-fidelity frontier: one SAE per L1 coefficient (relu) or per k (topk), each in
    OUT/<value>/; OUT/frontier.json lists (value, L0, CE-loss score, FVU). One writer per OUT folder."""
    with runlock.exclusive(cfg.out):
        return _sae_sweep(checkpoint, cfg, values)


def _sae_sweep(checkpoint: str, cfg: SAETrainConfig, values: list[float]) -> list[dict[str, Any]]:
    rows = []
    for v in values:
        knob = {"l1_coef": v} if cfg.kind == "relu" else {"k": int(v)}
        r = run_sae_train(checkpoint, dataclasses.replace(cfg, out=str(Path(cfg.out) / f"{v:g}"), **knob))
        m = r["metrics"]
        rows.append({**knob, "l0": m["l0"], "ce_loss_score_zero": m["ce_loss_score_zero"], "fvu": m["fvu"],
                     "dead_fraction": m["dead_fraction"]})
    # Written last and whole: frontier.json is what marks a reproduce stage done.
    write_text_atomically(Path(cfg.out) / "frontier.json",
                          json.dumps({"checkpoint": str(checkpoint), "points": rows}, indent=1) + "\n")
    return rows


def _command(cfg: SAETrainConfig, action: str, checkpoint: str, values: tuple[float, ...]) -> None:
    if action == "train":
        result = run_sae_train(checkpoint, cfg)
        m = result["metrics"]
        print(f"SAE on {result['sae']['hook']}: L0 {m['l0']:.2f}, FVU {m['fvu']:.3f}, CE-loss score {m['ce_loss_score_zero']:.3f} "
              f"(mean-ablation {m['ce_loss_score_mean']:.3f}), dead {m['dead_fraction']:.1%}; written to {cfg.out}")
        return
    for row in run_sae_sweep(checkpoint, cfg, list(values)):
        print(json.dumps(row))


COMMAND = Command("sae", "train an SAE on a hook point (sae train), or a frontier of them (sae sweep)", _command,
                  (SAETrainConfig,), (Arg("action", "train one SAE, or sweep a frontier", choices=("train", "sweep")),
                                      Arg("checkpoint", "checkpoint or run folder"),
                                      Arg("values", "sweep: L1 coefficients (relu) or k values (topk)",
                                          default="1,2,5,10", item=float)))
