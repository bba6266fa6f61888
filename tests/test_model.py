"""The self-ablating transformer: masks, the two-stream rule, hooks."""

import pytest
import torch

from selfablate.errors import ConfigError
from selfablate.ops.masks import hard_topk, hard_topk_soft_grad, soft_topk

from .helpers import SMALL, perturbed, small_config

pytestmark = pytest.mark.usefixtures("backend")  # each test on both backends (conftest)


def make(ablation="local", dtype=torch.float64, seed=0, **kw):
    """The small float64 model with its mask heads and LayerNorms perturbed, so that tests see real masks."""
    return perturbed(small_config(ablation=ablation, **kw), scale=0.5, only=("mask_head", "ln"), seed=seed, dtype=dtype)


def tokens(B=2, T=10, seed=1):
    return torch.randint(0, SMALL["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


# -- masks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 8, 9])
def test_hard_mask_has_exactly_k_ones_per_row(k):
    scores = torch.randn(4, 6, 9)
    scores[0, 0] = 0.0  # all tied: still exactly k
    scores[1, 1, :4] = 2.0  # ties across the boundary
    for mask in (hard_topk(scores, k), hard_topk_soft_grad(scores.requires_grad_(), k, 0.1, 1e-12)):
        assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
        assert (mask.detach().sum(-1) == k).all()
    # The ones sit on the k largest scores.
    m = hard_topk(scores.detach(), k)
    kth = scores.detach().topk(k, dim=-1).values[..., -1:]
    assert (scores.detach()[m.bool()].view(4, 6, k) >= kth).all()


@pytest.mark.parametrize("shape, k", [((5, 20), 6), ((2, 3, 9), 1), ((4, 7), 6), ((3, 2, 512), 32)])
def test_straight_through_gradient_equals_soft_topk_gradient(shape, k):
    """The hand-written backward of hard_topk_soft_grad against autograd through soft_topk (and
    the autograd reference), whose gradient it must be, down to rounding."""
    from selfablate.ops.masks import hard_topk_soft_grad_reference

    torch.manual_seed(0)
    scores = torch.randn(*shape, dtype=torch.float64)
    w = torch.randn(*shape, dtype=torch.float64)
    grads = []
    for fn in (hard_topk_soft_grad, soft_topk, hard_topk_soft_grad_reference):
        s = scores.clone().requires_grad_()
        out = fn(s, k, 0.3, 1e-12)
        (out * w).sum().backward()
        grads.append(s.grad)
        if fn is not soft_topk:
            assert torch.equal(out.detach(), hard_topk(scores, k))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[2], grads[1], rtol=0, atol=0)


def test_soft_topk_matches_formula_and_finite_differences():
    torch.manual_seed(0)
    s = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    k, T, eps = 4, 0.5, 1e-12
    # Naive reference written out from the formula, with a full sort.
    srt = s.sort(dim=-1, descending=True).values
    m = (srt[:, k - 1] + srt[:, k]) / 2
    w = torch.sigmoid((s - m[:, None]) / (T * (srt[:, k - 1] - srt[:, k])[:, None] + eps))
    ref = w * k / w.sum(-1, keepdim=True)
    torch.testing.assert_close(soft_topk(s, k, T, eps), ref)
    torch.testing.assert_close(soft_topk(s, k, T, eps).sum(-1), torch.full((3,), float(k), dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda x: soft_topk(x, k, T, eps), (s,))


def test_soft_topk_approaches_hard_mask_at_low_temperature():
    s = torch.randn(8, 30)
    torch.testing.assert_close(soft_topk(s, 5, 1e-4), hard_topk(s, 5), atol=1e-4, rtol=0)


# -- the two-stream rule ----------------------------------------------------------------------

@pytest.mark.parametrize("window", [(), (0, 3, 4)], ids=["global", "local-layers"])
@pytest.mark.parametrize("ablation", ["local", "global", "both"])
def test_ablated_logits_equal_a_naive_rerun_with_the_mask_at_one_position(ablation, window):
    """With GPT-Neo's local layers too: the ablated query sees its window's clean keys and its own."""
    model = make(ablation, attention_window=window)
    toks = tokens()
    out = model(toks)
    B, T = toks.shape
    assert not torch.allclose(out.logits_ablated, out.logits_clean)
    for t in range(T):
        attn = torch.ones_like(out.attn_mask)
        mlp = torch.ones_like(out.mlp_mask)
        attn[:, t], mlp[:, t] = out.attn_mask[:, t], out.mlp_mask[:, t]
        naive = model.run_with_masks(toks, attn, mlp)
        torch.testing.assert_close(out.logits_ablated[:, t], naive[:, t], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("ablation", ["local", "global", "both"])
def test_a_one_layer_model_follows_the_two_stream_rule(ablation):
    """One block: the global head's scores are still (layers, batch, pos, width), as a local head's."""
    model = make(ablation, n_layers=1)
    toks = tokens()
    out = model(toks)
    assert out.attn_mask.shape == (*toks.shape, 1, SMALL["d_model"]) and (out.mlp_mask.sum(-1) == SMALL["k_mlp"]).all()
    for t in range(toks.shape[1]):
        attn, mlp = torch.ones_like(out.attn_mask), torch.ones_like(out.mlp_mask)
        attn[:, t], mlp[:, t] = out.attn_mask[:, t], out.mlp_mask[:, t]
        naive = model.run_with_masks(toks, attn, mlp)
        torch.testing.assert_close(out.logits_ablated[:, t], naive[:, t], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("ablation", ["local", "global"])
def test_full_width_k_makes_the_ablated_stream_equal_the_clean_one(ablation):
    model = make(ablation, k_attn=SMALL["d_model"], k_mlp=SMALL["d_mlp"])
    toks = tokens()
    out = model(toks, toks, return_logits=True)
    assert (out.attn_mask == 1).all() and (out.mlp_mask == 1).all()
    torch.testing.assert_close(out.logits_ablated, out.logits_clean, rtol=1e-10, atol=1e-10)
    assert out.loss_recon.item() == pytest.approx(0.0, abs=1e-20)


def test_masks_have_documented_shapes_and_k_ones():
    model = make("both")
    out = model(tokens(B=3, T=7))
    assert out.attn_mask.shape == (3, 7, SMALL["n_layers"], SMALL["d_model"])
    assert out.mlp_mask.shape == (3, 7, SMALL["n_layers"], SMALL["d_mlp"])
    assert (out.attn_mask.sum(-1) == SMALL["k_attn"]).all()
    assert (out.mlp_mask.sum(-1) == SMALL["k_mlp"]).all()
    assert out.logits_ablated.shape == (3, 7, SMALL["vocab_size"])


@pytest.mark.parametrize("ablation", ["local", "global", "both"])
def test_per_layer_mask_path_equals_the_stacked_public_path(ablation):
    """forward() keeps masks per layer; composing the public pieces with stacked
    (batch, pos, n_layers, width) masks must give the same ablated loss and parameter gradients."""
    from selfablate.model.hooks import Stream
    from selfablate.model.losses import cross_entropy

    model = make(ablation)
    x, y = tokens(), tokens(seed=2)
    fast = model(x, y).loss_ablated
    fast_grads = torch.autograd.grad(fast, list(model.parameters()), allow_unused=True)
    emb = model.embed(x)
    clean = model.run_stream(emb, Stream.CLEAN)
    masks = model.compute_masks(clean)
    a, m = torch.stack([b.attn for b in masks], 2), torch.stack([b.mlp for b in masks], 2)
    ablated = model.run_stream(emb, Stream.ABLATED, a, m, clean_kv=clean.kv)
    ref = cross_entropy(model.unembed(ablated.final), y)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    for (name, _), g, r in zip(model.named_parameters(), fast_grads, ref_grads):
        assert (g is None) == (r is None), name
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=name)
    assert any("mask_head" in n and g is not None and g.abs().sum() > 0
               for (n, _), g in zip(model.named_parameters(), fast_grads))


def test_mask_depends_only_on_the_past():
    model = make("global")
    toks = tokens(B=1, T=10)
    other = toks.clone()
    other[:, 6:] = (other[:, 6:] + 1) % SMALL["vocab_size"]
    a, b = model(toks), model(other)
    torch.testing.assert_close(a.attn_mask[:, :6], b.attn_mask[:, :6])
    torch.testing.assert_close(a.logits_ablated[:, :6], b.logits_ablated[:, :6])


def test_loss_is_the_weighted_sum_of_its_terms():
    model = make("local", coef_clean=0.7, coef_ablated=0.2, coef_recon=3.0)
    toks = tokens()
    out = model(toks, toks, return_logits=True)
    expected = 0.7 * out.loss_clean + 0.2 * out.loss_ablated + 3.0 * out.loss_recon
    torch.testing.assert_close(out.loss, expected)
    ce = torch.nn.functional.cross_entropy(out.logits_ablated.reshape(-1, SMALL["vocab_size"]), toks.reshape(-1))
    torch.testing.assert_close(out.loss_ablated, ce)


def test_mask_heads_receive_gradient_through_the_hard_mask():
    model = make("local", dtype=torch.float32)
    out = model(tokens(), tokens(seed=2))
    out.loss.backward()
    g = model.blocks[1].mask_head.attn.weight.grad
    assert g is not None and g.abs().sum() > 0


def test_global_mode_runs_the_clean_stream_once():
    model = make("global")
    calls = []
    with model.hooks([("blocks.0.hook_resid_pre", lambda x, hp: calls.append("clean")),
                      ("blocks.0.hook_resid_pre_ablated", lambda x, hp: calls.append("ablated"))]):
        model(tokens())
    assert calls == ["clean", "ablated"]


def test_baseline_has_no_ablated_stream():
    model = make("none")
    out = model(tokens(), tokens())
    assert out.logits_ablated is None and out.attn_mask is None
    torch.testing.assert_close(out.loss, out.loss_clean)
    assert not any("mask_head" in n for n, _ in model.named_parameters())


# -- hooks ------------------------------------------------------------------------------------

def test_pattern_hook_path_matches_the_fused_kernel():
    model = make("local")
    toks = tokens()
    fused = model(toks)
    patterns = {}
    with model.hooks([(lambda n: "hook_pattern" in n, lambda x, hp: patterns.__setitem__(hp.name, x))]):
        manual = model(toks)
    torch.testing.assert_close(manual.logits_ablated, fused.logits_ablated)
    torch.testing.assert_close(manual.logits_clean, fused.logits_clean)
    clean = patterns["blocks.0.attn.hook_pattern"]  # (B, H, T, T), causal, rows sum to 1
    assert clean.shape == (2, 4, 10, 10) and clean.triu(1).abs().max() == 0
    ablated = patterns["blocks.0.attn.hook_pattern_ablated"]  # (B, H, T, 2T): [clean | own]
    assert ablated.shape == (2, 4, 10, 20)
    torch.testing.assert_close(ablated.sum(-1), torch.ones(2, 4, 10, dtype=torch.float64))
    own = ablated[..., 10:]
    assert (own - torch.diag_embed(own.diagonal(dim1=-2, dim2=-1))).abs().max() == 0


def test_hooks_can_replace_masks_and_cache_activations():
    model = make("local")
    toks = tokens()
    ones = lambda x, hp: torch.ones_like(x)  # noqa: E731
    with model.hooks([(lambda n: n.endswith("_mask"), ones)]):
        out = model(toks)
    torch.testing.assert_close(out.logits_ablated, out.logits_clean)
    _, cache = model.run_with_cache(toks, names=["blocks.2.mlp.hook_post", "blocks.2.hook_mlp_mask"])
    assert cache["blocks.2.mlp.hook_post"].shape == (2, 10, SMALL["d_mlp"])
    assert (cache["blocks.2.hook_mlp_mask"].sum(-1) == SMALL["k_mlp"]).all()
    with pytest.raises(KeyError):
        with model.hooks([("blocks.9.nope", ones)]):
            pass


def test_unscaled_attention_scores():
    """GPT-Neo does not divide q.k by sqrt(d_head); check one head by hand."""
    model = make("none")
    toks = tokens(B=1, T=4)
    _, cache = model.run_with_cache(toks, names=lambda n: n.startswith("blocks.0.attn."))
    q, k = cache["blocks.0.attn.hook_q"], cache["blocks.0.attn.hook_k"]
    scores = (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(4, 4, dtype=torch.bool).tril(), float("-inf"))
    # The pattern hook is not in the cache of a fused run; recompute through it.
    pat = {}
    with model.hooks([("blocks.0.attn.hook_pattern", lambda x, hp: pat.setdefault("p", x))]):
        model(toks)
    torch.testing.assert_close(pat["p"], scores.softmax(-1))


# -- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [
    (dict(k_attn=0), "k_attn must be in 1..d_model=16"),
    (dict(k_attn=17), "k_attn must be in 1..d_model=16"),
    (dict(k_mlp=33), "k_mlp must be in 1..d_mlp=32"),
    (dict(n_heads=5), "divisible by n_heads"),
    (dict(ablation="sideways"), "ablation must be one of none, local, global, both"),
])
def test_bad_model_config_gives_one_line_error(kw, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        small_config(**kw)
    assert "\n" not in str(e.value)


def test_straight_through_mask_without_autograd_is_the_hard_mask():
    s = torch.randn(6, 12)
    with torch.no_grad():
        fast = hard_topk_soft_grad(s.clone().requires_grad_(), 4, 0.1)
    torch.testing.assert_close(fast, hard_topk(s, 4), rtol=0, atol=0)
    assert (hard_topk_soft_grad(s, 12, 0.1) == 1).all()


@pytest.mark.parametrize("masked", [False, True], ids=["self-key", "masked"])  # the two forms of the rule
@pytest.mark.parametrize("policy_of", ["cpu", "cuda"])  # their head alignments (16 and 8)
@pytest.mark.parametrize("T, d_head", [(7, 4), (1, 8), (9, 15), (5, 16)])
def test_two_stream_attention_equals_the_naive_masked_form_with_gradients(T, d_head, policy_of, masked, monkeypatch):
    import importlib

    from selfablate import ops

    policies = importlib.import_module("selfablate.ops.policy").POLICIES
    monkeypatch.setitem(policies, policy_of, policies[policy_of]._replace(two_stream_masked=masked))
    with ops.device_policy_as(policy_of):
        _two_stream_equals_naive(T, d_head)


def _two_stream_equals_naive(T, d_head):
    from selfablate.ops import self_ablated_allowed, two_stream_attention

    g = torch.Generator().manual_seed(0)
    q, kc, vc, ka, va = (torch.randn(2, 3, T, d_head, generator=g, dtype=torch.float64, requires_grad=True)
                         for _ in range(5))
    fast = two_stream_attention(q, kc, vc, ka, va)
    slow = naive_attention(q, torch.cat([kc, ka], 2), torch.cat([vc, va], 2), self_ablated_allowed(T, q.device))
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    w = torch.randn(fast.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((fast * w).sum(), (q, kc, vc, ka, va)),
                    torch.autograd.grad((slow * w).sum(), (q, kc, vc, ka, va))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # Position 0 has no clean past: it sees only its own ablated value.
    torch.testing.assert_close(fast[:, :, 0], va[:, :, 0])


def naive_attention(q, k, v, allowed):
    """Unscaled softmax attention, written out: the reference for the fused (padded) kernel calls."""
    scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("T, d_head", [(6, 8), (1, 4), (5, 16), (4, 17)])
def test_fused_causal_attention_equals_the_naive_one_with_gradients(T, d_head):
    from selfablate.model.hooks import HookPoint
    from selfablate.model.layers import attend

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, T, d_head, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fast = attend(q, k, v, None, HookPoint())
    slow = naive_attention(q, k, v, torch.ones(T, T, dtype=torch.bool).tril())
    assert fast.shape == (2, 3, T, d_head)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    w = torch.randn(fast.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((fast * w).sum(), (q, k, v)), torch.autograd.grad((slow * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
