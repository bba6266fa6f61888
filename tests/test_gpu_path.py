"""What a GPU run takes, tested on the CPU: bf16 autocast (CUDA's default precision runs the same
code under CPU autocast), masks and gradients that do not depend on the backend or on ties."""

import dataclasses
import functools

import pytest
import torch

from selfablate import ModelConfig, SelfAblatingTransformer
from selfablate.config import get_preset
from selfablate.metrics_log import read_metrics
from selfablate.ops.masks import hard_topk_soft_grad, soft_topk, topk_winners
from selfablate.train import autocast_for, make_optimizer, train, train_step

PAPER_WIDTHS = ModelConfig(vocab_size=512, n_ctx=64, d_model=128, n_heads=16, d_mlp=512, n_layers=2,
                           k_attn=32, k_mlp=32, ablation="local")
"""The paper's widths (where bf16 scores tie at the cut in many rows), few layers, a small vocabulary."""


def grad_norm_of_a_step(cfg: ModelConfig, precision: str, tokens: torch.Tensor) -> float:
    torch.manual_seed(0)
    model = SelfAblatingTransformer(cfg)
    _, tr = get_preset("tiny")
    opt = make_optimizer(model, dataclasses.replace(tr, grad_clip=1e30))  # clip_grad_norm_ reports, never clips
    cpu = torch.device("cpu")
    m = train_step(model, opt, (tokens, tokens), 0, tr, cpu, autocast_for(cpu, precision)).read()
    return m.grad_norm


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("ablation, window", [("local", ()), ("global", ()), ("local", (0, 8))],
                         ids=["local", "global", "local-gpt-neo-window"])
def test_bf16_step_gradient_norm_tracks_float32(backend, ablation, window, set_backend):
    """Under bf16 autocast the mask heads used to score in bf16, tie at the cut in ~15% of rows and
    divide the gradient by eps (a gradient norm of ~1e6 against ~1). Also with a GPT-Neo local layer
    (its band mask through the masked attention path)."""
    set_backend(backend)
    cfg = dataclasses.replace(PAPER_WIDTHS, ablation=ablation, attention_window=window)
    tokens = torch.randint(0, cfg.vocab_size, (4, cfg.n_ctx), generator=torch.Generator().manual_seed(1))
    fp32, bf16 = (grad_norm_of_a_step(cfg, p, tokens) for p in ("float32", "bfloat16"))
    assert 0.5 * fp32 <= bf16 <= 2 * fp32, (fp32, bf16)


