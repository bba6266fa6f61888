"""selfablate: train self-ablating transformers (arXiv 2505.00509) and test their interpretability."""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import ModelConfig, TrainConfig
from .data.tokenizer import gpt2_tokenizer
from .errors import SelfAblateError
from .model import ForwardOutput, SelfAblatingTransformer

__version__ = "0.1.0"
__all__ = ["ForwardOutput", "ModelConfig", "SelfAblateError", "SelfAblatingTransformer", "TrainConfig",
           "gpt2_tokenizer", "load_checkpoint", "save_checkpoint"]
