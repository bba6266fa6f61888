"""Exports to other interpretability libraries (optional extras: `tl`, `hf`)."""
