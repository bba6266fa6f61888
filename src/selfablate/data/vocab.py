"""Compact vocabulary: keep only the GPT-2 ids that occur in the training split.

TinyStories uses a small part of GPT-2's 50257 tokens (8,725 in the shared sample), and at this
model size the LM head dominates the cost of a step; a compact head is several times cheaper.
Model id i stands for GPT-2 id ids[i] (an exact, order-preserving remap of every training
token); one extra id, the last, stands for every GPT-2 token never seen in training (<unk>),
which can occur in held-out text (0.22% of the sample's valid tokens) and is never sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .tokenizer import EOT, VOCAB_SIZE


@dataclass(frozen=True)
class CompactVocab:
    ids: np.ndarray
    """Sorted GPT-2 ids kept (always including <|endoftext|>); model id i <-> GPT-2 id ids[i]."""

    @classmethod
    def from_tokens(cls, tokens: np.ndarray) -> "CompactVocab":
        counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=VOCAB_SIZE)
        counts[EOT] += 1
        return cls(np.flatnonzero(counts).astype(np.int64))

    @property
    def size(self) -> int:
        """Model vocabulary size: the kept ids plus <unk>."""
        return len(self.ids) + 1

    @property
    def unk(self) -> int:
        return len(self.ids)

    def lookup(self) -> np.ndarray:
        """(50257,) GPT-2 id -> model id, <unk> for ids not kept."""
        table = np.full(VOCAB_SIZE, self.unk, dtype=np.int64)
        table[self.ids] = np.arange(len(self.ids))
        return table


# A model's vocabulary: `model` is a SelfAblatingTransformer (its cfg.compact_vocab and, for a compact
# vocabulary, its vocab_ids buffer); the model itself knows nothing of GPT-2's ids.


def token_lookup(model: Any) -> np.ndarray | None:
    """(50257,) GPT-2 id -> model id for a compact vocabulary (<unk> for ids it lacks); None when
    the model uses GPT-2's ids directly."""
    if not model.cfg.compact_vocab:
        return None
    return CompactVocab(model.vocab_ids.cpu().numpy()).lookup()


def to_model_ids(model: Any, gpt2_ids: Tensor) -> Tensor:
    """GPT-2 ids -> the model's ids (the same tensor without a compact vocabulary)."""
    lookup = token_lookup(model)
    return gpt2_ids if lookup is None else torch.from_numpy(lookup).to(gpt2_ids.device)[gpt2_ids]


def to_gpt2_ids(model: Any, model_ids: Tensor) -> Tensor:
    """Inverse of to_model_ids; <unk> maps to <|endoftext|>."""
    if not model.cfg.compact_vocab:
        return model_ids
    table = torch.cat([model.vocab_ids, model.vocab_ids.new_tensor([EOT])])
    return table[model_ids.to(table.device)]


def unk_id(model: Any) -> int | None:
    """The model's <unk> id (the last), or None without a compact vocabulary."""
    return model.cfg.vocab_size - 1 if model.cfg.compact_vocab else None


def unknown_share(lookup: np.ndarray | None, gpt2_ids: np.ndarray) -> float:
    """The fraction of `gpt2_ids` that a compact vocabulary's `lookup` maps to <unk> (its last id,
    the lookup's maximum); 0.0 without one."""
    if lookup is None or len(gpt2_ids) == 0:
        return 0.0
    return float((lookup[np.asarray(gpt2_ids, dtype=np.int64)] == lookup.max()).mean())
