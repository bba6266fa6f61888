"""The self-ablating transformer and its parts."""

from .hooks import HookPoint, Stream
from .masks import hard_topk, hard_topk_soft_grad, soft_topk
from .transformer import ForwardOutput, SelfAblatingTransformer

__all__ = ["ForwardOutput", "HookPoint", "SelfAblatingTransformer", "Stream",
           "hard_topk", "hard_topk_soft_grad", "soft_topk"]
