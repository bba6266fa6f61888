"""Neuron-to-Graph (`selfablate explain`): pruning, importance, the trie and its predictions on
hand-built cases whose answers are known; F1 against a hand count; a planted neuron in a real
model explained end to end; resuming; the explorer page."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from selfablate import ModelConfig, SelfAblatingTransformer
from selfablate.checkpoint import save_checkpoint
from selfablate.cli import main
from selfablate.data.tokenizer import gpt2_tokenizer
from selfablate.explain import n2g
from selfablate.explain import run as explain_run

ONCE, THE, PAD = 11, 12, 0


def once_the(gap: int):
    """A fake model with one unit: 1.0 at a last token THE with ONCE `gap` tokens before it,
    0.2 at THE without it, else 0."""
    def fn(tokens: torch.Tensor) -> torch.Tensor:
        last = tokens[:, -1] == THE
        before = tokens[:, -1 - gap] == ONCE if tokens.shape[1] > gap else torch.zeros_like(last)
        return torch.where(last, torch.where(before, 1.0, 0.2), 0.0)[:, None]  # (batch, units=1)
    return fn


def examples(*contexts: list[int]) -> n2g.Examples:
    width = max(map(len, contexts))
    ctx = torch.tensor([[-1] * (width - len(c)) + c for c in contexts])
    return n2g.Examples(torch.zeros(len(contexts), dtype=torch.long), ctx, torch.ones(len(contexts)))


def test_the_after_once_prunes_weighs_and_becomes_a_two_token_path():
    fn = once_the(gap=1)
    ex = examples([5, 7, 3, ONCE, THE], [9, ONCE, THE])
    length, act = n2g.prune(fn, ex, keep=0.5, batch_size=4)
    assert length.tolist() == [2, 2]  # THE alone keeps 0.2 < 0.5 of 1.0; ONCE THE keeps all
    assert act.tolist() == [1.0, 1.0]
    pruned = [ex.context[i, -m:] for i, m in enumerate(length.tolist())]
    imp = n2g.importance(fn, pruned, ex.unit, replacement=PAD, batch_size=3)
    assert [v.tolist() for v in imp] == [pytest.approx([0.8, 1.0])] * 2  # without ONCE 0.2 is left; without THE 0
    path = n2g.pattern(pruned[0].tolist(), imp[0].tolist(), threshold=0.75)
    assert path == (THE, ONCE)
    graph = n2g.build_graph([path, path], [1.0, 0.9])
    assert n2g.paths(graph) == [((THE, ONCE), 1.0)]  # the two examples share one path; the larger value
    text = np.array([[ONCE, THE, 4, THE, ONCE, 5, THE]])
    assert n2g.predict(graph, text).tolist() == [[0, 1, 0, 0, 0, 0, 0]]


def test_an_unimportant_token_becomes_a_wildcard_and_matches_any_token():
    fn = once_the(gap=2)
    ex = examples([9, 8, ONCE, 4, THE])
    length, _ = n2g.prune(fn, ex, keep=0.5, batch_size=8)
    assert length.tolist() == [3]
    pruned = [ex.context[0, -3:]]
    imp = n2g.importance(fn, pruned, ex.unit, replacement=PAD, batch_size=8)
    assert imp[0].tolist() == pytest.approx([0.8, 0.0, 1.0])
    path = n2g.pattern(pruned[0].tolist(), imp[0].tolist(), threshold=0.75)
    assert path == (THE, n2g.WILDCARD, ONCE)
    graph = n2g.build_graph([path, (THE,)], [1.0, 0.2])
    text = np.array([[ONCE, 7, THE, THE, ONCE, 3, THE, 1]])
    # THE alone predicts 0.2 everywhere; with ONCE two before, 1.0 (the larger match)
    assert n2g.predict(graph, text).tolist() == [pytest.approx([0, 0, 1.0, 0.2, 0, 0, 1.0, 0])]
    # a path never reaches before a window's start
    assert n2g.predict(graph, np.array([[4, THE]])).tolist() == [pytest.approx([0, 0.2])]


def test_the_whole_context_is_kept_when_no_shorter_one_keeps_enough():
    fn = once_the(gap=4)
    ex = examples([ONCE, 1, 2, 3, THE], [2, THE])
    length, act = n2g.prune(fn, ex, keep=0.9, batch_size=8)
    assert length.tolist() == [5, 1]  # the first needs ONCE, four back; the second is THE without it throughout
    assert act.tolist() == pytest.approx([1.0, 0.2])


def test_scores_against_a_hand_count():
    actual = np.array([[0.0, 0.9, 0.6, 0.1, 0.5, 0.0, 0.2, 1.0]])
    predicted = np.array([[0.0, 1.0, 0.0, 0.7, 0.5, 0.9, 0.0, 0.4]])
    # unit max 1.0, fire 0.5: fires at 1, 2, 4, 7; predicted at 1, 3, 4, 5: TP 2 (1, 4), FP 2 (3, 5), FN 2 (2, 7)
    s = n2g.scores(predicted, actual, unit_max=1.0, fire=0.5)
    assert (s.precision, s.recall, s.f1, s.fires, s.predicted) == (0.5, 0.5, 0.5, 4, 4)
    s = n2g.scores(predicted, actual, unit_max=2.0, fire=0.5)  # fires where >= 1.0: only position 7
    assert (s.precision, s.recall, s.f1) == (0.0, 0.0, 0.0)
    silent = n2g.scores(np.zeros((1, 4)), np.zeros((1, 4)), unit_max=1.0, fire=0.5)
    assert np.isnan(silent.f1) and np.isnan(silent.precision) and np.isnan(silent.recall)


# -- a real model with a planted neuron -------------------------------------------------------


def planted_model(token: int) -> SelfAblatingTransformer:
    """A clean model whose layer-0 neuron 0 fires on `token` only: the token's embedding alone has
    a large first coordinate, attention and positions add nothing to the residual, and the
    neuron reads that coordinate. Every other weight is random."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50257, n_ctx=32, d_model=16, n_layers=2, n_heads=2, d_mlp=8, k_attn=4, k_mlp=4,
                    ablation="none")
    model = SelfAblatingTransformer(cfg).eval()
    with torch.no_grad():
        model.wte.weight[:, 0] = -0.5
        model.wte.weight[token, 0] = 4.0
        model.wpe.weight.zero_()
        for block in model.blocks:  # no attention output: each position's residual is its token's
            block.attn.out_proj.weight.zero_()
            block.attn.out_proj.bias.zero_()
        fc = model.blocks[0].mlp.fc_in
        fc.weight[0] = 0.0
        fc.weight[0, 0] = 3.0  # the normalised first coordinate is about 3.9 for the token, about -0.5 else
        fc.bias[0] = -3.0
    return model


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, stories_dir):
    the = gpt2_tokenizer().encode(" the")[0]
    folder = tmp_path_factory.mktemp("planted") / "run"
    save_checkpoint(planted_model(the), folder / "checkpoint")
    out = folder / "explain"
    args = ["explain", str(folder), "--data", str(stories_dir), "--train-tokens", "4096", "--test-tokens", "2048",
            "--no-progress", "--device", "cpu", "--stories", "2"]
    assert main(args) == 0
    return folder, out, args


