"""fastattn's nn modules: drop-in replacements for torch.nn attention layers."""
from .attention import Attention, KVCache
from .cross_attention import CrossAttention
from .incremental import cross_attention_step, self_attention_step
from .multihead_attention import MultiheadAttention
from .spacetime import (AxialAttention, DividedSpaceTimeAttention, FactorisedDotProductAttention,
                        LocalGlobalAttention)
from .window_attention import WindowAttention

__all__ = ["Attention", "KVCache", "CrossAttention", "MultiheadAttention", "WindowAttention",
           "DividedSpaceTimeAttention", "AxialAttention", "LocalGlobalAttention", "FactorisedDotProductAttention",
           "self_attention_step", "cross_attention_step"]
