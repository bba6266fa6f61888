"""Tokenizer, data sources, token cache and windows."""

import json

import numpy as np
import pytest
import torch

from selfablate import gpt2_tokenizer
from selfablate.data.dataset import TokenWindows, cache_key, tokenize_split
from selfablate.data.sources import FileSource, FolderSource, HubSource, resolve_source
from selfablate.data.tokenizer import EOT
from selfablate.errors import DataError

from .conftest import write_txt


def test_gpt2_tokenizer_ids_offline():
    enc = gpt2_tokenizer()
    assert enc.encode("Once upon a time") == [7454, 2402, 257, 640]
    assert enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    assert enc.encode(" Lily") == [20037]  # names with a leading space are single tokens
    assert enc.decode(enc.encode("Hello, world! It's 3.14")) == "Hello, world! It's 3.14"


def test_folder_source_reads_eot_separated_stories(tmp_path):
    write_txt(tmp_path / "TinyStories-train.txt", ["A cat.\nIt sat.", "A dog."])
    write_txt(tmp_path / "TinyStories-valid.txt", ["A bird."])
    src = resolve_source(str(tmp_path))
    assert isinstance(src, FolderSource)
    assert list(src.stories("train")) == ["A cat.\nIt sat.", "A dog."]
    assert list(src.stories("valid")) == ["A bird."]


def test_jsonl_file_source_holds_out_every_50th_story(tmp_path):
    path = tmp_path / "stories.jsonl"
    path.write_text("".join(json.dumps({"text": f"Story {i}."}) + "\n" for i in range(100)))
    src = resolve_source(str(path))
    assert isinstance(src, FileSource)
    assert list(src.stories("valid")) == ["Story 49.", "Story 99."]
    assert len(list(src.stories("train"))) == 98


def test_tokenized_cache_layout_and_key(stories_dir, tmp_path):
    src = FolderSource(stories_dir)
    tokens = tokenize_split(src, "valid", tmp_path, progress=False)
    enc = gpt2_tokenizer()
    first = next(iter(src.stories("valid")))
    ids = enc.encode_ordinary(first)
    assert tokens.dtype == np.uint16
    assert tokens[: len(ids)].tolist() == ids and tokens[len(ids)] == EOT  # EOT after each story
    assert int((np.asarray(tokens) == EOT).sum()) == len(list(src.stories("valid")))
    # Cached: the second call reads the same file; a content change gives a new key.
    assert len(list(tmp_path.glob("valid-*.bin"))) == 1
    again = tokenize_split(src, "valid", tmp_path, progress=False)
    assert np.array_equal(again, tokens)
    key = cache_key(src, "valid")
    with open(stories_dir / "valid.txt", "a") as f:
        f.write("One more story.\n<|endoftext|>\n")
    try:
        assert cache_key(src, "valid") != key
    finally:
        text = (stories_dir / "valid.txt").read_text()
        (stories_dir / "valid.txt").write_text(text.removesuffix("One more story.\n<|endoftext|>\n"))


def test_random_windows_are_deterministic_and_shifted():
    tokens = np.arange(1000, dtype=np.uint16)
    w = TokenWindows(tokens, 16)
    x1, y1 = w.random_batch(4, torch.Generator().manual_seed(3))
    x2, y2 = w.random_batch(4, torch.Generator().manual_seed(3))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(y1[:, :-1], x1[:, 1:]) and torch.equal(y1, x1 + 1)


def test_sequential_windows_cover_the_split_once():
    tokens = np.arange(101, dtype=np.uint16)
    w = TokenWindows(tokens, 10)
    ys = torch.cat([y.flatten() for _, y in w.sequential_batches(3)])
    assert ys.tolist() == list(range(1, 101))
    assert w.num_batches(3) == len(list(w.sequential_batches(3))) == 4
    assert w.num_batches(3, limit=5) == len(list(w.sequential_batches(3, 5))) == 2


@pytest.mark.parametrize("spec,msg", [
    ("/no/such/folder", "data folder or file /no/such/folder does not exist"),
])
def test_missing_data_is_a_one_line_error(spec, msg):
    with pytest.raises(DataError, match=msg):
        resolve_source(spec)


def test_folder_without_splits_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="no train split in"):
        list(resolve_source(str(tmp_path)).stories("train"))


def test_hub_without_datasets_or_network_is_a_one_line_error():
    with pytest.raises(DataError) as e:
        list(HubSource().stories("valid"))
    assert "\n" not in str(e.value) and ("hub" in str(e.value))


