"""Compact vocabulary: an exact remap of the training tokens."""

import dataclasses

import numpy as np
import torch

from selfablate import ModelConfig, SelfAblatingTransformer, load_checkpoint
from selfablate.config import get_preset
from selfablate.data.tokenizer import EOT
from selfablate.data.vocab import CompactVocab
from selfablate.generate import generate
from selfablate.train import train
from selfablate.data.vocab import to_gpt2_ids, to_model_ids


def test_compact_vocab_is_an_order_preserving_remap_with_unk():
    train_tokens = np.array([5, 900, 5, 42, 50000], dtype=np.uint16)
    v = CompactVocab.from_tokens(train_tokens)
    assert v.ids.tolist() == [5, 42, 900, 50000, EOT]  # EOT is always kept
    lookup = v.lookup()
    assert lookup[train_tokens].tolist() == [0, 2, 0, 1, 3]
    assert v.ids[lookup[train_tokens]].tolist() == train_tokens.tolist()  # exact round trip
    assert lookup[7] == v.unk == 5 and v.size == 6


def test_compact_model_equals_the_full_model_restricted_to_the_kept_ids():
    torch.manual_seed(0)
    base = dict(n_ctx=8, d_model=16, n_layers=2, n_heads=2, d_mlp=32, k_attn=4, k_mlp=8, ablation="local")
    full = SelfAblatingTransformer(ModelConfig(vocab_size=50257, **base)).double()
    kept = torch.tensor(sorted({3, 7, 11, 1000, 20000, EOT}))
    compact = SelfAblatingTransformer(ModelConfig(vocab_size=len(kept) + 1, compact_vocab=True, **base)).double()
    state = {k: v for k, v in full.state_dict().items() if k != "wte.weight"}
    wte = torch.cat([full.wte.weight[kept], torch.zeros(1, 16, dtype=torch.float64)])
    compact.load_state_dict({**state, "wte.weight": wte, "vocab_ids": kept})
    gpt2 = torch.tensor([[3, 1000, 7, EOT, 11, 20000, 3, 7]])
    a = full(gpt2)
    b = compact(to_model_ids(compact, gpt2))
    torch.testing.assert_close(b.logits_clean[..., :-1], a.logits_clean[..., kept], rtol=0, atol=1e-12)
    torch.testing.assert_close(b.logits_ablated[..., :-1], a.logits_ablated[..., kept], rtol=0, atol=1e-12)
    assert torch.equal(to_gpt2_ids(compact, to_model_ids(compact, gpt2)), gpt2)


def test_training_with_a_compact_vocab_end_to_end(tmp_path, stories_dir):
    model_cfg, tr = get_preset("tiny")
    model_cfg = dataclasses.replace(model_cfg, compact_vocab=True)
    tr = dataclasses.replace(tr, data=str(stories_dir), out=str(tmp_path / "run"), progress=False,
                             max_steps=30, eval_interval=30, checkpoint_interval=15)
    result = train(model_cfg, tr)
    model = load_checkpoint(result.checkpoint)
    assert model.cfg.compact_vocab and model.cfg.vocab_size < 8000
    assert model.vocab_ids[-1] == EOT and bool((model.vocab_ids.diff() > 0).all())
    assert result.final_eval.clean < 7.0  # well below ln(vocab_size) ~ 8 after 30 steps
    out = generate(model, [7454, 2402, 257, 640], 5, stream="ablated", temperature=0.0)
    assert out.tokens[:4] == [7454, 2402, 257, 640]
    assert all(t in set(model.vocab_ids.tolist()) for t in out.new_tokens)
    # Resuming a finished run checks the vocabulary against the data and just reports.
    again = train(model_cfg, dataclasses.replace(tr, resume=True))
    assert again.final_eval == result.final_eval


def test_unknown_share_counts_the_ids_a_compact_vocabulary_lacks():
    import numpy as np

    from selfablate.data.vocab import CompactVocab, unknown_share

    lookup = CompactVocab(np.array([3, 7, 11])).lookup()  # model ids 0, 1, 2; <unk> is 3
    assert unknown_share(lookup, np.array([3, 7, 5, 11, 50000, 3, 9, 7])) == 3 / 8
    assert unknown_share(None, np.array([5, 6])) == 0.0 and unknown_share(lookup, np.array([], dtype=int)) == 0.0
