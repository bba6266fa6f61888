"""`selfablate reproduce`: the grid end to end at tiny scale, resumable, and its report."""

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from selfablate import reproduce
from selfablate.errors import ConfigError
from selfablate.report.table import Cell, aggregate, markdown
from selfablate.reproduce import ReproduceConfig, grid


def tiny_cfg(out: Path, data: str) -> ReproduceConfig:
    return ReproduceConfig(out=str(out), preset="tiny", data=data, ablations=("local",), ks=(2,), seeds=(0,),
                           max_steps=6, eval_max_tokens=2048, circuit_prompts=4, tau_sweep=(0.01,), sae_steps=10,
                           sae_eval_tokens=1024, explain_tokens=4096, progress=False)


def test_story_mask_figure_shows_the_model_the_evaluations_read(tmp_path, stories_dir, monkeypatch):
    """Under keep=best the evaluations read the run's best/, so the held-out story's masks must too."""
    import torch

    from selfablate import ModelConfig, SelfAblatingTransformer
    from selfablate.checkpoint import save_checkpoint
    from selfablate.report import build, plots

    run = tmp_path / "models" / "local-k2-s0"
    cfg = ModelConfig(n_ctx=16, d_model=8, n_layers=1, n_heads=2, d_mlp=16, k_attn=2, k_mlp=2)
    saved = {}
    for seed, sub in ((0, "checkpoint"), (1, "best")):
        torch.manual_seed(seed)
        saved[sub] = SelfAblatingTransformer(cfg)
        save_checkpoint(saved[sub], run / sub)
    shown = []
    monkeypatch.setattr(plots, "training_curves", lambda runs, path: path)
    monkeypatch.setattr(plots, "story_masks", lambda model, tokens, labels, path: shown.append(model) or path)
    build.figures(tmp_path, ["local-k2-s0"], {}, str(stories_dir))
    assert torch.equal(shown[0].wte.weight, saved["best"].wte.weight)


def test_grid_is_baseline_plus_ablation_by_k_by_seed():
    cfg = ReproduceConfig(ablations=("local", "global"), ks=(2, 8), seeds=(0, 1))
    names = [s.name for s in grid(cfg)]
    assert names == ["none-s0", "local-k2-s0", "local-k8-s0", "global-k2-s0", "global-k8-s0",
                     "none-s1", "local-k2-s1", "local-k8-s1", "global-k2-s1", "global-k8-s1"]
    spec = grid(cfg)[2]
    assert (spec.model.k_attn, spec.model.k_mlp, spec.train.seed, spec.train.resume) == (8, 8, 0, True)


@pytest.mark.parametrize("bad", [dict(ks=(2, "x")), dict(ks="2,8"), dict(ks=(2.5,)), dict(ablations=("local", "nope")), dict(ks=(0,)),
                                 dict(tau_sweep=(0.01, float("nan"))), dict(seeds=(True,)), dict(preset="huge"),
                                 dict(ioi_prompts="no/such/file.json")])
def test_bad_grid_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        ReproduceConfig(**bad)


def test_k_wider_than_the_layer_is_a_config_error():
    with pytest.raises(ConfigError, match="k"):
        grid(ReproduceConfig(preset="tiny", ks=(4096,)))


def test_aggregate_gives_mean_and_sample_std_over_seeds():
    cells = aggregate({"local-k2-s0": {"ioi_edges": 10.0}, "local-k2-s1": {"ioi_edges": 14.0},
                       "none-s0": {"ioi_edges": 30.0}})
    by = {c.name: c for c in cells}
    assert by["local-k2"].seeds == 2 and by["local-k2"].mean["ioi_edges"] == 12.0
    assert by["local-k2"].std["ioi_edges"] == pytest.approx(2 ** 0.5 * 2)  # sample std of (10, 14)
    assert by["none"].std["ioi_edges"] == 0.0
    md = markdown([Cell("local-k2", 2, {"ioi_edges": 12.0}, {"ioi_edges": 2.8284})], "test")
    assert "| local-k2 | 2 | 12 ± 3 |" in md and "79" in md  # the paper's baseline row is printed beside


def test_the_results_page_reads_ranges_off_the_table():
    from selfablate.report.results import _reading

    cells = [Cell("none", 1, {"ppl_clean": 30.0, "ioi_accuracy": 0.6, "sae_l0": 4.18}, {}),
             Cell("local-k2", 1, {"ppl_clean": 41.08, "ppl_ablated": 58.0, "ioi_accuracy": 0.58}, {}),
             Cell("global-k8", 1, {"ppl_clean": 39.5, "ioi_accuracy": 0.61}, {})]
    lines = _reading(cells)
    assert "- Clean perplexity: baseline 30.00; self-ablating models 39.50-41.08." in lines
    assert "- IOI accuracy: baseline 0.60; self-ablating models 0.58-0.61." in lines
    assert "- SAE L0: baseline 4.18; self-ablating models -." in lines
    assert any("barely do IOI (accuracy at most 0.61" in ln for ln in lines)
    assert any(ln.startswith("- One seed per model") for ln in lines)
    two = [c._replace(seeds=2, std={"ppl_clean": 0.5 + i}) for i, c in enumerate(cells)]
    two[0] = two[0]._replace(mean={**two[0].mean, "ioi_accuracy": 0.9})
    lines = _reading(two)
    assert "- 2 seeds per model; the largest std of clean perplexity over seeds is 2.50." in lines
    assert not any("barely" in ln for ln in lines)


