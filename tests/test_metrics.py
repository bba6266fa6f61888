"""Metric formulas on cases computed by hand."""

import math

import numpy as np
import pytest
import torch

from selfablate.eval import metrics as M


def test_selection_frequency_dead_and_always_on():
    # 4 tokens, 1 layer, 4 units, k = 2.
    masks = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0]]).view(4, 1, 4)
    f = M.selection_frequency(masks)
    assert f.tolist() == [[1.0, 0.5, 0.5, 0.0]]
    assert M.dead_fraction(f).tolist() == [0.25]
    assert M.always_on_fraction(f).tolist() == [0.25]


def test_mask_entropy_extremes_and_a_hand_case():
    uniform = torch.full((1, 8), 0.25)  # k=2 of 8, every unit equally often
    assert M.mask_entropy(uniform).item() == pytest.approx(math.log(8))
    fixed = torch.tensor([[1.0, 1.0, 0, 0, 0, 0, 0, 0]])  # the same 2 units always
    assert M.mask_entropy(fixed).item() == pytest.approx(math.log(2))
    f = torch.tensor([[1.0, 0.5, 0.5, 0.0]])  # p = (1/2, 1/4, 1/4, 0)
    assert M.mask_entropy(f).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(4))


def test_persistence_between_adjacent_tokens():
    m = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 0]]).view(1, 3, 1, 4)
    # t=0->1 keeps 1 of 2, t=1->2 keeps 2 of 2: 3 / 4
    assert M.persistence(m).tolist() == [0.75]


def test_hoyer_gini_kurtosis_near_zero():
    one_hot = torch.tensor([[0.0, 0.0, 0.0, 5.0]])
    flat = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    assert M.hoyer_sparsity(one_hot).item() == pytest.approx(1.0)
    assert M.hoyer_sparsity(flat).item() == pytest.approx(0.0)
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # L1/L2 = 2/sqrt2 = sqrt2; (2 - sqrt2)/(2 - 1)
    assert M.hoyer_sparsity(x).item() == pytest.approx(2 - math.sqrt(2))
    assert M.gini(flat).item() == pytest.approx(0.0)
    assert M.gini(one_hot).item() == pytest.approx(0.75)  # 1 - 1/n
    # sorted (0,0,1,1): sum (2i-5) c_i = (1)(1) + (3)(1) = 4; / (4 * 2) = 0.5
    assert M.gini(x).item() == pytest.approx(0.5)
    # (1,0,0,1): mu 0.5, deviations +-0.5, m2 = 0.25, m4 = 0.0625 -> 1.0
    assert M.kurtosis(x).item() == pytest.approx(1.0)
    # (0,0,0,4): mu 1, d = (-1,-1,-1,3): m2 = 3, m4 = (1+1+1+81)/4 = 21 -> 21/9
    assert M.kurtosis(torch.tensor([[0.0, 0.0, 0.0, 4.0]])).item() == pytest.approx(21 / 9)
    assert M.near_zero_fraction(torch.tensor([[0.001, -0.005, 0.5, -2.0]])).item() == 0.5


def test_weight_l1_all_counts_the_tied_embedding_twice():
    params = [("wte.weight", torch.tensor([[1.0, -1.0]])), ("wpe.weight", torch.tensor([[0.0, 0.0]])),
              ("blocks.0.mlp.fc_in.weight", torch.tensor([[4.0, 0.0]])), ("blocks.0.mlp.fc_in.bias", torch.tensor([2.0])),
              ("blocks.0.mask_head.attn.weight", torch.tensor([[9.0, 9.0]]))]
    # (2*2 + 0 + 4 + 2 + 18) / (2*2 + 2 + 2 + 1 + 2) = 28 / 11
    assert M.weight_l1_all(params) == pytest.approx(28 / 11)
    assert M.weight_l1_nonembedding(params) == pytest.approx(4 / 2)


def test_token_entropy_and_selectivity():
    assert M.token_entropy([7, 7, 7, 7]) == 0.0
    assert M.token_entropy([1, 2, 3, 4]) == pytest.approx(math.log(4))
    assert M.token_entropy([1, 1, 2, 3]) == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    means = torch.tensor([[4.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 2.0]])  # 3 classes x 3 units
    si = M.selectivity_index(means)
    assert si[0].item() == pytest.approx(1.0) and si[1].item() == pytest.approx(0.0)
    assert si[2].item() == pytest.approx((2 - 0) / (2 + 0))


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_data():
    rng = np.random.default_rng(0)
    small, large = rng.normal(3.0, 1.0, 50), rng.normal(3.0, 1.0, 5000)
    lo_s, hi_s = M.bootstrap_ci(small)
    lo_l, hi_l = M.bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < 3.0 < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5
    # The standard error of a mean of 5000 N(0,1) values is 0.0141: the 95% interval is ~ +-0.028.
    assert (hi_l - lo_l) == pytest.approx(2 * 1.96 * 1 / math.sqrt(5000), rel=0.15)


def test_the_papers_l1_is_over_the_transformer_lens_export():
    """By hand: every parameter but the mask heads, the tied embedding twice (W_E and W_U), and the
    zero q/k/v biases (3 x d_model a layer) and unembedding bias (vocab) that the export adds."""
    from selfablate import ModelConfig, SelfAblatingTransformer
    from selfablate.interop.transformer_lens import weight_l1_tl

    cfg = ModelConfig(vocab_size=50, n_ctx=8, d_model=16, n_layers=2, n_heads=4, d_mlp=32, k_attn=4, k_mlp=8,
                      init="torch-default")
    torch.manual_seed(0)
    model = SelfAblatingTransformer(cfg)
    kept = [p for n, p in model.named_parameters() if "mask_head" not in n]
    total = sum(p.abs().sum().item() for p in kept) + model.wte.weight.abs().sum().item()
    count = sum(p.numel() for p in kept) + model.wte.weight.numel() + 2 * 3 * 16 + 50
    assert weight_l1_tl(model) == pytest.approx(total / count, rel=1e-6)


def test_the_papers_l1_equals_the_mean_over_the_hooked_transformers_parameters():
    pytest.importorskip("transformer_lens")
    from selfablate import ModelConfig, SelfAblatingTransformer
    from selfablate.interop.transformer_lens import to_hooked_transformer, weight_l1_tl

    torch.manual_seed(0)
    model = SelfAblatingTransformer(ModelConfig(vocab_size=50, n_ctx=8, d_model=16, n_layers=2, n_heads=4, d_mlp=32,
                                                k_attn=4, k_mlp=8, init="torch-default"))
    ht = to_hooked_transformer(model)
    params = list(ht.parameters())
    assert weight_l1_tl(model) == pytest.approx(sum(p.abs().sum().item() for p in params) / sum(p.numel() for p in params), rel=1e-6)
