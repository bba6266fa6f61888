"""train --init-from: a pretrained GPT-Neo (saved by transformers, offline) as the clean stream of a
self-ablating model; its mask heads new, its weights optionally frozen."""

import dataclasses
import json

import pytest
import torch

from selfablate import SelfAblatingTransformer, load_checkpoint
from selfablate.cli import main
from selfablate.config import get_preset
from selfablate.data.dataset import TokenWindows, tokenize_split
from selfablate.data.sources import resolve_source
from selfablate.interop.hf import load_source
from selfablate.train import start_from, train

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def neo(tmp_path_factory):
    """A random GPT-Neo with GPT-2's vocabulary, a global and a local layer (window 16 < 64
    positions), its attention weights large enough to matter, saved as save_pretrained does."""
    torch.manual_seed(0)
    cfg = transformers.GPTNeoConfig(vocab_size=50257, max_position_embeddings=64, hidden_size=32, num_layers=2,
                                    num_heads=4, attention_types=[[["global", "local"], 1]], window_size=16,
                                    intermediate_size=64, embed_dropout=0.0, attention_dropout=0.0,
                                    resid_dropout=0.0)
    hf = transformers.GPTNeoForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "attention" in name:
                p.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("neo")
    hf.save_pretrained(folder)
    return folder, hf


def run_cfg(tmp_path, stories_dir, neo_folder, **kw):
    model, tr = get_preset("tiny")
    model = dataclasses.replace(model, k_attn=8, k_mlp=16)
    tr = dataclasses.replace(tr, data=str(stories_dir), out=str(tmp_path / "run"), progress=False,
                             init_from=str(neo_folder), max_steps=30, eval_interval=30, **kw)
    return model, tr


def held_out_ablated_ce(model, stories_dir) -> float:
    windows = TokenWindows(tokenize_split(resolve_source(str(stories_dir)), "valid", progress=False), 64)
    x, y = next(iter(windows.sequential_batches(8, 8)))
    with torch.no_grad():
        return model(x, y).loss_ablated.item()


def test_the_source_is_the_clean_stream_exactly_past_the_window(neo):
    folder, hf = neo
    source = load_source(str(folder))
    assert source.model.cfg.attention_window == (0, 16) and source.model.cfg.n_ctx == 64
    tokens = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(source.model(tokens).logits_clean, hf(tokens).logits.detach(), rtol=0, atol=1e-5)


def test_a_short_fine_tune_lowers_the_ablated_loss_and_records_its_source(neo, tmp_path, stories_dir):
    folder, hf = neo
    model_cfg, tr = run_cfg(tmp_path, stories_dir, folder)
    source = load_source(str(folder))
    torch.manual_seed(tr.seed)  # the run's own initialisation of the mask heads
    start = SelfAblatingTransformer(source.architecture(model_cfg))
    start_from(start, source)
    before = held_out_ablated_ce(start, stories_dir)
    result = train(model_cfg, tr)
    after = held_out_ablated_ce(load_checkpoint(result.checkpoint), stories_dir)
    assert after < before - 0.5, (before, after)
    meta = json.loads((result.checkpoint / "config.json").read_text())["meta"]
    assert meta["init_from"] == {"source": str(folder), "sha256": source.sha256}


def test_freezing_keeps_every_clean_weight_bit_identical(neo, tmp_path, stories_dir):
    folder, _ = neo
    model_cfg, tr = run_cfg(tmp_path, stories_dir, folder, freeze_clean=True)
    source = load_source(str(folder))
    trained = load_checkpoint(train(model_cfg, tr).checkpoint)
    theirs = source.model.state_dict()
    heads = 0
    for name, p in trained.state_dict().items():
        if "mask_head" in name:
            heads += 1
        else:
            assert torch.equal(p, theirs[name]), name
    fresh = SelfAblatingTransformer(trained.cfg).state_dict()
    assert heads and any(not torch.equal(trained.state_dict()[n], fresh[n]) for n in fresh if "mask_head" in n)


def test_a_corrupt_or_unsupported_source_is_one_line(neo, tmp_path, stories_dir, capsys):
    folder, _ = neo
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not weights")
    for src, msg in ((gpt2, "a gpt2 model; only GPT-Neo models"), (tmp_path / "nowhere", "not one of our checkpoints"),
                     (broken, "cannot load it as GPT-Neo")):
        code = main(["train", "--preset", "tiny", "--data", str(stories_dir), "--out", str(tmp_path / "o"),
                     "--init-from", str(src), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and msg in err[0], (src, err)
        assert not (tmp_path / "o").exists()


def test_one_of_our_checkpoints_gives_its_clean_stream(tmp_path, tiny_runs):
    from selfablate import ModelConfig, save_checkpoint
    from selfablate.errors import SelfAblateError

    torch.manual_seed(0)
    ours = SelfAblatingTransformer(ModelConfig(n_ctx=32, d_model=16, n_layers=2, n_heads=4, d_mlp=32, k_attn=4,
                                               k_mlp=8, ablation="global"))
    save_checkpoint(ours, tmp_path / "ours")
    source = load_source(str(tmp_path / "ours"))
    assert source.model.cfg.ablation == "none"
    theirs = source.model.state_dict()
    assert set(theirs) == {k for k in ours.state_dict() if "mask_head" not in k}
    assert all(torch.equal(theirs[k], ours.state_dict()[k]) for k in theirs)
    with pytest.raises(SelfAblateError, match="a compact-vocabulary model cannot start a run"):
        load_source(str(tiny_runs["local"]))


def test_reproduce_from_a_pretrained_model_takes_it_as_the_baseline(neo, tmp_path, stories_dir, monkeypatch):
    """`reproduce --init-from`: the baseline is the imported model itself (untrained), each
    self-ablating model starts from it with new mask heads; both record the source's hash, and
    the results page says where the grid started."""
    from selfablate import reproduce
    from selfablate.interop.hf import weights_sha256

    folder, _ = neo
    monkeypatch.setattr(reproduce, "STAGES", tuple(s for s in reproduce.STAGES if s.name in ("train", "evaluate")))
    cfg = reproduce.ReproduceConfig(out=str(tmp_path / "grid"), preset="tiny", data=str(stories_dir),
                                    ablations=("local",), ks=(4,), max_steps=3, eval_max_tokens=512,
                                    init_from=str(folder), progress=False)
    report = reproduce.run_reproduce(cfg)
    source = load_source(str(folder))
    base, local = (tmp_path / "grid" / "models" / n for n in ("none-s0", "local-k4-s0"))
    imported = load_checkpoint(base)
    assert imported.cfg.ablation == "none" and imported.cfg.attention_window == (0, 16)
    assert weights_sha256(imported) == source.sha256  # the source's weights, untouched
    for run in (base, local):
        assert json.loads((run / "checkpoint" / "config.json").read_text())["meta"]["init_from"]["sha256"] == source.sha256
    tuned = load_checkpoint(local)
    assert tuned.cfg.ablation == "local" and tuned.cfg.n_ctx == 64 and not tuned.cfg.compact_vocab
    assert json.loads((tmp_path / "grid" / "eval" / "none-s0.json").read_text())["lm"]["clean"]["ce"] > 0
    assert "| none |" in (report / "table.md").read_text()
    from selfablate.report.build import write_report

    write_report(tmp_path / "grid", tmp_path / "results.md")
    text = (tmp_path / "results.md").read_text()
    assert f"- **Start:** every model from {folder} (weights sha256 {source.sha256[:12]}" in text
