"""IOI prompts from a file in auto-circuit's format, read as the paper's authors read theirs.

The authors loaded `autocircuit_ioi_customized_prompts.json` (shipped in `prompts/`, MIT, its
licence beside it) with auto-circuit 1.0.1's `load_datasets_from_json(path, prepend_bos=True,
batch_size=64, train_test_size=(128, 128))`. What that does, and so what this does:

- the prompt list is shuffled once by Python's `random` seeded with 42, then the first 128 pairs
  are the train split and the next 128 the test split;
- auto-circuit prepends BOS (`<|endoftext|>`, id 50256) and left-pads the 256 prompts with the
  same id; TransformerLens, seeing a left-padding tokenizer, masks the leading pad tokens and
  starts the positions after them. The authors' conversion has `default_prepend_bos=False`, so
  the BOS (equal to the pad token) is masked too: their model never saw it, and ran every prompt
  exactly as if alone and without BOS (measured: `make crosscheck`, logits equal to 1e-15). So
  `bos=False` is their protocol; here prompts are right-padded and read at their own last token,
  which under causal attention is the same computation;
- each answer and wrong answer must be one GPT-2 token (auto-circuit would otherwise read several).

The batch size (64) matters: auto-circuit's ACDC reads only the first batch of the loader it is
given, so the authors' circuits were found on the first 64 prompts of the train split
(`CircuitConfig.batch` takes that many; see `circuits.run.prompt_batches`).
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..data.tokenizer import EOT, gpt2_tokenizer
from ..errors import SelfAblateError
from .ioi import IOIBatch

AUTHORS = "authors"
"""The name that selects the shipped copy of the authors' prompt file."""


class PromptSplit(NamedTuple):
    """The train split (circuit discovery) and the test split (behaviour on unseen prompts)."""

    train: IOIBatch
    test: IOIBatch


def is_prompt_set(name: str) -> bool:
    """`name` selects IOI prompts: templates (the generator), authors (the shipped file) or a file."""
    return name in ("templates", AUTHORS) or Path(name).is_file()


def why_not_prompt_set(name: str) -> str:
    """Why `name` selects no IOI prompts, in words for a one-line error."""
    path = Path(name)
    if path.is_dir():
        return f"{name} is a folder, not a prompt file"
    if path.suffix or "/" in name:
        return f"the prompt file {name} does not exist"
    return f"{name!r} is neither templates, authors nor a prompt file"


def authors_file() -> Path:
    return Path(str(resources.files("selfablate.circuits").joinpath("prompts/autocircuit_ioi_customized_prompts.json")))


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The "prompts" list of an auto-circuit prompt file, each checked: clean, corrupt (text) and
    one-element answers / wrong_answers. Any fault is one line naming the file and the prompt."""
    path = authors_file() if str(path) == AUTHORS else Path(path)
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))["prompts"]
    except OSError as e:
        raise SelfAblateError(f"cannot read the prompt file {path} ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise SelfAblateError(f"{path}: not an auto-circuit prompt file (JSON with a \"prompts\" list)") from None
    if not isinstance(prompts, list) or not prompts:
        raise SelfAblateError(f"{path}: \"prompts\" must be a non-empty list")
    for i, p in enumerate(prompts):
        ok = (isinstance(p, dict) and isinstance(p.get("clean"), str) and isinstance(p.get("corrupt"), str)
              and all(isinstance(p.get(k), list) and len(p[k]) == 1 and isinstance(p[k][0], str)
                      for k in ("answers", "wrong_answers")))
        if not ok:
            raise SelfAblateError(f"{path}: prompt {i} must have text \"clean\" and \"corrupt\" and one text each "
                                  "in \"answers\" and \"wrong_answers\"")
    return prompts


def _token(word: str, where: str) -> int:
    ids = gpt2_tokenizer().encode(word)
    if len(ids) != 1:
        raise SelfAblateError(f"{where}: the answer {word!r} is {len(ids)} GPT-2 tokens; IOI answers must be one "
                              "token (with its leading space, e.g. \" Mary\")")
    return ids[0]


def load_prompt_file(path: str | Path, split: tuple[int, int] = (128, 128), bos: bool = False,
                     seed: int = 42) -> PromptSplit:
    """The train and test splits of a prompt file, as auto-circuit's loader makes them (module doc)."""
    prompts = read_prompts(path)
    n_train, n_test = split
    if n_train < 1 or n_test < 0 or n_train + n_test > len(prompts):
        raise SelfAblateError(f"{path}: a split of {n_train} + {n_test} prompts needs that many; the file has "
                              f"{len(prompts)}")
    random.Random(seed).shuffle(prompts)  # auto-circuit: random.seed(42); random.shuffle(...)
    chosen = prompts[: n_train + n_test]
    enc, head = gpt2_tokenizer(), [EOT] if bos else []
    clean = [head + enc.encode(p["clean"]) for p in chosen]
    corrupt = [head + enc.encode(p["corrupt"]) for p in chosen]
    for i, (c, x) in enumerate(zip(clean, corrupt)):
        if len(c) != len(x):
            raise SelfAblateError(f"{path}: prompt {i} (after shuffling) has a corrupt prompt of another length "
                                  f"({len(x)} vs {len(c)} tokens)")
    io = [_token(p["answers"][0], str(path)) for p in chosen]
    s = [_token(p["wrong_answers"][0], str(path)) for p in chosen]
    width = max(map(len, clean))
    right = lambda rows: torch.tensor([r + [EOT] * (width - len(r)) for r in rows], device="cpu")  # noqa: E731
    batch = IOIBatch(right(clean), right(corrupt), torch.tensor([len(r) - 1 for r in clean], device="cpu"),
                     torch.tensor(io, device="cpu"), torch.tensor(s, device="cpu"), [p["clean"] for p in chosen])
    return PromptSplit(batch.rows(0, n_train), batch.rows(n_train, n_train + n_test))
