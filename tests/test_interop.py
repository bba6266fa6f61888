"""Exports to TransformerLens and Hugging Face (skipped where those libraries are absent)."""

import dataclasses

import pytest
import torch

from selfablate import ModelConfig, SelfAblatingTransformer
from selfablate.errors import SelfAblateError
from selfablate.data.vocab import to_model_ids

from .helpers import perturbed

CFG = dict(vocab_size=300, n_ctx=32, d_model=32, n_layers=2, n_heads=4, d_mlp=64, ablation="local", k_attn=8, k_mlp=16)


@pytest.fixture(scope="module")
def model():
    return perturbed(ModelConfig(**CFG))


def test_transformer_lens_export_matches_both_streams(model):
    pytest.importorskip("transformer_lens")
    from selfablate.interop.transformer_lens import ablation_hooks, to_hooked_transformer

    ht = to_hooked_transformer(model)
    tokens = torch.randint(0, CFG["vocab_size"], (3, 20), generator=torch.Generator().manual_seed(1))
    ours = model(tokens)
    torch.testing.assert_close(ht(tokens).detach(), ours.logits_clean, rtol=0, atol=1e-5)
    for pos in (0, 9, 19):
        theirs = ht.run_with_hooks(tokens[:, : pos + 1], fwd_hooks=ablation_hooks(model, tokens, pos))[:, pos]
        torch.testing.assert_close(theirs.detach(), ours.logits_ablated[:, pos], rtol=0, atol=1e-5)
        assert (ours.logits_ablated[:, pos] - ours.logits_clean[:, pos]).abs().max() > 1e-3  # the hooks matter


def test_transformer_lens_missing_is_a_one_line_error(model, monkeypatch):
    import importlib

    import selfablate.interop.transformer_lens as tl_export

    def missing(name):
        raise ImportError(f"No module named '{name}'")

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(SelfAblateError, match=r"selfablate\[tl\]"):
        tl_export.to_hooked_transformer(model)


def test_gpt_neo_export_and_import_round_trip(model):
    pytest.importorskip("transformers")
    from selfablate.interop.hf import from_gpt_neo, to_gpt_neo

    base = SelfAblatingTransformer(ModelConfig(**(CFG | {"ablation": "none"}))).double().eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "mask_head" not in k}, strict=True)
    hf = to_gpt_neo(base)
    tokens = torch.randint(0, CFG["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(2))
    ours = base(tokens).logits_clean
    torch.testing.assert_close(hf(tokens).logits.detach(), ours, rtol=0, atol=1e-5)
    back = from_gpt_neo(hf)
    torch.testing.assert_close(back(tokens).logits_clean, ours, rtol=0, atol=1e-10)


def test_gpt_neo_with_local_layers_runs_exactly_past_its_window():
    """GPT-Neo's local layers (query t sees keys t - window < j <= t) imported as a band mask:
    transformers' logits to 1e-5 at a context four times the window, and back again on export."""
    transformers = pytest.importorskip("transformers")
    from selfablate.interop.hf import from_gpt_neo, to_gpt_neo

    torch.manual_seed(0)
    cfg = transformers.GPTNeoConfig(vocab_size=300, max_position_embeddings=64, hidden_size=32, num_layers=2,
                                    num_heads=4, attention_types=[[["global", "local"], 1]], window_size=16,
                                    intermediate_size=64, embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0)
    hf = transformers.GPTNeoForCausalLM(cfg).eval()
    with torch.no_grad():  # weights large enough that attention is far from uniform
        for name, p in hf.named_parameters():
            if "attention" in name:
                p.normal_(0, 0.5)
    ours = from_gpt_neo(hf)
    assert ours.cfg.n_ctx == 64 and ours.cfg.attention_window == (0, 16)
    tokens = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(3))
    theirs = hf(tokens).logits.detach()
    torch.testing.assert_close(ours(tokens).logits_clean, theirs, rtol=0, atol=1e-5)
    # the window matters: all-global attention gives other logits past position 16
    glob = SelfAblatingTransformer(dataclasses.replace(ours.cfg, attention_window=()))
    glob.load_state_dict(ours.state_dict())
    assert (glob(tokens).logits_clean[:, 16:] - theirs[:, 16:]).abs().max() > 1e-2
    torch.testing.assert_close(to_gpt_neo(ours)(tokens).logits.detach(), theirs, rtol=0, atol=1e-5)


def test_compact_vocabulary_exports_back_to_gpt2_ids_exactly():
    pytest.importorskip("transformer_lens")
    from selfablate.interop.transformer_lens import to_hooked_transformer

    torch.manual_seed(0)
    kept = torch.tensor([0, 11, 13, 257, 262, 50256])  # GPT-2 ids the "training data" had
    model = SelfAblatingTransformer(ModelConfig(**(CFG | {"vocab_size": len(kept) + 1, "compact_vocab": True}))).double().eval()
    model.vocab_ids.copy_(kept)
    ht = to_hooked_transformer(model, full_vocab=True)
    gpt2 = torch.tensor([[257, 11, 999, 262, 13, 40000]])  # 999 and 40000 are not kept: both read <unk>
    ours = model(to_model_ids(model, gpt2)).logits_clean.log_softmax(-1)  # (1, T, 7)
    theirs = ht(gpt2).detach().log_softmax(-1)  # (1, T, 50257)
    torch.testing.assert_close(theirs[..., kept], ours[..., :-1], rtol=0, atol=1e-6)
    missing = torch.ones(50257, dtype=torch.bool)
    missing[kept] = False
    torch.testing.assert_close(theirs[..., missing].logsumexp(-1), ours[..., -1], rtol=0, atol=1e-6)
