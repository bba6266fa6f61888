"""One pass over held-out text: each batch's activations feed a set of accumulators.

`run_batch` does the forward passes (the model, and its ablated stream under random masks of the
same k as a control) and exposes what the accumulators read as a `BatchView`.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..model import SelfAblatingTransformer
from ..ops.lm_head import per_token_cross_entropy
from ..ops.masks import hard_topk
from ..runtime import wide, wide_dtype
from . import metrics as M


class BatchView(NamedTuple):
    """What one evaluation batch exposes."""

    tokens: Tensor
    """(batch, pos) model ids."""
    ce_clean: Tensor
    """(batch, pos) per-token cross-entropy of the clean stream."""
    ce_ablated: Tensor | None
    """Likewise, ablated stream (None for a baseline)."""
    ce_random: Tensor | None
    """Ablated stream with random masks of the same k (the control)."""
    attn_mask: Tensor | None
    """(batch, pos, n_layers, d_model)."""
    mlp_mask: Tensor | None
    """(batch, pos, n_layers, d_mlp)."""
    random_attn_mask: Tensor | None
    random_mlp_mask: Tensor | None
    mlp_post: Tensor
    """(batch, pos, n_layers, d_mlp) clean MLP activations (after gelu_new)."""
    final_clean: Tensor
    """(batch, pos, d_model) the clean stream's final LayerNorm output."""


def _random_mask_hook(k: int, generator: torch.Generator, store: dict, key: str):
    def hook(mask: Tensor, hp) -> Tensor:
        # drawn where the mask is (the generator lives there): no host round trip per layer
        noise = torch.rand(mask.shape, generator=generator, device=mask.device)
        store.setdefault(key, []).append(r := hard_topk(noise, k))
        return r

    return hook


@torch.no_grad()
def run_batch(model: SelfAblatingTransformer, x: Tensor, y: Tensor, generator: torch.Generator) -> BatchView:
    L = model.cfg.n_layers
    names = [f"blocks.{i}.mlp.hook_post" for i in range(L)] + ["ln_final.hook_normalized"]
    ablating = model.cfg.self_ablating
    if ablating:
        names.append("ln_final.hook_normalized_ablated")
    out, cache = model.run_with_cache(x, names=names, return_logits=False)
    W = model.wte.weight
    ce_clean = per_token_cross_entropy(cache["ln_final.hook_normalized"], W, y)
    mlp_post = torch.stack([cache[f"blocks.{i}.mlp.hook_post"] for i in range(L)], dim=2)  # (B, T, L, d_mlp)
    if not ablating:
        return BatchView(x, ce_clean, None, None, None, None, None, None, mlp_post, cache["ln_final.hook_normalized"])
    ce_ablated = per_token_cross_entropy(cache["ln_final.hook_normalized_ablated"], W, y)
    rnd: dict[str, list[Tensor]] = {}
    hooks = [(f"blocks.{i}.hook_attn_mask", _random_mask_hook(model.cfg.k_attn, generator, rnd, "attn")) for i in range(L)]
    hooks += [(f"blocks.{i}.hook_mlp_mask", _random_mask_hook(model.cfg.k_mlp, generator, rnd, "mlp")) for i in range(L)]
    with model.hooks(hooks):
        _, control = model.run_with_cache(x, names=["ln_final.hook_normalized_ablated"], return_logits=False)
    ce_random = per_token_cross_entropy(control["ln_final.hook_normalized_ablated"], W, y)
    return BatchView(x, ce_clean, ce_ablated, ce_random, out.attn_mask, out.mlp_mask,
                     torch.stack(rnd["attn"], dim=2), torch.stack(rnd["mlp"], dim=2), mlp_post,
                     cache["ln_final.hook_normalized"])


# -- accumulators -----------------------------------------------------------------------------
# Each keeps its sums on the model's device and reads nothing back while the pass runs (a read
# makes the host wait for the device); `result` moves them to the host once.


class LossAccumulator:
    """Per-sequence loss sums, for means with bootstrap intervals over sequences."""

    def __init__(self) -> None:
        self.sums: dict[str, list[Tensor]] = {"clean": [], "ablated": [], "random_mask": []}
        self.counts: list[int] = []

    def update(self, v: BatchView) -> None:
        self.counts += [v.tokens.shape[1]] * v.tokens.shape[0]
        for key, ce in (("clean", v.ce_clean), ("ablated", v.ce_ablated), ("random_mask", v.ce_random)):
            if ce is not None:
                self.sums[key].append(wide(ce).sum(dim=1))  # (batch,) on the device

    def result(self, n_resamples: int, seed: int) -> dict[str, dict[str, float]]:
        counts = np.asarray(self.counts, dtype=np.float64)
        res = {}
        for key, parts in self.sums.items():
            if not parts:
                continue
            sums = torch.cat(parts).double().cpu().numpy()  # (sequences,)
            per_token = np.asarray(sums) / counts  # a sequence's mean, weighted by its length
            mean = float(np.sum(sums) / counts.sum())
            lo, hi = M.bootstrap_ci(per_token, counts, n_resamples, seed)
            res[key] = {"ce": mean, "ce_ci95": [lo, hi], "ppl": float(np.exp(mean)),
                        "ppl_ci95": [float(np.exp(lo)), float(np.exp(hi))]}
        return res


