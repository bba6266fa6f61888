"""Sparse autoencoders: metric definitions on hand-checked cases, identity/zero SAEs, training."""

import dataclasses

import pytest
import torch

from selfablate import load_checkpoint
from selfablate.data.dataset import TokenWindows, tokenize_split
from selfablate.data.sources import resolve_source
from selfablate.errors import CheckpointError, SelfAblateError
from selfablate.sae import SAE, SAEConfig, load_sae
from selfablate.sae import metrics as M
from selfablate.sae.buffer import hook_activations
from selfablate.sae.train import SAETrainConfig, evaluate_sae, run_sae_train
from selfablate.data.vocab import token_lookup

pytestmark = pytest.mark.usefixtures("backend")  # each test on both backends (conftest)

HOOK = "blocks.1.hook_mlp_out"


def test_l0_fvu_ce_score_by_hand():
    f = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [3.0, 1.0, 1.0]])
    assert M.l0(f) == pytest.approx(5 / 3)
    assert M.density(f).tolist() == pytest.approx([2 / 3, 1 / 3, 2 / 3])
    x = torch.randn(50, 4)
    assert M.fvu(x, x) == 0.0
    assert M.fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)
    assert M.ce_loss_score(5.0, 3.0, 3.0) == 1.0 and M.ce_loss_score(5.0, 5.0, 3.0) == 0.0
    assert M.ce_loss_score(5.0, 4.0, 3.0) == 0.5


def test_topk_sae_keeps_at_most_k():
    sae = SAE(SAEConfig(d_in=8, d_sae=32, kind="topk", k=3))
    f = sae.encode(torch.randn(20, 8))
    assert ((f > 0).sum(-1) <= 3).all() and (f >= 0).all()


@pytest.fixture(scope="module")
def trained(tiny_runs, stories_dir):
    ckpt = tiny_runs["local"]
    model = load_checkpoint(ckpt)
    windows = TokenWindows(tokenize_split(resolve_source(str(stories_dir)), "valid"), 32, token_lookup(model))
    return ckpt, model, windows


def identity_sae(d: int) -> SAE:
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, hook=HOOK))
    eye = torch.eye(d)
    with torch.no_grad():  # f = (relu(x), relu(-x)); x_hat = relu(x) - relu(-x) = x
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_(), sae.b_dec.zero_()
    return sae


def test_identity_sae_scores_one_and_zero_sae_scores_zero(trained):
    _, model, windows = trained
    ident = evaluate_sae(model, identity_sae(32), windows, 512)
    assert ident["fvu"] == pytest.approx(0.0, abs=1e-10)
    assert ident["ce_loss_score_zero"] == pytest.approx(1.0, abs=1e-5)
    assert ident["kl_with_sae"] == pytest.approx(0.0, abs=1e-6)
    zero = SAE(SAEConfig(d_in=32, d_sae=64, hook=HOOK))
    with torch.no_grad():
        zero.W_dec.zero_(), zero.b_dec.zero_()
    z = evaluate_sae(model, zero, windows, 512)
    assert z["ce_loss_score_zero"] == pytest.approx(0.0, abs=1e-6)
    assert z["ce_with_sae"] == pytest.approx(z["ce_zero_ablation"])


