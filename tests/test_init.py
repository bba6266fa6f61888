"""Initialisation: `init="torch-default"` gives every parameter the distribution the authors' model
gives it, and every preset starts at a cross-entropy near ln(vocab)."""

import math

import pytest
import torch

from selfablate import ModelConfig, SelfAblatingTransformer
from selfablate.config import PRESETS

# The paper's widths: the tied matrix's bound 1/sqrt(d_model) differs from the MLP's 1/sqrt(d_mlp).
PAPER = dict(vocab_size=50257, n_ctx=256, d_model=128, n_layers=2, n_heads=16, d_mlp=512)


def authors_default(name: str, cfg: ModelConfig) -> tuple[str, float]:
    """The distribution a parameter of ours has in the authors' model (keenanpepper/
    self-ablating-transformers, model/), where every module keeps PyTorch's default:
    ("uniform", bound) for nn.Linear's U(+-1/sqrt(fan_in)) (weight and bias alike),
    ("normal", std) for nn.Embedding, ("exact", value) for LayerNorm."""
    d, d_mlp = cfg.d_model, cfg.d_mlp
    table = {
        # tied by wte.weight = lm_head.weight: the matrix is nn.Linear(d_model, vocab, bias=False)'s
        "wte.weight": ("uniform", 1 / math.sqrt(d)),
        "wpe.weight": ("normal", 1.0),  # nn.Embedding(n_ctx, d_model)
        "ln_1.weight": ("exact", 1.0), "ln_1.bias": ("exact", 0.0),
        "ln_2.weight": ("exact", 1.0), "ln_2.bias": ("exact", 0.0),
        "ln_final.weight": ("exact", 1.0), "ln_final.bias": ("exact", 0.0),  # their ln_f
        # attention.py: q/k/v_proj Linear(d, d, bias=False), out_proj Linear(d, d)
        "q_proj.weight": ("uniform", 1 / math.sqrt(d)), "k_proj.weight": ("uniform", 1 / math.sqrt(d)),
        "v_proj.weight": ("uniform", 1 / math.sqrt(d)),
        "out_proj.weight": ("uniform", 1 / math.sqrt(d)), "out_proj.bias": ("uniform", 1 / math.sqrt(d)),
        # mlp.py: c_fc Linear(d, d_mlp), c_proj Linear(d_mlp, d)
        "fc_in.weight": ("uniform", 1 / math.sqrt(d)), "fc_in.bias": ("uniform", 1 / math.sqrt(d)),
        "fc_out.weight": ("uniform", 1 / math.sqrt(d_mlp)), "fc_out.bias": ("uniform", 1 / math.sqrt(d_mlp)),
        # block.py's attention/neuron_ablation_head Linear(d, d) / Linear(d, d_mlp); gpt_neo.py's
        # attention/neuron_ablations_head Linear(d, L d) / Linear(d, L d_mlp): all read d
        "mask_head.attn.weight": ("uniform", 1 / math.sqrt(d)), "mask_head.attn.bias": ("uniform", 1 / math.sqrt(d)),
        "mask_head.mlp.weight": ("uniform", 1 / math.sqrt(d)), "mask_head.mlp.bias": ("uniform", 1 / math.sqrt(d)),
    }
    key = next((k for k in table if name == k or name.endswith("." + k) or name.endswith("_" + k)), None)
    assert key is not None, f"no expected distribution for parameter {name}"
    return table[key]


def check_distribution(name: str, p: torch.Tensor, kind: str, value: float) -> None:
    x = p.detach().double().flatten()
    n = x.numel()
    if kind == "exact":
        assert torch.equal(x, torch.full_like(x, value)), name
        return
    # the sample std's relative standard error is about sqrt((kurtosis - 1) / n) / 2: allow 6 of them
    kurtosis, std = (1.8, value / math.sqrt(3)) if kind == "uniform" else (3.0, value)
    tol = 3 * math.sqrt((kurtosis - 1) / n)
    assert abs(x.std().item() / std - 1) < tol, f"{name}: std {x.std().item():.4g}, expected {std:.4g} ({kind})"
    assert abs(x.mean().item()) < 6 * std / math.sqrt(n), f"{name}: mean {x.mean().item():.3g}"
    if kind == "uniform":
        assert x.abs().max().item() <= value, f"{name}: beyond U(+-{value:.4g})"
        assert x.abs().max().item() > value * (1 - 20 / n), f"{name}: narrower than U(+-{value:.4g})"


@pytest.mark.parametrize("ablation", ["local", "global"])
def test_torch_default_gives_every_parameter_the_authors_distribution(ablation):
    cfg = ModelConfig(**PAPER, ablation=ablation, init="torch-default")
    torch.manual_seed(0)
    model = SelfAblatingTransformer(cfg)
    for name, p in model.named_parameters():
        check_distribution(name, p, *authors_default(name, cfg))


def test_gpt_neo_init_is_normal_with_zero_biases():
    cfg = ModelConfig(**PAPER, init="gpt-neo", init_std=0.02)
    torch.manual_seed(0)
    for name, p in SelfAblatingTransformer(cfg).named_parameters():
        if "ln" in name:
            check_distribution(name, p, "exact", 1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            check_distribution(name, p, "exact", 0.0)
        else:
            check_distribution(name, p, "normal", 0.02)


def initial_cross_entropy(cfg: ModelConfig, seed: int, batch: int = 2, pos: int = 128) -> tuple[float, float]:
    """Clean and ablated CE of a freshly initialised model on uniformly random tokens."""
    torch.manual_seed(seed)
    model = SelfAblatingTransformer(cfg).eval()
    pos = min(pos, cfg.n_ctx)
    tokens = torch.randint(0, cfg.vocab_size, (batch, pos + 1), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(tokens[:, :-1], targets=tokens[:, 1:])
    return out.loss_clean.item(), out.loss_ablated.item()


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("init", ["preset's", "torch-default", "gpt-neo"])
def test_every_preset_starts_near_ln_vocab(preset, init):
    """A uniform prediction costs ln(vocab); a model at initialisation should be near it (the
    authors' model: 11.01 at ln 50257 = 10.83), not tens of nats above."""
    cfg = PRESETS[preset]()[0]
    if init != "preset's":
        cfg = ModelConfig(**{**cfg.__dict__, "init": init})
    clean, ablated = initial_cross_entropy(cfg, seed=0)
    for ce in (clean, ablated):
        assert abs(ce - math.log(cfg.vocab_size)) < 0.5, (preset, init, clean, ablated)
