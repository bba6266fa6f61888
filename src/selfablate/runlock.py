"""One writer per output folder: an advisory lock that the operating system drops with its process."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from .errors import SelfAblateError

LOCK_FILE = ".selfablate.lock"


@contextlib.contextmanager
def exclusive(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold `folder`'s lock for the block: a second process that asks for it meanwhile gets a
    one-line error naming the holder's PID. The lock is flock(2)'s: released when the holder's
    process ends, however it ends, so a crash never leaves a stale lock. (Where fcntl does not
    exist, e.g. on Windows, the block runs unlocked.)"""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SelfAblateError(f"cannot create the folder {folder} ({e.strerror or e})") from None
    try:
        import fcntl
    except ImportError:
        yield folder
        return
    try:
        f = open(folder / LOCK_FILE, "a+")
    except OSError as e:  # a folder of that name, an unreadable file
        raise SelfAblateError(f"cannot use the lock file {folder / LOCK_FILE} ({e.strerror or e}): remove it "
                              "if no selfablate process is writing to this folder") from None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise SelfAblateError(f"{folder} is in use by another selfablate process (PID {holder}); "
                                  "wait for it, or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield folder
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
