"""transformers' GPTNeoForCausalLM of our model's shape: the reference step both speed benchmarks
time beside ours (`train_step.py` on a CPU, `gpu.py` on a GPU)."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from selfablate import ModelConfig


def gpt_neo_step(cfg: ModelConfig, batch: int, pos: int, device: str | torch.device = "cpu",
                 autocast: Callable = contextlib.nullcontext) -> Callable[[], None]:
    """One full training step (forward, backward, clipping, the same fused AdamW as ours) of a
    GPT-Neo with cfg's widths, global attention and no dropout: the clean half of our work."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    c = GPTNeoConfig(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.n_ctx, hidden_size=cfg.d_model,
                     num_layers=cfg.n_layers, num_heads=cfg.n_heads, attention_types=[[["global"], cfg.n_layers]],
                     intermediate_size=cfg.d_mlp, activation_function="gelu_new", embed_dropout=0.0,
                     attention_dropout=0.0, resid_dropout=0.0, window_size=cfg.n_ctx)
    model = GPTNeoForCausalLM(c).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randint(0, cfg.vocab_size, (batch, pos), device=device)

    def step() -> None:
        with autocast():
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
