"""Shared fixtures: a small real TinyStories folder cut from the bundled sample, backends."""

from pathlib import Path

import pytest

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
