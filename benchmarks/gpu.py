"""The training step on one CUDA GPU: correctness, then speed, in one table.

    python benchmarks/gpu.py [--budget 240] [--out DIR]      # needs transformers for GPT-Neo's rows
    python benchmarks/gpu.py --smoke                          # the same code on this CPU, tiny sizes

Measured in this one run, in order of importance (a section that would end past --budget seconds
is skipped and says so; a section that fails says why and the rest go on):
- the bf16 matmul rate (8192^3, random data), the ceiling MFU is taken against;
- a graph-replayed step equals an eager one (losses of 4 steps and the weights after them);
- tokens/s and peak memory of `selfablate.step.train_step` (eager) and `GraphedStep` (the whole
  step as one CUDA graph), local, global and baseline, at 24 x 256 (the paper's batch) and 192 x 256,
  bf16 autocast and float32 (TF32); transformers' GPTNeoForCausalLM of the same shape, eager;
- CUDA kernels per step (the profiler), eager against graph-replayed; the masks' top-(k+1) cut
  in order (a sort on CUDA) against unsorted with two minima (what the step uses); the LM head
  alone, chunked against the Triton kernels and plain F.cross_entropy; one layer's attention alone,
  PyTorch's fused kernels against the Triton kernels for narrow heads;
- CUDA float32 against CPU float64 (losses, logits, masks) at the paper's architecture, and the
  bf16 gradient against float32's (norm ratio, cosine);
- the grid's evaluations (`gpu_evals.py`): ACDC on the paper's graph, `evaluate` over 131,072
  tokens, SAE training steps/s, then SAE and ACDC on their eager paths (no CUDA graphs) beside
  them (`--only circuits,evaluate,sae,sae-eager,circuits-eager` runs these alone);
- torch.compile(fullgraph=True), eager and captured (compilation takes most of a minute a model).
Without CUDA (and without --smoke) it says so in one line and exits 0. Writes gpu.json to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from selfablate import ModelConfig, SelfAblatingTransformer, ops
from selfablate.config import TrainConfig
from selfablate.ops import device_policy_as
from selfablate.ops.lm_head import linear_cross_entropy
from selfablate.ops.masks import _cut
from selfablate.perf import train_flops_per_token
from selfablate.runtime import autocast_for, configure
from selfablate.step import GraphedStep, make_optimizer, train_step

import gpu_evals
from gpt_neo import gpt_neo_step
from timing import sync

SHAPES = ((24, 256), (192, 256))
KINDS = {"baseline": "none", "local": "local", "global": "global"}
PRECISIONS = ("bfloat16", "float32")
RESULTS: dict[str, object] = {}
LINES: list[str] = []


class Run:
    """Where and how big: the device, the paper's architecture (or a tiny one for --smoke)."""

    def __init__(self, smoke: bool, budget: float, out: Path):
        self.device = torch.device("cpu" if smoke else "cuda")
        self.smoke, self.budget, self.out, self.t0 = smoke, budget, out, time.perf_counter()
        self.arch = (dict(vocab_size=97, n_ctx=32, d_model=32, n_layers=2, n_heads=4, d_mlp=64, k_attn=8, k_mlp=8)
                     if smoke else dict(init="torch-default"))
        self.shapes = ((2, 32), (4, 32)) if smoke else SHAPES

    def cfg(self, kind: str, **kw) -> ModelConfig:
        return ModelConfig(**{**self.arch, "ablation": KINDS[kind], "coef_clean": 0.5, "coef_ablated": 0.5,
                              "coef_recon": 0.0, "temperature_attn": 1.0, "temperature_mlp": 1.0, **kw})

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def say(line: str) -> None:
    LINES.append(line)
    print(line, flush=True)


