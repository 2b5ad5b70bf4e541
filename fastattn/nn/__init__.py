"""fastattn's nn modules: drop-in replacements for torch.nn attention layers."""
from .multihead_attention import MultiheadAttention

__all__ = ["MultiheadAttention"]
