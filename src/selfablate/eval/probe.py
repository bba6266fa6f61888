"""Leakage probe: can a linear read-out of a position's mask bits predict its next token?

The mask is computed from the clean stream, which knows the context, so some predictive power is
legitimate; what matters is the comparison with (a) random masks of the same k, which carry
nothing, (b) the current token alone (a bigram read-out), and (c) the class prior. A mask that
smuggles the answer from the clean pass into the ablated one stands out against all three.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..runtime import wide


def softmax_probe(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, n_classes: int,
                  epochs: int = 16, batch_size: int = 256, lr: float = 0.05, weight_decay: float = 1e-4,
                  seed: int = 0) -> dict[str, float]:
    """Multinomial logistic regression trained with minibatch Adam (seeded), early-stopped on the
    CE of a held-back fifth of the training positions (so a probe on uninformative features ends
    near the class prior instead of overfitting); held-out CE (nats) and accuracy on the test set,
    and whether it learned at all (some epoch beat its start, the prior of the fitted positions)."""
    g = torch.Generator().manual_seed(seed)  # a CPU generator: the order is the same on every device
    n_val = max(1, len(y_train) // 5)
    x_fit, y_fit, x_val, y_val = x_train[n_val:], y_train[n_val:], x_train[:n_val], y_train[:n_val]
    w = x_train.new_zeros(x_train.shape[1], n_classes, requires_grad=True)
    b = torch.log(torch.bincount(y_fit, minlength=n_classes).float() + 1).requires_grad_()  # start at the prior
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    best = (F.cross_entropy(x_val @ w + b, y_val).item(), w.detach().clone(), b.detach().clone())
    learned = False
    for _ in range(epochs):
        for idx in torch.randperm(len(y_fit), generator=g, device="cpu").to(x_fit.device).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(x_fit[idx] @ w + b, y_fit[idx]).backward()
            opt.step()
        with torch.no_grad():
            val = F.cross_entropy(x_val @ w + b, y_val).item()
        if val < best[0]:
            best, learned = (val, w.detach().clone(), b.detach().clone()), True
    _, w_best, b_best = best
    with torch.no_grad():
        logits = x_test @ w_best + b_best
        return {"ce": F.cross_entropy(logits, y_test).item(),
                "accuracy": (logits.argmax(-1) == y_test).float().mean().item(), "learned": learned}


def one_hot_classes(ids: Tensor, classes: Tensor, n_classes: int) -> Tensor:
    """Map ids to class indices: position in `classes`, or n_classes - 1 ('other')."""
    table = ids.new_full((int(max(ids.max(), classes.max())) + 1,), n_classes - 1)
    table[classes] = torch.arange(len(classes), device=ids.device)
    return table[ids]


def leakage_probe(mask_bits: Tensor, random_bits: Tensor, current: Tensor, targets: Tensor,
                  residual: Tensor | None = None, top_classes: int = 512, epochs: int = 16, seed: int = 0) -> dict:
    """mask_bits, random_bits (n, features) 0/1; current, targets (n,) token ids; residual
    (n, d_model) the clean final residual, whose probe is the ceiling: what the model knows.
    Even-indexed positions train the probes, odd ones test them. Targets outside the
    `top_classes` most frequent next tokens (in the training half) share one 'other' class."""
    train, test = slice(0, None, 2), slice(1, None, 2)
    counts = torch.bincount(targets[train])
    classes = counts.argsort(descending=True)[:top_classes]
    classes = classes[counts[classes] > 0]
    n_classes = len(classes) + 1
    y = one_hot_classes(targets, classes, n_classes)
    cur = F.one_hot(one_hot_classes(current, classes, n_classes), n_classes).float()
    prior = wide(torch.bincount(y[train], minlength=n_classes)) + 1.0  # add-one smoothed
    prior_ce = float(-(prior / prior.sum()).log()[y[test]].mean())
    # Scale each feature set to unit mean squared row norm, so one learning rate suits one-hot
    # (1 bit on) and mask features (n_layers * (k_attn + k_mlp) bits on) alike.
    scaled = lambda x: x / x.sum(dim=1).mean().clamp_min(1).sqrt()  # noqa: E731
    feats = {"mask": scaled(mask_bits.float()), "random_mask": scaled(random_bits.float()), "current_token": cur}
    if residual is not None:
        feats["clean_residual"] = residual.float() / residual.float().norm(dim=1).mean().clamp_min(1e-12)
    results = {name: softmax_probe(x[train], y[train], x[test], y[test], n_classes, epochs, seed=seed)
               for name, x in feats.items()}
    results["prior"] = {"ce": prior_ce, "accuracy": float((y[test] == int(prior[:-1].argmax())).float().mean())}
    # A probe that never beat its start (too few positions for the classes) measures nothing: then
    # the output says so instead of a gain (the mask's and the random mask's CE would both be the
    # prior of the fitted positions, equal to many digits).
    learned = results["mask"]["learned"] or results.get("clean_residual", {}).get("learned", False)
    gain = results["random_mask"]["ce"] - results["mask"]["ce"] if learned else None
    out = {"classes": n_classes, "train_positions": int(y[train].numel()), "test_positions": int(y[test].numel()),
           "probes": results, "status": "ok" if learned else "probe did not learn", "mask_gain_over_random_nats": gain}
    if residual is not None:  # 1: the mask exposes all the clean stream's next-token knowledge
        ceiling = results["random_mask"]["ce"] - results["clean_residual"]["ce"]
        out["mask_share_of_residual_gain"] = None if gain is None else gain / max(1e-9, ceiling)
    return out