def section(run: Run, name: str, cost: float, fn: Callable[[Run], None]) -> None:
    """Run one section unless it would end past the budget (its cost a rough guess in seconds)."""
    if run.elapsed() + cost > run.budget:
        say(f"[{name}] skipped: {run.elapsed():.0f} s spent, about {cost:.0f} s more would pass --budget {run.budget:.0f}")
        return
    t0 = time.perf_counter()
    try:
        fn(run)
    except Exception as e:  # a benchmark reports a broken section and goes on with the rest
        say(f"[{name}] FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        traceback.print_exc()
    say(f"[{name}] {time.perf_counter() - t0:.1f} s")
    (run.out / "gpu.json").write_text(json.dumps(RESULTS, indent=1) + "\n")


# -- the ceiling ---------------------------------------------------------------------------------

def matmul_peak(run: Run) -> None:
    n = 1024 if run.smoke else 8192
    a, b = (torch.randn(n, n, device=run.device, dtype=torch.bfloat16) for _ in range(2))
    seconds = timed(run, lambda: a @ b, warmup=3, repeats=10)
    RESULTS["bf16_matmul_tflops"] = 2 * n**3 / seconds / 1e12
    say(f"bf16 matmul {n}^3 (random data): {RESULTS['bf16_matmul_tflops']:.0f} TFLOP/s")


def topk_cut(run: Run) -> None:
    """The masks' cut, s_(k) and s_(k+1) of each row, at a local step's widths and rows (every
    layer's units in one call; k 32): from topk(k + 1) in order, which sorts them, against
    `ops.masks._cut`, which takes them unsorted and reads two minima."""
    rows, k = (256, 8) if run.smoke else (24 * 256 * 8, 32)
    out = RESULTS.setdefault("topk_cut_ms", {})
    for width in (128, 512):
        s = torch.randn(rows, width, device=run.device)
        ordered = timed(run, lambda: s.topk(k + 1, dim=-1, sorted=True).values[:, k - 1 : k + 1], 3, 20)
        unsorted = timed(run, lambda: _cut(s, k), 3, 20)
        out[width] = {"sorted_topk": ordered * 1e3, "unsorted_and_minima": unsorted * 1e3}
        say(f"cut of {rows} rows x {width}, k {k}: topk in order {ordered * 1e3:.3f} ms, "
            f"unsorted + minima {unsorted * 1e3:.3f} ms ({ordered / unsorted:.2f}x)")


def lm_head(run: Run) -> None:
    """The LM head alone (loss and both gradients, GPT-2's vocabulary, d_model 128) for one stream
    at 24 x 256 and 192 x 256 rows, bf16 autocast and float32 (TF32): the chunked head (CUDA's
    policy), the Triton kernels (`DevicePolicy.triton_lm_head`) and plain F.cross_entropy(h @ W.T);
    each one's gradients against the chunked head's. (With --smoke, on CUDA's policy: the Triton
    kernels in Triton's interpreter where TRITON_INTERPRET=1 is set.)"""
    configure(run.device)
    vocab, d = (300, 32) if run.smoke else (50257, 128)
    out = RESULTS.setdefault("lm_head_ms", {})
    for rows in ((96,) if run.smoke else (24 * 256, 192 * 256)):
        h = torch.randn(rows, d, device=run.device, requires_grad=True)
        w = (torch.randn(vocab, d, device=run.device) / 8).requires_grad_()
        y = torch.randint(0, vocab, (rows,), device=run.device)
        for precision in PRECISIONS:
            times, grads = {}, {}
            for name, changes in (("chunked", {}), ("triton", {"triton_lm_head": True}),
                                  ("plain", {"plain_lm_head": True})):
                with policy_variant(**changes), device_policy_as("cuda"), autocast_for(run.device, precision)():
                    fn = lambda: torch.autograd.grad(linear_cross_entropy(h, w, y), (h, w))  # noqa: E731
                    grads[name] = fn()
                    times[name] = timed(run, fn, *short(run)) * 1e3
            off = {n: farthest(g, grads["chunked"]) for n, g in grads.items()}
            out[f"{rows} {precision}"] = {"ms": times, "grad_rel_diff": off}
            say(f"LM head, {rows} rows, {precision}: " + ", ".join(
                f"{n} {times[n]:.2f} ms (grads {off[n]:.1e} off)" for n in times))


def attention(run: Run) -> None:
    """One layer's attention alone (forward and backward, the paper's 16 heads of 8) at 24 x 256 and
    192 x 256, causal and two-stream, bf16 and float32 (TF32): PyTorch's fused attention in the
    form CUDA's policy picks, against the Triton kernels (`DevicePolicy.triton_attention`)."""
    configure(run.device)
    out = RESULTS.setdefault("attention_ms", {})
    for batch in ((2,) if run.smoke else (24, 192)):
        pos = 40 if run.smoke else 256
        for precision in PRECISIONS:
            dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
            xs = [torch.randn(batch, 16, pos, 8, device=run.device, dtype=dtype, requires_grad=True) for _ in range(5)]
            for rule, fn, n in (("causal", ops.causal_attention, 3), ("two-stream", ops.two_stream_attention, 5)):
                times, outs = {}, {}
                for name, changes in (("pytorch", {}), ("triton", {"triton_attention": True})):
                    with policy_variant(**changes), device_policy_as("cuda"), ops.use_backend("torch"):
                        step = lambda: torch.autograd.grad(fn(*xs[:n]).float().square().sum(), xs[:n])  # noqa: E731
                        outs[name] = step()
                        times[name] = timed(run, step, *short(run)) * 1e3
                off = farthest(outs["triton"], outs["pytorch"])
                out[f"{batch}x{pos} {precision} {rule}"] = {"ms": times, "grad_rel_diff": off}
                say(f"attention {batch}x{pos} {precision} {rule}: PyTorch {times['pytorch']:.3f} ms, "
                    f"Triton {times['triton']:.3f} ms ({times['pytorch'] / times['triton']:.2f}x), grads {off:.1e} apart")


def farthest(tensors, references) -> float:
    """The largest relative distance |a - b| / |b| between paired tensors (say, two ways' gradients)."""
    return max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(tensors, references))


