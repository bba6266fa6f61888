"""Why a bf16 step's gradient is far from float32's in a self-ablating model, on the CPU.

One step of the paper's architecture (4 x 256 random tokens), its gradient in float64 (the
reference), float32 and bf16 autocast, as cosines against float64 per parameter group; for bf16
also with float32's masks forced into the forward pass, and the gradients that reach the masks and
the scores, layer by layer. Each row is one initialisation, ablation and `topk_gap_floor`:

    python benchmarks/precision.py [--quick]

The soft top-k divides by the gap at each row's cut (D = T (s_(k) - s_(k+1)) + eps, widened to
the floor), so the rows with the narrowest gaps carry most of the scores' gradient. bf16's
rounding of the clean stream (about 4e-3 relative) changes which rows those are; float32's (6e-8)
does not. A wider floor bounds the amplification.
"""

from __future__ import annotations

import copy
import dataclasses
import sys

import torch

from selfablate import SelfAblatingTransformer
from selfablate.config import paper

GROUPS = ("wte", "wpe", "blocks", "mask heads", "all")


def group_of(name: str) -> str:
    return "wte" if name.startswith("wte") else "wpe" if name.startswith("wpe") else \
        "mask heads" if "mask_head" in name else "blocks"


def step_gradient(model, x, y, bf16: bool, masks: dict | None = None, watch: list[str] = ()):
    """Flattened gradients per group, the masks the forward pass chose, and the gradients that
    reached the hook points in `watch` (masks or scores)."""
    model.zero_grad(set_to_none=True)
    chosen, reached = {}, {}

    def hook(name):
        def fn(t, _):
            chosen[name] = t.detach().clone()
            t = t.clone() if masks is None else masks[name] + (t - t.detach())  # keep the soft gradient
            t.register_hook(lambda g: reached.__setitem__(name, g.detach().double()))
            return t
        return fn

    with model.hooks([(n, hook(n)) for n in watch]), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(x, y, return_logits=False, return_masks=False).loss.backward()
    flat = {}
    for n, p in model.named_parameters():
        flat.setdefault(group_of(n), []).append(p.grad.detach().double().flatten())
    flat = {g: torch.cat(v) for g, v in flat.items()}
    flat["all"] = torch.cat([flat[g] for g in GROUPS[:-1] if g in flat])
    return flat, chosen, reached


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def row(init: str, ablation: str, floor: float, layers: bool) -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(paper()[0], init=init, ablation=ablation, topk_gap_floor=floor)
    m32 = SelfAblatingTransformer(cfg)
    m64 = copy.deepcopy(m32).double()
    tokens = torch.randint(0, cfg.vocab_size, (4, cfg.n_ctx + 1), generator=torch.Generator().manual_seed(2))
    x, y = tokens[:, :-1], tokens[:, 1:]
    masks = [n for n in m32.hook_points() if n.endswith(("hook_attn_mask", "hook_mlp_mask"))]
    scores = [n for n in m32.hook_points() if n.endswith(("hook_attn_scores", "hook_mlp_scores"))]
    g64, _, _ = step_gradient(m64, x, y, False)
    g32, chosen32, reached32 = step_gradient(m32, x, y, False, watch=masks + scores)
    g16, chosen16, reached16 = step_gradient(m32, x, y, True, watch=masks + scores)
    masks = [n for n in masks if n in chosen32]  # a baseline has the hook points but no masks
    forced = step_gradient(m32, x, y, True, masks=chosen32, watch=masks)[0] if masks else g16
    differ = max(((chosen32[n] != chosen16[n]).any(-1).double().mean().item() for n in masks), default=0.0)
    print(f"{init:<13} {ablation:<6} {floor:<5} " + " ".join(
        f"{cos(g32[g], g64[g]):.4f}/{cos(g16[g], g64[g]):.4f}/{cos(forced[g], g64[g]):.4f}" if g in g64 else f"{'-':^20}"
        for g in GROUPS) + f"  {differ:.1%}")
    if layers and masks:
        for n in masks + scores:
            print(f"    {n:<28} bf16 vs float32: cosine {cos(reached16[n], reached32[n]):.4f}, "
                  f"float32 norm {reached32[n].norm().item():.3g}")


def main() -> None:
    quick = "--quick" in sys.argv
    print(f"torch {torch.__version__}; paper architecture, one step of 4 x 256 random tokens")
    print("cosine with float64's gradient: float32 / bf16 / bf16 with float32's masks forced; "
          "last column: most mask rows that differ in any layer, bf16 against float32")
    print(f"{'init':<13} {'abl.':<6} {'floor':<5} " + " ".join(f"{g:^20}" for g in GROUPS) + "  rows")
    row("torch-default", "local", 0.01, layers=not quick)
    if quick:
        return
    row("torch-default", "none", 0.01, layers=False)
    row("gpt-neo", "local", 0.01, layers=False)
    row("gpt-neo", "none", 0.01, layers=False)
    row("torch-default", "global", 0.01, layers=False)
    for floor in (0.1, 0.5):
        row("torch-default", "local", floor, layers=False)


if __name__ == "__main__":
    main()
