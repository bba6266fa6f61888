"""IOI prompts and the edge-patching forward behind ACDC / EAP."""

import dataclasses

import pytest
import torch

from selfablate import ModelConfig, SelfAblatingTransformer, gpt2_tokenizer
from selfablate.circuits.patching import EdgeGraph, cache_run, kl_last, last_logprobs, patched_forward
from selfablate.circuits.ioi import TEMPLATES, ioi_behaviour, ioi_prompts, single_token_words, NAMES

from .helpers import perturbed

pytestmark = pytest.mark.usefixtures("backend")  # each test on both backends (conftest)


CFG = dict(vocab_size=50257, n_ctx=64, d_model=16, n_layers=2, n_heads=4, d_mlp=32, ablation="local", k_attn=4, k_mlp=8)


def test_paper_graph_has_the_papers_edge_count():
    g = EdgeGraph(n_layers=8, n_heads=16)
    assert g.n_sources == 137 and g.n_edges == 23_981 and len(g.edge_names) == 23_981
    assert g.edge_names[0] == ("embed", "L0.H0.q") and g.edge_names[-1] == ("L7.MLP", "final")
    dests = {d for _, d in g.edge_names}
    assert len(dests) == 8 * 16 * 3 + 8 + 1  # 393 destinations


def test_ioi_prompts_are_aligned_pairs_with_single_token_names():
    enc = gpt2_tokenizer()
    batch = ioi_prompts(8, seed=1)
    assert batch.clean.shape == batch.corrupt.shape
    for i, text in enumerate(batch.texts):
        ids = enc.encode(text)
        assert batch.clean[i, : len(ids)].tolist() == ids and batch.last[i] == len(ids) - 1
        io, s = enc.decode([int(batch.io[i])]).strip(), enc.decode([int(batch.s[i])]).strip()
        assert text.count(io) == 1 and text.count(s) == 2 and text.endswith(" to")
        corrupt = enc.decode(batch.corrupt[i, : len(ids)].tolist())
        assert io not in corrupt.split() and s not in corrupt.split()
    assert ioi_prompts(8, seed=1).texts == batch.texts and ioi_prompts(8, seed=2).texts != batch.texts
    assert len(single_token_words(NAMES)) >= 30 and len(TEMPLATES) == 4


def test_ioi_behaviour_by_hand():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
    b = ioi_behaviour(logits, torch.tensor([0, 0]), torch.tensor([1, 1]))
    assert b.logit_diff == pytest.approx((2.0 - 3.0) / 2) and b.accuracy == 0.5
    assert b.prob_io == pytest.approx((logits.softmax(-1)[0, 0] + logits.softmax(-1)[1, 0]).item() / 2)


@pytest.fixture(scope="module")
def setup():
    model = perturbed(ModelConfig(**CFG))  # away from init, so every edge matters
    batch = ioi_prompts(6, seed=0)
    return model, batch, EdgeGraph(2, 4)


@pytest.mark.parametrize("window", [(), (3, 0)], ids=["global", "gpt-neo-local-layer"])
def test_no_patched_edges_reproduce_the_clean_run(setup, window):
    model, batch, graph = setup
    if window:  # the same weights with a local layer shorter than the prompts: patching must apply it too
        local = perturbed(dataclasses.replace(model.cfg, attention_window=window))
        local.load_state_dict(model.state_dict())
        model = local
    final, _ = patched_forward(model, batch.clean, torch.zeros(graph.n_edges, dtype=torch.float64))
    out = model(batch.clean)
    rows = torch.arange(len(batch.last))
    torch.testing.assert_close(model.unembed(model.ln_final(final))[rows, batch.last],
                               out.logits_clean[rows, batch.last], rtol=1e-10, atol=1e-10)


def test_all_patched_edges_reproduce_the_corrupt_run(setup):
    model, batch, graph = setup
    _, corrupt = patched_forward(model, batch.corrupt, torch.zeros(graph.n_edges, dtype=torch.float64))
    final, _ = patched_forward(model, batch.clean, torch.ones(graph.n_edges, dtype=torch.float64), corrupt)
    ref = model(batch.corrupt).logits_clean
    rows = torch.arange(len(batch.last))
    torch.testing.assert_close(model.unembed(model.ln_final(final))[rows, batch.last], ref[rows, batch.last],
                               rtol=1e-10, atol=1e-10)


