"""Shared fixtures: a small real TinyStories folder cut from the shared sample, or written here."""

from pathlib import Path

import pytest

from selfablate.data.sources import EOT_LINE, default_data_locations

FALLBACK_STORIES = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
    "Tom had a big red ball. He liked to throw it to his dog, Max. Max ran fast and caught the ball.",
    "One day, a small bird sat on a tree. The bird sang a happy song. The sun was warm and bright.",
    "Sue and Ben went to the beach. They built a sand castle. Then a wave came and took it away.",
]


def shared_data() -> Path | None:
    return next((p.resolve() for p in default_data_locations() if (p / "train.txt").is_file()), None)


def cut_stories(path: Path, n: int) -> list[str]:
    stories, lines = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip() == EOT_LINE:
                stories.append("".join(lines).strip())
                lines = []
                if len(stories) == n:
                    break
            else:
                lines.append(line)
    return [s for s in stories if s]


def write_txt(path: Path, stories: list[str]) -> None:
    path.write_text("".join(f"{s}\n{EOT_LINE}\n" for s in stories), encoding="utf-8")


@pytest.fixture(scope="session")
def stories_dir(tmp_path_factory) -> Path:
    """train.txt / valid.txt with real TinyStories text: 600 + 150 stories of the shared sample
    (about 130k + 30k tokens), or a small written set repeated when the sample is absent."""
    root = tmp_path_factory.mktemp("tinystories")
    shared = shared_data()
    if shared is not None:
        write_txt(root / "train.txt", cut_stories(shared / "train.txt", 600))
        write_txt(root / "valid.txt", cut_stories(shared / "valid.txt", 150))
    else:
        write_txt(root / "train.txt", FALLBACK_STORIES * 200)
        write_txt(root / "valid.txt", FALLBACK_STORIES[::-1] * 40)
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
