"""Indirect-object identification (IOI) prompts in TinyStories style, and IOI behaviour.

"One day, Lily and Tom went to the park. Tom gave a ball to" -> " Lily" (the indirect object,
IO), not " Tom" (the subject, S). ABBA templates name IO first, BABA templates S first. The
corrupt prompt replaces all three names with three other names, so the answer is no longer
derivable while everything else (length, places, objects) stays the same.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import torch
from torch import Tensor

from ..data.tokenizer import EOT, gpt2_tokenizer
from ..errors import SelfAblateError

NAMES = ("Lily", "Tom", "Ben", "Sue", "Max", "Tim", "Anna", "Sam", "Mia", "Jack", "Lucy", "Sara", "Mark",
         "Kate", "Jane", "John", "Mary", "Bob", "Amy", "Emma", "Jake", "Ella", "Zoe", "Leo", "Mike", "Bella",
         "Molly", "Daisy", "Jill", "Bill", "Lisa", "Joe", "Dan", "Sally", "Timmy", "Billy", "Jenny", "Peter")
PLACES = ("park", "store", "beach", "forest", "garden", "school", "zoo", "farm", "lake", "house", "kitchen")
OBJECTS = ("ball", "book", "toy", "cake", "flower", "apple", "hat", "box", "kite", "cookie", "doll", "car")
# {A} and {B} are the first two names; {S} repeats the subject. ABBA: A=IO, B=S; BABA: A=S, B=IO.
# Every name follows a space, so each is the single token " Name".
TEMPLATES = (
    "One day, {A} and {B} went to the {place}. {S} gave a {object} to",
    "Today, {A} and {B} were playing in the {place}. {S} gave the {object} to",
    "Once upon a time, {A} and {B} found a {object} at the {place}. {S} gave it to",
    "One morning, {A} and {B} went to the {place} together. Then {S} gave a {object} to",
)


class IOIBatch(NamedTuple):
    """Clean and corrupt prompts, right-padded; read the prediction at `last`."""

    clean: Tensor
    """(n, pos) GPT-2 token ids."""
    corrupt: Tensor
    """(n, pos) the same prompts with all three names replaced."""
    last: Tensor
    """(n,) index of each prompt's final token."""
    io: Tensor
    """(n,) GPT-2 id of the indirect object (the right answer)."""
    s: Tensor
    """(n,) GPT-2 id of the subject (the distractor)."""
    texts: list[str]

    def rows(self, lo: int, hi: int) -> IOIBatch:
        """Prompts lo..hi-1 (the padding stays as wide as the whole batch's)."""
        return IOIBatch(*(t[lo:hi] for t in self[:5]), self.texts[lo:hi])


def single_token_words(words: tuple[str, ...]) -> list[str]:
    """The words that are one GPT-2 token with their leading space."""
    enc = gpt2_tokenizer()
    return [w for w in words if len(enc.encode(" " + w)) == 1]


def ioi_prompts(n: int, seed: int = 0, names: tuple[str, ...] = NAMES, bos: bool = False) -> IOIBatch:
    """n seeded prompt pairs, alternating ABBA and BABA, cycling through the templates; with `bos`,
    each starts with <|endoftext|>."""
    enc = gpt2_tokenizer()
    head = [EOT] if bos else []
    pool = single_token_words(names)
    if len(pool) < 5:
        raise SelfAblateError("IOI needs at least 5 names that are single GPT-2 tokens")
    rng = random.Random(seed)
    clean, corrupt, io, s, texts = [], [], [], [], []
    for i in range(n):
        template = TEMPLATES[(i // 2) % len(TEMPLATES)]
        a_io, a_s, x, y, z = rng.sample(pool, 5)
        fill = dict(place=rng.choice(PLACES), object=rng.choice(OBJECTS))
        first, second = (a_io, a_s) if i % 2 == 0 else (a_s, a_io)
        text = template.format(A=first, B=second, S=a_s, **fill)
        clean.append(head + enc.encode(text))
        corrupt.append(head + enc.encode(template.format(A=x, B=y, S=z, **fill)))
        io.append(enc.encode(" " + a_io)[0])
        s.append(enc.encode(" " + a_s)[0])
        texts.append(text)
        assert len(clean[-1]) == len(corrupt[-1]), "names must be single tokens"
    width = max(map(len, clean))
    cpu = lambda x: torch.tensor(x, device="cpu")  # noqa: E731
    pad = lambda rows: cpu([r + [r[-1]] * (width - len(r)) for r in rows])  # noqa: E731
    return IOIBatch(pad(clean), pad(corrupt), cpu([len(r) - 1 for r in clean]), cpu(io), cpu(s), texts)


class IOIBehaviour(NamedTuple):
    logit_diff: float
    """Mean logit(IO) - logit(S) at the final position."""
    accuracy: float
    """Fraction of prompts with logit(IO) > logit(S)."""
    prob_io: float
    """Mean probability of the IO token."""


def ioi_behaviour(logits_last: Tensor, io: Tensor, s: Tensor) -> IOIBehaviour:
    """logits_last (n, vocab) at each prompt's final position; io, s (n,) in the model's ids."""
    rows = torch.arange(len(io), device=logits_last.device)
    io, s = io.to(logits_last.device), s.to(logits_last.device)
    diff = logits_last[rows, io] - logits_last[rows, s]
    p_io = logits_last.float().softmax(-1)[rows, io]
    return IOIBehaviour(diff.mean().item(), (diff > 0).float().mean().item(), p_io.mean().item())
