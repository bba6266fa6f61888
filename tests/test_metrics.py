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


def test_weight_l1_paper_counts_the_tied_embedding_twice():
    params = [("wte.weight", torch.tensor([[1.0, -1.0]])), ("wpe.weight", torch.tensor([[0.0, 0.0]])),
              ("blocks.0.mlp.fc_in.weight", torch.tensor([[4.0, 0.0]])), ("blocks.0.mlp.fc_in.bias", torch.tensor([2.0])),
              ("blocks.0.mask_head.attn.weight", torch.tensor([[9.0, 9.0]]))]
    # (2*2 + 0 + 4 + 2 + 18) / (2*2 + 2 + 2 + 1 + 2) = 28 / 11
    assert M.weight_l1_paper(params) == pytest.approx(28 / 11)
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
