"""Sparse autoencoders: ReLU + L1 (the paper's) and TopK (Gao et al. 2024)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..config import check_choice, require, config_from_dict
from ..errors import CheckpointError
from ..files import umask, write_text_atomically


@dataclass(frozen=True)
class SAEConfig:
    """Architecture of one sparse autoencoder."""

    d_in: int
    """Width of the activation it reads (e.g. d_model for hook_mlp_out)."""
    d_sae: int
    """Number of latents (the paper: 16 x d_in)."""
    kind: Literal["relu", "topk"] = "relu"
    """relu: ReLU latents with an L1 penalty; topk: keep the k largest pre-activations."""
    k: int = 32
    """Latents kept per token (topk only)."""
    hook: str = "blocks.6.hook_mlp_out"
    """The model hook point it was trained on."""
    scale: float = 1.0
    """Inputs are multiplied by this before encoding (and outputs divided by it)."""
    subtract_b_dec: bool = True
    """Encode x * scale - b_dec (the common form); False encodes x * scale itself (SAELens's
    apply_b_dec_to_input=False, the paper authors' setting)."""

    def __post_init__(self) -> None:
        require(self.d_in >= 1 and self.d_sae >= 1, "d_in and d_sae must be >= 1")
        check_choice(self, "kind")
        require(self.kind != "topk" or 1 <= self.k <= self.d_sae, f"k must be in 1..d_sae={self.d_sae}, got {self.k}")


class SAEOutput(NamedTuple):
    recon: Tensor
    """(..., d_in) reconstruction, in the input's units."""
    latents: Tensor
    """(..., d_sae) latent activations (>= 0)."""


class SAE(nn.Module):
    """x -> f = act((x * scale - b_dec) W_enc + b_enc) -> x_hat = (f W_dec + b_dec) / scale
    (without subtract_b_dec: act(x * scale W_enc + b_enc))."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        w = torch.randn(cfg.d_in, cfg.d_sae)
        w = w / w.norm(dim=0, keepdim=True)  # unit-norm decoder rows; encoder initialised as its transpose
        self.W_dec = nn.Parameter(w.T.contiguous())  # (d_sae, d_in)
        self.W_enc = nn.Parameter(w.clone())  # (d_in, d_sae)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def encode(self, x: Tensor) -> Tensor:
        centred = x * self.cfg.scale - (self.b_dec if self.cfg.subtract_b_dec else 0.0)
        pre = centred @ self.W_enc + self.b_enc  # (..., d_sae)
        if self.cfg.kind == "topk":
            top = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, top.indices, F.relu(top.values))
        return F.relu(pre)

    def decode(self, f: Tensor) -> Tensor:
        return (f @ self.W_dec + self.b_dec) / self.cfg.scale

    def forward(self, x: Tensor) -> SAEOutput:
        f = self.encode(x)
        return SAEOutput(self.decode(f), f)

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Keep decoder rows at unit norm (so the L1 penalty cannot be dodged by scaling)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))


def sae_loss(sae: SAE, x: Tensor, l1_coef: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training loss on scaled inputs: MSE + l1_coef * L1, with
    MSE = mean_tokens sum_d (x_hat - x)^2 and L1 = mean_tokens sum_i f_i ||W_dec_i|| (SAELens's
    standard objective; topk SAEs use MSE alone). Returns (loss, mse, l1)."""
    f = sae.encode(x)
    recon_scaled = f @ sae.W_dec + sae.b_dec
    mse = (recon_scaled - x * sae.cfg.scale).pow(2).sum(-1).mean()
    l1 = (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    loss = mse + (l1_coef * l1 if sae.cfg.kind == "relu" else 0.0)
    return loss, mse, l1


def save_sae(sae: SAE, folder: str | Path, meta: dict | None = None) -> Path:
    """Weights, then their config, each written beside its name and renamed into place (a reader
    never sees half a file), with the modes of a plain file (safetensors writes 0600)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".sae.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}, str(tmp))
    os.chmod(tmp, 0o666 & ~umask())
    os.replace(tmp, folder / "sae.safetensors")
    write_text_atomically(folder / "cfg.json", json.dumps({**dataclasses.asdict(sae.cfg), "meta": meta or {}}, indent=1) + "\n")
    return folder


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    folder = Path(folder)
    try:
        raw = json.loads((folder / "cfg.json").read_text())
        raw.pop("meta", None)
        with torch.device("cpu"):
            sae = SAE(config_from_dict(SAEConfig, raw))
        sae.load_state_dict(load_file(str(folder / "sae.safetensors"), device=str(device)))
    except FileNotFoundError as e:
        raise CheckpointError(f"no SAE at {folder} ({Path(e.filename).name} not found)") from None
    except (json.JSONDecodeError, SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"corrupt SAE at {folder}: {str(e).splitlines()[0]}") from None
    return sae.to(device)
