"""Nominal FLOP accounting (the MFU denominator) against PyTorch's own FLOP counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from selfablate import ModelConfig, SelfAblatingTransformer
from selfablate.perf.flops import forward_flops_per_token, train_flops_per_token


def test_forward_flops_match_the_flop_counter(monkeypatch, set_backend):
    set_backend("torch")  # the counter knows aten's GEMMs only
    cfg = ModelConfig(vocab_size=500, n_ctx=32, d_model=32, n_layers=2, n_heads=4, d_mlp=64, ablation="none")
    model = SelfAblatingTransformer(cfg).eval()
    B, T = 3, 32
    # Hooking the pattern makes attention explicit matmuls, which the counter sees (the fused kernel it may not).
    identity = [(f"blocks.{l}.attn.hook_pattern", lambda p, hook: p) for l in range(cfg.n_layers)]
    with FlopCounterMode(display=False) as counter, torch.no_grad(), model.hooks(identity):
        model(torch.zeros(B, T, dtype=torch.long))
    # The counter charges causal attention for all T keys; the model count, for the T/2 a query sees on average.
    full_attention = cfg.n_layers * 2 * 2 * (T / 2) * cfg.d_model
    assert counter.get_total_flops() == pytest.approx(B * T * (forward_flops_per_token(cfg, T) + full_attention))


def test_paper_step_costs_what_issue_6_states():
    """About 50 MFLOP per token for a clean step, about 105 for a local self-ablating one."""
    assert train_flops_per_token(ModelConfig(ablation="none"), 256) / 1e6 == pytest.approx(49.6, abs=0.1)
    local = train_flops_per_token(ModelConfig(ablation="local"), 256) / 1e6
    assert local == pytest.approx(2 * 49.6 + 3 * 1.31, abs=0.2) and 100 < local < 106


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_takes_every_setting_on_glibc():
    from selfablate.perf import keep_freed_memory

    assert keep_freed_memory() is True


@pytest.mark.parametrize("keep", [True, False])
def test_training_sets_the_allocator_only_when_asked(tmp_path, stories_dir, monkeypatch, keep):
    import dataclasses

    import selfablate.train as train_module
    from selfablate.config import get_preset

    calls = []
    monkeypatch.setattr(train_module, "keep_freed_memory", lambda: calls.append(1) or True)
    model_cfg, tr = get_preset("tiny")
    tr = dataclasses.replace(tr, out=str(tmp_path / "run"), data=str(stories_dir), max_steps=1, progress=False,
                             keep_freed_memory=keep)
    train_module.train(model_cfg, tr)
    assert calls == ([1] if keep else [])


def test_onednn_gemm_computes_the_product_and_both_peaks_are_measured():
    from selfablate.ops.onednn import linear, onednn_available, pack
    from selfablate.perf import gemm_peaks

    peaks = gemm_peaks(n=128, repeats=2)
    assert peaks["torch.mm"] > 0
    if not onednn_available():
        pytest.skip("this PyTorch build has no oneDNN linear")
    torch.manual_seed(0)
    a, b = torch.randn(37, 64), torch.randn(64, 29)
    for weight in (b.T, pack(b.T.contiguous())):  # as it is, and packed as the peak's GEMM is
        torch.testing.assert_close(linear(a, weight), a @ b, rtol=1e-5, atol=1e-5)
    assert peaks["onednn"] > 0
