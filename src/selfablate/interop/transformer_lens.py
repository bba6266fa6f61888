"""Export the clean model to a TransformerLens 2.x `HookedTransformer` (extra `tl`).

TransformerLens 2.x is what the paper's tools (auto-circuit, SAELens) accept; version 4 removed
`HookedTransformer`, so the extra pins transformer-lens >= 2.16, < 3. The exported model runs
the clean stream; `ablation_hooks` reproduces the ablated stream at one chosen position.

A compact-vocabulary model exports over its own ids (d_vocab = cfg.vocab_size; translate tokens
with `data.vocab.to_model_ids`), or with full_vocab=True back over GPT-2's 50257 ids, exactly: every id
the model lacks reads <unk>'s embedding, and its logit is <unk>'s minus log(number of such ids)
(through the unembedding bias b_U), so together they carry <unk>'s probability and every kept
id's probability is unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from ..data.tokenizer import VOCAB_SIZE
from ..errors import SelfAblateError
from ..model import SelfAblatingTransformer
from . import optional_import
from ..data.vocab import token_lookup, unk_id


def _transformer_lens() -> Any:
    return optional_import("transformer_lens", "tl", "exporting to TransformerLens (transformer-lens >= 2.16, < 3)")


def hooked_transformer_config(model: SelfAblatingTransformer, full_vocab: bool = False, **overrides: Any) -> Any:
    """The HookedTransformerConfig of our clean stream: GPT-Neo-style, unscaled attention."""
    c = model.cfg
    kwargs = dict(n_layers=c.n_layers, d_model=c.d_model, n_ctx=c.n_ctx, d_head=c.d_head, n_heads=c.n_heads,
                  d_mlp=c.d_mlp, d_vocab=VOCAB_SIZE if full_vocab else c.vocab_size, act_fn="gelu_new", normalization_type="LN", eps=c.ln_eps,
                  use_attn_scale=False, positional_embedding_type="standard", default_prepend_bos=False,
                  original_architecture="GPTNeoForCausalLM", dtype=model.wte.weight.dtype)
    return _transformer_lens().HookedTransformerConfig(**(kwargs | overrides))


def _embedding(model: SelfAblatingTransformer, full_vocab: bool) -> tuple[Tensor, Tensor]:
    """(vocab, d_model) embedding and (vocab,) unembedding bias, over GPT-2's ids if full_vocab."""
    w = model.wte.weight
    if not full_vocab or not model.cfg.compact_vocab:
        return w, w.new_zeros(w.shape[0])
    lookup = torch.as_tensor(token_lookup(model), device=w.device)  # GPT-2 id -> model id
    missing = lookup == unk_id(model)
    bias = w.new_zeros(VOCAB_SIZE)
    bias[missing] = -math.log(int(missing.sum()))  # the missing ids share <unk>'s probability
    return w[lookup], bias


