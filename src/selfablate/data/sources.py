"""Where stories come from: a folder of TinyStories text files, a .jsonl/.parquet file, or the hub.

A source yields the stories of a split ("train" or "valid") as strings and fingerprints each
split by its content, so that token caches are keyed by what was actually read.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Protocol

from ..errors import DataError

Split = Literal["train", "valid"]
SPLITS: tuple[Split, ...] = ("train", "valid")
HUB_DATASET = "roneneldan/TinyStories"
EOT_LINE = "<|endoftext|>"
# Names tried for each split inside a data folder, in order.
SPLIT_FILES = {
    "train": ("TinyStories-train.txt", "train.txt", "train.txt.xz", "train.jsonl", "train.parquet"),
    "valid": ("TinyStories-valid.txt", "valid.txt", "valid.txt.xz", "validation.txt", "valid.jsonl",
              "validation.jsonl", "valid.parquet", "validation.parquet"),
}
SAMPLE = Path(__file__).with_name("sample")
"""The bundled TinyStories sample (xz-compressed; CDLA-Sharing-1.0, see its README.md): the
default data, so that the demo and the tests run offline anywhere."""
HELD_OUT_EVERY = 50  # a single file: every 50th story is held out as the validation split


class Source(Protocol):
    name: str

    def stories(self, split: Split) -> Iterator[str]: ...

    def fingerprint(self, split: Split) -> str: ...


def read_stories(path: Path) -> Iterator[str]:
    """Stories of one file: <|endoftext|>-separated text (.txt), or the `text` field of
    .jsonl records or .parquet rows."""
    readers = {".txt": _txt_stories, ".xz": _txt_stories, ".jsonl": _jsonl_stories, ".parquet": _parquet_stories}
    if path.suffix not in readers:
        raise DataError(f"unsupported data file {path} (use .txt, .txt.xz, .jsonl or .parquet)")
    try:
        yield from readers[path.suffix](path)
    except DataError:
        raise
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start} of a line): check the file") from None
    except (OSError, ValueError, EOFError, lzma.LZMAError) as e:  # a damaged .xz or .parquet; pyarrow's errors are these
        raise DataError(f"{path} is unreadable as {path.suffix} ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                        "check the file") from None


NOT_TEXT_WARNING = 0.01
"""A .txt file with more than this share of bytes that are not UTF-8 gets a warning (they are
read as U+FFFD and tokenised all the same)."""


def _txt_stories(path: Path) -> Iterator[str]:
    lines: list[str] = []
    opener = lzma.open if path.suffix == ".xz" else open
    chars = replaced = 0
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            chars, replaced = chars + len(line), replaced + line.count("\ufffd")
            if line.strip() == EOT_LINE:
                if text := "".join(lines).strip():
                    yield text
                lines = []
            else:
                lines.append(line)
    if text := "".join(lines).strip():
        yield text
    if replaced > NOT_TEXT_WARNING * max(1, chars):
        print(f"selfablate: warning: {replaced / chars:.0%} of {path}'s characters are not UTF-8 text "
              "(read as U+FFFD): is it the data you meant?", file=sys.stderr)


def _jsonl_stories(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{n}: expected a JSON object with a 'text' field") from None
            if text := str(text).strip():
                yield text


def _parquet_stories(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow: pip install 'selfablate[parquet]'") from None
    table = pq.ParquetFile(path)
    if "text" not in table.schema_arrow.names:
        raise DataError(f"{path} has no 'text' column")
    for batch in table.iter_batches(columns=["text"]):
        for text in batch.column(0).to_pylist():
            if text and (text := text.strip()):
                yield text


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FolderSource:
    """A folder holding one file per split (e.g. train.txt and valid.txt)."""

    root: Path

    @property
    def name(self) -> str:
        return str(self.root)

    def path(self, split: Split) -> Path:
        for fname in SPLIT_FILES[split]:
            if (self.root / fname).is_file():
                return self.root / fname
        raise DataError(f"no {split} split in {self.root} (looked for {', '.join(SPLIT_FILES[split])})")

    def stories(self, split: Split) -> Iterator[str]:
        return read_stories(self.path(split))

    def fingerprint(self, split: Split) -> str:
        return file_digest(self.path(split))


@dataclass(frozen=True)
class FileSource:
    """One file; every HELD_OUT_EVERY-th story forms the validation split."""

    path: Path

    @property
    def name(self) -> str:
        return str(self.path)

    def stories(self, split: Split) -> Iterator[str]:
        held_out = split == "valid"
        for i, text in enumerate(read_stories(self.path)):
            if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held_out:
                yield text

    def fingerprint(self, split: Split) -> str:
        return f"{file_digest(self.path)}:{split}:{HELD_OUT_EVERY}"


@dataclass(frozen=True)
class HubSource:
    """The Hugging Face hub dataset (needs the `hub` extra and a network connection)."""

    dataset: str = HUB_DATASET

    @property
    def name(self) -> str:
        return f"hf:{self.dataset}"

    def _load(self, split: Split):
        try:
            import datasets
        except ImportError:
            raise DataError("loading from the hub needs `pip install 'selfablate[hub]'`, "
                            "or pass --data FOLDER with train.txt/valid.txt") from None
        try:
            return datasets.load_dataset(self.dataset, split="train" if split == "train" else "validation")
        except Exception as e:  # network, auth and not-found errors come in many types
            raise DataError(f"cannot load {self.dataset} from the Hugging Face hub (offline?): "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                            "pass --data FOLDER instead") from None

    def stories(self, split: Split) -> Iterator[str]:
        for row in self._load(split):
            if text := row["text"].strip():
                yield text

    def fingerprint(self, split: Split) -> str:
        return f"{self.dataset}:{split}:{self._load(split)._fingerprint}"


def resolve_source(spec: str = "") -> Source:
    """--data value -> Source. Empty: $SELFABLATE_DATA, else the bundled sample (`SAMPLE`)."""
    spec = spec or os.environ.get("SELFABLATE_DATA", "")
    if not spec:
        return FolderSource(SAMPLE)
    if spec.startswith("hf:"):
        return HubSource(spec[3:] or HUB_DATASET)
    path = Path(spec).expanduser()
    if path.is_dir():
        return FolderSource(path.resolve())
    if path.is_file():
        return FileSource(path.resolve())
    raise DataError(f"data folder or file {spec} does not exist")
