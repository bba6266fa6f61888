"""Attention as the model needs it: causal, and the ablated stream's two-stream rule.

Both have one signature on every backend: (batch, n_heads, pos, d_head) tensors in and out, scores
not divided by sqrt(d_head) (GPT-Neo's). On a float32 CPU with the `cpu` backend the C kernel
(`cpu_attention`) computes them; where the device's policy asks for them, Triton's kernels for
narrow heads (`triton_attention`); elsewhere PyTorch's fused attention, in the form the device
favours (`DevicePolicy.head_align`, `DevicePolicy.two_stream_masked`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_attention, triton_attention
from .policy import policy


def _pad_last(x: Tensor, width: int) -> Tensor:
    """Zero-pad the last dim of (B, H, T, D) to `width`: (B, H, T, width)."""
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def _aligned(d: int, device: torch.device) -> int:
    """d rounded up to the device's head alignment (`ops.DevicePolicy.head_align`)."""
    align = policy(device).head_align
    return -(-d // align) * align


def _fused(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
    """PyTorch's fused attention, unscaled, heads padded to the device's alignment; allowed None
    is causal. (B, H, Tq, Dh) -> (B, H, Tq, Dh)."""
    Dh, width = q.shape[-1], _aligned(q.shape[-1], q.device)
    z = F.scaled_dot_product_attention(_pad_last(q, width), _pad_last(k, width), _pad_last(v, width),
                                       attn_mask=allowed, is_causal=allowed is None, scale=1.0)
    return z if width == Dh else z[..., :Dh]  # (B, H, Tq, Dh)


def _triton(q: Tensor) -> bool:
    """The device's policy asks for the Triton kernels (`DevicePolicy.triton_attention`) and they run here."""
    return policy(q.device).triton_attention and triton_attention.available(q)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal softmax attention with unscaled scores. q, k, v: (B, H, T, Dh) -> (B, H, T, Dh)."""
    if cpu_attention.applies(q, k, v):
        return cpu_attention.causal(q, k, v)
    if _triton(q):
        return triton_attention.causal(q, k, v)
    return _fused(q, k, v, None)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """Softmax attention with unscaled scores over the keys `allowed` (bool (Tq, Tk)) lets each
    query see. q: (B, H, Tq, Dh); k, v: (B, H, Tk, Dh) -> (B, H, Tq, Dh)."""
    return _fused(q, k, v, allowed)


def two_stream_attention(q: Tensor, clean_k: Tensor, clean_v: Tensor, own_k: Tensor, own_v: Tensor) -> Tensor:
    """The two-stream rule: query t sees the clean keys j < t and its own ablated key t.
    All (B, H, pos, Dh) -> (B, H, pos, Dh). On a float32 CPU `cpu_attention` computes
    the rule directly, and so do `triton_attention`'s kernels where the policy asks for them;
    elsewhere one fused call over [clean | own] keys with the rule as its mask, or
    (`ops.DevicePolicy.two_stream_masked` off) `_attend_with_self_key`."""
    if cpu_attention.applies(q, clean_k, own_k):
        return cpu_attention.two_stream(q, clean_k, clean_v, own_k, own_v)
    if _triton(q):
        return triton_attention.two_stream(q, clean_k, clean_v, own_k, own_v)
    if policy(q.device).two_stream_masked:
        keys = torch.cat([clean_k, own_k], dim=2)  # (B, H, 2 * pos, Dh)
        values = torch.cat([clean_v, own_v], dim=2)  # (B, H, 2 * pos, Dh)
        return _fused(q, keys, values, self_ablated_allowed(q.shape[2], q.device))
    return _attend_with_self_key(q, clean_k, clean_v, own_k, own_v)


def _attend_with_self_key(q: Tensor, clean_k: Tensor, clean_v: Tensor, own_k: Tensor, own_v: Tensor) -> Tensor:
    """The two-stream rule in one causal fused call over pos keys instead of a masked one over
    2 * pos (same result; tested against the masked form).

    Put a "self" key first, k* = [0, ..., 0, 1], then the clean keys 0..pos-2 (no ablated query
    sees the last one), and give each query one more dimension holding its own-key score
    q_t . k_own_t: then q~_t . k* is that score and q~_t . [k_j, 0] = q_t . k_j, and causal masking
    lets query t see exactly k* and the clean keys 0..t-1. The self key's value [0, ..., 0, 1]
    returns its softmax weight w_t in column Dh of the output, so z_t = sum_j<t p_tj v_j + w_t * v_own_t.
    """
    B, H, T, Dh = q.shape
    width = _aligned(Dh + 1, q.device)
    own_score = (q * own_k).sum(-1, keepdim=True)  # (B, H, T, 1)
    self_key = F.pad(q.new_ones(B, H, 1, 1), (Dh, width - Dh - 1))  # (B, H, 1, width): 1 at Dh, else 0
    queries = _pad_last(torch.cat([q, own_score], -1), width)  # (B, H, T, width)
    keys = torch.cat([self_key, _pad_last(clean_k[:, :, :-1], width)], dim=2)  # (B, H, T, width)
    values = torch.cat([self_key, _pad_last(clean_v[:, :, :-1], width)], dim=2)  # (B, H, T, width)
    z = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=1.0)
    return z[..., :Dh] + z[..., Dh : Dh + 1] * own_v  # (B, H, T, Dh)


_ALLOWED: dict[tuple[str, int, int, torch.device], Tensor] = {}


def windowed_allowed(pos: int, window: int, device: torch.device) -> Tensor | None:
    """GPT-Neo's local attention: query t sees the keys t - window < j <= t. bool (pos, pos), or
    None where the window (0: none) reaches every earlier key: plain causal attention."""
    if not 0 < window < pos:
        return None
    key = ("window", pos, window, torch.device(device))
    if key not in _ALLOWED:
        ones = torch.ones(pos, pos, dtype=torch.bool, device=device)
        _ALLOWED[key] = ones.tril() & ones.triu(diagonal=1 - window)  # 0 <= t - j < window
    return _ALLOWED[key]


def self_ablated_allowed(pos: int, device: torch.device, window: int = 0) -> Tensor:
    """Which keys an ablated query may see, over [clean keys | ablated keys]: (pos, 2 * pos).

    Query t sees the clean keys j < t (within `window` of t, if given) and its own ablated key t,
    so that the ablation of one token never leaks into another token's computation. Made once per
    length, window and device.
    """
    key = ("ablated", pos, window, torch.device(device))
    if key not in _ALLOWED:
        eye = torch.eye(pos, dtype=torch.bool, device=device)
        past = torch.ones(pos, pos, dtype=torch.bool, device=device).tril(diagonal=-1)
        band = windowed_allowed(pos, window, device)
        if band is not None:
            past &= band
        _ALLOWED[key] = torch.cat([past, eye], dim=1)
    return _ALLOWED[key]
