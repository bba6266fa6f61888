"""`selfablate evaluate`: the pipeline end to end, the probe, localisation, consistency."""

import csv
import json
import math

import pytest
import torch

from selfablate import load_checkpoint
from selfablate.data.dataset import TokenWindows, tokenize_split
from selfablate.data.sources import resolve_source
from selfablate.eval.collect import TOKEN_CLASSES, classify_token, run_batch
from selfablate.eval.evaluate import EvalConfig, evaluate_many
from selfablate.eval.lm import evaluate_loss
from selfablate.eval.localisation import ce_with_units, localisation
from selfablate.eval.probe import leakage_probe
from selfablate.data.vocab import token_lookup

pytestmark = pytest.mark.usefixtures("backend")  # each test on both backends (conftest)


@pytest.fixture(scope="module")
def checkpoints(tiny_runs):
    return [tiny_runs["none"], tiny_runs["local"]]


@pytest.fixture(scope="module")
def evaluated(checkpoints, stories_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-out")
    cfg = EvalConfig(out=str(out), data=str(stories_dir), max_tokens=4096, bootstrap=200, probe_positions=2000,
                     localisation_tokens=512, progress=False)
    rows = evaluate_many([str(c) for c in checkpoints], cfg)
    return out, rows, cfg


def test_evaluate_writes_traceable_json_and_csv(evaluated, checkpoints):
    out, rows, _ = evaluated
    assert [r["model"] for r in rows] == ["none", "local"]
    with open(out / "summary.csv") as f:
        assert [r["model"] for r in csv.DictReader(f)] == ["none", "local"]
    r = json.loads((out / "local.json").read_text())
    assert r["config"]["ablation"] == "local" and r["checkpoint"] == str(checkpoints[1])
    model = load_checkpoint(checkpoints[1])
    windows = TokenWindows(tokenize_split(resolve_source(r["data"]["source"]), "valid"), 32, token_lookup(model))
    whole_windows = min(4096 // 32, windows.num_sequential())  # 4096 tokens, or all of a smaller split
    assert len(r["data"]["sha256"]) == 64 and r["data"]["tokens"] == whole_windows * 32
    base = json.loads((out / "none.json").read_text())
    assert "masks" not in base and "ablated" not in base["lm"] and base["data"]["sha256"] == r["data"]["sha256"]
    assert r["localisation"]["tokens"] == 512  # localisation_tokens, below max_tokens


def test_lm_numbers_agree_with_the_plain_loss_evaluation(evaluated, checkpoints, stories_dir):
    out, _, cfg = evaluated
    r = json.loads((out / "local.json").read_text())
    model = load_checkpoint(checkpoints[1])
    windows = TokenWindows(tokenize_split(resolve_source(str(stories_dir)), "valid"), 32, token_lookup(model))
    plain = evaluate_loss(model, windows.sequential_batches(32, 4096 // 32))
    assert r["lm"]["clean"]["ce"] == pytest.approx(plain.clean, rel=1e-5)
    assert r["lm"]["ablated"]["ce"] == pytest.approx(plain.ablated, rel=1e-5)
    lo, hi = r["lm"]["clean"]["ce_ci95"]
    assert lo < r["lm"]["clean"]["ce"] < hi
    assert r["lm"]["clean"]["ppl"] == pytest.approx(math.exp(plain.clean), rel=1e-5)


def test_mask_statistics_are_consistent(evaluated):
    out, _, _ = evaluated
    m = json.loads((out / "local.json").read_text())["masks"]
    for kind, k, width in (("attn", 8, 32), ("mlp", 16, 64)):
        freq = torch.tensor(m[kind]["selection_frequency"])
        assert torch.allclose(freq.sum(-1), torch.full((2,), float(k)))  # exactly k per token
        assert all(math.log(k) - 1e-6 <= h <= math.log(width) + 1e-6 for h in m[kind]["entropy"])
        # Random masks of k of width units persist with probability k / width.
        assert m[kind]["persistence_random_mask"] == pytest.approx([k / width] * 2, abs=0.03)


def test_random_mask_control_keeps_exactly_k(checkpoints):
    model = load_checkpoint(checkpoints[1])
    x = torch.randint(0, model.cfg.vocab_size, (2, 16))
    v = run_batch(model, x, x, torch.Generator().manual_seed(0))
    assert (v.random_attn_mask.sum(-1) == 8).all() and (v.random_mlp_mask.sum(-1) == 16).all()
    assert not torch.equal(v.random_attn_mask, v.attn_mask)
    assert v.ce_random.shape == x.shape


def test_leakage_probe_catches_a_mask_that_encodes_the_next_token():
    g = torch.Generator().manual_seed(0)
    n, classes = 4000, 20
    targets = torch.randint(0, classes, (n,), generator=g)
    current = torch.randint(0, classes, (n,), generator=g)
    random_bits = torch.rand(n, 40, generator=g) < 0.25
    leaky = torch.cat([torch.nn.functional.one_hot(targets, classes).bool(), random_bits[:, :20]], dim=1)
    r = leakage_probe(leaky, random_bits, current, targets, top_classes=classes)
    assert r["probes"]["mask"]["accuracy"] > 0.95
    assert r["probes"]["random_mask"]["ce"] > math.log(classes) - 0.2  # nothing to read
    # Early stopping keeps a probe on content-free features at the prior, not worse.
    assert r["probes"]["random_mask"]["ce"] == pytest.approx(r["probes"]["prior"]["ce"], abs=0.1)
    assert r["mask_gain_over_random_nats"] > 2.0 and r["status"] == "ok"


def _probe_data(n: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, classes, (n,), generator=g)
    current = torch.randint(0, classes, (n,), generator=g)
    residual = torch.nn.functional.one_hot(targets, classes).float() + 0.1 * torch.randn(n, classes, generator=g)
    return targets, current, residual, g


def test_leakage_probe_planted_leak_and_no_leak_control():
    """With the clean residual as the ceiling (here it knows the next token): a mask that encodes the
    next token exposes most of it (share 0.85); a mask that carries nothing, none (near 0)."""
    targets, current, residual, g = _probe_data(4000, 20)
    random_bits = torch.rand(4000, 40, generator=g) < 0.25
    leak = torch.cat([torch.nn.functional.one_hot(targets, 20).bool(), random_bits[:, :20]], dim=1)
    planted = leakage_probe(leak, random_bits, current, targets, residual, top_classes=20)
    control = leakage_probe(torch.rand(4000, 40, generator=g) < 0.25, random_bits, current, targets, residual,
                            top_classes=20)
    assert planted["status"] == control["status"] == "ok"
    assert planted["mask_share_of_residual_gain"] > 0.75  # measured 0.85: the probe stops early, short of the ceiling
    assert abs(control["mask_share_of_residual_gain"]) < 0.05 and abs(control["mask_gain_over_random_nats"]) < 0.1


def test_a_probe_that_cannot_learn_says_so_instead_of_a_number():
    """Too few positions for the classes (as on the tiny models): no probe beats its start."""
    targets, current, _, g = _probe_data(60, 400)
    bits = [torch.rand(60, 40, generator=g) < 0.25 for _ in range(3)]
    r = leakage_probe(bits[0], bits[1], current, targets, bits[2].float(), top_classes=400)
    assert r["status"] == "probe did not learn"
    assert r["mask_gain_over_random_nats"] is None and r["mask_share_of_residual_gain"] is None


def test_localisation_finds_units_that_recover_the_target(checkpoints, stories_dir):
    model = load_checkpoint(checkpoints[0])
    windows = TokenWindows(tokenize_split(resolve_source(str(stories_dir)), "valid"), 32, token_lookup(model))
    batches = list(windows.sequential_batches(8, 16))
    loc = localisation(model, batches, target=0.9)
    assert 0 < loc.units_needed <= loc.total_units == 2 * (32 + 64)
    assert loc.ce_no_units > loc.ce_all_units
    assert loc.ce_no_units - loc.ce_at_units_needed >= 0.9 * (loc.ce_no_units - loc.ce_all_units) - 1e-9
    ones = (torch.ones(2, 32), torch.ones(2, 64))
    assert ce_with_units(model, batches, *ones) == pytest.approx(loc.ce_all_units)


def test_token_classes():
    assert TOKEN_CLASSES[classify_token(" Lily")] == "capitalised"
    assert TOKEN_CLASSES[classify_token(".")] == "punctuation"
    assert TOKEN_CLASSES[classify_token(" 42")] == "number"
    assert TOKEN_CLASSES[classify_token("\n")] == "newline"
    assert TOKEN_CLASSES[classify_token(" the")] == "function_word"
    assert TOKEN_CLASSES[classify_token(" dog")] == "other"


def test_summary_keeps_every_model_whose_json_is_in_the_folder(evaluated, checkpoints, tmp_path):
    """evaluate --out D used to rewrite summary.csv with only the models of its own call."""
    import dataclasses
    import shutil

    out, _, cfg = evaluated
    mine = tmp_path / "eval"
    mine.mkdir()
    for name in ("none", "local"):
        shutil.copy(out / f"{name}.json", mine / f"{name}.json")
    other = tmp_path / "other"
    shutil.copytree(checkpoints[1], other / "checkpoint")
    rows = evaluate_many([str(other)], dataclasses.replace(cfg, out=str(mine), bootstrap=10, max_tokens=1024))
    assert [r["model"] for r in rows] == ["other"]
    with open(mine / "summary.csv") as f:
        assert [r["model"] for r in csv.DictReader(f)] == ["other", "local", "none"]


def test_the_evaluation_pass_reads_nothing_back_while_it_runs(checkpoints, stories_dir):
    """On CUDA's path, `one_pass` over many batches makes no host read (a value read as a number, a
    data-sized selection, a tensor handed to Python or copied to the host): each would stall a GPU.
    Its sums stay on the device until the results are made."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from selfablate import ops
    from selfablate.eval.evaluate import one_pass

    syncs = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "unique", "_unique2", "bincount"}
    reads = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in syncs:
                reads.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    class Methods(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("tolist", "numpy", "cpu", "item"):
                reads.append("Tensor." + func.__name__)
            return func(*args, **(kwargs or {}))

    for checkpoint in checkpoints:
        model = load_checkpoint(checkpoint)
        windows = TokenWindows(tokenize_split(resolve_source(str(stories_dir)), "valid", progress=False),
                               model.cfg.n_ctx, token_lookup(model))
        cfg = EvalConfig(out="", batch_size=2, progress=False)
        with ops.use_backend("torch"), ops.device_policy_as("cuda"), Ops(), Methods():
            acc = one_pass(model, windows, cfg, n_windows=8)  # 4 batches
        assert reads.count("Tensor.tolist") <= 1 and len(reads) - reads.count("Tensor.tolist") == 0, reads
        reads.clear()
        assert acc["acts"].n == 8 * model.cfg.n_ctx
