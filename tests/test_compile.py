"""The training step compiles as one graph (`torch.compile(fullgraph=True)`), and the compiled step
computes what the eager one does: what a CUDA graph of the whole step needs, checked on a CPU."""

import contextlib
import dataclasses
import copy
from types import SimpleNamespace

import pytest
import torch

from selfablate import ModelConfig, SelfAblatingTransformer

from .helpers import FROM_HOST, SYNC_OPS, Recorder

CFG = dict(vocab_size=97, n_ctx=16, d_model=32, n_layers=2, n_heads=4, d_mlp=64, k_attn=8, k_mlp=16)


def loss_and_grads(model, x, y, run=None):
    out = (model if run is None else run)(x, y, return_logits=False, return_masks=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return torch.stack([out.loss, out.loss_clean, out.loss_ablated, out.loss_recon]).detach(), grads


@pytest.mark.parametrize("ablation", ["local", "global"])
def test_training_forward_has_no_graph_break(ablation):
    """On the process's backend (C kernels on this CPU): while the compiler traces, ops take
    PyTorch's path and read nothing back on the host."""
    torch.manual_seed(0)
    model = SelfAblatingTransformer(ModelConfig(**CFG, ablation=ablation))
    x, y = torch.randint(0, 97, (2, 2, 16))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda x, y: model(x, y, return_logits=False, return_masks=False).loss)(x, y)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons[:3]


def test_cudas_path_has_no_graph_break_with_either_lm_head(monkeypatch):
    """On CUDA's path (PyTorch's operators, CUDA's policy), with the chunked LM head and with the
    plain one that `DevicePolicy.plain_lm_head` gives torch.compile to fuse; the paper's loss (c = 0,
    its reconstruction term made without a graph)."""
    from selfablate import ops

    torch.manual_seed(0)
    model = SelfAblatingTransformer(ModelConfig(**CFG, ablation="local", coef_ablated=0.5, coef_recon=0.0))
    x, y = torch.randint(0, 97, (2, 2, 16))
    for plain in (False, True):
        monkeypatch.setitem(ops.POLICIES, "cuda", ops.POLICIES["cuda"]._replace(plain_lm_head=plain))
        with ops.use_backend("torch"), ops.device_policy_as("cuda"):
            torch._dynamo.reset()
            explained = torch._dynamo.explain(lambda x, y: model(x, y, return_logits=False, return_masks=False).loss)(x, y)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (plain, explained.break_reasons[:3])


def test_compiled_step_equals_eager():
    """Losses and every gradient of the compiled step are as close to a float64 reference as the
    eager float32 step's are (the mask heads' gradients, through the soft top-k's 1 / gap, are
    the least well conditioned: about 1e-3 from float64 in either). Ablation "both": its graph
    holds the local heads and the global one, so that one compilation (about a minute on a
    2-core CPU with nothing cached) covers both."""
    torch.manual_seed(0)
    model = SelfAblatingTransformer(ModelConfig(**CFG, ablation="both", coef_ablated=0.5, coef_recon=0.5))
    with torch.no_grad():  # away from the initialisation, so that every unit and mask head matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, y = torch.randint(0, 97, (2, 4, 16), generator=torch.Generator().manual_seed(1))
    ref_losses, ref = loss_and_grads(copy.deepcopy(model).double(), x, y)
    losses, grads = loss_and_grads(model, x, y)
    torch._dynamo.reset()
    c_losses, c_grads = loss_and_grads(model, x, y, run=torch.compile(model, fullgraph=True))
    torch.testing.assert_close(c_losses.double(), ref_losses, rtol=1e-5, atol=1e-6)
    assert c_grads.keys() == grads.keys() == ref.keys()
    for name, g in ref.items():
        eager, compiled = ((grads[name].double() - g).norm() / g.norm(), (c_grads[name].double() - g).norm() / g.norm())
        assert compiled <= 4 * eager + 1e-4, (name, compiled.item(), eager.item())


# -- what a CUDA graph of the whole step needs, checked on the path CUDA takes -------------------

