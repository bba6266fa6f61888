"""Token datasets: a split tokenised once into a cached uint16 memmap, read as windows."""

from __future__ import annotations

import hashlib
import itertools
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import DataError
from .sources import Source, Split
from .tokenizer import EOT, gpt2_tokenizer

CACHE_FORMAT = "uint16-eot-after-v1"  # bump when the layout of cached tokens changes
CHUNK = 2048  # stories tokenised per batch


def default_cache_dir() -> Path:
    return Path(os.environ.get("SELFABLATE_CACHE", Path.home() / ".cache" / "selfablate" / "tokens"))


def cache_key(source: Source, split: Split) -> str:
    """Keyed by the split's content, the tokenizer and the cache layout."""
    enc = gpt2_tokenizer()
    parts = [source.fingerprint(split), enc.name, str(enc.n_vocab), CACHE_FORMAT]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def _remove_orphans(cache_dir: Path) -> None:
    """Delete the partial caches (*.tmp<PID>) of processes that no longer exist (killed mid-write)."""
    for tmp in cache_dir.glob("*.tmp*"):
        pid = tmp.suffix[len(".tmp"):]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (PermissionError, OSError):
            pass  # alive (another user's), or unknowable: leave it


def tokenize_split(source: Source, split: Split, cache_dir: Path | None = None, progress: bool = True) -> np.ndarray:
    """The split's tokens (uint16 memmap): each story followed by <|endoftext|>.

    Tokenised once, streamed to disk, and renamed into place when complete, so an interrupted
    run never leaves a truncated cache behind.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"{split}-{cache_key(source, split)}.bin"
    _drop_if_damaged(path)
    if not path.exists():
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # HOME read-only, or a file where a folder should be
            raise DataError(f"cannot create the token cache folder {cache_dir} ({e.strerror or e}): set "
                            "$SELFABLATE_CACHE to a writable folder") from None
        _remove_orphans(cache_dir)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            n = _write_tokens(source, split, tmp, progress)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise DataError(f"could not write the token cache {path} ({e.strerror or e}); nothing was "
                            "cached (set $SELFABLATE_CACHE to another folder)") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if n == 0:
            tmp.unlink(missing_ok=True)
            raise DataError(f"the {split} split of {source.name} holds no stories")
        os.replace(tmp, path)
    return np.memmap(path, dtype=np.uint16, mode="r")


def _drop_if_damaged(path: Path) -> None:
    """A cache is renamed into place whole, so one that is empty or of an odd size (uint16 tokens)
    was damaged afterwards (a truncation, a disk error): it is removed, and tokenised again."""
    size = path.stat().st_size if path.is_file() else None
    if size is not None and (size == 0 or size % 2):
        print(f"selfablate: warning: the token cache {path} is damaged ({size} bytes); "
              "tokenising again", file=sys.stderr)
        try:
            path.unlink()
        except OSError as e:
            raise DataError(f"the token cache {path} is damaged and cannot be removed ({e.strerror or e}): "
                            "delete it, or set $SELFABLATE_CACHE to another folder") from None


def _write_tokens(source: Source, split: Split, out: Path, progress: bool) -> int:
    enc = gpt2_tokenizer()
    stories = iter(source.stories(split))
    total = 0
    with open(out, "wb") as f, tqdm(desc=f"tokenising {split}", unit=" stories", disable=not progress) as bar:
        while batch := list(itertools.islice(stories, CHUNK)):
            for ids in enc.encode_ordinary_batch(batch):
                ids.append(EOT)
                f.write(np.asarray(ids, dtype=np.uint16).tobytes())
                total += len(ids)
            bar.update(len(batch))
    return total


class TokenWindows:
    """Windows of seq_len + 1 tokens from a token array: inputs and next-token targets."""

    def __init__(self, tokens: np.ndarray, seq_len: int, lookup: np.ndarray | None = None, split: str = ""):
        """lookup: optional (50257,) GPT-2 id -> model id table (a compact vocabulary); split: its
        name, for messages."""
        if len(tokens) < seq_len + 1:
            name = f"the {split} split" if split else "the split"
            raise DataError(f"{name} has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
        self.tokens, self.seq_len, self.lookup = tokens, seq_len, lookup

    def _stack(self, starts: Tensor | list[int]) -> tuple[Tensor, Tensor]:
        rows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        if self.lookup is not None:
            rows = self.lookup[rows]
        t = torch.from_numpy(rows)  # (batch, seq_len + 1)
        return t[:, :-1], t[:, 1:]

    def random_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Uniformly random windows; deterministic for the generator's state."""
        high = len(self.tokens) - self.seq_len
        return self._stack(torch.randint(0, high, (batch_size,), generator=generator, device="cpu").tolist())

    def num_sequential(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def num_batches(self, batch_size: int, limit: int | None = None) -> int:
        """How many batches `sequential_batches(batch_size, limit)` yields."""
        n = self.num_sequential() if limit is None else min(limit, self.num_sequential())
        return -(-n // batch_size)

    def sequential_batches(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Non-overlapping windows covering the split from the start (for evaluation):
        every token but the last of the final partial window is predicted exactly once."""
        n = self.num_sequential() if limit is None else min(limit, self.num_sequential())
        for first in range(0, n, batch_size):
            yield self._stack([i * self.seq_len for i in range(first, min(first + batch_size, n))])

    def spread_batches(self, batch_size: int, n_batches: int) -> list[tuple[Tensor, Tensor]]:
        """A fixed set of windows spread evenly over the split (for quick periodic evaluation)."""
        n = batch_size * n_batches
        starts = np.linspace(0, len(self.tokens) - self.seq_len - 1, n).astype(np.int64).tolist()
        return [self._stack(starts[i : i + batch_size]) for i in range(0, n, batch_size)]
