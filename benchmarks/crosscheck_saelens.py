"""Cross-check our SAE metrics against SAELens's evaluation code on the same SAE, model and
tokens. Not part of `make test`: sae-lens 6.54 needs transformer-lens 2.x; `make crosscheck` builds
a venv with both and runs this script.

SAELens computes sparsity and variance on every position of its batch, and CE on every position
but the last (whose next token it lacks). So SAELens gets the held-out windows of T + 1 tokens for
its losses and their first T tokens for sparsity and variance, and we evaluate the windows x (T
tokens) with targets y (the next T tokens): every metric then covers the same positions.

    python benchmarks/crosscheck_saelens.py [--checkpoint DIR] [--hook blocks.1.hook_mlp_out]
"""

import argparse

import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.evals import get_recons_loss, get_sparsity_and_variance_metrics
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.activation_scaler import ActivationScaler

from selfablate import ModelConfig, SelfAblatingTransformer, load_checkpoint
from selfablate.data.dataset import tokenize_split
from selfablate.data.sources import resolve_source
from selfablate.errors import DataError
from selfablate.interop.transformer_lens import to_hooked_transformer
from selfablate.sae.buffer import hook_activations
from selfablate.sae.model import SAE, SAEConfig, load_sae
from selfablate.sae.train import evaluate_sae
from selfablate.data.vocab import to_model_ids

from random_model import nudged


class Windows:
    """The part of TokenWindows that evaluate_sae reads: fixed (x, y) batches."""

    def __init__(self, full: torch.Tensor):
        self.full, self.seq_len = full, full.shape[1] - 1

    def sequential_batches(self, batch_size: int, limit: int):
        return [(self.full[:, :-1], self.full[:, 1:])]


class Store:
    """The part of SAELens's ActivationsStore that its sparsity metrics read."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        return self.tokens


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="")
    p.add_argument("--hook", default="blocks.1.hook_mlp_out")
    p.add_argument("--sae", default="", help="a trained SAE folder (selfablate sae train --out); default: a synthetic one")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--data", default="", help="held-out text (as for train); empty: the default")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint).eval()
    else:
        model = nudged(SelfAblatingTransformer(ModelConfig(n_ctx=64, d_model=64, n_layers=2, n_heads=4, d_mlp=256,
                                                           ablation="local", k_attn=16, k_mlp=64))).eval()
    T = min(64, model.cfg.n_ctx) - 1  # SAELens reads T + 1 tokens
    n = args.windows * (T + 1)
    try:
        raw = torch.from_numpy(tokenize_split(resolve_source(args.data), "valid", progress=False)[:n].astype("int64"))
    except DataError as e:  # the cross-check is of metric definitions: any tokens will do
        print(f"no held-out text ({e}); using random GPT-2 token ids")
        raw = torch.randint(0, 50257, (n,), generator=torch.Generator().manual_seed(0))
    full = to_model_ids(model, raw.view(args.windows, T + 1))  # (windows, T + 1)

    # An SAE with some structure: decoder rows from real activations, a negative encoder bias.
    if args.sae:
        sae = load_sae(args.sae).eval()
        args.hook = sae.cfg.hook
    acts = hook_activations(model, full[:, :-1], args.hook).float()
    d_in = acts.shape[-1]
    if not args.sae:
        sae = SAE(SAEConfig(d_in, 8 * d_in, "relu", hook=args.hook, scale=d_in**0.5 / acts.norm(dim=-1).mean().item()))
        with torch.no_grad():
            sae.b_enc.fill_(-0.3)
            sae.b_dec.copy_(acts.mean(0) * sae.cfg.scale)
    ours = evaluate_sae(model, sae, Windows(full), n_tokens=full[:, :-1].numel())

    theirs_sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=sae.cfg.d_sae, apply_b_dec_to_input=True,
                                               metadata=SAEMetadata(hook_name=args.hook)))
    theirs_sae.load_state_dict({k: v.detach().clone() for k, v in sae.state_dict().items()})
    scaler = ActivationScaler(scaling_factor=sae.cfg.scale)
    ht = to_hooked_transformer(model)
    sparse, feats = get_sparsity_and_variance_metrics(
        theirs_sae, ht, Store(full[:, :-1]), scaler, n_batches=1, compute_l2_norms=False, compute_sparsity_metrics=True,
        compute_variance_metrics=True, compute_featurewise_density_statistics=True, eval_batch_size_prompts=len(full),
        model_kwargs={})
    rec = get_recons_loss(theirs_sae, ht, scaler, full, compute_kl=True, compute_ce_loss=True, hook_name=args.hook)
    mean = {k: v[:, : T].mean().item() if v.dim() > 1 else v.mean().item() for k, v in rec.items()}
    theirs = {
        "l0": sparse["l0"], "explained_variance": sparse["explained_variance"],
        "ce_clean": mean["ce_loss_without_sae"], "ce_with_sae": mean["ce_loss_with_sae"],
        "ce_zero_ablation": mean["ce_loss_with_ablation"],
        "ce_loss_score_zero": (mean["ce_loss_with_ablation"] - mean["ce_loss_with_sae"])
        / (mean["ce_loss_with_ablation"] - mean["ce_loss_without_sae"]),
        "kl_with_sae": mean["kl_div_with_sae"], "kl_zero_ablation": mean["kl_div_with_ablation"],
        "kl_div_score": (mean["kl_div_with_ablation"] - mean["kl_div_with_sae"]) / mean["kl_div_with_ablation"],
        "dead_fraction": sum(f == 0 for f in feats["feature_density"]) / len(feats["feature_density"]),
    }
    print(f"SAE on {args.hook}: d_in {d_in}, d_sae {sae.cfg.d_sae}, {full[:, :-1].numel()} positions "
          f"({args.windows} windows of {T} tokens)")
    print(f"{'metric':<22} {'selfablate':>12} {'SAELens':>12} {'|diff|':>10}")
    worst = 0.0
    for k, v in theirs.items():
        diff = abs(ours[k] - v)
        worst = max(worst, diff)
        print(f"{k:<22} {ours[k]:>12.6f} {v:>12.6f} {diff:>10.2e}")
    print(f"max |difference| {worst:.2e}")


if __name__ == "__main__":
    main()