def test_one_patched_edge_changes_only_what_is_downstream(setup):
    model, batch, graph = setup
    _, corrupt = patched_forward(model, batch.corrupt, torch.zeros(graph.n_edges, dtype=torch.float64))
    mask = torch.zeros(graph.n_edges, dtype=torch.float64)
    e = graph.edge_names.index(("embed", "L1.MLP"))
    mask[e] = 1
    _, src = patched_forward(model, batch.clean, mask, corrupt)
    _, clean_src = patched_forward(model, batch.clean, torch.zeros_like(mask))
    names = graph.source_names
    torch.testing.assert_close(src[: names.index("L1.MLP")], clean_src[: names.index("L1.MLP")])
    assert not torch.allclose(src[names.index("L1.MLP")], clean_src[names.index("L1.MLP")])
    clean_logp = last_logprobs(model, patched_forward(model, batch.clean, torch.zeros_like(mask))[0], batch.last)
    assert kl_last(clean_logp, clean_logp).item() == pytest.approx(0.0, abs=1e-12)


def test_sparse_and_dense_patching_agree(setup):
    model, batch, graph = setup
    zeros = torch.zeros(graph.n_edges, dtype=torch.float64)
    _, corrupt = patched_forward(model, batch.corrupt, zeros)
    g = torch.Generator().manual_seed(0)
    for density in (0.1, 0.5, 0.9):  # rows on both sides of the mostly-pruned switch
        mask = (torch.rand(graph.n_edges, generator=g, dtype=torch.float64) < density).double()
        sparse, _ = patched_forward(model, batch.clean, mask, corrupt)
        dense, _ = patched_forward(model, batch.clean, mask.clone().requires_grad_(), corrupt)
        torch.testing.assert_close(sparse, dense.detach(), rtol=1e-10, atol=1e-10)


def test_start_layer_reuses_clean_sources_exactly(setup):
    model, batch, graph = setup
    zeros = torch.zeros(graph.n_edges, dtype=torch.float64)
    _, corrupt = patched_forward(model, batch.corrupt, zeros)
    _, clean = cache_run(model, batch.clean)
    mask = zeros.clone()
    mask[-5:] = 1  # edges into the final residual only
    full, _ = patched_forward(model, batch.clean, mask, corrupt)
    for start in (1, 2):  # 2 = n_layers: only the final residual is rebuilt
        late, _ = patched_forward(model, batch.clean, mask, corrupt, start_layer=start, clean=clean)
        torch.testing.assert_close(late, full, rtol=1e-10, atol=1e-10)


def test_node_and_projection_reuse_is_exact(setup):
    """Masks as ACDC leaves them: each destination row all patched, all clean or mixed. The
    reusing path (0/1 mask, caches) must equal the dense path that recomputes everything."""
    model, batch, graph = setup
    _, corrupt = cache_run(model, batch.corrupt)
    _, clean = cache_run(model, batch.clean)
    g = torch.Generator().manual_seed(0)
    for trial in range(6):
        mask = torch.zeros(graph.n_edges, dtype=torch.float64)
        for _, start, rows, n in graph.groups:
            for r in range(rows):
                kind = int(torch.randint(3, (1,), generator=g))
                row = slice(start + r * n, start + (r + 1) * n)
                mask[row] = [0.0, 1.0, float(torch.rand(1, generator=g) < 0.5)][kind] if kind < 2 else \
                    (torch.rand(n, generator=g, dtype=torch.float64) < 0.5).double()
        first_layer = graph.edge_layers[int(mask.nonzero().min())] if bool(mask.any()) else 0
        fast, _ = patched_forward(model, batch.clean, mask, corrupt, start_layer=first_layer, clean=clean)
        dense, _ = patched_forward(model, batch.clean, mask.clone().requires_grad_(), corrupt.sources)
        torch.testing.assert_close(fast, dense.detach(), rtol=1e-10, atol=1e-10)


# -- discovery --------------------------------------------------------------------------------