TOKEN_CLASSES = ("capitalised", "punctuation", "number", "newline", "function_word", "other")
_FUNCTION_WORDS = {"the", "a", "an", "and", "to", "of", "was", "is", "he", "she", "it", "they", "in",
                   "on", "with", "her", "his", "that", "for", "but", "so", "at", "you", "i"}


def classify_token(text: str) -> int:
    """Index into TOKEN_CLASSES of a decoded token (capitalised words are mostly names here)."""
    word = text.strip()
    rules = [
        bool(re.fullmatch(r"[A-Z][a-z]+", word)) and text.startswith(" "),
        bool(word) and bool(re.fullmatch(r"[^\w\s]+", word)),
        word.isdigit(),
        "\n" in text or text == "<|endoftext|>",
        word.lower() in _FUNCTION_WORDS,
    ]
    return rules.index(True) if any(rules) else len(rules)


class MaskAccumulator:
    """Selection frequency (overall and per token class) and persistence of one kind of mask."""

    def __init__(self, n_layers: int, width: int, token_class: Tensor, device: torch.device = torch.device("cpu")):
        zeros = lambda *shape: torch.zeros(*shape, dtype=wide_dtype(device), device=device)  # noqa: E731
        self.freq_sum = zeros(n_layers, width)
        self.class_sum = zeros(len(TOKEN_CLASSES), n_layers, width)
        self.class_count = zeros(len(TOKEN_CLASSES))
        self.kept, self.kept_again = zeros(n_layers), zeros(n_layers)
        self.random_kept, self.random_kept_again = zeros(n_layers), zeros(n_layers)
        self.n = 0
        self.token_class = token_class.to(device)

    def update(self, tokens: Tensor, mask: Tensor, random_mask: Tensor) -> None:
        m = mask.to(self.freq_sum.dtype)
        flat = m.flatten(0, 1)  # (B*T, L, W)
        self.freq_sum += flat.sum(0)
        cls = self.token_class[tokens.flatten()]
        self.class_sum.index_add_(0, cls, flat)
        # index_add_, not bincount: bincount sizes its output from the data, a read on the host
        self.class_count.index_add_(0, cls, torch.ones_like(cls, dtype=self.class_count.dtype))
        self.n += flat.shape[0]
        for kept, again, mm in ((self.kept, self.kept_again, m),
                                (self.random_kept, self.random_kept_again, random_mask.to(m.dtype))):
            kept += mm[:, :-1].sum(dim=(0, 1, 3))
            again += (mm[:, :-1] * mm[:, 1:]).sum(dim=(0, 1, 3))

    def on_host(self) -> None:
        """Every sum moved to the host in float64, once, for the results."""
        for name in ("freq_sum", "class_sum", "class_count", "kept", "kept_again", "random_kept", "random_kept_again"):
            setattr(self, name, getattr(self, name).cpu().double())

    def result(self, k: int, top: int = 5) -> dict:
        self.on_host()
        freq = self.freq_sum / self.n
        overall = freq / freq.sum(-1, keepdim=True)
        classes = {}
        for c, name in enumerate(TOKEN_CLASSES):
            if self.class_count[c] == 0:
                continue
            f = self.class_sum[c] / self.class_count[c]
            # Total-variation distance between this class's and all tokens' selection distributions.
            tv = 0.5 * (f / f.sum(-1, keepdim=True) - overall).abs().sum(-1)
            classes[name] = {"tokens": int(self.class_count[c]), "tv_from_all_tokens": tv.tolist(),
                             "top_units": f.topk(min(top, f.shape[-1]), dim=-1).indices.tolist()}
        width = freq.shape[-1]
        return {
            "k": k, "width": width, "tokens": self.n,
            "dead_fraction": M.dead_fraction(freq).tolist(),
            "always_on_fraction": M.always_on_fraction(freq).tolist(),
            "entropy": M.mask_entropy(freq).tolist(), "entropy_uniform": float(np.log(width)),
            "entropy_fixed": float(np.log(k)),
            "persistence": (self.kept_again / self.kept).tolist(),
            "persistence_random_mask": (self.random_kept_again / self.random_kept).tolist(),
            "selection_frequency": freq.tolist(),
            "token_classes": classes,
        }