def test_a_planted_neuron_is_explained_by_its_token_with_f1_one(planted_run):
    folder, out, _ = planted_run
    result = json.loads((out / "explain.json").read_text())
    neuron = result["layers"][0]["units"][0]
    assert result["layers"][0]["key"] == "mlp-clean-0"
    assert neuron["f1"] == 1.0 and neuron["precision"] == 1.0 and neuron["recall"] == 1.0
    assert neuron["fires"] > 20  # " the" is common in the held-out stories
    assert [(n["t"], n["c"]) for n in neuron["graph"]] == [(" the", [])]  # one node: the token alone
    assert all(e["tokens"] == [" the"] for e in neuron["examples"])  # pruned to the token itself
    others = [u["f1"] for u in result["layers"][0]["units"][1:] if u["f1"] is not None]
    assert np.mean(others) < 0.9  # random neurons are not all explained
    rows = (out / "explain.csv").read_text().splitlines()
    assert rows[0].startswith("kind,stream,layer,unit") and len(rows) == 1 + 2 * 8
    assert set(result["summary"]) == {"mlp-clean"} and result["summary"]["mlp-clean"]["units"] == 16


def test_a_second_run_reuses_every_finished_layer(planted_run, monkeypatch):
    folder, out, args = planted_run
    before = (out / "layers" / "mlp-clean-1.json").read_bytes()
    monkeypatch.setattr(explain_run, "explain_units", lambda *a, **k: pytest.fail("a finished layer was redone"))
    assert main(args) == 0
    assert (out / "layers" / "mlp-clean-1.json").read_bytes() == before
    (out / "layers" / "mlp-clean-1.json").unlink()
    redone = []
    monkeypatch.setattr(explain_run, "explain_units", lambda model, units, *a: redone.append(units.key) or
                        json.loads(before))
    assert main(args) == 0 and redone == ["mlp-clean-1"]


