"""Data-parallel training under torchrun: 2 CPU processes (gloo) take the step one process takes."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from selfablate import ModelConfig, SelfAblatingTransformer
from selfablate.config import TrainConfig
from selfablate.train import make_optimizer, train_step


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, tmp_path, env_extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_combined_batch(tmp_path, stories_dir):
    ablation = "local"
    common = ["train", "--preset", "tiny", "--data", str(stories_dir), "--max-steps", "3", "--ablation", ablation,
              "--batch-size", "8", "--log-interval", "1", "--no-progress"]
    single = run([sys.executable, "-m", "selfablate", *common, "--out", str(tmp_path / "one")], tmp_path, {})
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "selfablate", *common, "--out", str(tmp_path / "two")], tmp_path, {})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # Rank 0 alone logged, each step once, with the loss averaged over both halves of the batch.
    logs = [[json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("one", "two")]
    steps = [[r for r in log if "lr" in r] for log in logs]
    assert [r["step"] for r in steps[1]] == [r["step"] for r in steps[0]] == [1, 2, 3]
    for a, b in zip(*steps):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    # float32 all-reduce sums in another order, and Adam turns the last bits of tiny gradients
    # into whole steps: the weights agree closely, not bit for bit (the float64 test is exact).
    one = load_file(tmp_path / "one" / "checkpoint" / "model.safetensors")
    two = load_file(tmp_path / "two" / "checkpoint" / "model.safetensors")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=2e-2, msg=k)


def _rank(rank: int, port: int, out: str, grad_accum: int = 1) -> None:
    """One process of a 2-process gloo job: one float64 training step on its half of the batch
    (in grad_accum micro-batches)."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from selfablate import distributed

    d, device = distributed.init(torch.device("cpu"), 8, grad_accum)
    model, opt, batch, cfg = _setup(grad_accum)
    train_step(distributed.wrap(model, d, device), opt, distributed.shard(batch, d), 0, cfg, device, contextlib.nullcontext)
    if d.main:
        torch.save(model.state_dict(), out)
    torch.distributed.destroy_process_group()


def _setup(grad_accum: int = 1):
    torch.manual_seed(0)
    model = SelfAblatingTransformer(ModelConfig(vocab_size=300, n_ctx=16, d_model=32, n_layers=2, n_heads=4, d_mlp=64,
                                                ablation="local", k_attn=8, k_mlp=16)).double()
    cfg = TrainConfig(batch_size=8, lr=1e-2, warmup_steps=0, max_steps=1, grad_accum=grad_accum)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, 300, (8, 16), generator=g), torch.randint(0, 300, (8, 16), generator=g))
    return model, make_optimizer(model, cfg), batch, cfg


@pytest.mark.slow
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_ddp_step_equals_the_combined_batch_step_exactly_in_float64(tmp_path, grad_accum):
    """With grad_accum 2 each process runs two micro-batches, the first under DDP's no_sync."""
    out = str(tmp_path / "ddp.pt")
    torch.multiprocessing.spawn(_rank, args=(free_port(), out, grad_accum), nprocs=2, join=True)
    model, opt, batch, cfg = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, opt, batch, 0, cfg, torch.device("cpu"), contextlib.nullcontext)
    ddp = torch.load(out)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=0, atol=1e-12, msg=k)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the step moved the weights


def test_batch_not_divisible_by_processes_is_a_config_error(monkeypatch):
    from selfablate import distributed
    from selfablate.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="divisible"):
        distributed.init(torch.device("cpu"), 8)


@pytest.mark.parametrize("grad_accum", [2, 4])
def test_gradient_accumulation_takes_the_whole_batch_step_exactly_in_float64(grad_accum):
    model, opt, batch, cfg = _setup()
    acc_model, acc_opt, _, acc_cfg = _setup(grad_accum)
    one = train_step(model, opt, batch, 0, cfg, torch.device("cpu"), contextlib.nullcontext).read()
    acc = train_step(acc_model, acc_opt, batch, 0, acc_cfg, torch.device("cpu"), contextlib.nullcontext).read()
    for (k, v), w in zip(model.state_dict().items(), acc_model.state_dict().values()):
        torch.testing.assert_close(w, v, rtol=0, atol=1e-12, msg=k)
    for f in ("loss", "loss_clean", "loss_ablated", "loss_recon", "grad_norm"):
        assert getattr(acc, f) == pytest.approx(getattr(one, f), rel=1e-6), f


def test_reductions_run_on_the_training_device_as_nccl_needs(monkeypatch):
    """NCCL reduces device tensors only. A process group whose only backend is `cuda:gloo` has its
    shape on a CPU: there, reducing a CPU tensor fails as it does under NCCL; `distributed.mean`
    reduces a tensor on the training device it is given."""
    import torch.distributed as dist

    from selfablate import distributed

    store = dist.HashStore()
    dist.init_process_group("cuda:gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.ones(2))  # what the old `mean` did at the first log step
        seen = []
        monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: seen.append(t.device))
        two = distributed.Dist(rank=0, world=2, local_rank=0)
        assert distributed.mean([1.0, None, 3.0], two, torch.device("cpu")) == [0.5, None, 1.5]
        assert seen == [torch.device("cpu")]  # the training device, not a fixed one
    finally:
        dist.destroy_process_group()