class ActivationAccumulator:
    """Sparsity of the clean MLP activations (per layer, averaged over tokens), per-token-id mean
    activations (for selectivity) and each neuron's top-activating positions."""

    def __init__(self, n_layers: int, d_mlp: int, frequent_ids: np.ndarray, vocab_size: int, top: int, eps: float,
                 device: torch.device = torch.device("cpu")):
        self.eps, self.top, self.n = eps, top, 0
        wide_ = wide_dtype(device)
        self.stats = {name: torch.zeros(n_layers, dtype=wide_, device=device)
                      for name in ("near_zero", "hoyer", "gini", "kurtosis")}
        self.row_of = torch.full((vocab_size,), -1, dtype=torch.long, device="cpu")
        self.row_of[torch.from_numpy(frequent_ids)] = torch.arange(len(frequent_ids), device="cpu")
        self.row_of = self.row_of.to(device)
        self.id_sum = torch.zeros(len(frequent_ids), n_layers * d_mlp, dtype=wide_, device=device)
        self.id_count = torch.zeros(len(frequent_ids), dtype=wide_, device=device)
        self.top_vals = torch.full((n_layers * d_mlp, 0), float("-inf"), device=device)
        self.top_pos = torch.zeros((n_layers * d_mlp, 0), dtype=torch.long, device=device)

    def update(self, tokens: Tensor, mlp_post: Tensor, first_position: int) -> None:
        a = mlp_post.float()  # (B, T, L, d_mlp)
        B, T, L, D = a.shape
        per_layer = a.permute(2, 0, 1, 3).reshape(L, B * T, D)  # (L, B*T, d_mlp)
        wide_ = self.id_sum.dtype
        for name, fn in (("hoyer", M.hoyer_sparsity), ("gini", M.gini), ("kurtosis", M.kurtosis)):
            self.stats[name] += torch.stack([fn(x).to(wide_).sum() for x in per_layer])
        self.stats["near_zero"] += torch.stack([M.near_zero_fraction(x, self.eps).to(wide_).sum() for x in per_layer])
        self.n += B * T
        units = a.reshape(B * T, L * D)  # (B*T, units)
        rows = self.row_of[tokens.flatten()]
        # Infrequent ids add zeros to row 0 instead of being selected out: a selection sizes its
        # result from the data, which the host would have to read.
        keep = (rows >= 0).to(wide_)
        rows = rows.clamp_min(0)
        self.id_sum.index_add_(0, rows, units.clamp_min(0).to(wide_) * keep[:, None])
        self.id_count.index_add_(0, rows, keep)
        pos = first_position + torch.arange(B * T, device=units.device)
        vals = torch.cat([self.top_vals, units.T], dim=1)
        idx = torch.cat([self.top_pos, pos.expand(L * D, -1)], dim=1)
        best = vals.topk(min(self.top, vals.shape[1]), dim=1)
        self.top_vals, self.top_pos = best.values, idx.gather(1, best.indices)

    def sparsity(self) -> dict[str, list[float]]:
        """Per layer, the token-average of each activation-sparsity measure."""
        return {name: (s.cpu().double() / self.n).tolist() for name, s in self.stats.items()}

    def on_host(self) -> None:
        """The per-id sums and the top examples moved to the host, once, for the results."""
        self.id_sum, self.id_count = self.id_sum.cpu().double(), self.id_count.cpu().double()
        self.top_vals, self.top_pos = self.top_vals.cpu(), self.top_pos.cpu()

    def specialisation(self, raw_tokens: np.ndarray, decode, n_layers: int, shown: int = 5,
                       context: int = 10, min_count: int = 20) -> dict:
        """Per neuron: token entropy of its top activations, selectivity over frequent token ids,
        and its top examples (token with the preceding context); summaries per layer."""
        self.on_host()
        L = n_layers
        D = self.id_sum.shape[1] // L
        frequent = self.id_count >= min_count
        means = self.id_sum[frequent] / self.id_count[frequent].unsqueeze(1)  # (ids, units)
        selectivity = M.selectivity_index(means) if frequent.any() else torch.zeros(L * D, device="cpu")
        top_tokens = raw_tokens[self.top_pos.numpy()]  # (units, top)
        entropy = np.array([M.token_entropy(row) for row in top_tokens])
        neurons = []
        for u in range(L * D):
            examples = [{"activation": float(self.top_vals[u, j]), "token": decode([int(raw_tokens[p])]),
                         "context": decode([int(t) for t in raw_tokens[max(0, p - context) : p]])}
                        for j, p in enumerate(self.top_pos[u, :shown].tolist())]
            neurons.append({"layer": u // D, "neuron": u % D, "top_token_entropy": float(entropy[u]),
                            "selectivity": float(selectivity[u]), "top_examples": examples})
        per_layer = lambda x: [float(np.mean(x[l * D : (l + 1) * D])) for l in range(L)]  # noqa: E731
        return {"top_k": self.top, "min_token_count": min_count, "frequent_token_ids": int(frequent.sum()),
                "mean_top_token_entropy": per_layer(entropy), "mean_selectivity": per_layer(selectivity.numpy()),
                "neurons": neurons}