@pytest.mark.slow
def test_reproduce_runs_resumes_and_reports(tmp_path, stories_dir, monkeypatch, device_strict):
    """Every stage (train, evaluate with localisation, circuits with ACDC, EAP and EAP-IG, an SAE, N2G)
    and the report, device-strict (conftest): nothing in them makes a tensor without a device."""
    cfg = tiny_cfg(tmp_path / "run", str(stories_dir))
    # Interrupt the first run at its first SAE: everything before it must survive.
    real_sae = reproduce._sae

    def broken(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(reproduce, "STAGES", tuple(s._replace(run=broken) if s.name == "sae" else s
                                                  for s in reproduce.STAGES))
    with pytest.raises(KeyboardInterrupt):
        reproduce.run_reproduce(cfg)
    out = Path(cfg.out)
    done = out / "models" / "none-s0" / "done.json"
    evaluated = out / "eval" / "none-s0.json"
    stamps = {p: p.stat().st_mtime_ns for p in (done, evaluated, out / "circuits" / "none-s0" / "circuit.json")}
    assert not (out / "sae").exists()

    monkeypatch.setattr(reproduce, "STAGES", tuple(s._replace(run=real_sae) if s.name == "sae" else s
                                                  for s in reproduce.STAGES))
    folder = reproduce.run_reproduce(cfg)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # finished stages were skipped
    per_model = json.loads((folder / "per_model.json").read_text())
    assert set(per_model) == {"none-s0", "local-k2-s0"}
    for m in per_model.values():
        assert {"ioi_edges", "sae_l0", "sae_ce_score", "ppl_clean", "weight_l1"} <= set(m)
    assert "ppl_ablated" in per_model["local-k2-s0"] and "ppl_ablated" not in per_model["none-s0"]
    # eval_max_tokens caps every evaluation, localisation's search too (its default is 8,192 tokens).
    assert json.loads((out / "eval" / "local-k2-s0.json").read_text())["localisation"]["tokens"] == 2048
    table = (folder / "table.md").read_text()
    assert "| local-k2 |" in table and "| none |" in table and "paper" in table
    assert (folder / "table.csv").read_text().count("\n") == 2 + 1 + 2  # header, 2 cells, 2 paper rows
    assert "\\begin{tabular}" in (folder / "table.tex").read_text()
    for png in ("training_curves", "selection_frequency", "story_masks", "circuits", "sae_frontier",
                "n2g_vs_selection", "sparsity_vs_specialisation"):
        assert (folder / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (folder / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 7 and "<table>" in html
    explains = {n: json.loads((out / "explain" / n / "explain.json").read_text()) for n in per_model}
    for name, m in per_model.items():  # the table's N2G F1 is the explanation's own mean and interval
        s = explains[name]["summary"]["mlp-clean"]
        assert (m["n2g_f1"], [m["n2g_f1_lo"], m["n2g_f1_hi"]]) == (s["f1_mean"], s["f1_ci95"])
        assert f"{s['f1_mean']:.3f} [{s['f1_ci95'][0]:.3f}, {s['f1_ci95'][1]:.3f}]" in table
    explorer = (folder / "explorer.html").read_text()
    assert all(f'"{n}":' in explorer for n in per_model)  # both models, to switch between

    from selfablate.cli import main

    page = tmp_path / "docs" / "results.md"
    assert main(["report", str(out), "--results", str(page)]) == 0
    text = page.read_text()
    assert table.strip() in text  # the run's own table, whole
    assert "2 models (none-s0, local-k2-s0)" in text and "6 steps of 8 x 32 tokens = 1,536 tokens" in text
    assert "`blocks.0.hook_mlp_out`, 10 steps" in text and "first 2,048 held-out tokens" in text
    assert "Neuron-to-Graph explanations of every clean MLP neuron (20 top examples from 4,096 training tokens" in text
    for png in ("selection_frequency", "circuits", "sae_frontier", "n2g_vs_selection"):
        assert f"](results_figures/{png}.png)" in text
        assert (page.parent / "results_figures" / f"{png}.png").read_bytes() == (folder / f"{png}.png").read_bytes()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (Debian package `chromium`; `make test` installs it)")
def test_report_html_renders_in_headless_chromium(tmp_path):
    from selfablate.report.html import write_html
    from selfablate.report.plots import sae_frontier

    png = sae_frontier({"m": [{"l0": 1.0, "ce_loss_score_zero": 0.5}, {"l0": 3.0, "ce_loss_score_zero": 0.8}]},
                       tmp_path / "f.png")
    page = write_html(tmp_path / "report.html", "t", "| model | x |\n|---|---|\n| a | 1 |\n| b | 2 |\n",
                      [("one", png), ("two", png)])
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'data-images-loaded="2/2"' in dom and 'data-table-rows="2"' in dom
    assert "2 of 2 figures loaded" in dom


def test_report_of_a_folder_that_is_not_a_reproduction_is_a_one_line_error(tmp_path, capsys):
    from selfablate.cli import main

    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfablate: error:") and "reproduce.json" in err and "\n" not in err


def test_changed_settings_are_refused_unless_accepted_and_never_rewritten_silently(tmp_path, capsys):
    import dataclasses
    import json

    from selfablate.reproduce import record

    meta = tmp_path / "reproduce.json"
    cfg = ReproduceConfig(out=str(tmp_path), ks=(2, 8))
    record(meta, cfg, ["none-s0"])
    record(meta, dataclasses.replace(cfg, progress=False, device="cpu"), ["none-s0"])  # computes the same grid
    with pytest.raises(ConfigError, match=r"ks: \[2, 8\] -> \[2\]; tau: 0.03 -> 0.01.*--accept-changed"):
        record(meta, dataclasses.replace(cfg, ks=(2,), tau=0.01), ["none-s0"])
    assert json.loads(meta.read_text())["config"]["ks"] == [2, 8]  # the record is untouched
    record(meta, dataclasses.replace(cfg, ks=(2,), accept_changed=True), ["none-s0"])
    saved = json.loads(meta.read_text())
    assert saved["config"]["ks"] == [2] and saved["history"][0]["ks"] == [2, 8]
    assert "ks: [2, 8] -> [2]" in capsys.readouterr().err
    meta.write_text("{not json")
    with pytest.raises(ConfigError, match="not a reproduce record"):
        record(meta, cfg, ["none-s0"])




def test_a_record_of_an_older_version_with_lists_as_text_is_the_same_grid(tmp_path):
    from selfablate.reproduce import changed_settings

    meta = tmp_path / "reproduce.json"
    cfg = ReproduceConfig(out=str(tmp_path), ks=(2, 8), ablations=("local",), tau_sweep=(0.01, 0.1))
    old = json.loads(json.dumps(__import__("dataclasses").asdict(cfg)))
    old.update(ks="2,8", ablations="local", seeds="0", tau_sweep="0.01,0.1", sae_sweep="")
    meta.write_text(json.dumps({"config": old}))
    assert changed_settings(meta, cfg) == []
    old["ks"] = "2,x"
    meta.write_text(json.dumps({"config": old}))
    with pytest.raises(ConfigError, match="not a reproduce record"):
        changed_settings(meta, cfg)


def test_a_setting_an_older_record_lacks_counts_as_its_default(tmp_path):
    """A record written before a setting existed ran with that setting's default: the same grid
    when it is still the default, a changed one when not (a grid from scratch is not silently
    continued from a pretrained model)."""
    from selfablate.reproduce import changed_settings

    meta = tmp_path / "reproduce.json"
    cfg = ReproduceConfig(out=str(tmp_path))
    old = json.loads(json.dumps(__import__("dataclasses").asdict(cfg)))
    del old["init_from"], old["explain_tokens"]
    meta.write_text(json.dumps({"config": old}))
    assert changed_settings(meta, cfg) == []
    source = tmp_path / "neo"
    source.mkdir()
    assert changed_settings(meta, __import__("dataclasses").replace(cfg, init_from=str(source))) == [
        f"init_from: '' -> {str(source)!r}"]


def test_the_paper_preset_takes_the_authors_prompts_and_sae_settings(monkeypatch, tmp_path):
    import selfablate.report.circuits as circuits
    import selfablate.sae.train as sae_train

    seen = {}
    monkeypatch.setattr(circuits, "write_circuits", lambda ckpt, cfg: seen.setdefault("circuits", cfg))
    monkeypatch.setattr(sae_train, "run_sae_sweep", lambda ckpt, cfg, values: seen.setdefault("sae", cfg))
    for preset, prompts, lr, steps in (("paper", "authors", 1e-5, 100_000), ("cpu-small", "templates", 4e-4, 2000)):
        seen.clear()
        cfg = ReproduceConfig(out=str(tmp_path), preset=preset)
        spec = grid(cfg)[1]
        reproduce._circuits(cfg, spec)
        reproduce._sae(cfg, spec)
        assert seen["circuits"].prompts == prompts and (seen["sae"].lr, seen["sae"].steps) == (lr, steps)
    seen.clear()
    reproduce._sae(dataclasses.replace(cfg, sae_steps=7), spec)
    assert seen["sae"].steps == 7
