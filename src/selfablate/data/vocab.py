"""Compact vocabulary: keep only the GPT-2 ids that occur in the training split.

TinyStories uses a small part of GPT-2's 50257 tokens (8,725 in the shared sample), and at this
model size the LM head dominates the cost of a step; a compact head is several times cheaper.
Model id i stands for GPT-2 id ids[i] (an exact, order-preserving remap of every training
token); one extra id, the last, stands for every GPT-2 token never seen in training (<unk>),
which can occur in held-out text (0.22% of the sample's valid tokens) and is never sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