def test_downstream_metrics_equal_full_logits(trained):
    """CE and KL with the SAE spliced in, and with the zero and mean ablations, equal a plain
    computation from the (tokens, vocab) log-probabilities (the metrics go through the LM head in
    chunks of rows: 512 tokens are two chunks)."""
    _, model, windows = trained
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, d_sae=64, hook=HOOK))
    got = evaluate_sae(model, sae, windows, 512)
    batches = list(windows.sequential_batches(8, 512 // 32))
    acts = torch.cat([hook_activations(model, x, HOOK) for x, _ in batches])
    mean = acts.mean(0)
    ce, kl = {}, {}
    for name, fn in {"clean": None, "sae": lambda t: sae(t).recon.view_as(t), "zero": torch.zeros_like,
                     "mean": lambda t: mean.expand_as(t)}.items():
        logp = []
        for x, _ in batches:
            with model.hooks([] if fn is None else [(HOOK, lambda t, hp: fn(t))]), torch.no_grad():
                logp.append(model(x).logits_clean.double().log_softmax(-1))
        logp = torch.cat(logp)  # (windows, T, vocab)
        y = torch.cat([y for _, y in batches])
        ce[name] = -logp.gather(-1, y[..., None]).mean().item()
        kl[name] = (ref.exp() * (ref - logp)).sum(-1).mean().item() if name != "clean" else 0.0
        ref = logp if name == "clean" else ref
    assert got["ce_clean"] == pytest.approx(ce["clean"], rel=1e-6)
    for name, key in (("sae", "with_sae"), ("zero", "zero_ablation"), ("mean", "mean_ablation")):
        assert got[f"ce_{key}"] == pytest.approx(ce[name], rel=1e-6), name
    assert got["kl_with_sae"] == pytest.approx(kl["sae"], rel=1e-4, abs=1e-7)
    assert got["kl_zero_ablation"] == pytest.approx(kl["zero"], rel=1e-4, abs=1e-7)


def test_hook_activations_match_the_cache(trained):
    _, model, windows = trained
    x, _ = next(windows.sequential_batches(2))
    _, cache = model.run_with_cache(x, names=[HOOK, HOOK + "_ablated"])
    torch.testing.assert_close(hook_activations(model, x, HOOK), cache[HOOK].reshape(-1, 32))
    torch.testing.assert_close(hook_activations(model, x, HOOK + "_ablated"), cache[HOOK + "_ablated"].reshape(-1, 32))
    with pytest.raises(SelfAblateError, match="no hook point named 'blocks.6.hook_mlp_out' \\(the model has 2 layers"):
        hook_activations_check = __import__("selfablate.sae.buffer", fromlist=["check_hook"]).check_hook
        hook_activations_check(model, "blocks.6.hook_mlp_out")


def test_sae_training_reconstructs_and_sparsifies(trained, stories_dir, tmp_path):
    ckpt, _, _ = trained
    base = SAETrainConfig(out=str(tmp_path / "a"), hook=HOOK, data=str(stories_dir), expansion=4, steps=300,
                          batch_tokens=512, pool_tokens=8192, eval_tokens=1024, progress=False, l1_coef=0.001,
                          input_scaling="unit")
    weak = run_sae_train(str(ckpt), base)["metrics"]
    strong = run_sae_train(str(ckpt), dataclasses.replace(base, out=str(tmp_path / "b"), l1_coef=0.05))["metrics"]
    assert weak["fvu"] < 0.5 and weak["ce_loss_score_zero"] > 0.9 and weak["dead_fraction"] < 0.5
    assert strong["l0"] < weak["l0"]  # a larger L1 coefficient gives a sparser code
    live = next(ex for ex in weak["top_examples"] if ex)
    assert isinstance(live[0]["token"], str) and live[0]["activation"] >= live[-1]["activation"] > 0
    sae = load_sae(tmp_path / "a")
    assert sae.cfg.d_sae == 128 and sae.cfg.hook == HOOK
    (tmp_path / "a" / "sae.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="corrupt SAE"):
        load_sae(tmp_path / "a")


def test_without_subtracting_the_decoder_bias_the_encoder_reads_the_input_itself():
    torch.manual_seed(0)
    x = torch.randn(5, 8, dtype=torch.float64)
    for subtract in (True, False):
        sae = SAE(SAEConfig(d_in=8, d_sae=16, hook=HOOK, scale=2.0, subtract_b_dec=subtract)).double()
        with torch.no_grad():
            sae.b_dec.copy_(torch.randn(8, dtype=torch.float64))
            sae.b_enc.copy_(torch.randn(16, dtype=torch.float64))
        centred = x * 2.0 - (sae.b_dec if subtract else 0.0)
        expected = torch.relu(centred @ sae.W_enc + sae.b_enc)  # by hand, from the class docstring
        torch.testing.assert_close(sae.encode(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(sae(x).recon, (expected @ sae.W_dec + sae.b_dec) / 2.0, rtol=0, atol=0)


def test_the_papers_sae_settings():
    from selfablate.sae.train import SAETrainConfig, paper_protocol

    cfg = paper_protocol(SAETrainConfig(out="x", hook="blocks.6.hook_mlp_out"))
    assert (cfg.lr, cfg.steps, cfg.batch_tokens, cfg.expansion, cfg.l1_coef, cfg.l1_warmup) == (1e-5, 100_000, 4096, 16,
                                                                                                 5.0, 0.05)
    assert (cfg.b_dec_init, cfg.subtract_b_dec, cfg.kind, cfg.input_scaling, cfg.seed) == ("zeros", False, "relu",
                                                                                            "sqrt_d", 42)
    assert cfg.out == "x" and cfg.hook == "blocks.6.hook_mlp_out"


def test_a_zero_initialised_sae_starts_with_a_zero_decoder_bias(trained):
    import dataclasses

    from selfablate.sae.train import SAETrainConfig, train_sae

    ckpt, model, windows = trained
    cfg = SAETrainConfig(out="", hook="blocks.1.hook_mlp_out", steps=1, lr=1e-12, pool_tokens=2048, batch_tokens=256,
                         progress=False)
    mean_init = train_sae(model, windows, cfg)
    zero_init = train_sae(model, windows, dataclasses.replace(cfg, b_dec_init="zeros", subtract_b_dec=False))
    assert mean_init.b_dec.abs().max() > 1e-3 and zero_init.b_dec.abs().max() < 1e-9
    assert zero_init.cfg.subtract_b_dec is False and mean_init.cfg.subtract_b_dec is True


def test_the_divergence_check_reads_the_losses_and_sees_a_weight_not_finite():
    from selfablate.errors import DivergedError
    from selfablate.sae.train import check_sae_finite

    sae = SAE(SAEConfig(4, 8))
    assert check_sae_finite(sae, 1, torch.tensor(0.5), torch.tensor(2.0)) == (0.5, 2.0)
    with torch.no_grad():
        sae.b_dec[0] = float("nan")  # the loss of the batch before can still be finite
    with pytest.raises(DivergedError, match="diverged by step 3"):
        check_sae_finite(sae, 3, torch.tensor(0.5), torch.tensor(2.0))
    with pytest.raises(DivergedError):
        check_sae_finite(SAE(SAEConfig(4, 8)), 3, torch.tensor(float("inf")), torch.tensor(2.0))


def _graphed_step_on_the_host(sae, batch_tokens):
    """An SAEStep built as on CUDA (capturable Adam, rate and L1 coefficient in tensors, a fixed
    input buffer), whose step is run here as the function a CUDA graph would record."""
    from selfablate.sae.train import SAEStep

    step = SAEStep(sae, batch_tokens, 1e-3, torch.device("cpu"), graphed=True)

    def run(x, lr, coef):
        step.opt.param_groups[0]["lr"].fill_(lr)
        step.coef.fill_(coef)
        step.x.copy_(x)
        return step.captured.fn()
    return run


@pytest.mark.parametrize("kind", ["relu", "topk"])
def test_an_sae_step_can_be_captured_as_a_cuda_graph(kind):
    """After the first step (which makes Adam's state), every step runs the same operators on the
    same shapes, reads nothing back and makes no tensor from host data."""
    from .helpers import FROM_HOST, SYNC_OPS, Recorder

    torch.manual_seed(0)
    run = _graphed_step_on_the_host(SAE(SAEConfig(8, 32, kind, k=4)), 64)
    steps = []
    for i in range(3):
        with Recorder() as rec:
            run(torch.randn(64, 8), 1e-3 * (i + 1), 0.5 * i)
        steps.append(rec.calls)
    names = {name for name, _ in steps[1]}
    assert not SYNC_OPS & names and not FROM_HOST & names, (SYNC_OPS | FROM_HOST) & names
    assert len(steps[1]) > 20 and steps[2] == steps[1]


def test_the_graphed_sae_step_trains_as_the_eager_one():
    """Rates and coefficients read from device tensors, a capturable Adam: the same weights as
    the eager step's after steps of changing rate and L1 coefficient."""
    from selfablate.sae.train import SAEStep

    torch.manual_seed(0)
    eager_sae, data = SAE(SAEConfig(8, 32)), torch.randn(5, 64, 8)
    graphed_sae = SAE(SAEConfig(8, 32))
    graphed_sae.load_state_dict(eager_sae.state_dict())
    start = eager_sae.W_enc.detach().clone()
    eager, graphed = SAEStep(eager_sae, 64, 1e-3, torch.device("cpu"), graphed=False), _graphed_step_on_the_host(graphed_sae, 64)
    for i, x in enumerate(data):
        lr, coef = 1e-2 / (i + 1), 0.2 * i
        torch.testing.assert_close(graphed(x, lr, coef), eager(x, lr, coef), rtol=1e-6, atol=1e-7)
    for name, w in eager_sae.state_dict().items():
        torch.testing.assert_close(graphed_sae.state_dict()[name], w, rtol=1e-6, atol=1e-7)
    assert (graphed_sae.W_enc - start).abs().max() > 1e-3  # it did train


def test_a_pool_smaller_than_a_batch_still_gives_whole_batches(trained):
    """The buffer tops itself up to the batch asked for: the step's shape never changes."""
    from selfablate.sae.buffer import ActivationBuffer

    _, model, windows = trained
    buffer = ActivationBuffer(model, windows, HOOK, 2, 40, torch.Generator().manual_seed(0))
    assert [len(buffer.next(100)) for _ in range(4)] == [100] * 4
