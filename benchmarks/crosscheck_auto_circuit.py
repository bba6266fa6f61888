"""Cross-check our circuit discovery against auto-circuit 1.0.1 (the paper's tool) on the same
weights, through the TransformerLens export. Not part of `make test`: auto-circuit needs
transformer-lens 2.18, numpy < 2 and pyarrow < 23 (`make crosscheck` builds that venv).

Compares, on one model and one batch of equal-length IOI prompts:
  1. the KL of the same patched circuits (random edge masks) computed by both;
  2. EAP scores (logit-difference gradient at mask 0) per edge;
  3. ACDC at one tau, with our ACDC visiting edges in auto-circuit's own order (its order within
     a layer is a Python set's, so the same order is needed for the same greedy result): one edge
     a pass, 16 speculative trials a pass, and 32 through the fixed-shape pass that CUDA replays.

    python benchmarks/crosscheck_auto_circuit.py [--checkpoint DIR] [--prompts 16] [--tau 0.03]
"""

import argparse
import time

import torch
from torch.nn.functional import log_softmax

from auto_circuit.data import PromptDataLoader, PromptDataset
from auto_circuit.prune_algos.ACDC import acdc_prune_scores
from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores
from auto_circuit.utils.ablation_activations import src_ablations
from auto_circuit.utils.graph_utils import patch_mode, patchable_model, set_all_masks
from auto_circuit.utils.tensor_ops import multibatch_kl_div

from selfablate import ModelConfig, SelfAblatingTransformer, load_checkpoint
from selfablate.circuits.discovery import acdc, eap_scores, kl_with_mask, make_task
from selfablate.circuits.ioi import IOIBatch, ioi_prompts
from selfablate.interop.transformer_lens import to_hooked_transformer
from selfablate.data.vocab import to_model_ids

from random_model import nudged


def their_name(name: str) -> str:
    """Our node names -> auto-circuit's."""
    if name == "embed":
        return "Resid Start"
    if name == "final":
        return "Resid End"
    parts = name.split(".")
    layer = parts[0][1:]
    if parts[1] == "MLP":
        return f"MLP {layer}"
    head = f"A{layer}.{parts[1][1:]}"
    return head if len(parts) == 2 else f"{head}.{parts[2].upper()}"


def equal_length_prompts(n: int, seed: int) -> IOIBatch:
    """auto-circuit reads the last position of the batch, so all prompts must have one length."""
    pool = ioi_prompts(8 * n, seed=seed)
    lengths = pool.last.tolist()
    mode = max(set(lengths), key=lengths.count)
    idx = torch.tensor([i for i, L in enumerate(lengths) if L == mode][:n])
    T = mode + 1
    return IOIBatch(pool.clean[idx, :T], pool.corrupt[idx, :T], pool.last[idx], pool.io[idx], pool.s[idx],
                    [pool.texts[i] for i in idx.tolist()])


