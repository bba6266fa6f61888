"""Export and import the clean model as a Hugging Face `GPTNeoForCausalLM` (extra `hf`), the
format of the public TinyStories models, so that ours and theirs can be compared directly.

GPT-Neo alternates global and local (windowed) attention; an imported model keeps each layer's
window (`ModelConfig.attention_window`) and runs exactly at any context up to its positions.
Export writes each layer's kind back. Mask heads are not part of the export (the clean
stream is), and a compact-vocabulary model cannot be exported: GPT-Neo's tied LM head has no
bias to give the ids it lacks their share of <unk>'s probability.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

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


# -- a pretrained model as the start of a self-ablating one (train --init-from) ----------------

ARCHITECTURE = ("vocab_size", "compact_vocab", "n_ctx", "d_model", "n_layers", "n_heads", "d_mlp", "ln_eps",
                "attention_window")
"""The ModelConfig fields a source decides; the rest (ablation, k, temperatures, losses) are the run's."""


class Source(NamedTuple):
    """A pretrained clean model to start from."""

    model: SelfAblatingTransformer
    """Its clean stream as our baseline (float32, on the CPU)."""
    name: str
    """As given: a folder, hf:NAME, or one of our checkpoints."""
    sha256: str
    """Of its weights in our parameter order (float32 bytes): the same model gives the same hash."""

    def architecture(self, cfg: ModelConfig) -> ModelConfig:
        """`cfg` with the source's architecture (`ARCHITECTURE`); a k wider than a layer is refused there."""
        return dataclasses.replace(cfg, **{f: getattr(self.model.cfg, f) for f in ARCHITECTURE})


def weights_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, p in model.state_dict().items():
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _model_type(folder: Path) -> str | None:
    """A Hugging Face folder's config.json model_type (None: no such key, or not a dict)."""
    try:
        header = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise SelfAblateError(f"--init-from {folder}: its config.json is unreadable ({e})") from None
    return header.get("model_type") if isinstance(header, dict) else None


def load_source(src: str) -> Source:
    """A GPT-Neo folder saved by `save_pretrained`, `hf:NAME` (downloaded by transformers), or one
    of our checkpoints (its clean stream). Anything else, or a broken one, is one line."""
    from ..checkpoint import find, load_checkpoint

    path, hub = Path(src), src.startswith("hf:")
    kind = _model_type(path) if not hub and (path / "config.json").is_file() else None  # None: not Hugging Face's
    if kind is not None and kind != "gpt_neo":
        raise SelfAblateError(f"--init-from {src}: a {kind} model; only GPT-Neo models (and ours) can start a run")
    hf_folder = kind is not None
    if not hub and not hf_folder and find(path) is not None:
        model = load_checkpoint(path)
        if model.cfg.compact_vocab:
            raise SelfAblateError(f"--init-from {src}: a compact-vocabulary model cannot start a run (its ids are "
                                  "its own data's); use one with the GPT-2 vocabulary")
        with torch.device("cpu"):  # like from_gpt_neo: on the CPU whatever the default device
            base = SelfAblatingTransformer(dataclasses.replace(model.cfg, ablation="none"))
        base.load_state_dict({k: v for k, v in model.state_dict().items() if "mask_head" not in k})
        return Source(base.float().eval(), src, weights_sha256(base))
    if not hub and not hf_folder:
        raise SelfAblateError(f"--init-from {src}: not one of our checkpoints, nor a folder with a GPT-Neo "
                              "config.json, nor hf:NAME")
    tf = _transformers()
    try:
        hf = tf.GPTNeoForCausalLM.from_pretrained(src[3:] if hub else str(path), local_files_only=not hub)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, safetensors' errors)
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SelfAblateError(f"--init-from {src}: cannot load it as GPT-Neo ({text})") from None
    model = from_gpt_neo(hf.float())
    return Source(model, src, weights_sha256(model))
