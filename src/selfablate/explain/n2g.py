"""Neuron-to-Graph (Foote et al. 2023, arXiv 2304.12918): a unit's top-activating examples turned
into a trie of token patterns that predicts the unit's activation on new text.

For one layer's units at a time:

1. `prune`: each example (the context ending at the activating token) is cut to the shortest
   suffix that keeps at least `keep` of the activation at the activating token;
2. `importance`: each token of a pruned example is replaced by a fixed token, and its importance is
   1 - (activation after replacing) / (activation before), at the activating token;
3. `build_graph`: the examples become a trie read backwards from the activating token: the
   activating token, then each earlier token up to the earliest important one, an unimportant
   token as a wildcard. An end node holds the largest normalised activation (activation / the
   unit's largest) of the examples ending there;
4. `predict` and `scores`: on new text the graph predicts, at each position, the largest end value
   among its paths that match there; precision, recall and F1 of "fires" (at least `fire` of the
   unit's largest activation) against the real activations.

N2G's augmentation (similar tokens proposed by BERT) needs a second language model and is not done.
Everything here runs on batches: all truncations of one length, and all replacements of all
examples of one length, go through the model together.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

WILDCARD = -1
"""A trie node's token when any token matches (an unimportant token of an example)."""

LastActivation = Callable[[Tensor], Tensor]
"""tokens (batch, pos) -> every unit's activation at the last position, (batch, units)."""


class Examples(NamedTuple):
    """One layer's top-activating examples, each for one unit."""

    unit: Tensor
    """(n,) the unit each example belongs to."""
    context: Tensor
    """(n, ctx) token ids on the host, the activating token last; left-filled with -1 where the text is shorter."""
    activation: Tensor
    """(n,) the unit's activation at the activating token in its original text."""


def _last_activation_chunked(fn: LastActivation, tokens: Tensor, units: Tensor, batch_size: int) -> Tensor:
    """fn on tokens (n, pos) in chunks of batch_size rows; each row's own unit, (n,) float32 on the host."""
    out = []
    for i in range(0, len(tokens), batch_size):
        acts = fn(tokens[i : i + batch_size])  # (chunk, units)
        out.append(acts.gather(1, units[i : i + batch_size, None].to(acts.device))[:, 0].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, device="cpu")


def prune(fn: LastActivation, ex: Examples, keep: float, batch_size: int) -> tuple[Tensor, Tensor]:
    """The shortest suffix of each example's context whose activation at the activating token is
    at least `keep` times that of the whole context. Returns (lengths (n,), the activation at
    that length (n,)). Every length 1..ctx is run once for the examples long enough for it."""
    n, ctx = ex.context.shape
    avail = (ex.context >= 0).sum(1)  # (n,) tokens each example has
    acts = torch.full((n, ctx), float("nan"), device="cpu")  # acts[i, m - 1]: activation with the last m tokens
    for m in range(1, ctx + 1):
        rows = torch.nonzero(avail >= m)[:, 0]
        if len(rows):
            acts[rows, m - 1] = _last_activation_chunked(fn, ex.context[rows, ctx - m :], ex.unit[rows], batch_size)
    full = acts.gather(1, (avail - 1).clamp(min=0)[:, None])[:, 0]  # (n,) the whole context's
    ok = acts >= keep * full[:, None]  # NaN (too short) compares False
    ok[torch.arange(n, device="cpu"), (avail - 1).clamp(min=0)] = True  # the whole context always qualifies
    length = ok.float().argmax(1) + 1  # the first True
    return length, acts.gather(1, (length - 1)[:, None])[:, 0]


def importance(fn: LastActivation, tokens: list[Tensor], units: Tensor, replacement: int,
               batch_size: int) -> list[Tensor]:
    """For each pruned example (tokens[i], activating token last) and each of its positions j:
    1 - a_j / a, where a is the unit's activation at the last position and a_j the same with
    token j replaced by `replacement`. Examples of one length run as one batch of length x length
    variants."""
    out: list[Tensor | None] = [None] * len(tokens)
    lengths = torch.tensor([len(t) for t in tokens], device="cpu")
    for m in lengths.unique().tolist():
        idx = torch.nonzero(lengths == m)[:, 0]
        base = torch.stack([tokens[i] for i in idx.tolist()])  # (e, m)
        variants = base[:, None, :].repeat(1, m + 1, 1)  # (e, m + 1, m): row 0 as is, row j + 1 with j replaced
        diag = torch.arange(m, device="cpu")
        variants[:, 1:][:, diag, diag] = replacement
        unit = units[idx].repeat_interleave(m + 1)  # (e * (m + 1),)
        acts = _last_activation_chunked(fn, variants.view(-1, m), unit, batch_size).view(-1, m + 1)  # (e, m + 1)
        imp = 1 - acts[:, 1:] / acts[:, :1]  # (e, m)
        for row, i in enumerate(idx.tolist()):
            out[i] = imp[row]
    return out  # type: ignore[return-value]


