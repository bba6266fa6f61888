"""The self-ablating transformer: a clean stream, a mask from it, and an ablated stream."""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from .. import ops
from ..config import ModelConfig
from ..errors import SelfAblateError
from .hooks import HookedModule, HookPoint, Stream, add_hook_points, hook
from .layers import KV, Block, BlockMasks, MaskHead
from .losses import combined_loss, cross_entropy


class ForwardOutput(NamedTuple):
    """What `SelfAblatingTransformer.forward` returns."""

    logits_clean: Tensor
    """(batch, pos, vocab) logits of the clean stream."""
    logits_ablated: Tensor | None
    """(batch, pos, vocab) logits of the ablated stream; None for a baseline (ablation='none')."""
    attn_mask: Tensor | None
    """(batch, pos, n_layers, d_model) attention-unit mask (exactly k_attn ones per row if hard);
    None for a baseline or with return_masks=False."""
    mlp_mask: Tensor | None
    """(batch, pos, n_layers, d_mlp) neuron mask; None as attn_mask."""
    loss: Tensor | None
    """a * loss_clean + b * loss_ablated + c * loss_recon (just loss_clean for a baseline)."""
    loss_clean: Tensor | None
    """Cross-entropy of the clean stream (nats/token)."""
    loss_ablated: Tensor | None
    """Cross-entropy of the ablated stream (nats/token)."""
    loss_recon: Tensor | None
    """Reconstruction loss between the normalised clean and ablated residuals (without a graph
    when its weight c is 0: it is then only reported)."""


class StreamRun(NamedTuple):
    """The residuals and keys/values of one pass of one stream."""

    resid_pre: list[Tensor]
    """Each block's input (batch, pos, d_model)."""
    resid_post: list[Tensor]
    """Each block's output (batch, pos, d_model)."""
    kv: list[KV]
    """Each block's keys and values."""
    final: Tensor
    """The final LayerNorm's output (batch, pos, d_model)."""


class FinalNorm(nn.LayerNorm):
    """ln_final, with the hook point `ln_final.hook_normalized` (and `_ablated`)."""

    def __init__(self, d_model: int, eps: float):
        super().__init__(d_model, eps=eps)
        add_hook_points(self, "hook_normalized")

    def forward(self, x: Tensor, stream: Stream = Stream.CLEAN) -> Tensor:  # type: ignore[override]
        return hook(self, "hook_normalized", stream)(super().forward(x))


class Scores(NamedTuple):
    """Every layer's unit scores, layers first so that each layer's slice is contiguous."""

    attn: Tensor
    """(n_layers, batch, pos, d_model) attention-unit scores."""
    mlp: Tensor
    """(n_layers, batch, pos, d_mlp) neuron scores."""


def _local_scores(model: "SelfAblatingTransformer", clean: StreamRun) -> Scores:
    """Each block's head reads the clean residual at that block's input."""
    per_layer = [block.mask_head(x) for block, x in zip(model.blocks, clean.resid_pre)]
    return Scores(*(torch.cat(s) for s in zip(*per_layer)))  # (1, ...) each -> (n_layers, batch, pos, width)


def _global_scores(model: "SelfAblatingTransformer", clean: StreamRun) -> Scores:
    """One head reads the final (normalised) clean residual and scores every layer at once."""
    return Scores(*model.global_mask_head(clean.final))


ScoreSource = Callable[["SelfAblatingTransformer", StreamRun], Scores]
SCORE_SOURCES: dict[str, tuple[ScoreSource, ...]] = {
    "none": (),
    "local": (_local_scores,),
    "global": (_global_scores,),
    "both": (_local_scores, _global_scores),  # scores added before the top-k
}


def _gpt_neo_init(model: "SelfAblatingTransformer") -> None:
    """GPT-Neo's: every Linear and Embedding weight N(0, init_std), Linear biases zero, LayerNorms (1, 0)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=model.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def _torch_default_init(model: "SelfAblatingTransformer") -> None:
    """The authors' model: every module keeps PyTorch's default (Linear U(+-1/sqrt(fan_in)) for
    weight and bias, Embedding N(0, 1), LayerNorm (1, 0)), except the tied embedding. They tie it by
    `wte.weight = lm_head.weight`, so the matrix is their LM head's nn.Linear(d_model, vocab):
    U(+-1/sqrt(d_model)), not the Embedding's N(0, 1), whose logits at initialisation would be
    about sqrt(d_model) times too large (a cross-entropy near 90 instead of ln(vocab))."""
    nn.init.kaiming_uniform_(model.wte.weight, a=math.sqrt(5))  # nn.Linear's own reset_parameters


INITS: dict[str, Callable[["SelfAblatingTransformer"], None]] = {
    "gpt-neo": _gpt_neo_init,
    "torch-default": _torch_default_init,
}
"""ModelConfig.init -> the function that initialises a new model's parameters."""


