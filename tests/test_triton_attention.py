"""Triton's causal and two-stream attention (`ops.triton_attention`, `DevicePolicy.triton_attention`)
against float64. Without a GPU its kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET)."""

import copy

import pytest
import torch

from selfablate import ModelConfig, SelfAblatingTransformer, ops
from selfablate.ops import triton_attention, triton_lm_head
from selfablate.ops.attention import self_ablated_allowed

from .helpers import FROM_HOST, SYNC_OPS, Recorder

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 dots exact (no TF32) where there is a GPU, as here."""
    saved, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def reference(q, k, v, own_k=None, own_v=None):
    """Plain attention in float64: causal, or the two-stream rule over [clean | own] keys."""
    T = q.shape[2]
    if own_k is None:
        allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    else:
        k, v, allowed = torch.cat([k, own_k], 2), torch.cat([v, own_v], 2), self_ablated_allowed(T, q.device)
    scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))  # (B, H, T, T or 2T)
    return scores.softmax(-1) @ v


def inputs(n, T, d_head, seed=0, fused_layout=True):
    """n (B, H, T, d_head) float64 tensors; fused_layout: views of one (B, T, n, H, d_head) tensor,
    as the model's q/k/v projections make them (one stride pattern, not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    B, H = 2, 3
    if fused_layout:
        whole = torch.randn(B, T, n, H, d_head, generator=g, dtype=torch.float64) * 1.5
        return [whole[:, :, i].transpose(1, 2).to(DEVICE) for i in range(n)]  # (B, H, T, d_head) views
    return [torch.randn(B, H, T, d_head, generator=g, dtype=torch.float64).to(DEVICE) * 1.5 for _ in range(n)]