@pytest.mark.parametrize("ablation", ["local", "global", "none"])
def test_a_training_step_can_be_captured_as_a_cuda_graph(ablation):
    """A step on CUDA's path (PyTorch's operators, CUDA's policy) reads nothing back on the host,
    makes no tensor from host data, and runs the same operators on the same shapes every step
    (after the first, which creates the optimiser's state)."""
    from selfablate import ops
    from selfablate.config import get_preset
    from selfablate.step import GraphedStep, make_optimizer

    torch.manual_seed(0)
    _, tr = get_preset("tiny")
    model = SelfAblatingTransformer(ModelConfig(**CFG, ablation=ablation))
    opt = make_optimizer(model, tr)
    steps = []
    with ops.use_backend("torch"), ops.device_policy_as("cuda"):
        for step in range(3):
            x = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(step))
            with Recorder() as rec:
                GraphedStep._run(SimpleNamespace(model=model, opt=opt, cfg=tr, autocast=contextlib.nullcontext,
                                                 inputs=(x, x)))
            steps.append(rec.calls)
    names = [name for name, _ in steps[1]]
    assert not SYNC_OPS & set(names), SYNC_OPS & set(names)
    assert not FROM_HOST & set(names), FROM_HOST & set(names)
    assert len(names) > 100 and steps[2] == steps[1]


def test_captured_warms_up_then_records_once_and_replays(monkeypatch):
    """`runtime.Captured` on a stand-in for CUDA's graph API: the warm-up calls run fn on a side
    stream that waits for the main one and is waited for; the next call records fn once (in the
    shared pool) and replays it; later calls only replay and return the recorded outputs."""
    from selfablate.runtime import Captured

    log = []

    class Graph:
        def replay(self):
            log.append("replay")

    class Stream:
        def __init__(self, name="side"):
            self.name = name

        def wait_stream(self, other):
            log.append(f"{self.name} waits for {other.name}")

    @contextlib.contextmanager
    def graph(g, pool=None):
        log.append(f"record into {pool}")
        yield
        log.append("recorded")

    main = Stream("main")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: main)
    calls = []

    def fn():
        calls.append(len(calls))
        log.append("fn")
        return [len(calls)]

    run = Captured(fn, torch.device("cpu"), warmup=2, pool="pool")
    outs = [run() for _ in range(4)]
    assert outs[:2] == [[1], [2]] and outs[2] == [3] and outs[3] is outs[2] and len(calls) == 3
    assert log == ["side waits for main", "fn", "main waits for side"] * 2 + \
        ["record into pool", "fn", "recorded", "replay", "replay"]


def test_a_zero_weight_reconstruction_term_is_reported_without_a_graph():
    """c = 0 (the paper's runs): the term is the same number, made without a graph, and every
    gradient is the one with the term left out of the loss by hand (float64)."""
    torch.manual_seed(0)
    cfg = ModelConfig(**CFG, ablation="local", coef_ablated=0.5, coef_recon=0.0)
    model = SelfAblatingTransformer(cfg).double()
    x, y = torch.randint(0, 97, (2, 2, 16))
    out = model(x, y, return_logits=False, return_masks=False)
    assert not out.loss_recon.requires_grad and out.loss.requires_grad
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    again = model(x, y, return_logits=False, return_masks=False)
    (cfg.coef_clean * again.loss_clean + cfg.coef_ablated * again.loss_ablated).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-12, atol=0)
    weighted = SelfAblatingTransformer(dataclasses.replace(cfg, coef_recon=0.5)).double()
    weighted.load_state_dict(model.state_dict())
    recon = weighted(x, y, return_logits=False, return_masks=False).loss_recon
    assert recon.requires_grad and torch.equal(recon.detach(), out.loss_recon)


def test_the_zero_weight_branch_compiles_when_c_is_traced_as_a_symbol():
    """After a recompilation for a changed loss weight the compiler traces c as a symbol (automatic
    dynamic): the c = 0 branch must still compile, and still leave the term without a graph."""
    torch._dynamo.reset()
    x, y = torch.randint(0, 97, (2, 2, 16))
    for c in (0.0, 0.1, 0.0):
        torch.manual_seed(0)
        model = SelfAblatingTransformer(ModelConfig(**CFG, ablation="local", coef_ablated=0.5, coef_recon=c))
        out = torch.compile(model, backend="eager", fullgraph=True)(x, y, return_logits=False, return_masks=False)
        assert out.loss_recon.requires_grad == (c != 0) and out.loss.requires_grad
