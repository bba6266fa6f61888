"""The self-ablating transformer and its parts."""

from .hooks import HookPoint, Stream
from .transformer import ForwardOutput, SelfAblatingTransformer

__all__ = ["ForwardOutput", "HookPoint", "SelfAblatingTransformer", "Stream"]
