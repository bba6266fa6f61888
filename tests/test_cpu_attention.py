"""The compiled CPU attention kernel against plain float64 attention, in value and gradients."""

import shutil

import pytest
import torch

from selfablate.ops import cpu_attention, kernels
from selfablate.model.layers import attend
from selfablate.ops import self_ablated_allowed, two_stream_attention

from .test_model import naive_attention as naive

needs_kernel = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the kernel")


def views(B, H, T, Dh, n, scale=1.0, seed=0):
    """n float64 (B, H, T, Dh) views of (B, T, H, Dh) tensors, as the model's projections give them."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, T, H, Dh, generator=g, dtype=torch.float64) * scale).transpose(1, 2) for _ in range(n)]


def compare(fast_fn, slow_fn, inputs64, atol):
    """fast_fn on float32 copies against slow_fn in float64: outputs and every input gradient."""
    x32 = [x.float().requires_grad_() for x in inputs64]
    x64 = [x.clone().requires_grad_() for x in inputs64]
    fast, slow = fast_fn(*x32), slow_fn(*x64)
    w = torch.randn(slow.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert (fast.double() - slow).abs().max() <= atol
    for a, b in zip(torch.autograd.grad((fast * w.float()).sum(), x32), torch.autograd.grad((slow * w).sum(), x64)):
        assert (a.double() - b).abs().max() <= atol * max(1.0, b.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("B, H, T, Dh", [(2, 3, 37, 8), (1, 1, 1, 8), (3, 2, 16, 4), (1, 5, 17, 16), (2, 16, 64, 8)])
def test_causal_kernel_equals_naive_attention(B, H, T, Dh):
    assert cpu_attention.available(Dh)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    compare(cpu_attention.causal, lambda q, k, v: naive(q, k, v, causal), views(B, H, T, Dh, 3), 2e-5)


@needs_kernel
@pytest.mark.parametrize("B, H, T, Dh", [(2, 3, 37, 8), (1, 1, 1, 8), (1, 2, 33, 16), (2, 16, 64, 8)])
def test_two_stream_kernel_equals_the_masked_form(B, H, T, Dh):
    """Query t sees the clean keys j < t and its own ablated key t (`self_ablated_allowed`)."""
    allowed = self_ablated_allowed(T, torch.device("cpu"))

    def slow(q, kc, vc, ka, va):
        return naive(q, torch.cat([kc, ka], 2), torch.cat([vc, va], 2), allowed)

    compare(cpu_attention.two_stream, slow, views(B, H, T, Dh, 5), 2e-5)


@needs_kernel
def test_kernel_keeps_its_accuracy_for_large_scores():
    """Scores in the hundreds (the max shift) and probabilities that underflow to 0 (exp below -87)."""
    allowed = self_ablated_allowed(40, torch.device("cpu"))
    compare(cpu_attention.two_stream,
            lambda q, kc, vc, ka, va: naive(q, torch.cat([kc, ka], 2), torch.cat([vc, va], 2), allowed),
            views(2, 3, 40, 8, 5, scale=6.0, seed=3), 5e-4)


@needs_kernel
def test_a_peaked_attention_makes_no_subnormal_gradient():
    """Unscaled scores put many p far below 2^-64, and each one's product with a small gradient is
    a float32 subnormal, slow on x86 cores. Under the CPU's flush policy the backward takes p below
    2^-64 as 0: no gradient entry is subnormal, the clean key that every query weighs at about
    2^-87 gets exactly zero dK and dV, and every gradient still equals float64's."""
    T, Dh = 32, 8
    allowed = self_ablated_allowed(T, torch.device("cpu"))
    q, kc, vc, ka, va = views(1, 1, T, Dh, 5, seed=3)
    q[..., 0] = 4.0
    kc[:, :, 0, 0] = -15.0  # clean key 0: q_t . k_0 about -60 nats (-87 in base 2) for every query t > 0
    x32 = [x.float().requires_grad_() for x in (q, kc, vc, ka, va)]
    x64 = [x.clone().requires_grad_() for x in (q, kc, vc, ka, va)]
    w = torch.randn(1, 1, T, Dh, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 1e-15
    fast = torch.autograd.grad((cpu_attention.two_stream(*x32) * w.float()).sum(), x32)
    slow64 = naive(x64[0], torch.cat(x64[1:5:2], 2), torch.cat(x64[2:5:2], 2), allowed)
    slow = torch.autograd.grad((slow64 * w).sum(), x64)
    tiny = torch.finfo(torch.float32).tiny
    for a, b in zip(fast, slow):
        assert not ((a != 0) & (a.abs() < tiny)).any()
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()
    d_kc, d_vc = fast[1], fast[2]
    assert (d_kc[:, :, 0] == 0).all() and (d_vc[:, :, 0] == 0).all()
    assert slow[2][:, :, 0].abs().max() > 0


@needs_kernel
def test_model_attention_takes_the_kernel_in_float32_only(monkeypatch, set_backend):
    from selfablate.model.hooks import HookPoint

    calls = []
    real = cpu_attention._KernelAttention.apply
    monkeypatch.setattr(cpu_attention._KernelAttention, "apply", lambda *a: calls.append(1) or real(*a))
    q, k, v = (x.float() for x in views(1, 2, 5, 8, 3))
    attend(q, k, v, None, HookPoint())
    two_stream_attention(q, k, v, k, v)
    assert len(calls) == 2
    assert not cpu_attention.applies(q.double(), k.double())
    assert not cpu_attention.applies(torch.randn(1, 1, 4, 64))  # head dims past MAX_HEAD_DIM
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_attention.applies(q, k)
    set_backend("torch")
    attend(q, k, v, None, HookPoint())
    assert len(calls) == 2


@needs_kernel
def test_a_training_step_is_the_same_with_and_without_the_kernel(monkeypatch, set_backend):
    from selfablate.config import ModelConfig
    from selfablate.model import SelfAblatingTransformer

    torch.manual_seed(0)
    model = SelfAblatingTransformer(ModelConfig(vocab_size=97, n_ctx=40, d_model=32, n_layers=2, n_heads=4,
                                                d_mlp=64, k_attn=8, k_mlp=16, ablation="local"))
    tokens = torch.randint(0, 97, (3, 40))
    results = {}
    for use in (True, False):
        set_backend("cpu" if use else "torch")
        model.zero_grad()
        out = model(tokens, tokens, return_logits=False)
        out.loss.backward()
        results[use] = [out.loss_clean, out.loss_ablated] + [p.grad.clone() for p in model.parameters()]
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_without_a_compiler_the_model_keeps_pytorch_attention(monkeypatch, tmp_path):
    """A missing compiler gives one warning and `available` False; attention still works."""
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("SELFABLATE_KERNEL_CACHE", str(tmp_path))
    clear_caches()
    try:
        with pytest.warns(kernels.KernelWarning, match="no C compiler"):
            assert not cpu_attention.available(8)
        q, k, v = (x.float() for x in views(1, 2, 5, 8, 3))
        assert not cpu_attention.applies(q, k, v)
        out = two_stream_attention(q, k, v, k, v)
        slow = naive(q, torch.cat([k, k], 2), torch.cat([v, v], 2), self_ablated_allowed(5, q.device))
        torch.testing.assert_close(out, slow)
        assert not list(tmp_path.iterdir())
    finally:
        clear_caches()


@needs_kernel
def test_kernel_builds_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFABLATE_KERNEL_CACHE", str(tmp_path))
    clear_caches()
    try:
        assert cpu_attention.available(4)
        built = sorted(p.name for p in tmp_path.iterdir())
        assert len(built) == 1 and built[0].startswith("attention-head_dim4-") and built[0].endswith(".so")
        clear_caches()
        mtime = (tmp_path / built[0]).stat().st_mtime_ns
        assert cpu_attention.available(4)
        assert (tmp_path / built[0]).stat().st_mtime_ns == mtime  # loaded, not rebuilt
    finally:
        clear_caches()


def clear_caches():
    cpu_attention._library.cache_clear()
    kernels.load.cache_clear()
    kernels._compiler.cache_clear()


@needs_kernel
def test_kernel_exp_is_accurate_to_a_few_ulp_and_zero_below_its_range():
    x = torch.cat([torch.linspace(-87, 0, 4096 * 16 - 32), torch.tensor([-87.5, -100.0, -1e30] + [0.0] * 29)])
    out = torch.empty_like(x)
    cpu_attention._library(8).exp_array(x.data_ptr(), out.data_ptr(), x.numel())
    ref = x[:-32].double().exp()
    rel = ((out[:-32].double() - ref) / ref).abs().max().item()
    assert rel < 8 * 2**-24, rel  # measured 3.7 x 2^-24 here (torch.exp: 1.0); one float32 ulp is 2^-23 to 2^-24
    assert (out[-32:-29] == 0).all() and (out[-29:] == 1).all()


@needs_kernel
def test_portable_build_without_gcc_shuffles_gives_the_same_gradients(monkeypatch):
    """-DPORTABLE builds the backward's tile transpose through memory (what Clang compiles)."""
    q, kc, vc, ka, va = (x.float() for x in views(2, 3, 37, 8, 5, seed=4))
    results, build = [], cpu_attention._library
    for defines in ({}, {"PORTABLE": 1}):
        lib = build(8, **defines)
        assert lib is not None
        monkeypatch.setattr(cpu_attention, "_library", lambda d, lib=lib: lib)
        xs = [x.clone().requires_grad_() for x in (q, kc, vc, ka, va)]
        out = cpu_attention.two_stream(*xs)
        results.append([out, *torch.autograd.grad(out.sum(), xs)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
