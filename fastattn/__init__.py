"""fastattn: fused attention kernels for PyTorch.

    out = fastattn.attention(q, k, v, causal=True)            # [B, H, L, D] in, [B, H, L, Dv] out
    out = fastattn.scaled_dot_product_attention(q, k, v)      # drop-in for F.scaled_dot_product_attention
    mha = fastattn.MultiheadAttention(512, 8)                 # drop-in for torch.nn.MultiheadAttention
    print(fastattn.explain(q, k, v))                          # which backend runs, and why not the others
"""
from .dispatch import available_backends, use_backend
from .functional import AttentionFunction, attention, explain, scaled_dot_product_attention
from .nn import MultiheadAttention
from .problem import MAX_HEAD_DIM
from .spacetime import (axial_attention, factorised_dot_product_attention, global_attention, local_attention,
                        spatial_attention, temporal_attention)
from .window import window_attention

__version__ = "0.1.0"

__all__ = [
    "attention", "scaled_dot_product_attention", "explain", "use_backend", "available_backends",
    "AttentionFunction", "MAX_HEAD_DIM",
    "MultiheadAttention",
    "window_attention",
    "axial_attention", "temporal_attention", "spatial_attention", "factorised_dot_product_attention",
    "local_attention", "global_attention",
]