@pytest.mark.parametrize("rule", ["causal", "two-stream"])
@pytest.mark.parametrize("T, d_head, fused_layout", [(70, 8, True), (128, 8, False), (37, 5, True), (64, 32, False)])
def test_triton_attention_equals_float64(rule, T, d_head, fused_layout):
    """Output and every input's gradient of float32 inputs against float64's: positions that fill
    no block (64) or several, heads padded to 16 (5, 8) or not (32), inputs as views of a fused
    projection (kept as they are) and contiguous."""
    n = 3 if rule == "causal" else 5
    xs = inputs(n, T, d_head, fused_layout=fused_layout)
    fn = triton_attention.causal if rule == "causal" else triton_attention.two_stream
    grad_out = torch.randn(xs[0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    ref_in = [x.clone().requires_grad_() for x in xs]
    ref = reference(*ref_in)
    ref_grads = torch.autograd.grad((ref * grad_out).sum(), ref_in)
    got_in = [x.float().requires_grad_() for x in xs]
    got = fn(*got_in)
    grads = torch.autograd.grad((got * grad_out.float()).sum(), got_in)
    assert got.dtype == torch.float32 and got.transpose(1, 2).is_contiguous()  # (B, T, H, Dh) in memory
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=5e-6 * ref.abs().max().item())
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(g.double(), r, rtol=0, atol=5e-6 * r.abs().max().item(), msg=f"input {i}")


def test_under_bf16_it_is_the_float32_attention_to_bf16s_rounding():
    xs = inputs(5, 70, 8, seed=2)
    ref = reference(*xs)
    got = triton_attention.two_stream(*(x.bfloat16() for x in xs))
    assert got.dtype == torch.bfloat16
    assert (got.double() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_the_ops_take_the_kernels_only_where_the_policy_asks(monkeypatch):
    """ops.causal_attention and ops.two_stream_attention on PyTorch's path take the Triton kernels
    under a policy with `triton_attention` (and give the fused path's results), and never float64."""
    calls = []
    inner = triton_attention.flash_attention
    monkeypatch.setattr(triton_attention, "flash_attention", lambda *a: calls.append(1) or inner(*a))
    xs = inputs(5, 40, 8, seed=3)
    with ops.use_backend("torch"), ops.device_policy_as("cuda"):
        plain = ops.two_stream_attention(*(x.float() for x in xs)), ops.causal_attention(*(x.float() for x in xs[:3]))
        monkeypatch.setitem(ops.POLICIES, "cuda", ops.POLICIES["cuda"]._replace(triton_attention=True))
        ops.two_stream_attention(*xs)  # float64: PyTorch's
        assert not calls
        got = ops.two_stream_attention(*(x.float() for x in xs)), ops.causal_attention(*(x.float() for x in xs[:3]))
    assert len(calls) == 2
    for g, p in zip(got, plain):
        torch.testing.assert_close(g, p, rtol=1e-5, atol=1e-5)


CFG = dict(vocab_size=97, n_ctx=16, d_model=32, n_layers=2, n_heads=4, d_mlp=64, k_attn=8, k_mlp=16, ablation="local",
           coef_ablated=0.5, coef_recon=0.0)
BOTH = {"triton_attention": True, "triton_lm_head": True}


@pytest.mark.parametrize("changes", [{"triton_lm_head": True}, BOTH], ids=["lm-head", "both"])
def test_a_model_step_with_triton_kernels_is_as_close_to_float64_as_pytorchs(monkeypatch, changes):
    """The loss and every parameter's gradient of a float32 step on CUDA's path, with the Triton LM
    head alone and with both Triton switches, against the float64 model's: no further off than
    PyTorch's path (the mask heads' gradients, through the soft top-k's 1 / gap, are the least well
    conditioned)."""
    torch.manual_seed(0)
    model = SelfAblatingTransformer(ModelConfig(**CFG)).to(DEVICE)
    x, y = torch.randint(0, 97, (2, 4, 16), device=DEVICE)

    def step(m, changes):
        monkeypatch.setitem(ops.POLICIES, "cuda", ops.POLICIES["cuda"]._replace(**changes))
        with ops.use_backend("torch"), ops.device_policy_as("cuda"):
            loss = m(x, y, return_logits=False, return_masks=False).loss
            return loss.detach().double(), torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)

    ref_loss, ref = step(copy.deepcopy(model).double(), {})
    calls = {}
    for module, name in ((triton_attention, "flash_attention"), (triton_lm_head, "cross_entropy_and_grads")):
        inner, calls[name] = getattr(module, name), []
        monkeypatch.setattr(module, name, lambda *a, inner=inner, log=calls[name]: log.append(1) or inner(*a))
    (_, plain), (loss, got) = step(model, {}), step(model, changes)
    # the LM head of each stream; the attention of 2 layers x 2 streams
    assert {n: len(c) for n, c in calls.items()} == {"cross_entropy_and_grads": 2,
                                                      "flash_attention": 4 if "triton_attention" in changes else 0}
    assert abs(loss - ref_loss) <= 1e-6 * ref_loss
    for (name, _), r, p, g in zip(model.named_parameters(), ref, plain, got):
        if r is not None:
            err, err_plain = ((g.double() - r).norm() / r.norm()).item(), ((p.double() - r).norm() / r.norm()).item()
            assert err <= 1.5 * err_plain + 1e-6, (name, err, err_plain)


@pytest.mark.parametrize("changes, operators", [
    ({"triton_lm_head": True}, {"lm_head_rows", "lm_head_vocab"}),
    ({"triton_attention": True}, {"flash_attention", "flash_attention_backward"}),
    (BOTH, {"flash_attention", "flash_attention_backward", "lm_head_rows", "lm_head_vocab"}),
], ids=["lm-head", "attention", "both"])
def test_cudas_path_with_triton_kernels_is_one_graph_that_can_be_captured(monkeypatch, changes, operators):
    """With either Triton switch or both on CUDA's path: the training forward compiles with no graph
    break (each kernel an opaque operator; the attention's has its own backward operator), and a
    step reads nothing back and makes no tensor from host data, as a CUDA graph needs."""
    monkeypatch.setitem(ops.POLICIES, "cuda", ops.POLICIES["cuda"]._replace(**changes))
    torch.manual_seed(0)
    model = SelfAblatingTransformer(ModelConfig(**CFG)).to(DEVICE)
    x, y = torch.randint(0, 97, (2, 2, 16), device=DEVICE)
    with ops.use_backend("torch"), ops.device_policy_as("cuda"):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(lambda x, y: model(x, y, return_logits=False, return_masks=False).loss)(x, y)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons[:3]
        with Recorder() as rec:
            model(x, y, return_logits=False, return_masks=False).loss.backward()
    names = {name for name, _ in rec.calls}
    assert operators <= names
    assert not SYNC_OPS & names and not FROM_HOST & names, (SYNC_OPS | FROM_HOST) & names