def test_mask_heads_score_in_float32_under_autocast():
    model = SelfAblatingTransformer(PAPER_WIDTHS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, cache = model.run_with_cache(torch.zeros(1, 8, dtype=torch.long),
                                        names=lambda n: n.endswith(("_scores", "_mask")))
    assert cache and all(t.dtype == torch.float32 for t in cache.values())


@pytest.mark.slow
def test_short_bf16_run_learns_as_float32_does(tmp_path, stories_dir):
    model_cfg, tr = get_preset("tiny")
    # 12 steps: bf16 matmuls are slow on a CPU without bf16 units, and by then CE has fallen from
    # ln(50257) = 10.8 to about 10.0 in both precisions.
    tr = dataclasses.replace(tr, data=str(stories_dir), max_steps=12, eval_interval=12, checkpoint_interval=12,
                             progress=False)
    val = {p: train(model_cfg, dataclasses.replace(tr, precision=p, out=str(tmp_path / p))).final_eval
           for p in ("float32", "bfloat16")}
    assert val["bfloat16"].clean < 10.4 and val["bfloat16"].ablated < 10.4, val
    assert val["bfloat16"].clean == pytest.approx(val["float32"].clean, abs=0.05), val
    assert val["bfloat16"].ablated == pytest.approx(val["float32"].ablated, abs=0.05), val


# -- ties ------------------------------------------------------------------------------------


def tied_scores(rows: int, width: int, dtype=torch.float32) -> torch.Tensor:
    """Scores in a few distinct values, so that most rows tie at the cut (as bf16 scores do)."""
    g = torch.Generator().manual_seed(width)
    return torch.randint(0, 6, (rows, width), generator=g).to(dtype) / 4


@pytest.mark.parametrize("width, k", [(32, 8), (128, 32), (512, 32), (20, 7)])
def test_every_backend_breaks_ties_alike(width, k, set_backend):
    """Of scores tied at the cut, the earliest win, on the C kernel and on PyTorch's operators (the
    CUDA path); the scores and positions on either side of the cut agree too."""
    s = tied_scores(300, width)
    results = {}
    for backend in ("cpu", "torch"):
        set_backend(backend)
        results[backend] = topk_winners(s, k)
    for a, b in zip(results["cpu"], results["torch"]):
        assert torch.equal(a, b)
    hard = results["torch"].hard
    assert (hard.sum(-1) == k).all()
    # The rule itself, by hand: winners above the cut, then ties earliest first.
    for row, mask in zip(s, hard):
        order = sorted(range(width), key=lambda i: (-row[i].item(), i))
        assert mask.nonzero().squeeze(1).tolist() == sorted(order[:k])


@pytest.mark.parametrize("width, k", [(32, 8), (128, 32), (512, 32), (20, 7), (16, 15)])
@pytest.mark.parametrize("tied", [True, False])
def test_winners_from_a_sort_equal_winners_from_topk(width, k, tied):
    """The sort form (`DevicePolicy.topk_by_sort`) gives the topk form's masks, cut scores and positions,
    with ties at the cut and among the winners, and without."""
    from selfablate.ops.masks import _sorted_topk_winners, _torch_topk_winners

    s = tied_scores(300, width) if tied else torch.randn(300, width, generator=torch.Generator().manual_seed(k))
    for a, b in zip(_sorted_topk_winners(s, k), _torch_topk_winners(s, k)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("width, k", [(128, 32), (512, 32)])
def test_tied_rows_give_a_bounded_gradient_equal_on_both_backends(width, k, set_backend):
    """A tie at the cut gives a gradient of order 1/eps with the paper's divisor; with the cut widened
    to the floor it is bounded, and the same on both backends (float64 autograd through soft_topk is
    the reference)."""
    s = tied_scores(64, width)
    w = torch.randn(s.shape, generator=torch.Generator().manual_seed(0))
    ref = s.double().requires_grad_()
    (soft_topk(ref, k, 0.3) * w.double()).sum().backward()
    for backend in ("cpu", "torch"):
        set_backend(backend)
        x = s.clone().requires_grad_()
        (hard_topk_soft_grad(x, k, 0.3) * w).sum().backward()
        # float32 rounds s + shift; the gradient is steep at a widened cut: 5e-3 of its largest entry.
        torch.testing.assert_close(x.grad.double(), ref.grad, rtol=0, atol=5e-3 * ref.grad.abs().max().item())
    # Bounded by that of a row whose gap is the floor, 1/100 of the mean neighbour gap: here ~6e4,
    # where the paper's divisor (floor 0) gives ~1e11.
    assert x.grad.abs().max() < 1e6
    paper = s.clone().requires_grad_()
    (hard_topk_soft_grad(paper, k, 0.3, 1e-12, 0.0) * w).sum().backward()
    assert paper.grad.abs().max() > 1e9


def test_the_widened_cut_keeps_the_papers_gradient_above_the_floor():
    """Rows whose gap at the cut is above the floor get the paper's gradient exactly (floor 0)."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(50, 64, generator=g, dtype=torch.float64)
    w = torch.randn(50, 64, generator=g, dtype=torch.float64)
    grads = {}
    for floor in (0.0, 0.01):
        x = s.clone().requires_grad_()
        (hard_topk_soft_grad(x, 16, 0.1, 1e-12, floor) * w).sum().backward()
        grads[floor] = x.grad
    top = s.topk(17, dim=-1).values
    spread = s.amax(-1) - s.amin(-1)
    above = (top[:, 15] - top[:, 16]) > 0.01 * spread / 63
    assert above.sum() >= 45  # most rows
    torch.testing.assert_close(grads[0.01][above], grads[0.0][above], rtol=0, atol=0)


def test_a_row_of_equal_scores_has_no_gradient(set_backend):
    for backend in ("cpu", "torch"):
        set_backend(backend)
        x = torch.zeros(3, 32).requires_grad_()
        (hard_topk_soft_grad(x, 8, 0.1) * torch.randn(3, 32)).sum().backward()
        assert torch.equal(x.grad, torch.zeros(3, 32))


@pytest.mark.slow
def test_compiled_model_trains_as_the_eager_one(tmp_path, stories_dir, set_backend, monkeypatch):
    """--compile (torch.compile of the model, what a GPU run would use) on PyTorch's path, through
    the training loop: with AOT autograd's tracing and functionalisation (where a graph breaks or a
    step changes meaning) but not inductor's C++ code generation, a minute per graph on this CPU;
    inductor's numerics are test_compile's."""
    set_backend("torch")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    model_cfg, tr = get_preset("tiny")
    tr = dataclasses.replace(tr, data=str(stories_dir), max_steps=3, eval_interval=3, checkpoint_interval=3,
                             log_interval=1, progress=False)
    runs = {c: train(model_cfg, dataclasses.replace(tr, compile=c, out=str(tmp_path / c))) for c in ("off", "on")}
    logs = {c: read_metrics(tmp_path / c) for c in runs}
    # Step 1 starts from the same weights, so both streams' losses agree to float32 rounding.
    for key in ("loss_clean", "loss_ablated", "grad_norm"):
        assert logs["on"][0][key] == pytest.approx(logs["off"][0][key], rel=1e-5), key
    # AdamW's first updates are about lr * sign(g): a gradient near zero that rounding moves across zero
    # moves its parameter 2 * lr the other way, and a k-winners choice can then fall differently. After
    # three updates the losses agree to 0.1 % (about 0.01 of CE 10.6), not to rounding.
    assert runs["on"].final_eval.clean == pytest.approx(runs["off"].final_eval.clean, rel=1e-3)
    assert runs["on"].final_eval.ablated == pytest.approx(runs["off"].final_eval.ablated, rel=1e-3)


@pytest.mark.parametrize("width, k", [(128, 32), (512, 32), (20, 7), (16, 15), (8, 1)])
@pytest.mark.parametrize("tied", [True, False])
def test_the_cut_is_the_kth_and_next_largest_score(width, k, tied):
    """PyTorch's path reads s_(k) and s_(k+1) from an unsorted top-(k+1): against a full sort,
    with ties at the cut (s_(k) = s_(k+1)), above it and among all k + 1, and without."""
    from selfablate.ops.masks import _cut

    s = tied_scores(300, width) if tied else torch.randn(300, width, generator=torch.Generator().manual_seed(k))
    if tied:
        s[0] = 1.0  # every score equal
        s[1, : k + 1] = 2.0  # exactly the k + 1 largest equal, the rest below
    ordered = s.sort(dim=-1, descending=True).values
    a, b = _cut(s, k)
    assert torch.equal(a, ordered[:, k - 1 : k]) and torch.equal(b, ordered[:, k : k + 1])
    assert tied == bool((a == b).any())


@pytest.mark.parametrize("bias", [False, True, "mixed"])
@pytest.mark.parametrize("name, dtype", [("torch", torch.float64), ("cpu", torch.float32)])
def test_linears_of_one_input_equal_each_layer_and_take_one_gemm_on_pytorchs_path(bias, name, dtype, set_backend):
    """`ops.linears` (the attention's q, k, v projections): each output and every gradient equal
    the layers called one by one; on PyTorch's path (CUDA's) one GEMM runs forward and two
    backward, where one a layer ran before. The `cpu` backend's float32 (its kernels' regime)
    and a mixed set of biases go one by one."""
    from selfablate import ops

    from .helpers import Recorder

    set_backend(name)
    torch.manual_seed(0)
    layers = [ops.Linear(8, n, bias=bool(bias) and (bias is True or i != 1)).to(dtype) for i, n in enumerate((8, 8, 16))]
    x = torch.randn(2, 5, 8, dtype=dtype, requires_grad=True)
    weights = [torch.randn(2, 5, layer.out_features, dtype=dtype) for layer in layers]
    params = [x, *(p for layer in layers for p in layer.parameters())]
    expected = [layer(x) for layer in layers]
    expected_grads = torch.autograd.grad(sum((y * w).sum() for y, w in zip(expected, weights)), params)
    with Recorder() as rec:
        outs = ops.linears(x, layers)
        grads = torch.autograd.grad(sum((y * w).sum() for y, w in zip(outs, weights)), params)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for got, want in zip([*outs, *grads], [*expected, *expected_grads]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    gemms = sum(op in ("mm", "addmm", "_linear_pointwise") for op, _ in rec.calls)
    one_by_one = name == "cpu" or bias == "mixed"
    assert gemms == (9 if one_by_one else 3), [op for op, _ in rec.calls]


@pytest.mark.parametrize("name", ["cpu", "torch"])
def test_the_soft_gradient_has_no_subnormals_on_a_cpu(name, set_backend, monkeypatch):
    """Far below a narrow cut w (1 - w) is tiny, and times a small incoming gradient it falls into
    float32's subnormals, which make every later product on a CPU slow. The CPU's policy sets
    those entries to zero. PyTorch's operators compute them and then flush, leaving every other
    entry as it was; the C kernel makes none at all: it takes w below 2^-64 as 0 (u below
    -64 ln 2), which changes only entries 2^-60 below the row's largest."""
    from selfablate import ops

    set_backend(name)
    # D = a - b = 0.01, so u = (s - 1.005) / D runs from -50 to -85 below the cut: w < 2^-64 there.
    row = torch.cat([torch.full((4,), 1.01), torch.tensor([1.0]), 1.0 - torch.linspace(0.5, 0.85, 27)])  # width 32
    s = row.repeat(6, 1) + torch.arange(6.0)[:, None]  # the same gaps in every row
    g = torch.randn(s.shape, generator=torch.Generator().manual_seed(0)) * 1e-6
    tiny = torch.finfo(torch.float32).tiny

    def grad() -> torch.Tensor:
        x = s.clone().requires_grad_()
        (hard_topk_soft_grad(x, 4, 1.0) * g).sum().backward()
        return x.grad

    monkeypatch.setitem(ops.POLICIES, "cpu", ops.POLICIES["cpu"]._replace(flush_subnormal_grads=False))
    raw = grad()
    monkeypatch.undo()
    flushed = grad()
    subnormal = (raw != 0) & (raw.abs() < tiny)
    assert subnormal.sum() >= 6 and (raw.abs() >= tiny).sum() >= 6 * 5
    assert not ((flushed != 0) & (flushed.abs() < tiny)).any()
    if name == "torch":
        assert torch.equal(flushed, torch.where(subnormal, 0.0, raw))
        return
    far = torch.zeros_like(raw, dtype=torch.bool)
    far[:, 5:] = True  # u <= -50
    assert (flushed[far] == 0).all() and (raw[far].abs() >= tiny).any()
    assert torch.equal(flushed[~far], raw[~far])
    assert (raw[far].abs() <= 2**-60 * raw.abs().amax()).all()
