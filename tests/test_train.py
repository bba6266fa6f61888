"""Training: schedule, resume equivalence, loss on real text, checkpoints and their errors."""

import contextlib
import dataclasses
import math
import json

import pytest
import torch

from selfablate import load_checkpoint, save_checkpoint
from selfablate.checkpoint import WEIGHTS
from selfablate.config import TrainConfig, get_preset
from selfablate.errors import CheckpointError
from selfablate.metrics_log import read_metrics
from selfablate.train import lr_at, train

from .helpers import ONE_BACKEND

pytestmark = pytest.mark.usefixtures("backend")  # each test on both backends (conftest)


def tiny(tmp_path, stories_dir, **kw):
    model, tr = get_preset("tiny")
    tr = dataclasses.replace(tr, data=str(stories_dir), out=str(tmp_path / "run"), progress=False, **kw)
    return model, tr


def test_lr_schedule_warms_up_then_decays_by_cosine():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("ablation", ["local", "global"])
def test_resume_after_an_interruption_equals_training_straight(tmp_path, stories_dir, monkeypatch, ablation):
    model_cfg, tr = tiny(tmp_path, stories_dir, max_steps=8, checkpoint_interval=4, eval_interval=4,
                         log_interval=1)
    model_cfg = dataclasses.replace(model_cfg, ablation=ablation)
    straight = train(model_cfg, dataclasses.replace(tr, out=str(tmp_path / "straight")))

    import selfablate.train as tr_mod

    real_step = tr_mod.train_step

    def dies_at_step_7(model, opt, batch, step, *args):
        if step == 6:  # after the checkpoint at step 4 and two more logged steps
            raise KeyboardInterrupt
        return real_step(model, opt, batch, step, *args)

    monkeypatch.setattr(tr_mod, "train_step", dies_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(model_cfg, dataclasses.replace(tr, out=str(tmp_path / "split")))
    monkeypatch.setattr(tr_mod, "train_step", real_step)
    resumed = train(model_cfg, dataclasses.replace(tr, out=str(tmp_path / "split"), resume=True))

    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert resumed.final_eval == straight.final_eval
    # The log holds each step once: the interrupted run's steps 5-6 were replaced.
    steps = [m["step"] for m in read_metrics(tmp_path / "split") if "loss" in m]
    assert steps == list(range(1, 9))
    losses = lambda run: [(m["step"], m["loss"]) for m in read_metrics(tmp_path / run) if "loss" in m]  # noqa: E731
    assert losses("split") == losses("straight")


@ONE_BACKEND
def test_a_longer_run_on_resume_continues_the_rate_it_had_reached(tmp_path, stories_dir, monkeypatch):
    """Resumed with a larger max_steps, the rate used to jump back up (the cosine recomputed over the
    new length: 0.00032 -> 0.0013); now it falls from where it was to the floor at the new end."""
    import selfablate.train as tr_mod

    model_cfg, tr = tiny(tmp_path, stories_dir, max_steps=10, checkpoint_interval=2, log_interval=1)
    real_step = tr_mod.train_step

    def dies_at_step_7(model, opt, batch, step, *args):
        if step == 6:
            raise KeyboardInterrupt
        return real_step(model, opt, batch, step, *args)

    monkeypatch.setattr(tr_mod, "train_step", dies_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(model_cfg, tr)
    monkeypatch.setattr(tr_mod, "train_step", real_step)
    for max_steps in (20, 30):  # lengthened twice: the second resume starts from the first's curve
        train(model_cfg, dataclasses.replace(tr, max_steps=max_steps, resume=True))
    rates = [m["lr"] for m in read_metrics(tmp_path / "run") if "lr" in m]
    assert len(rates) == 30, rates
    assert rates[6] == pytest.approx(lr_at(6, tr))  # the step after the checkpoint: the rate it had reached
    assert all(b <= a + 1e-12 for a, b in zip(rates[2:], rates[3:]))  # after the warm-up, it never rises
    assert rates[18] > rates[19] >= rates[-1] == pytest.approx(tr.lr * tr.min_lr_ratio, rel=0.05)


def test_existing_run_is_never_overwritten(tmp_path, stories_dir):
    model_cfg, tr = tiny(tmp_path, stories_dir, max_steps=2)
    train(model_cfg, tr)
    with pytest.raises(CheckpointError, match="already holds a checkpoint: pass --resume"):
        train(model_cfg, tr)
    other = dataclasses.replace(model_cfg, d_model=48, n_heads=4)
    with pytest.raises(CheckpointError, match="another architecture: d_model=32, expected 48"):
        train(other, dataclasses.replace(tr, resume=True))


@pytest.mark.parametrize("lost, sub", [("config.json", "checkpoint"), ("model.safetensors", "checkpoint"),
                                       ("optimizer.pt", "checkpoint"), ("config.json", "best")])
def test_an_incomplete_checkpoint_is_refused_not_overwritten(tmp_path, stories_dir, lost, sub):
    """A checkpoint folder missing a file (a copy gone wrong) used to count as no checkpoint: a new
    run overwrote the weights, the optimiser state and the metrics log with exit 0."""
    model_cfg, tr = tiny(tmp_path, stories_dir, max_steps=2, keep="best", eval_interval=2)
    train(model_cfg, tr)
    run = tmp_path / "run"
    (run / sub / lost).unlink()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for resume in (False, True):
        with pytest.raises(CheckpointError, match=f"{sub} is not a complete checkpoint \\(no {lost}\\)"):
            train(model_cfg, dataclasses.replace(tr, resume=resume, max_steps=4))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and ".selfablate.lock" not in p.name} == \
        {p: b for p, b in before.items() if ".selfablate.lock" not in p.name}


def test_loss_falls_on_real_tinystories(tmp_path, stories_dir):
    model_cfg, tr = tiny(tmp_path, stories_dir, max_steps=60, eval_interval=60, log_interval=1,
                         checkpoint_interval=60)
    result = train(dataclasses.replace(model_cfg, ablation="local"), tr)
    logged = [m for m in read_metrics(tmp_path / "run") if "loss_clean" in m]
    assert logged[0]["loss_clean"] > 9.5  # ~ln(50257) = 10.8 at initialisation
    assert logged[-1]["loss_clean"] < logged[0]["loss_clean"] - 3.0
    assert logged[-1]["loss_ablated"] < logged[0]["loss_ablated"] - 3.0
    assert result.final_eval.clean < 7.0 and result.final_eval.ablated < 7.0


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model_cfg, _ = get_preset("tiny")
    from selfablate import SelfAblatingTransformer
    import selfablate.checkpoint as ck

    model = SelfAblatingTransformer(model_cfg)
    save_checkpoint(model, tmp_path / "ckpt", meta={"step": 1})
    before = load_checkpoint(tmp_path / "ckpt").state_dict()

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_file", crash)
    with torch.no_grad():
        model.wte.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, tmp_path / "ckpt", meta={"step": 2})
    after = load_checkpoint(tmp_path / "ckpt")
    assert all(torch.equal(before[n], p) for n, p in after.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind


def test_checkpoint_round_trip_and_errors(tmp_path):
    model_cfg, _ = get_preset("tiny")
    from selfablate import SelfAblatingTransformer

    model = SelfAblatingTransformer(model_cfg)
    folder = save_checkpoint(model, tmp_path / "c")
    loaded = load_checkpoint(folder)
    assert loaded.cfg == model_cfg
    x = torch.randint(0, model_cfg.vocab_size, (1, 8))
    torch.testing.assert_close(loaded(x).logits_ablated, model(x).logits_ablated, rtol=0, atol=0)

    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="another architecture: ablation='local', expected 'none'"):
        load_checkpoint(folder, expect=dataclasses.replace(model_cfg, ablation="none"))

    weights = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="corrupt checkpoint .*model.safetensors is unreadable"):
        load_checkpoint(folder)

    (folder / WEIGHTS).write_bytes(weights)
    header = json.loads((folder / "config.json").read_text())
    header["model"]["d_mlp"] = 128  # weights of another architecture than the config says
    (folder / "config.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="does not fit its config: blocks.0.* has shape"):
        load_checkpoint(folder)

    header["model"]["k_mlp"] = 999
    (folder / "config.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="invalid model config: k_mlp must be in 1..d_mlp=128"):
        load_checkpoint(folder)

    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_checkpoint(folder)


def test_bf16_autocast_step_runs_and_tracks_float32():
    """The CUDA path uses bf16 autocast; CPU autocast exercises the same code."""
    from selfablate import SelfAblatingTransformer
    from selfablate.train import autocast_for, make_optimizer, train_step

    model_cfg, tr = get_preset("tiny")
    x = torch.randint(0, model_cfg.vocab_size, (4, 32))
    losses = {}
    for precision in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = SelfAblatingTransformer(model_cfg)
        opt = make_optimizer(model, tr)
        autocast = autocast_for(torch.device("cpu"), precision)
        losses[precision] = train_step(model, opt, (x, x), 0, tr, torch.device("cpu"), autocast).read()
    assert math.isfinite(losses["bfloat16"].loss)
    assert losses["bfloat16"].loss_clean == pytest.approx(losses["float32"].loss_clean, rel=0.02)
    assert autocast_for(torch.device("cpu"), "auto") is contextlib.nullcontext


def test_fused_adamw_step_equals_the_plain_one():
    import torch

    from selfablate import ModelConfig, SelfAblatingTransformer
    from selfablate.config import TrainConfig
    from selfablate.train import make_optimizer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=100, n_ctx=8, d_model=16, n_layers=1, n_heads=2, d_mlp=32, ablation="local",
                      k_attn=4, k_mlp=8)
    a, b = SelfAblatingTransformer(cfg), SelfAblatingTransformer(cfg)
    b.load_state_dict(a.state_dict())
    before = {n: p.detach().clone() for n, p in a.named_parameters()}
    tcfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    fast = make_optimizer(a, tcfg)
    assert fast.defaults.get("fused")
    twin = dict(zip((id(p) for p in a.parameters()), b.parameters()))  # a's parameter -> b's
    plain = torch.optim.AdamW([{"params": [twin[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"]}
                               for g in fast.param_groups], lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), foreach=False)
    for _ in range(3):
        for p, q in zip(a.parameters(), b.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fast.step()
        plain.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)
        assert not torch.equal(p, before[n])  # the steps moved every parameter


def test_a_diverging_run_stops_with_one_line_and_keeps_the_good_checkpoint(tmp_path, stories_dir, capsys):
    """lr 1e6 on a resumed good run (through the API: the command line refuses a changed --lr on
    resume): the weights go non-finite; training stops at a read step with an error naming it,
    and the checkpoint on disk is still the good one."""
    from selfablate.errors import DivergedError

    model_cfg, tr = tiny(tmp_path, stories_dir, max_steps=10, checkpoint_interval=5, log_interval=5)
    train(model_cfg, tr)
    good = (tmp_path / "run" / "checkpoint" / WEIGHTS).read_bytes()
    with pytest.raises(DivergedError, match="training diverged at step .*the last good checkpoint"):
        train(model_cfg, dataclasses.replace(tr, max_steps=30, lr=1e6, resume=True))
    assert (tmp_path / "run" / "checkpoint" / WEIGHTS).read_bytes() == good


@pytest.mark.parametrize("bad", [dict(lr=float("inf")), dict(lr=float("nan")), dict(beta1=1.5), dict(beta2=-0.1),
                                 dict(weight_decay=-1.0), dict(grad_clip=float("inf"))])
def test_optimiser_numbers_are_validated_up_front(bad):
    from selfablate.errors import ConfigError

    with pytest.raises(ConfigError):
        TrainConfig(**bad)


def test_a_second_writer_on_one_folder_gets_one_line_naming_the_holder(tmp_path, stories_dir, capsys):
    import os

    from selfablate import runlock
    from selfablate.cli import main

    out = tmp_path / "run"
    with runlock.exclusive(out):
        code = main(["train", "--preset", "tiny", "--data", str(stories_dir), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"PID {os.getpid()}" in err[0], err
    assert not (out / "checkpoint").exists()
    # Released with its holder: the folder is free again.
    assert main(["train", "--preset", "tiny", "--data", str(stories_dir), "--out", str(out), "--no-progress",
                 "--max-steps", "2"]) == 0


def test_resume_drops_a_torn_last_metrics_line_and_orphaned_temp_folders(tmp_path, stories_dir):
    model_cfg, tr = tiny(tmp_path, stories_dir, max_steps=4, checkpoint_interval=2, log_interval=1)
    train(model_cfg, tr)
    out = tmp_path / "run"
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # what a full disk leaves
    (out / ".checkpoint.tmp-dead").mkdir()  # what a kill during a save leaves
    with pytest.warns(UserWarning, match="torn last line"):
        train(model_cfg, dataclasses.replace(tr, max_steps=6, resume=True))
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert not (out / ".checkpoint.tmp-dead").exists()


def test_a_full_disk_says_so_in_one_line_and_keeps_the_previous_checkpoint(tmp_path, stories_dir, monkeypatch):
    import errno

    import selfablate.checkpoint as ckpt

    model_cfg, tr = tiny(tmp_path, stories_dir, max_steps=2, checkpoint_interval=2)
    train(model_cfg, tr)
    good = (tmp_path / "run" / "checkpoint" / WEIGHTS).read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    def short_write(*a, **k):  # what torch.save raises when the disk fills under optimizer.pt
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4019")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(CheckpointError, match="the disk is full.*previous one, if any, is intact"):
        train(model_cfg, dataclasses.replace(tr, max_steps=4, resume=True))
    monkeypatch.undo()
    monkeypatch.setattr(ckpt.torch, "save", short_write)
    with pytest.raises(CheckpointError, match=r"\(the disk is full, or the file system refused the write\); the "):
        train(model_cfg, dataclasses.replace(tr, max_steps=4, resume=True))
    assert (tmp_path / "run" / "checkpoint" / WEIGHTS).read_bytes() == good


def test_the_paper_preset_is_the_authors_protocol():
    """Their saved paper-scale run configurations: a = b = 0.5, c = 0, T = 1.0, batch 24, lr 1.4e-3,
    cosine to 0 with no warm-up, AdamW (0.9, 0.999), float32, PyTorch's initialisation, the best
    held-out checkpoint."""
    m, t = get_preset("paper")
    assert (m.coef_clean, m.coef_ablated, m.coef_recon, m.temperature_attn, m.temperature_mlp) == (0.5, 0.5, 0.0, 1.0, 1.0)
    assert (m.d_model, m.n_layers, m.n_heads, m.d_mlp, m.n_ctx, m.k_attn, m.k_mlp) == (128, 8, 16, 512, 256, 32, 32)
    assert m.init == "torch-default" and not m.compact_vocab
    assert (t.batch_size, t.lr, t.warmup_steps, t.min_lr_ratio, t.beta1, t.beta2) == (24, 1.4e-3, 0, 0.0, 0.9, 0.999)
    assert (t.weight_decay, t.grad_clip, t.precision, t.keep) == (0.0, 1.0, "float32", "best")
    # CosineAnnealingLR(T_max=max_steps) stepped once per step: lr_t = lr (1 + cos(pi t / T)) / 2
    for step in (0, 1, 1000, 200_000, 399_999):
        assert lr_at(step, t) == pytest.approx(t.lr * (1 + math.cos(math.pi * step / t.max_steps)) / 2)


@ONE_BACKEND
def test_keep_best_keeps_the_lowest_held_out_objective(tmp_path, stories_dir):
    from selfablate.checkpoint import find, read_header

    model_cfg, tr = tiny(tmp_path, stories_dir, max_steps=8, eval_interval=2, checkpoint_interval=4, keep="best")
    train(model_cfg, tr)
    out = tmp_path / "run"
    vals = [m for m in read_metrics(out) if "val_loss_clean" in m]
    objectives = [model_cfg.coef_clean * v["val_loss_clean"] + model_cfg.coef_ablated * v["val_loss_ablated"] for v in vals]
    best = read_header(out / "best")["meta"]
    assert best["objective"] == pytest.approx(min(objectives)) and best["step"] == vals[objectives.index(min(objectives))]["step"]
    assert find(out) == out / "best" and find(out / "checkpoint") == out / "checkpoint"


def test_a_graph_runs_optimiser_state_resumes_in_an_eager_run():
    """A CUDA-graph run saves a capturable AdamW whose learning rate is a tensor; resumed without
    graphs, the optimiser keeps its own flags and a float learning rate, and steps as the saved one would."""
    from selfablate.step import load_optimizer_state, make_optimizer

    _, tcfg = get_preset("tiny")
    models = [torch.nn.Linear(4, 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    graphed = make_optimizer(models[0], tcfg, capturable=True)
    for group in graphed.param_groups:
        group["lr"] = torch.tensor(1e-2)
    for p in models[0].parameters():
        p.grad = torch.ones_like(p)
    graphed.step()
    with torch.no_grad():
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            b.copy_(a)
    eager = make_optimizer(models[1], tcfg)
    load_optimizer_state(eager, graphed.state_dict())
    for p in models[1].parameters():
        p.grad = torch.ones_like(p)
    assert all(g["capturable"] is False and g["lr"] == pytest.approx(1e-2) and isinstance(g["lr"], float)
               for g in eager.param_groups)
    for opt in (graphed, eager):
        opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)  # a float32 tensor lr rounds differently


@ONE_BACKEND
@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_the_mask_heads_learn_at_their_own_rate(scale):
    """AdamW's first update is lr * g / (|g| + eps): with the same gradients, the mask heads' moves
    are `scale` times those at scale 1, every other parameter's the same."""
    from selfablate import SelfAblatingTransformer
    from selfablate.train import autocast_for, make_optimizer, train_step

    model_cfg, tr = get_preset("tiny")
    x = torch.randint(0, model_cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    moves = {}
    for s in (1.0, scale):
        torch.manual_seed(0)
        model = SelfAblatingTransformer(model_cfg)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        cfg = dataclasses.replace(tr, mask_head_lr_scale=s)
        train_step(model, make_optimizer(model, cfg), (x, x), 5, cfg, torch.device("cpu"), autocast_for(torch.device("cpu"), "float32"))
        moves[s] = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    heads = [n for n in moves[1.0] if "mask_head" in n]
    assert heads and all(moves[1.0][n].abs().max() > 0 for n in heads)
    for n, move in moves[scale].items():
        # atol: a few float32 ulps of weights about 0.02 (a move is read as after - before)
        torch.testing.assert_close(move, moves[1.0][n] * (scale if n in heads else 1.0), rtol=1e-5, atol=1e-8,
                                   msg=lambda m, n=n: f"{n}: {m}")


@ONE_BACKEND
def test_an_optimiser_state_keeps_its_groups_and_the_runs_own_rate_scale():
    """At scale 1 the groups are the two they always were (a state saved before resumes); at
    another scale the mask heads have two of their own, and a loaded state keeps this run's scale."""
    from selfablate import SelfAblatingTransformer
    from selfablate.step import load_optimizer_state
    from selfablate.train import make_optimizer

    model_cfg, tr = get_preset("tiny")
    model = SelfAblatingTransformer(model_cfg)
    assert len(make_optimizer(model, tr).param_groups) == 2
    scaled = make_optimizer(model, dataclasses.replace(tr, mask_head_lr_scale=2.0))
    assert [g.get("lr_scale") for g in scaled.param_groups] == [1.0, 1.0, 2.0, 2.0]
    state = scaled.state_dict()
    for g in state["param_groups"]:
        g.pop("lr_scale")  # as a state saved by an older version would be
    load_optimizer_state(scaled, state)
    assert [g["lr_scale"] for g in scaled.param_groups] == [1.0, 1.0, 2.0, 2.0]
