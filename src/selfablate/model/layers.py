"""Building blocks of the GPT-Neo-style decoder: attention, MLP, mask head, block.

Each module serves both streams. The stream is passed in (it picks the hook points), and the
ablated stream additionally gets its unit masks and the clean keys/values of the same layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..config import ModelConfig
from .hooks import HookPoint, Stream, add_hook_points, hook


class KV(NamedTuple):
    """Keys and values of one layer, each (batch, n_heads, pos, d_head)."""

    k: Tensor
    v: Tensor


def attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, pattern: HookPoint) -> Tensor:
    """Softmax attention with unscaled scores (GPT-Neo does not divide by sqrt(d_head)).

    q: (B, H, Tq, Dh); k, v: (B, H, Tk, Dh); allowed: bool (Tq, Tk), or None for causal. A fused
    kernel (`ops`) runs unless someone hooks the pattern, which it never materialises.
    """
    if not pattern.active:
        return ops.causal_attention(q, k, v) if allowed is None else ops.masked_attention(q, k, v, allowed)
    if allowed is None:
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))  # (B, H, Tq, Tk)
    return pattern(scores.softmax(dim=-1)) @ v


class Attention(nn.Module):
    """Multi-head causal self-attention; its d_model context dimensions are the ablatable units."""

    def __init__(self, cfg: ModelConfig, window: int = 0):
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.window = window  # GPT-Neo's local attention (0: global); see ModelConfig.attention_window
        self.q_proj = ops.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = ops.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = ops.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.out_proj = ops.Linear(cfg.d_model, cfg.d_model)
        add_hook_points(self, "hook_q", "hook_k", "hook_v", "hook_pattern", "hook_z")

    def _split_heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, Dh)

    def forward(self, x: Tensor, stream: Stream, unit_mask: Tensor | None = None,
                clean_kv: KV | None = None) -> tuple[Tensor, KV]:
        """x: (B, T, d_model) normalised residual. unit_mask: (B, T, d_model) or None.
        clean_kv: the clean stream's keys/values of this layer; given, the two-stream rule applies.
        Returns the attention output (B, T, d_model) and this stream's own keys/values."""
        B, T, D = x.shape
        q, k, v = ops.linears(x, (self.q_proj, self.k_proj, self.v_proj))  # (B, T, D) each
        q = hook(self, "hook_q", stream)(self._split_heads(q))
        k = hook(self, "hook_k", stream)(self._split_heads(k))
        v = hook(self, "hook_v", stream)(self._split_heads(v))
        pattern = hook(self, "hook_pattern", stream)
        band = ops.windowed_allowed(T, self.window, x.device)  # None: causal (no window, or one >= T)
        if clean_kv is None:
            z = attend(q, k, v, band, pattern)
        elif not (pattern.active or band is not None):
            z = ops.two_stream_attention(q, clean_kv.k, clean_kv.v, k, v)
        else:  # the rule as a mask over [clean keys | ablated keys]: (pos, 2 * pos)
            keys = torch.cat([clean_kv.k, k], dim=2)  # (B, H, 2T, Dh)
            values = torch.cat([clean_kv.v, v], dim=2)  # (B, H, 2T, Dh)
            z = attend(q, keys, values, ops.self_ablated_allowed(T, x.device, self.window), pattern)
        z = z.transpose(1, 2)  # (B, T, H, Dh)
        if unit_mask is not None:
            z = z * unit_mask.view(B, T, self.n_heads, self.d_head)  # (B, T, H, Dh)
        z = hook(self, "hook_z", stream)(z)
        return self.out_proj(z.reshape(B, T, D)), KV(k, v)  # (B, T, d_model)