def test_env_var_and_default_data(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFABLATE_DATA", str(tmp_path))
    assert resolve_source("") == FolderSource(tmp_path.resolve())
    monkeypatch.delenv("SELFABLATE_DATA")
    monkeypatch.chdir(tmp_path)  # nothing beside the working directory: the default needs no ../shared
    from selfablate.data.sources import SAMPLE

    source = resolve_source("")
    assert source == FolderSource(SAMPLE) and source.path("train").name == "train.txt.xz"
    first = next(source.stories("valid"))
    assert len(first) > 100 and "<|endoftext|>" not in first


def test_the_bundled_sample_has_its_stories_and_its_licence():
    from selfablate.data.sources import SAMPLE, read_stories

    assert sum(1 for _ in read_stories(SAMPLE / "train.txt.xz")) == 7155
    assert sum(1 for _ in read_stories(SAMPLE / "valid.txt.xz")) == 3114
    assert "CDLA-Sharing-1.0" in (SAMPLE / "README.md").read_text()


def test_parquet_folder_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["Once upon a time.", "  ", "The end."]}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"text": ["A valid story."], "id": [1]}), tmp_path / "validation.parquet")
    src = resolve_source(str(tmp_path))
    assert list(src.stories("train")) == ["Once upon a time.", "The end."]
    assert list(src.stories("valid")) == ["A valid story."]
    pq.write_table(pa.table({"story": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="has no 'text' column"):
        list(resolve_source(str(tmp_path / "bad.parquet")).stories("train"))


def test_a_killed_tokeniser_leaves_no_partial_cache_behind(tmp_path, stories_dir):
    """A partial cache whose process is gone (kill -9 skips every cleanup) is removed by the next run;
    one whose process is alive is left alone."""
    import os
    import subprocess

    from selfablate.data.dataset import tokenize_split
    from selfablate.data.sources import FolderSource

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"valid-x.tmp{dead.pid}").write_bytes(b"half")
    (tmp_path / f"valid-y.tmp{os.getpid()}").write_bytes(b"mine")
    tokenize_split(FolderSource(stories_dir), "valid", tmp_path, progress=False)
    assert not (tmp_path / f"valid-x.tmp{dead.pid}").exists() and (tmp_path / f"valid-y.tmp{os.getpid()}").exists()


def test_a_full_disk_while_caching_tokens_is_one_line(tmp_path, stories_dir, monkeypatch):
    import errno

    import selfablate.data.dataset as ds
    from selfablate.data.sources import FolderSource

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ds, "_write_tokens", full)
    with pytest.raises(DataError, match="could not write the token cache .*No space left on device"):
        ds.tokenize_split(FolderSource(stories_dir), "valid", tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, content, msg", [
    ("train.jsonl", b'{"text": "a"}\n\xff\xfe\x00binary\n', "is not UTF-8 text"),
    ("train.parquet", b"PAR1 this is no parquet file PAR1", "is unreadable as .parquet"),
    ("train.txt.xz", b"\xfd7zXZ\x00 not really xz", "is unreadable as .xz"),
])
def test_unreadable_data_is_one_line_naming_the_file(tmp_path, name, content, msg):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / name).write_bytes(content)
    (folder / name.replace("train", "valid")).write_bytes(content)
    with pytest.raises(DataError, match=msg) as e:
        tokenize_split(resolve_source(str(folder)), "train", tmp_path / "cache", progress=False)
    assert name in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("size", [0, 3])
def test_a_damaged_token_cache_is_tokenised_again(tmp_path, stories_dir, size, capsys):
    source = resolve_source(str(stories_dir))
    good = np.array(tokenize_split(source, "valid", tmp_path, progress=False))
    cache = next(tmp_path.glob("valid-*.bin"))
    cache.write_bytes(cache.read_bytes()[:size])  # emptied, or cut to an odd size
    again = np.array(tokenize_split(source, "valid", tmp_path, progress=False))
    assert np.array_equal(again, good) and "is damaged" in capsys.readouterr().err


def test_a_cache_folder_that_cannot_exist_is_one_line(tmp_path, stories_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="cannot create the token cache folder .*SELFABLATE_CACHE"):
        tokenize_split(resolve_source(str(stories_dir)), "valid", blocker / "cache", progress=False)


def test_a_lock_file_that_is_a_folder_is_one_line(tmp_path):
    from selfablate import runlock
    from selfablate.errors import SelfAblateError

    (tmp_path / runlock.LOCK_FILE).mkdir()
    with pytest.raises(SelfAblateError, match="cannot use the lock file"):
        with runlock.exclusive(tmp_path):
            pass


def test_result_files_are_readable_like_checkpoints(tmp_path):
    import os

    from selfablate.files import write_text_atomically

    mask = os.umask(0o022)
    try:
        path = write_text_atomically(tmp_path / "r.json", "{}")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_txt_file_of_random_bytes_gets_a_warning(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    noise = bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8))
    (folder / "train.txt").write_bytes(noise)
    (folder / "valid.txt").write_text("Once upon a time there was a cat.\n")
    tokenize_split(resolve_source(str(folder)), "train", tmp_path / "cache", progress=False)
    assert "characters are not UTF-8 text" in capsys.readouterr().err
    tokenize_split(resolve_source(str(folder)), "valid", tmp_path / "cache", progress=False)
    assert capsys.readouterr().err == ""  # real text: no warning