def short(run: Run) -> tuple[int, int]:
    """Warm-up calls and timed calls of one operation: few in a smoke run (Triton's interpreter)."""
    return (1, 1) if run.smoke else (2, 10)


def timed(run: Run, fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median seconds of one call, after warm-up (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(run.device)
    if run.device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in events)[repeats // 2] / 1e3


# -- steps ---------------------------------------------------------------------------------------

def stepper(run: Run, model: torch.nn.Module, precision: str, graphed: bool, batch: int, pos: int,
            module: torch.nn.Module | None = None) -> Callable[[], object]:
    """A training step of `model` (run through `module`, e.g. its compiled form) on a fixed random
    batch, eager or graph-replayed, as `selfablate train` builds it."""
    tcfg = TrainConfig(warmup_steps=0, max_steps=10**6, precision=precision)
    opt = make_optimizer(model, tcfg, capturable=graphed)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, model.cfg.vocab_size, (batch, pos + 1), generator=gen)
    xy = (data[:, :-1].contiguous(), data[:, 1:].contiguous())
    steps = iter(range(10**9))
    net = model if module is None else module
    if graphed:
        graph = GraphedStep(net, opt, tcfg, run.device, autocast_for(run.device, precision, cache=False))
        return lambda: graph(xy, next(steps))
    autocast = autocast_for(run.device, precision)
    return lambda: train_step(net, opt, xy, next(steps), tcfg, run.device, autocast)


def new_model(run: Run, kind: str) -> SelfAblatingTransformer:
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = SelfAblatingTransformer(run.cfg(kind))
    return model.to(run.device)


@contextlib.contextmanager
def policy_variant(**changes):
    """CUDA's `ops.DevicePolicy` with some fields changed, for a side-by-side comparison."""
    policy_module = importlib.import_module("selfablate.ops.policy")  # the module, not ops.policy the function
    saved = policy_module.POLICIES["cuda"]
    policy_module.POLICIES["cuda"] = saved._replace(**changes)
    try:
        yield
    finally:
        policy_module.POLICIES["cuda"] = saved


def throughput(run: Run, kind: str, batch: int, pos: int, precision: str, mode: str, variant: str = "",
               profile: bool = False) -> dict[str, float]:
    """tokens/s and peak memory of one configuration (mode: eager, graph, compiled, compiled+graph);
    with `profile`, also its kernels per step and the costliest of them."""
    configure(run.device)
    model = new_model(run, kind)
    module = None
    if mode.startswith("compiled"):
        torch._dynamo.reset()  # each configuration compiles afresh (a policy variant changes the graph)
        module = torch.compile(model, fullgraph=True)
    step = stepper(run, model, precision, graphed=mode.endswith("graph"), batch=batch, pos=pos, module=module)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_first = time.perf_counter()
    step()
    sync(run.device)
    first = time.perf_counter() - t_first
    seconds = timed(run, step, warmup=4, repeats=5 if run.smoke else 20)
    peak = torch.cuda.max_memory_allocated() / 2**30 if run.device.type == "cuda" else float("nan")
    row = {"tokens_per_s": batch * pos / seconds, "ms_per_step": 1e3 * seconds, "peak_gib": peak,
           "first_step_s": first}
    flops = train_flops_per_token(run.cfg(kind), pos)
    row["mfu"] = row["tokens_per_s"] * flops / (RESULTS.get("bf16_matmul_tflops", float("nan")) * 1e12)
    name = f"{kind} {batch}x{pos} {precision} {mode}{variant}"
    RESULTS.setdefault("throughput", {})[name] = row
    say(f"{kind:>8} {batch:>3}x{pos} {precision:>8} {mode + variant:<20} {row['tokens_per_s']:>11,.0f} tok/s "
        f"{row['ms_per_step']:>7.2f} ms  peak {peak:5.2f} GiB  MFU {row['mfu']:6.1%}  first step {first:5.1f} s")
    if profile and run.device.type == "cuda":
        RESULTS.setdefault("profiles", {})[name] = kernel_profile(step, name)
    del step, model, module
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def gpt_neo(run: Run) -> None:
    configure(run.device)
    for batch, pos in run.shapes:
        for precision in PRECISIONS:
            step = gpt_neo_step(run.cfg("baseline"), batch, pos, run.device, autocast_for(run.device, precision))
            seconds = timed(run, step, warmup=3, repeats=5 if run.smoke else 20)
            RESULTS.setdefault("gpt_neo", {})[f"{batch}x{pos} {precision}"] = batch * pos / seconds
            say(f"  gpt-neo {batch:>3}x{pos} {precision:>8} eager           {batch * pos / seconds:>11,.0f} tok/s "
                f"{1e3 * seconds:>7.2f} ms")


# -- correctness ---------------------------------------------------------------------------------

@contextlib.contextmanager
def exact_float32():
    """No TF32: float32 matmuls as float32, for comparisons with float64."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def graph_equals_eager(run: Run) -> None:
    """From the same weights and batches: 5 eager steps, twice (the control: CUDA's atomics make
    eager runs differ too), and 5 steps of which the last 2 replay a captured graph (float32, no TF32)."""
    if run.device.type != "cuda":
        say("graph vs eager: needs CUDA")
        return
    with exact_float32():
        for kind in ("local", "global"):
            out = []
            for graphed in (False, False, True):
                model = new_model(run, kind)
                step = stepper(run, model, "float32", graphed, batch=4, pos=model.cfg.n_ctx)  # graphs: 3 warm-up calls
                losses = [step().read().loss for _ in range(5)]
                out.append((losses, torch.cat([p.detach().flatten() for p in model.parameters()])))
            (la, wa), (lb, wb), (lg, wg) = out
            for name, (l2, w2) in (("eager vs eager", (lb, wb)), ("graph vs eager", (lg, wg))):
                loss_diff = max(abs(a - b) / abs(a) for a, b in zip(la, l2))
                weight_diff = ((wa - w2).norm() / wa.norm()).item()
                RESULTS.setdefault(name.replace(" ", "_"), {})[kind] = {"loss_rel": loss_diff, "weights_rel": weight_diff}
                say(f"{name}, {kind}: 5 steps, loss rel diff {loss_diff:.1e}, weights rel diff {weight_diff:.1e}")


def versus_float64(run: Run) -> None:
    """CUDA float32 (no TF32) against the same model in float64 on the CPU: the paper's architecture,
    2 x 256 random tokens, local and global."""
    for kind in ("local", "global"):
        model = new_model(run, kind).float()
        ref = copy.deepcopy(model).cpu().double()
        tokens = torch.randint(0, model.cfg.vocab_size, (2, model.cfg.n_ctx + 1), generator=torch.Generator().manual_seed(1))
        x, y = tokens[:, :-1], tokens[:, 1:]
        with torch.no_grad(), exact_float32():
            a = model(x.to(run.device), y.to(run.device), return_logits=True)
            b = ref(x, y, return_logits=True)
        losses = max(abs(getattr(a, f).item() - getattr(b, f).item()) / abs(getattr(b, f).item())
                     for f in ("loss", "loss_clean", "loss_ablated"))
        logits = max(((getattr(a, f).cpu().double() - getattr(b, f)).abs().max() / getattr(b, f).abs().max()).item()
                     for f in ("logits_clean", "logits_ablated"))
        masks = max((getattr(a, f).cpu().double() != getattr(b, f)).any(-1).double().mean().item()
                    for f in ("attn_mask", "mlp_mask"))
        RESULTS.setdefault("vs_float64", {})[kind] = {"loss_rel": losses, "logits_rel": logits, "mask_rows_differ": masks}
        say(f"float32 on {run.device.type} vs float64 on the CPU, {kind}: losses rel {losses:.1e}, "
            f"logits rel {logits:.1e}, mask rows that differ {masks:.2%}")


def bf16_gradient(run: Run) -> None:
    """The gradient of one step's loss under bf16 autocast against float32's (no TF32)."""
    for kind in ("local", "global"):
        model = new_model(run, kind)
        tokens = torch.randint(0, model.cfg.vocab_size, (8, model.cfg.n_ctx + 1), generator=torch.Generator().manual_seed(2))
        x, y = tokens[:, :-1].to(run.device), tokens[:, 1:].to(run.device)
        grads = {}
        for precision in PRECISIONS:
            model.zero_grad(set_to_none=True)
            with exact_float32(), autocast_for(run.device, precision)():
                model(x, y, return_logits=False, return_masks=False).loss.backward()
            grads[precision] = torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None])
        g16, g32 = grads["bfloat16"], grads["float32"]
        ratio, cos = (g16.norm() / g32.norm()).item(), torch.nn.functional.cosine_similarity(g16, g32, dim=0).item()
        RESULTS.setdefault("bf16_gradient", {})[kind] = {"norm_ratio": ratio, "cosine": cos}
        say(f"bf16 vs float32 gradient, {kind}: norm ratio {ratio:.4f}, cosine {cos:.4f}")
        for group, (a, b) in _by_group(model, grads).items():
            say(f"    {group:<12} norm ratio {(a.norm() / b.norm()).item():.4f}, "
                f"cosine {torch.nn.functional.cosine_similarity(a, b, dim=0).item():.4f}, norm {b.norm().item():.3g}")


def _by_group(model: torch.nn.Module, grads: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The two flattened gradients cut into parameter groups: embeddings, mask heads, the rest."""
    spans, start = {}, 0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        group = "wte" if name.startswith("wte") else "wpe" if name.startswith("wpe") else \
            "mask heads" if "mask_head" in name else "blocks"
        spans.setdefault(group, []).append(slice(start, start + p.numel()))
        start += p.numel()
    return {g: tuple(torch.cat([grads[pr][sl] for sl in sl_list]) for pr in PRECISIONS)
            for g, sl_list in spans.items()}


# -- kernels per step ----------------------------------------------------------------------------

def kernel_profile(step: Callable[[], object], name: str, steps: int = 3, top: int = 12) -> dict[str, object]:
    """CUDA kernels per step and the costliest kernels (total device time over `steps` steps)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    device_us = lambda e: getattr(e, "self_device_time_total", 0) or getattr(e, "device_time_total", 0)  # noqa: E731
    total = sum(device_us(e) for e in kernels) / steps
    count = sum(e.count for e in kernels) / steps
    say(f"  {name}: {count:.0f} kernels a step, {total / 1e3:.2f} ms of kernel time a step; costliest:")
    rows = []
    for e in sorted(kernels, key=device_us, reverse=True)[:top]:
        rows.append({"kernel": e.key[:100], "calls": e.count / steps, "ms": device_us(e) / steps / 1e3})
        say(f"    {rows[-1]['ms']:7.3f} ms {rows[-1]['calls']:6.0f}x  {rows[-1]['kernel']}")
    return {"kernels": count, "kernel_ms": total / 1e3, "top": rows}


# -- the plan ------------------------------------------------------------------------------------

def speed_section(kinds: tuple[str, ...], shapes: tuple[int, ...], precisions: tuple[str, ...],
                  modes: tuple[str, ...], profile: bool = False, **policy) -> Callable[[Run], None]:
    """Time every combination; with policy fields, under CUDA's policy changed so (a variant)."""
    variant = "".join(f" {k}={v}" for k, v in policy.items())

    def fn(run: Run) -> None:
        for kind in kinds:
            for i in shapes:
                batch, pos = run.shapes[i]
                for precision in precisions:
                    for mode in modes:
                        if mode.endswith("graph") and run.device.type != "cuda":
                            continue
                        with policy_variant(**policy) if policy else contextlib.nullcontext():
                            throughput(run, kind, batch, pos, precision, mode, variant, profile)
    return fn


TRITON = {"triton_lm_head": True, "triton_attention": True}
VARIANTS = ({"two_stream_masked": True}, {"topk_by_sort": True}, {"plain_lm_head": True}, {"triton_lm_head": True},
            {"triton_attention": True}, TRITON)
"""CUDA policy choices measured against the policy in force (`ops.DevicePolicy`: the self-key
attention, topk's winners, the chunked LM head against the plain one, the Triton kernels)."""


def variants(modes: tuple[str, ...]) -> Callable[[Run], None]:
    def fn(run: Run) -> None:
        for changes in VARIANTS:
            speed_section(("local",), (0,), ("bfloat16",), modes, **changes)(run)
    return fn


def evaluation(name: str, graphs: bool = True) -> Callable[[Run], None]:
    """One of the grid's evaluations (`gpu_evals`): circuits, evaluate or sae (graphs=False: eager)."""
    def fn(run: Run) -> None:
        r = gpu_evals.run(name, run.device, run.smoke, graphs)
        RESULTS.setdefault("evaluations", {})[name if graphs else f"{name} eager"] = r
        say(r["line"])
    return fn


PLAN = {
    "peak": ("bf16 matmul peak", 5, matmul_peak),
    "cut": ("the masks' cut, sorted or not", 5, topk_cut),
    "lm-head": ("the LM head alone: chunked, Triton, plain", 20, lm_head),
    "attention": ("attention alone: PyTorch's, Triton's", 15, attention),
    "graph": ("graph vs eager", 25, graph_equals_eager),
    "local": ("local 24x256", 20, speed_section(("local",), (0,), PRECISIONS, ("eager", "graph"))),
    "gpt-neo": ("gpt-neo", 25, gpt_neo),
    "others": ("global and baseline 24x256", 20, speed_section(("global", "baseline"), (0,), PRECISIONS,
                                                                ("eager", "graph"))),
    "large": ("192x256", 40, speed_section(("local", "global", "baseline"), (1,), ("bfloat16",), ("eager", "graph"))),
    "variants": ("policy variants, graph", 15, variants(("graph",))),
    "profile": ("kernels of a graph-replayed step", 15,
                speed_section(("local", "baseline"), (0,), ("bfloat16",), ("graph",), profile=True)),
    "float64": ("vs float64", 30, versus_float64),
    "bf16": ("bf16 gradient", 15, bf16_gradient),
    "large32": ("192x256 float32", 20, speed_section(("local",), (1,), ("float32",), ("eager", "graph"))),
    "circuits": ("ACDC on the paper graph", 60, evaluation("circuits")),
    "evaluate": ("evaluate 131k tokens", 30, evaluation("evaluate")),
    "sae": ("SAE steps/s", 30, evaluation("sae")),
    "sae-eager": ("SAE steps/s, eager", 30, evaluation("sae", graphs=False)),
    "circuits-eager": ("ACDC on the paper graph, eager", 120, evaluation("circuits", graphs=False)),
    "compiled": ("compiled local, bf16", 80, speed_section(("local",), (0,), ("bfloat16",), ("compiled+graph",),
                                                             profile=True)),
    "compiled32": ("compiled local, float32", 70, speed_section(("local",), (0,), ("float32",), ("compiled+graph",))),
    "compiled-global": ("compiled global", 70, speed_section(("global",), (0,), ("bfloat16",), ("compiled+graph",))),
    "compiled-large": ("compiled local 192x256", 70, speed_section(("local",), (1,), ("bfloat16",),
                                                                     ("compiled+graph",), profile=True)),
    "compiled-triton": ("compiled local, the Triton kernels", 70,
                        speed_section(("local",), (0,), ("bfloat16",), ("compiled+graph",), profile=True, **TRITON)),
    "compiled-large-triton": ("compiled local 192x256, the Triton kernels", 70,
                              speed_section(("local",), (1,), ("bfloat16",), ("compiled+graph",), **TRITON)),
    "compiled-triton32": ("compiled local, float32, the Triton kernels", 70,
                          speed_section(("local",), (0,), ("float32",), ("compiled+graph",), **TRITON)),
    "compiled-variants": ("policy variants, compiled", 360, variants(("compiled+graph",))),
    "compiled-baseline": ("compiled baseline", 50, speed_section(("baseline",), (0,), ("bfloat16",),
                                                                 ("compiled+graph",))),
}
"""Sections by key, in the order they run: --only picks some."""


def summary() -> None:
    """The table: each configuration's tokens/s, against eager and GPT-Neo."""
    rows = RESULTS.get("throughput", {})
    neo = RESULTS.get("gpt_neo", {})
    print("\n| configuration | tok/s | ms/step | vs eager | vs GPT-Neo | peak GiB | MFU (bf16 peak) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        kind, shape, precision, mode = name.split()[:4]
        eager = rows.get(f"{kind} {shape} {precision} eager", {}).get("tokens_per_s")
        ref = neo.get(f"{shape} {precision}")
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.2f} | "
              f"{r['tokens_per_s'] / eager if eager else float('nan'):.2f}x | "
              f"{r['tokens_per_s'] / ref if ref else float('nan'):.2f}x | {r['peak_gib']:.2f} | {r['mfu']:.1%} |")
    for name, value in neo.items():
        print(f"| transformers GPT-Neo {name} eager | {value:,.0f} | | | 1.00x | | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=240.0, help="seconds; sections that would end later are skipped")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu.json")
    p.add_argument("--only", default="", help=f"comma-separated sections, of: {', '.join(PLAN)}")
    p.add_argument("--smoke", action="store_true", help="run the code on this CPU at tiny sizes (no timings that matter)")
    args = p.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here; nothing measured (--smoke runs the code on the CPU)")
        return
    run = Run(args.smoke, args.budget, Path(args.out))
    run.out.mkdir(parents=True, exist_ok=True)
    name = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name()
    RESULTS["device"], RESULTS["torch"] = name, torch.__version__
    RESULTS["date"] = time.strftime("%Y-%m-%d")
    say(f"{name}, torch {torch.__version__}, {RESULTS['date']}")
    for key in args.only.split(",") if args.only else PLAN:
        section(run, *PLAN[key])
    summary()
    (run.out / "gpu.json").write_text(json.dumps(RESULTS, indent=1) + "\n")


if __name__ == "__main__":
    main()