class MLP(nn.Module):
    """Two-layer MLP with gelu_new; its d_mlp post-activation neurons are the ablatable units."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc_in = ops.Linear(cfg.d_model, cfg.d_mlp)
        self.fc_out = ops.Linear(cfg.d_mlp, cfg.d_model)
        add_hook_points(self, "hook_pre", "hook_post")

    def forward(self, x: Tensor, stream: Stream, unit_mask: Tensor | None = None) -> Tensor:
        pre = hook(self, "hook_pre", stream)(self.fc_in(x))
        post = ops.gelu_new(pre, unit_mask)  # gelu_new as in GPT-Neo, times the mask in the same pass
        return self.fc_out(hook(self, "hook_post", stream)(post))


class MaskHead(nn.Module):
    """Linear relevance scores for n_layers layers of attention units and neurons.

    A local head (one per block) scores its own layer; the global head scores all layers at once.
    """

    def __init__(self, d_model: int, d_attn: int, d_mlp: int, n_layers: int = 1):
        super().__init__()
        self.n_layers = n_layers
        self.attn = ops.Linear(d_model, n_layers * d_attn)
        self.mlp = ops.Linear(d_model, n_layers * d_mlp)

    def forward(self, resid: Tensor) -> tuple[Tensor, Tensor]:
        """resid (B, T, d_model) -> scores (L, B, T, d_model) and (L, B, T, d_mlp) for its
        n_layers = L layers (a local head's L is 1). In float32 (or wider)
        whatever the autocast state or the model's dtype: in bf16, with 8 bits of mantissa, the
        k-th and (k+1)-th scores tie in many rows, and the top-k's cut with them."""
        B, T, _ = resid.shape
        x = ops.at_least_fp32(resid)
        with torch.autocast(x.device.type, enabled=False):
            attn, mlp = _linears_in(x, (self.attn, self.mlp))  # (B, T, L * width) each
        if self.n_layers == 1:  # (B, T, width) -> (1, B, T, width), no copy
            return attn.unsqueeze(0), mlp.unsqueeze(0)
        # (B, T, L, width) -> (L, B, T, width): layers first, each layer's slice contiguous.
        return tuple(s.view(B, T, self.n_layers, -1).permute(2, 0, 1, 3).contiguous() for s in (attn, mlp))


def _linears_in(x: Tensor, layers: tuple[nn.Linear, ...]) -> tuple[Tensor, ...]:
    """Each layer(x), computed in x's dtype: together (`ops.linears`) when the weights already
    have it, else each with its weights cast."""
    if all(layer.weight.dtype == x.dtype for layer in layers):
        return ops.linears(x, layers)
    return tuple(F.linear(x, layer.weight.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))
                 for layer in layers)


class BlockMasks(NamedTuple):
    """One layer's unit masks: attn (B, T, d_model) and mlp (B, T, d_mlp)."""

    attn: Tensor
    mlp: Tensor


class Block(nn.Module):
    """Pre-LayerNorm transformer block, with an optional local mask head on its input residual."""

    def __init__(self, cfg: ModelConfig, local_head: bool, window: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.attn = Attention(cfg, window)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.mlp = MLP(cfg)
        self.mask_head = MaskHead(cfg.d_model, cfg.d_model, cfg.d_mlp) if local_head else None
        add_hook_points(self, "hook_resid_pre", "hook_attn_out", "hook_resid_mid",
                        "hook_mlp_out", "hook_resid_post")
        # Scores and masks exist once per layer (they are read off the clean stream).
        for name in ("hook_attn_scores", "hook_mlp_scores", "hook_attn_mask", "hook_mlp_mask"):
            self.add_module(name, HookPoint())

    def forward(self, x: Tensor, stream: Stream, masks: BlockMasks | None = None,
                clean_kv: KV | None = None) -> tuple[Tensor, KV]:
        x = hook(self, "hook_resid_pre", stream)(x)
        attn_out, kv = self.attn(self.ln_1(x), stream, masks and masks.attn, clean_kv)
        x = hook(self, "hook_resid_mid", stream)(x + hook(self, "hook_attn_out", stream)(attn_out))
        mlp_out = self.mlp(self.ln_2(x), stream, masks and masks.mlp)
        x = hook(self, "hook_resid_post", stream)(x + hook(self, "hook_mlp_out", stream)(mlp_out))
        return x, kv