def build_model(checkpoint: str) -> SelfAblatingTransformer:
    if checkpoint:
        return load_checkpoint(checkpoint).double().eval()
    torch.manual_seed(0)
    cfg = ModelConfig(n_ctx=64, d_model=64, n_layers=2, n_heads=4, d_mlp=256, ablation="local", k_attn=16, k_mlp=64)
    return nudged(SelfAblatingTransformer(cfg).double()).eval()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--tau", type=float, default=0.0, help="0: 2%% of the fully patched KL")
    args = p.parse_args()
    model = build_model(args.checkpoint)
    batch = equal_length_prompts(args.prompts, seed=0)
    task = make_task(model, batch)
    g = task.graph
    ids = lambda t: to_model_ids(model, t)  # noqa: E731

    ht = to_hooked_transformer(model, use_attn_result=True, use_split_qkv_input=True, use_hook_mlp_in=True)
    ours_logits = model(ids(batch.clean)).logits_clean
    print(f"model: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, {g.n_edges} edges, "
          f"{len(batch.texts)} prompts of {batch.clean.shape[1]} tokens")
    print(f"export: max |logits ours - TransformerLens| = {(ours_logits - ht(ids(batch.clean))).abs().max():.2e}")

    pm = patchable_model(ht, factorized=True, slice_output="last_seq", separate_qkv=True)
    dataset = PromptDataset(ids(batch.clean), ids(batch.corrupt), [a.view(1) for a in ids(batch.io)],
                            [s.view(1) for s in ids(batch.s)])
    loader = PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=len(dataset), shuffle=False)
    index = {(their_name(s), their_name(d)): i for i, (s, d) in enumerate(g.edge_names)}
    edges = {index[(e.src.name, e.dest.name)]: e for e in pm.edges}
    assert len(edges) == g.n_edges, f"auto-circuit has {len(pm.edges)} edges, we have {g.n_edges}"

    # 1. KL of the same circuits.
    clean, corrupt = ids(batch.clean), ids(batch.corrupt)
    patch_outs = src_ablations(pm, corrupt)
    with torch.inference_mode():
        clean_logp = log_softmax(pm(clean)[pm.out_slice], dim=-1)
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for density in (0.05, 0.3, 0.7, 1.0):
        mask = (torch.rand(g.n_edges, generator=gen) < density).double()
        set_all_masks(pm, 0.0)
        for i, e in edges.items():
            e.patch_mask(pm).data[e.patch_idx] = float(mask[i])
        with patch_mode(pm, patch_outs), torch.inference_mode():
            theirs = multibatch_kl_div(log_softmax(pm(clean)[pm.out_slice], dim=-1), clean_logp).item()
        ours = kl_with_mask(task, mask).item()
        worst = max(worst, abs(ours - theirs))
        print(f"KL of a random circuit (density {density}): ours {ours:.6f}, auto-circuit {theirs:.6f}")
    print(f"  max |difference| {worst:.2e}")
    set_all_masks(pm, 0.0)

    # 2. EAP.
    t0 = time.perf_counter()
    theirs_scores = mask_gradient_prune_scores(pm, loader, None, grad_function="logit", answer_function="avg_diff",
                                               mask_val=0.0)
    t_theirs = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours_eap = eap_scores(task)
    t_ours = time.perf_counter() - t0
    theirs_eap = torch.zeros(g.n_edges, dtype=torch.float64)
    for i, e in edges.items():
        theirs_eap[i] = float(e.prune_score(theirs_scores))
    a, b = ours_eap.abs(), theirs_eap.abs()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    print(f"EAP |scores|: correlation {corr:.6f}, max |difference| {(a - b).abs().max():.2e} "
          f"(max |score| {a.max():.3f}); time ours {t_ours:.2f} s, auto-circuit {t_theirs:.2f} s")

    # 3. ACDC at one tau, same edge order.
    tau = args.tau or kl_with_mask(task, torch.ones(g.n_edges, dtype=torch.float64)).item() / 50
    compare_acdc(task, pm, loader, edges, index, tau, "")


def compare_acdc(task, pm, loader, edges, index, tau: float, where: str) -> None:
    """ACDC at tau by auto-circuit and by us (visiting edges in auto-circuit's order): the kept edges."""
    exp = int(torch.floor(torch.log10(torch.tensor(tau))))
    base = tau / 10**exp
    order = [index[(e.src.name, e.dest.name)] for e in sorted(pm.edges, key=lambda x: x.dest.layer, reverse=True)]
    t0 = time.perf_counter()
    scores = acdc_prune_scores(pm, loader, None, tao_exps=[exp], tao_bases=[base])
    t_theirs = time.perf_counter() - t0
    theirs = {i for i, e in edges.items() if float(e.prune_score(scores)) == float("inf")}
    # One edge a pass (the CPU's default); 16 speculative trials a pass; and 32 through the dense
    # fixed-shape pass that CUDA records as a graph (`circuits`' default there), run eagerly here.
    for batch, fixed_shape in ((1, False), (16, False), (32, True)):
        t0 = time.perf_counter()
        r = acdc(task, tau, order=order, batch=batch, fixed_shape=fixed_shape)
        t_ours = time.perf_counter() - t0
        ours = {i for i in range(task.graph.n_edges) if r.mask[i] == 0}
        verdict = "same edges" if ours == theirs else f"{len(ours ^ theirs)} edges differ"
        how = f"batch {batch}" + (", fixed-shape pass" if fixed_shape else "")
        print(f"ACDC tau={tau:.4g}{where}, {how}: ours keeps {len(ours)} edges, auto-circuit {len(theirs)}, "
              f"in common {len(ours & theirs)}: {verdict}; time ours {t_ours:.2f} s, auto-circuit {t_theirs:.2f} s")
        for i in sorted(ours ^ theirs):
            print(f"  differs: {task.graph.edge_names[i]} (ours {'kept' if i in ours else 'pruned'}, "
                  f"delta KL {r.delta_kl[i]:.3g})")


if __name__ == "__main__":
    main()