class SelfAblatingTransformer(HookedModule):
    """GPT-Neo-style decoder with a clean and a self-ablated residual stream.

    Tied embeddings, learned positions, pre-LayerNorm, gelu_new, unscaled attention scores.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.d_model)
        local = cfg.ablation in ("local", "both")
        self.blocks = nn.ModuleList(Block(cfg, local_head=local, window=cfg.window(l)) for l in range(cfg.n_layers))
        self.ln_final = FinalNorm(cfg.d_model, cfg.ln_eps)
        self.global_mask_head = (MaskHead(cfg.d_model, cfg.d_model, cfg.d_mlp, cfg.n_layers)
                                 if cfg.ablation in ("global", "both") else None)
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        if cfg.compact_vocab:  # model id i <-> GPT-2 id vocab_ids[i]; the last id is <unk> (`data.vocab`)
            self.register_buffer("vocab_ids", torch.zeros(cfg.vocab_size - 1, dtype=torch.long))
        INITS[cfg.init](self)
        self.setup_hooks()

    # -- the pieces -------------------------------------------------------------------------

    def embed(self, tokens: Tensor) -> Tensor:
        """tokens (batch, pos) -> token + position embeddings (batch, pos, d_model)."""
        if tokens.dim() != 2:
            raise SelfAblateError(f"tokens must be (batch, pos), got shape {tuple(tokens.shape)}")
        T = tokens.shape[1]
        if T > self.cfg.n_ctx:
            raise SelfAblateError(f"sequence of {T} tokens exceeds the context length n_ctx={self.cfg.n_ctx}")
        # Checked where it is free: reading a device tensor's min and max would make the host wait
        # for the device (the trainer checks each batch on the host before sending it).
        if ops.policy(tokens.device).host_reads_free and tokens.numel() and \
                not 0 <= int(tokens.min()) <= int(tokens.max()) < self.cfg.vocab_size:
            raise SelfAblateError(f"token ids must be in 0..{self.cfg.vocab_size - 1}")
        pos = torch.arange(T, device=tokens.device)
        return self.hook_embed(self.wte(tokens)) + self.hook_pos_embed(self.wpe(pos))

    def run_stream(self, x: Tensor, stream: Stream, attn_mask: Tensor | None = None,
                   mlp_mask: Tensor | None = None, clean_kv: list[KV] | None = None) -> StreamRun:
        """Run the blocks on embeddings x. Masks are (batch, pos, n_layers, width) or None;
        with clean_kv, attention follows the two-stream rule (see `layers.self_ablated_allowed`)."""
        masks = (None if attn_mask is None else
                 [BlockMasks(a, m) for a, m in zip(attn_mask.unbind(2), mlp_mask.unbind(2))])
        return self._run_blocks(x, stream, masks, clean_kv)

    def _run_blocks(self, x: Tensor, stream: Stream, masks: list[BlockMasks] | None,
                    clean_kv: list[KV] | None) -> StreamRun:
        """run_stream with per-layer masks. Per-layer lists all the way from the mask heads to the
        blocks, because a (batch, pos, n_layers, width) tensor on the loss path costs a strided
        copy of all masks in each direction, and another of their gradients, a step."""
        pre, post, kvs = [], [], []
        for layer, block in enumerate(self.blocks):
            pre.append(x)
            x, kv = block(x, stream, None if masks is None else masks[layer],
                          None if clean_kv is None else clean_kv[layer])
            post.append(x)
            kvs.append(kv)
        return StreamRun(pre, post, kvs, self.ln_final(x, stream))

    def unembed(self, final: Tensor) -> Tensor:
        """Tied LM head: final residual (batch, pos, d_model) -> logits (batch, pos, vocab)."""
        return final @ self.wte.weight.T

    def compute_masks(self, clean: StreamRun) -> list[BlockMasks]:
        """Relevance scores from the clean stream -> each layer's k-winners-take-all masks,
        (batch, pos, d_model) and (batch, pos, d_mlp). Scores and masks pass through each block's
        hook points. Every layer's top-k is taken in one call (two, with the neurons): one launch
        of each operator instead of one per layer."""
        per_source = [src(self, clean) for src in SCORE_SOURCES[self.cfg.ablation]]
        mask_fn, cfg = ops.MASK_FUNCTIONS[self.cfg.mask_fn], self.cfg
        attn = self._hooked("hook_attn_scores", functools.reduce(torch.add, (s.attn for s in per_source)))
        mlp = self._hooked("hook_mlp_scores", functools.reduce(torch.add, (s.mlp for s in per_source)))
        attn = self._hooked("hook_attn_mask", mask_fn(attn, cfg.k_attn, cfg.temperature_attn, cfg.topk_eps,
                                                      cfg.topk_gap_floor))
        mlp = self._hooked("hook_mlp_mask", mask_fn(mlp, cfg.k_mlp, cfg.temperature_mlp, cfg.topk_eps,
                                                    cfg.topk_gap_floor))
        return [BlockMasks(a, m) for a, m in zip(attn.unbind(0), mlp.unbind(0))]

    def _hooked(self, name: str, stacked: Tensor) -> Tensor:
        """(n_layers, ...) through each block's hook point `name`; restacked only if a hook
        replaced a layer's slice."""
        points = [block.get_submodule(name) for block in self.blocks]
        if not any(p.active for p in points):
            return stacked
        layers = stacked.unbind(0)
        out = [p(x) for p, x in zip(points, layers)]
        return stacked if all(o is x for o, x in zip(out, layers)) else torch.stack(out)

    # -- entry points -----------------------------------------------------------------------

    def forward(self, tokens: Tensor, targets: Tensor | None = None, return_logits: bool | None = None,
                return_masks: bool = True) -> ForwardOutput:
        """tokens (batch, pos); targets (batch, pos) next tokens, or None for no loss.

        return_logits: whether to materialise the (batch, pos, vocab) logits; by default (None),
        only when there are no targets. With targets and without logits, the losses come from
        the chunked LM head + cross-entropy, which never holds them (logits_* are None): the
        fast path, so `model(x, targets=y).loss` trains as fast as the trainer does.
        return_masks=False (training) skips stacking the per-layer masks (attn_mask, mlp_mask are None).
        """
        if return_logits is None:
            return_logits = targets is None
        x = self.embed(tokens)
        # The clean stream never depends on the ablated one, so it runs first and once; its
        # residuals feed the mask heads (local and global alike) and its keys/values the ablated stream.
        clean = self.run_stream(x, Stream.CLEAN)
        logits_clean = self.unembed(clean.final) if return_logits else None
        ce_clean = None if targets is None else self._lm_loss(clean.final, logits_clean, targets)
        if not self.cfg.self_ablating:
            return ForwardOutput(logits_clean, None, None, None, ce_clean, ce_clean, None, None)
        masks = self.compute_masks(clean)
        ablated = self._run_blocks(x, Stream.ABLATED, masks, clean_kv=clean.kv)
        # Off the loss path, so the stacks cost a forward copy and nothing in the backward pass.
        attn_mask, mlp_mask = ((torch.stack([getattr(m, f) for m in masks], dim=2) for f in BlockMasks._fields)
                               if return_masks else (None, None))  # (batch, pos, n_layers, width) each
        logits_ablated = self.unembed(ablated.final) if return_logits else None
        if targets is None:
            return ForwardOutput(logits_clean, logits_ablated, attn_mask, mlp_mask, None, None, None, None)
        ce_ablated = self._lm_loss(ablated.final, logits_ablated, targets)
        recon = self._reconstruction(clean, ablated)
        loss = combined_loss(ce_clean, ce_ablated, recon, self.cfg.coef_clean, self.cfg.coef_ablated,
                             self.cfg.coef_recon)
        return ForwardOutput(logits_clean, logits_ablated, attn_mask, mlp_mask, loss, ce_clean, ce_ablated, recon)

    def _reconstruction(self, clean: StreamRun, ablated: StreamRun) -> Tensor:
        """The reconstruction loss over every block's output and the final residual. With c = 0
        (the paper's runs) it is only reported: made without a graph, so a step runs none of its
        backward kernels and sends no zero gradients into every residual."""
        terms = clean.resid_post + [clean.final], ablated.resid_post + [ablated.final]
        if self.cfg.coef_recon == 0:  # a branch, not set_grad_enabled(flag): the compiler may trace c as a symbol
            with torch.no_grad():
                return ops.reconstruction_loss(*terms)
        return ops.reconstruction_loss(*terms)

    def _lm_loss(self, final: Tensor, logits: Tensor | None, targets: Tensor) -> Tensor:
        """CE from materialised logits, or from the fused chunked head when there are none."""
        if logits is not None:
            return cross_entropy(logits, targets)
        return ops.linear_cross_entropy(final, self.wte.weight, targets)

    def run_with_masks(self, tokens: Tensor, attn_mask: Tensor, mlp_mask: Tensor) -> Tensor:
        """One ordinary causal pass with the given unit masks applied at every position.

        masks: (batch, pos, n_layers, width), e.g. all ones but at one position, or random
        masks for a control. Returns logits (batch, pos, vocab).
        """
        run = self.run_stream(self.embed(tokens), Stream.CLEAN, attn_mask, mlp_mask)
        return self.unembed(run.final)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - (self.wte.weight.numel() + self.wpe.weight.numel() if non_embedding else 0)