from selfablate.circuits.run import faithfulness_auc  # noqa: E402
from selfablate.circuits.discovery import acdc, eap_ig_scores, eap_scores, kl_with_mask, logit_diff_with_mask, make_task  # noqa: E402



@pytest.fixture(scope="module")
def task(setup):
    model, batch, _ = setup
    return make_task(model, batch)


def test_acdc_extremes(task):
    g = task.graph
    everything = acdc(task, tau=float("inf"))
    assert bool((everything.mask == 1).all())
    assert everything.kl == pytest.approx(kl_with_mask(task, torch.ones(g.n_edges, dtype=torch.float64)).item())
    nothing = acdc(task, tau=-1.0)
    assert bool((nothing.mask == 0).all()) and nothing.kl == pytest.approx(0.0, abs=1e-12)


def test_acdc_circuit_kl_is_what_its_mask_gives(task):
    total = kl_with_mask(task, torch.ones(task.graph.n_edges, dtype=torch.float64)).item()
    r = acdc(task, tau=total / 50)
    assert 0 < int((r.mask == 0).sum()) < task.graph.n_edges
    assert kl_with_mask(task, r.mask).item() == pytest.approx(r.kl, rel=1e-9, abs=1e-12)


def test_batched_trials_equal_one_at_a_time(task):
    """Each cumulative trial of a batch (the mask plus edges[: i + 1]) has the KL of the sparse
    one-edge path, for batches inside one destination group, across groups and across layers,
    on top of masks that already prune part of the later layers."""
    from selfablate.circuits.discovery import trial_kls

    g, layers = task.graph, task.graph.edge_layers
    gen = torch.Generator().manual_seed(0)
    for layer in range(g.n_layers + 1):
        mask = (torch.rand(g.n_edges, generator=gen, dtype=torch.float64) < 0.5).double()
        mask[[e for e in range(g.n_edges) if layers[e] <= layer]] = 0.0  # later layers partly pruned
        below = [e for e in reversed(range(g.n_edges)) if layer - 1 <= layers[e] <= layer]
        edges = sorted(torch.randperm(len(below), generator=gen)[:9].tolist())
        edges = [below[i] for i in edges]
        expected, trial = [], mask.clone()
        for e in edges:
            trial[e] = 1.0
            expected.append(kl_with_mask(task, trial).item())
        assert trial_kls(task, mask, edges).tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("batch, share", [(3, 1 / 200), (3, 1 / 50), (64, 1 / 10)])
def test_batched_acdc_keeps_the_same_edges(task, batch, share):
    tau = share * kl_with_mask(task, torch.ones(task.graph.n_edges, dtype=torch.float64)).item()
    one, many = acdc(task, tau), acdc(task, tau, batch=batch)
    assert 0 < int((one.mask == 0).sum()) < task.graph.n_edges
    assert torch.equal(one.mask, many.mask)
    # KL = sum p log p - p . logits + logsumexp: terms near ln(vocab) = 10.8 round at ~1e-14 each
    assert many.kl == pytest.approx(one.kl, abs=1e-11)
    assert torch.allclose(many.delta_kl, one.delta_kl, rtol=1e-8, atol=1e-11)


def test_eap_is_the_first_order_change_of_the_logit_difference(task):
    scores = eap_scores(task)
    base = logit_diff_with_mask(task, torch.zeros(task.graph.n_edges, dtype=torch.float64)).item()
    h = 1e-6
    for e in scores.abs().argsort(descending=True)[:3].tolist() + [0]:
        mask = torch.zeros(task.graph.n_edges, dtype=torch.float64)
        mask[e] = h
        fd = (logit_diff_with_mask(task, mask).item() - base) / h
        assert -scores[e].item() == pytest.approx(fd, rel=1e-4, abs=1e-8)


def test_eap_ig_is_complete(task):
    ig = eap_ig_scores(task, steps=20)
    total = kl_with_mask(task, torch.ones(task.graph.n_edges, dtype=torch.float64)).item()
    assert ig.sum().item() == pytest.approx(total, rel=0.02)


def test_faithfulness_auc_by_hand():
    # Points (0, 1.0), (10, 0.5), (100, 0): area = 0.1 * 0.75 + 0.9 * 0.25 = 0.3
    assert faithfulness_auc([(10, 0.5)], 100, 1.0) == pytest.approx(0.3)
    assert faithfulness_auc([], 100, 1.0) == pytest.approx(0.5)


