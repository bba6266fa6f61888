"""Writing result files so that each exists whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import SelfAblateError


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write `text` beside `path`, then rename it into place: a reader (or a stage's "done" check)
    never sees half a file, and a failed write (a full disk) leaves the previous file intact and
    says so in one line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 is for secrets; results are read like checkpoints
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise SelfAblateError(f"could not write {path} ({e.strerror or e}); the previous file, if any, is intact") from None
    return path


def umask() -> int:
    """The process's umask (read by setting it and putting it back): the modes a plain open() or
    mkdir() would give, for files written through mkstemp/mkdtemp's private ones."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_folder(out: str | os.PathLike) -> None:
    """An --out that cannot become a folder is a one-line error before any compute."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SelfAblateError(f"--out {path} is a file, not a folder")
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise SelfAblateError(f"--out {path}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise SelfAblateError(f"--out {path}: {existing} is not writable")
