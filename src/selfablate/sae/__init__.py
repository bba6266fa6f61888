"""Sparse autoencoders on any hook point of either stream."""

from .model import SAE, SAEConfig, load_sae, save_sae

__all__ = ["SAE", "SAEConfig", "load_sae", "save_sae"]