def hooked_transformer_state_dict(model: SelfAblatingTransformer, full_vocab: bool = False) -> dict[str, Tensor]:
    """Our weights under TransformerLens's names and layouts (W_Q: (n_heads, d_model, d_head),
    W_O: (n_heads, d_head, d_model), W_in: (d_model, d_mlp), W_U: (d_model, d_vocab))."""
    c = model.cfg
    H, Dh, D = c.n_heads, c.d_head, c.d_model
    emb, bias = _embedding(model, full_vocab)
    sd = {"embed.W_E": emb, "pos_embed.W_pos": model.wpe.weight,
          "ln_final.w": model.ln_final.weight, "ln_final.b": model.ln_final.bias,
          "unembed.W_U": emb.T, "unembed.b_U": bias}
    for l, block in enumerate(model.blocks):
        p, attn = f"blocks.{l}.", block.attn
        for name, proj in (("Q", attn.q_proj), ("K", attn.k_proj), ("V", attn.v_proj)):
            sd[p + f"attn.W_{name}"] = proj.weight.view(H, Dh, D).transpose(1, 2)  # (H, D, Dh)
            sd[p + f"attn.b_{name}"] = proj.weight.new_zeros(H, Dh)
        sd[p + "attn.W_O"] = attn.out_proj.weight.T.reshape(H, Dh, D)  # (H, Dh, D)
        sd[p + "attn.b_O"] = attn.out_proj.bias
        sd |= {p + "ln1.w": block.ln_1.weight, p + "ln1.b": block.ln_1.bias,
               p + "ln2.w": block.ln_2.weight, p + "ln2.b": block.ln_2.bias,
               p + "mlp.W_in": block.mlp.fc_in.weight.T, p + "mlp.b_in": block.mlp.fc_in.bias,
               p + "mlp.W_out": block.mlp.fc_out.weight.T, p + "mlp.b_out": block.mlp.fc_out.bias}
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def weight_l1_tl(model: SelfAblatingTransformer) -> float:
    """The paper's "L1", as the authors compute it: mean |w| over the parameters of the model
    converted to TransformerLens, i.e. over `hooked_transformer_state_dict` (no mask heads; the
    zero q/k/v and unembedding biases the conversion adds counted; the tied embedding counted
    twice, as W_E and W_U)."""
    values = list(hooked_transformer_state_dict(model).values())
    return sum(v.abs().sum().item() for v in values) / sum(v.numel() for v in values)


def to_hooked_transformer(model: SelfAblatingTransformer, full_vocab: bool = False, **cfg_overrides: Any) -> Any:
    """A HookedTransformer computing our clean stream (logits equal to ours to float rounding).
    full_vocab: a compact-vocabulary model over GPT-2's ids (see the module docstring).
    cfg_overrides go to HookedTransformerConfig, e.g. use_attn_result=True, use_split_qkv_input=True,
    use_hook_mlp_in=True for auto-circuit."""
    if any(0 < w < model.cfg.n_ctx for w in model.cfg.attention_window):
        raise SelfAblateError("a model with GPT-Neo local attention layers is not exported to TransformerLens here "
                              "(its windows would be dropped)")
    tl = _transformer_lens()
    ht = tl.HookedTransformer(hooked_transformer_config(model, full_vocab, **cfg_overrides))
    missing, unexpected = ht.load_state_dict(hooked_transformer_state_dict(model, full_vocab), strict=False)
    buffers = {name for name, _ in ht.named_buffers()}
    if unexpected or set(missing) - buffers:
        raise SelfAblateError(f"TransformerLens layout mismatch: missing {sorted(set(missing) - buffers)[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return ht.to(model.wte.weight.device).eval()


HookList = list[tuple[str, Callable[..., Tensor]]]


@torch.no_grad()
def ablation_hooks(model: SelfAblatingTransformer, tokens: Tensor, position: int) -> HookList:
    """TransformerLens forward hooks that turn the exported clean model into our ablated stream
    at one position: run the HookedTransformer on tokens[:, : position + 1] with these hooks and
    its logits at `position` equal our ablated logits there. (Masking position t only leaves the
    positions before t clean, so t reads their clean keys and values and its own ablated ones:
    exactly the two-stream rule.)"""
    if not model.cfg.self_ablating:
        raise SelfAblateError("a baseline model (ablation='none') has no ablated stream")
    out = model(tokens[:, : position + 1])
    attn = out.attn_mask[:, position]  # (batch, n_layers, d_model)
    mlp = out.mlp_mask[:, position]  # (batch, n_layers, d_mlp)
    H, Dh = model.cfg.n_heads, model.cfg.d_head

    def masker(mask: Tensor) -> Callable[..., Tensor]:
        def fn(act: Tensor, hook: Any) -> Tensor:
            act = act.clone()
            act[:, position] = act[:, position] * mask.reshape(act[:, position].shape).to(act.dtype)
            return act
        return fn

    hooks: HookList = []
    for l in range(model.cfg.n_layers):
        hooks.append((f"blocks.{l}.attn.hook_z", masker(attn[:, l].reshape(-1, H, Dh))))  # (batch, H, Dh)
        hooks.append((f"blocks.{l}.mlp.hook_post", masker(mlp[:, l])))
    return hooks
