"""Export and import the clean model as a Hugging Face `GPTNeoForCausalLM` (extra `hf`), the
format of the public TinyStories models, so that ours and theirs can be compared directly.

GPT-Neo alternates global and local (windowed) attention; an imported model keeps each layer's
window (`ModelConfig.attention_window`) and runs exactly at any context up to its positions.
Export writes each layer's kind back. Mask heads are not part of the export (the clean
stream is), and a compact-vocabulary model cannot be exported: GPT-Neo's tied LM head has no
bias to give the ids it lacks their share of <unk>'s probability.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig
from ..errors import SelfAblateError
from ..model import SelfAblatingTransformer
from . import optional_import


def _transformers() -> Any:
    return optional_import("transformers", "hf", "Hugging Face interop")


def _pairs(n_layers: int) -> list[tuple[str, str]]:
    """(our parameter name, GPT-Neo's) for every weight of the clean stream."""
    pairs = [("wte.weight", "transformer.wte.weight"), ("wpe.weight", "transformer.wpe.weight"),
             ("ln_final.weight", "transformer.ln_f.weight"), ("ln_final.bias", "transformer.ln_f.bias")]
    names = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.q_proj": "attn.attention.q_proj", "attn.k_proj": "attn.attention.k_proj",
             "attn.v_proj": "attn.attention.v_proj", "attn.out_proj": "attn.attention.out_proj",
             "mlp.fc_in": "mlp.c_fc", "mlp.fc_out": "mlp.c_proj"}
    for l in range(n_layers):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                if not (kind == "bias" and ours[-6:] in ("q_proj", "k_proj", "v_proj")):
                    pairs.append((f"blocks.{l}.{ours}.{kind}", f"transformer.h.{l}.{theirs}.{kind}"))
    return pairs


def to_gpt_neo(model: SelfAblatingTransformer) -> Any:
    """A GPTNeoForCausalLM computing our clean stream."""
    c = model.cfg
    if c.compact_vocab:
        raise SelfAblateError("a compact-vocabulary model cannot be exported to GPT-Neo (its LM head has no bias)")
    tf = _transformers()
    eot = 50256 if c.vocab_size > 50256 else None  # GPT-2's <|endoftext|>
    windows = {c.window(l) for l in range(c.n_layers)} - {0}
    if len(windows) > 1:
        raise SelfAblateError(f"GPT-Neo has one window size for all its local layers, this model has {sorted(windows)}")
    hf_cfg = tf.GPTNeoConfig(vocab_size=c.vocab_size, max_position_embeddings=c.n_ctx, hidden_size=c.d_model,
                             num_layers=c.n_layers, num_heads=c.n_heads,
                             attention_types=[[["local" if c.window(l) else "global"], 1] for l in range(c.n_layers)],
                             intermediate_size=c.d_mlp, activation_function="gelu_new", layer_norm_epsilon=c.ln_eps,
                             window_size=windows.pop() if windows else c.n_ctx, embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0,
                             tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot)
    hf = tf.GPTNeoForCausalLM(hf_cfg).to(device=model.wte.weight.device, dtype=model.wte.weight.dtype)
    ours, theirs = model.state_dict(), hf.state_dict()
    with torch.no_grad():
        for a, b in _pairs(c.n_layers):
            theirs[b].copy_(ours[a])
    hf.tie_weights()
    return hf.eval()


def gpt_neo_architecture(h: Any) -> ModelConfig:
    """Our baseline's ModelConfig for a GPTNeoConfig `h` (every layer's window kept)."""
    kinds = set(h.attention_layers)
    if not kinds <= {"global", "local"}:
        raise SelfAblateError(f"unsupported GPT-Neo attention types {sorted(kinds)}")
    if h.activation_function != "gelu_new":
        raise SelfAblateError(f"only gelu_new GPT-Neo models import exactly (got {h.activation_function})")
    windows = tuple(h.window_size if kind == "local" else 0 for kind in h.attention_layers)
    return ModelConfig(vocab_size=h.vocab_size, n_ctx=h.max_position_embeddings, d_model=h.hidden_size,
                       n_layers=h.num_layers, n_heads=h.num_heads, d_mlp=h.intermediate_size or 4 * h.hidden_size,
                       ln_eps=h.layer_norm_epsilon, attention_window=windows if any(windows) else (),
                       ablation="none")


def from_gpt_neo(hf: Any) -> SelfAblatingTransformer:
    """Our baseline (ablation='none') with a GPTNeoForCausalLM's weights, e.g. a public
    TinyStories model loaded with `GPTNeoForCausalLM.from_pretrained`."""
    cfg = gpt_neo_architecture(hf.config)
    with torch.device("cpu"):
        model = SelfAblatingTransformer(cfg)
    model = model.to(next(hf.parameters()).dtype)
    theirs, ours = hf.state_dict(), model.state_dict()
    with torch.no_grad():
        for a, b in _pairs(cfg.n_layers):
            ours[a].copy_(theirs[b])
    return model.eval()