def test_ablated_stream_of_a_baseline_is_one_line(planted_run, capsys):
    folder, _, args = planted_run
    assert main(args + ["--ablated"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == \
        ["selfablate: error: --ablated: this model has no ablated stream (ablation=none)"]


# -- the explorer in a real browser -----------------------------------------------------------

CHROMEDRIVER = shutil.which("chromedriver")


def browser():
    """Debian's Chromium, headless, driven through ChromeDriver by Selenium's WebDriver client."""
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


@pytest.mark.skipif(CHROMEDRIVER is None, reason="needs chromium and chromedriver (Debian packages chromium, "
                                                 "chromium-driver; `make test` installs them)")
def test_the_explorer_shows_a_tokens_kept_units_and_a_units_graph(tiny_runs, stories_dir, tmp_path):
    from selenium.webdriver.common.by import By

    out = tmp_path / "explain"
    assert main(["explain", str(tiny_runs["local"]), "--data", str(stories_dir), "--out", str(out), "--train-tokens",
                 "4096", "--test-tokens", "1024", "--no-progress", "--device", "cpu", "--stories", "2"]) == 0
    result = json.loads((out / "explain.json").read_text())
    story = result["stories"][0]
    pos = 5
    expected = sorted(u for u, _ in story["units"][pos]["mlp-1"])  # what the masks kept there
    assert len(expected) == result["config"]["k_mlp"]
    driver = browser()
    try:
        driver.get((out / "explorer.html").as_uri())
        assert driver.find_element(By.ID, "summary").text.count("mlp-clean") == 1
        driver.find_elements(By.CSS_SELECTOR, ".tok")[pos].click()
        shown = driver.find_elements(By.CSS_SELECTOR, '#token .unit[data-key="mlp-clean-1"]')
        assert sorted(int(e.get_attribute("data-unit")) for e in shown) == expected
        assert story["tokens"][pos] in driver.find_element(By.CSS_SELECTOR, "#token h2").text
        unit = expected[0]
        shown[[int(e.get_attribute("data-unit")) for e in shown].index(unit)].click()
        record = result["layers"][1]["units"][unit]
        assert driver.find_element(By.ID, "unit-title").text == f"mlp-clean-1 unit {unit}"
        f1 = driver.find_element(By.CSS_SELECTOR, "#unit-scores td").text
        assert f1 == ("-" if record["f1"] is None else f"{record['f1']:.3f}")
        nodes = driver.find_elements(By.CSS_SELECTOR, "#unit svg.graph g.node")
        assert len(nodes) == count_nodes(record["graph"])
        driver.save_screenshot(str(tmp_path / "explorer.png"))
    finally:
        driver.quit()


def count_nodes(nodes: list[dict]) -> int:
    return sum(1 + count_nodes(n["c"]) for n in nodes)