# -- the graph ----------------------------------------------------------------------------------


def pattern(tokens: list[int], importances: list[float], threshold: float) -> tuple[int, ...]:
    """An example as a path read backwards from its activating token (always kept): each earlier
    token up to the earliest important one (importance >= threshold), unimportant ones as WILDCARD."""
    important = [j for j in range(len(tokens) - 1) if importances[j] >= threshold]
    first = min(important, default=len(tokens) - 1)
    return tuple([tokens[-1]] + [t if importances[j] >= threshold else WILDCARD
                                 for j, t in reversed(list(enumerate(tokens[first:-1], start=first)))])


def build_graph(patterns: list[tuple[int, ...]], values: list[float]) -> dict:
    """The trie of the patterns: nodes {"t": token (WILDCARD: any), "v": end value or None,
    "c": children}; the root has t None. An end's value is the largest of the patterns ending there."""
    root: dict = {"t": None, "v": None, "c": []}
    for path, value in zip(patterns, values):
        node = root
        for tok in path:
            child = next((c for c in node["c"] if c["t"] == tok), None)
            if child is None:
                child = {"t": tok, "v": None, "c": []}
                node["c"].append(child)
            node = child
        node["v"] = value if node["v"] is None else max(node["v"], value)
    return root


def paths(graph: dict) -> list[tuple[tuple[int, ...], float]]:
    """Every (path, end value) of a trie, root excluded."""
    found = []

    def walk(node: dict, prefix: tuple[int, ...]) -> None:
        if node["v"] is not None:
            found.append((prefix, node["v"]))
        for c in node["c"]:
            walk(c, prefix + (c["t"],))

    for c in graph["c"]:
        walk(c, (c["t"],))
    return found


def predict(graph: dict, tokens: np.ndarray) -> np.ndarray:
    """tokens (windows, pos) -> predicted normalised activation (windows, pos): at each position,
    the largest end value among the paths that match there (path[0] the token at that position,
    path[j] the token j earlier, WILDCARD any), 0 where none does. Paths never reach across a
    window's start, as the model's context does not."""
    pred = np.zeros(tokens.shape, dtype=np.float32)
    T = tokens.shape[1]
    for path, value in paths(graph):
        D = len(path)
        if D > T:
            continue
        match = np.ones((tokens.shape[0], T - D + 1), dtype=bool)  # positions D - 1 .. T - 1
        for j, tok in enumerate(path):
            if tok != WILDCARD:
                match &= tokens[:, D - 1 - j : T - j] == tok
        region = pred[:, D - 1 :]
        np.maximum(region, np.where(match, np.float32(value), np.float32(0)), out=region)
    return pred


class Scores(NamedTuple):
    """How well a graph's predictions of "fires" match the unit's."""

    precision: float
    """TP / (TP + FP); NaN when the graph never predicts firing."""
    recall: float
    """TP / (TP + FN); NaN when the unit never fires."""
    f1: float
    """2 TP / (2 TP + FP + FN); NaN when neither fires anywhere."""
    fires: int
    """Positions where the unit fires (TP + FN)."""
    predicted: int
    """Positions where the graph predicts firing (TP + FP)."""


def scores(predicted: np.ndarray, actual: np.ndarray, unit_max: float, fire: float) -> Scores:
    """Fires: actual >= fire * unit_max; predicted to fire: predicted (normalised) >= fire."""
    real = actual >= fire * unit_max
    guess = predicted >= fire
    tp = int((real & guess).sum())
    fp, fn = int(guess.sum()) - tp, int(real.sum()) - tp
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return Scores(ratio(tp, tp + fp), ratio(tp, tp + fn), ratio(2 * tp, 2 * tp + fp + fn), tp + fn, tp + fp)
