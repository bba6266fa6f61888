"""Shared fixtures: a small real TinyStories folder cut from the bundled sample, two tiny trained
models, the perturbed float64 model (`helpers`), backends."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton's kernels (ops.triton_lm_head) run in its interpreter here
    os.environ.setdefault("TRITON_INTERPRET", "1")

from selfablate.data.sources import EOT_LINE, SAMPLE, read_stories


def cut_stories(path: Path, n: int) -> list[str]:
    stories = []
    for story in read_stories(path):
        stories.append(story)
        if len(stories) == n:
            break
    return stories


def write_txt(path: Path, stories: list[str]) -> None:
    path.write_text("".join(f"{s}\n{EOT_LINE}\n" for s in stories), encoding="utf-8")


@pytest.fixture(scope="session")
def stories_dir(tmp_path_factory) -> Path:
    """train.txt / valid.txt with real TinyStories text: the first 600 + 150 stories of the bundled
    sample (about 130k + 30k tokens)."""
    root = tmp_path_factory.mktemp("tinystories")
    write_txt(root / "train.txt", cut_stories(SAMPLE / "train.txt.xz", 600))
    write_txt(root / "valid.txt", cut_stories(SAMPLE / "valid.txt.xz", 150))
    return root


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, stories_dir) -> dict[str, Path]:
    """Checkpoints of a baseline ("none") and a local self-ablating model: preset tiny with a compact
    vocabulary, 30 steps on `stories_dir` (trained once per session; tests must not change them)."""
    import dataclasses

    from selfablate.config import get_preset
    from selfablate.train import train

    root = tmp_path_factory.mktemp("tiny-runs")
    model_cfg, tr = get_preset("tiny")
    runs = {}
    for mode in ("none", "local"):
        cfg = dataclasses.replace(model_cfg, ablation=mode, compact_vocab=True)
        t = dataclasses.replace(tr, data=str(stories_dir), out=str(root / mode), progress=False, max_steps=30)
        runs[mode] = train(cfg, t).checkpoint
    return runs


@pytest.fixture
def float64_model():
    """float64_model(cfg=None, **perturbed's options): `helpers.perturbed` (default: the SMALL
    config, every parameter moved by N(0, 0.05^2))."""
    from .helpers import perturbed, small_config

    return lambda cfg=None, **kw: perturbed(cfg or small_config(), **kw)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Token caches and compiled kernels go to per-session temporary folders, never the user's ~/.cache."""
    monkeypatch.setenv("SELFABLATE_CACHE", str(tmp_path_factory.getbasetemp() / "token-cache"))
    monkeypatch.setenv("SELFABLATE_KERNEL_CACHE", str(tmp_path_factory.getbasetemp() / "kernel-cache"))


@pytest.fixture
def set_backend():
    """set_backend(name): the `selfablate.ops` backend for the rest of this test (restored after)."""
    from selfablate import ops

    saved = ops.backend()
    yield ops.select
    ops.select(saved)


@pytest.fixture(scope="module", params=["cpu", "torch"])
def backend(request):
    """Every test of a module that uses this runs on both `selfablate.ops` backends: `cpu` (the C
    kernels and oneDNN) and `torch` (PyTorch's operators: the path CUDA and MPS take). Module
    fixtures made before it (trained checkpoints) are shared by both; subprocesses get it from
    $SELFABLATE_BACKEND."""
    import os

    from selfablate import ops

    saved, env = ops.select(request.param), os.environ.get("SELFABLATE_BACKEND")
    os.environ["SELFABLATE_BACKEND"] = request.param
    yield request.param
    ops.select(saved)
    if env is None:
        os.environ.pop("SELFABLATE_BACKEND", None)
    else:
        os.environ["SELFABLATE_BACKEND"] = env


@pytest.fixture
def device_strict():
    """`torch.set_default_device("meta")` for the test: a tensor the library makes without
    `device=` lands on the meta device and fails the moment it meets real data (on a GPU, a CPU
    tensor meeting CUDA ones)."""
    import torch

    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)