def test_circuits_command_writes_json_and_svg(tmp_path, setup, capsys):
    import copy
    import json
    import xml.etree.ElementTree as ET

    from selfablate import save_checkpoint
    from selfablate.cli import main

    model, _, graph = setup
    save_checkpoint(copy.deepcopy(model).float(), tmp_path / "ckpt")  # the shared model stays as it is
    code = main(["circuits", str(tmp_path / "ckpt"), "--out", str(tmp_path / "c"), "--pairs", "4",
                 "--tau", "0.0001", "--sweep", "0.001", "--no-progress"])
    assert code == 0 and "ACDC tau=0.0001" in capsys.readouterr().out
    r = json.loads((tmp_path / "c" / "circuit.json").read_text())
    assert r["graph"]["edges"] == graph.n_edges and r["acdc"]["edges"] == len(r["acdc"]["circuit"])
    assert [s["tau"] for s in r["sweep"]] == [0.0001, 0.001] and set(r["ioi"]) == {"clean", "ablated"}
    assert r["acdc"]["batch"] == 1 and r["prompts"]["discovery"] == 4  # auto on the CPU: one edge a pass
    svg = ET.parse(tmp_path / "c" / "circuit.svg").getroot()
    assert svg.tag.endswith("svg") and len(svg.findall("{http://www.w3.org/2000/svg}line")) == r["acdc"]["edges"]
    assert (tmp_path / "c" / "circuit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_acdc_recovers_a_hand_built_circuit():
    """Only head L0.H0 writes to the residual (all other head outputs and all MLP output weights
    are zero), so names reach the last position only through that head's keys and values; its
    query reads the last token, which is the same word in clean and corrupt prompts. The circuit
    is exactly {embed -> L0.H0.k, embed -> L0.H0.v, L0.H0 -> final}."""
    torch.manual_seed(0)
    model = SelfAblatingTransformer(ModelConfig(**{**CFG, "ablation": "none"})).double().eval()
    Dh = 16 // 4
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc_out.weight.zero_()
            block.attn.out_proj.weight.zero_()
        model.blocks[0].attn.out_proj.weight[:, :Dh] = torch.randn(16, Dh, dtype=torch.float64)
        model.blocks[0].attn.k_proj.weight.mul_(20)  # a sharp, name-dependent attention pattern
    task = make_task(model, ioi_prompts(8, seed=3))
    for batch in (1, 16):
        r = acdc(task, tau=1e-9, batch=batch)
        kept = {task.graph.edge_names[e] for e in (r.mask == 0).nonzero().flatten().tolist()}
        assert kept == {("embed", "L0.H0.k"), ("embed", "L0.H0.v"), ("L0.H0", "final")}


def test_circuits_on_the_authors_prompts_from_the_command_line(tmp_path, setup, capsys):
    import copy
    import json

    from selfablate import save_checkpoint
    from selfablate.cli import main

    model, _, _ = setup
    save_checkpoint(copy.deepcopy(model).float(), tmp_path / "ckpt")
    code = main(["circuits", str(tmp_path / "ckpt"), "--out", str(tmp_path / "c"), "--prompts", "authors",
                 "--split", "8,6", "--batch", "4", "--sweep", "", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "prompts: authors, 4 pairs for discovery, 6 held out" in out
    assert "IOI (clean stream, held-out prompts)" in out
    r = json.loads((tmp_path / "c" / "circuit.json").read_text())
    assert r["prompts"] == {"discovery": 4, "held_out": 6} and set(r["ioi_test"]) == {"clean", "ablated"}
    assert r["prompts_sample"][0] == "After Joy and Rose went to the hospital, Joy gave a snack to"  # seed-42 order
    code = main(["circuits", str(tmp_path / "ckpt"), "--out", str(tmp_path / "d"), "--prompts", "missing.json"])
    assert code == 2 and "the prompt file missing.json does not exist" in capsys.readouterr().err


def _random_batches(task, seed=0):
    """(mask, edges) per layer: a mask pruning part of the later layers, and up to 9 edges into
    that layer and the one before it, in ACDC's order."""
    g, layers = task.graph, task.graph.edge_layers
    gen = torch.Generator().manual_seed(seed)
    for layer in range(g.n_layers + 1):
        mask = (torch.rand(g.n_edges, generator=gen, dtype=torch.float64) < 0.5).double()
        mask[[e for e in range(g.n_edges) if layers[e] <= layer]] = 0.0
        below = [e for e in reversed(range(g.n_edges)) if layer - 1 <= layers[e] <= layer]
        yield mask, [below[i] for i in sorted(torch.randperm(len(below), generator=gen)[:9].tolist())]


def test_fixed_shape_trials_equal_one_at_a_time(task):
    """The dense pass that a CUDA graph records: each trial's KL is the sparse one-edge path's,
    and padding with copies of the last edge repeats the last trial."""
    from selfablate.circuits.discovery import fixed_trial_kls

    for mask, edges in _random_batches(task):
        expected, trial = [], mask.clone()
        for e in edges:
            trial[e] = 1.0
            expected.append(kl_with_mask(task, trial).item())
        start = min(task.graph.edge_layers[e] for e in edges)
        tried = torch.tensor(edges + edges[-1:] * 3)
        kls = fixed_trial_kls(task, mask, tried, start)
        assert kls.tolist() == pytest.approx(expected + expected[-1:] * 3, rel=1e-12, abs=1e-15)


def test_the_fixed_shape_pass_can_be_captured_as_a_cuda_graph(task):
    """On CUDA's path, two passes from one start layer with other masks and edges run the same
    operators on the same shapes, read nothing back and make no tensor from host data."""
    from selfablate import ops
    from selfablate.circuits.discovery import fixed_trial_kls

    from .helpers import FROM_HOST, SYNC_OPS, Recorder

    g, passes = task.graph, []
    with ops.use_backend("torch"), ops.device_policy_as("cuda"):
        for seed in range(2):
            mask = (torch.rand(g.n_edges, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) < 0.5).double()
            tried = torch.randperm(g.n_edges, generator=torch.Generator().manual_seed(seed))[:8]
            with Recorder() as rec:
                fixed_trial_kls(task, mask, tried, 1)
            passes.append(rec.calls)
    names = {name for name, _ in passes[0]}
    assert not SYNC_OPS & names and not FROM_HOST & names, (SYNC_OPS | FROM_HOST) & names
    assert len(passes[0]) > 20 and passes[1] == passes[0]


class _Direct:
    """A stand-in for `runtime.Captured` that runs fn at every call (CUDA graphs need a GPU)."""
    made = 0

    def __init__(self, fn, device, warmup=1, pool=None):
        self.fn = fn
        type(self).made += 1

    def __call__(self):
        return self.fn()


def test_fixed_shape_trials_pad_short_batches_and_keep_one_graph_per_start_layer(task, monkeypatch):
    from selfablate.circuits import discovery

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(discovery, "Captured", _Direct)
    _Direct.made = 0
    graphed, starts = discovery.FixedShapeTrials(task, 12, graphed=True), set()
    for mask, edges in _random_batches(task, seed=1):
        for batch in (edges, edges[-2:]):  # a short batch, and one from a later start layer
            expected = discovery.trial_kls(task, mask, batch).tolist()
            assert graphed(mask, batch) == pytest.approx(expected, rel=1e-12, abs=1e-15)
            starts.add(min(task.graph.edge_layers[e] for e in batch))
    assert _Direct.made == len(starts) > 1


@pytest.mark.parametrize("batch", [1, 5])
def test_fixed_shape_acdc_keeps_the_same_edges(task, batch):
    """The dense pass that CUDA replays, run eagerly on the CPU, against the one-edge path."""
    tau = kl_with_mask(task, torch.ones(task.graph.n_edges, dtype=torch.float64)).item() / 50
    one, graphed = acdc(task, tau), acdc(task, tau, batch=batch, fixed_shape=True)
    assert 0 < int((one.mask == 0).sum()) < task.graph.n_edges
    assert torch.equal(one.mask, graphed.mask)
    assert torch.allclose(graphed.delta_kl, one.delta_kl, rtol=1e-8, atol=1e-11)
