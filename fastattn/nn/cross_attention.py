"""``fastattn.nn.CrossAttention``: Perceiver's latent-to-input cross-attention.

A small latent array (N = 128..1024 queries) attends over a huge input array (M up to 224*224 = 50,176 pixels):
LayerNorm on both, linear projections to ``qk_channels`` (queries, keys) and ``v_channels`` (values) -- which
need not be equal nor powers of two (Perceiver's Fourier-feature inputs give e.g. 261 channels) -- split into
heads, attention, and an output projection.  With M >> N the (query block, batch, head) programs cannot fill a
GPU, so the Triton backend splits the keys across programs and merges the partial results by their LSE
(split-KV, chosen automatically from the shapes; ``fastattn.explain`` shows the plan).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..functional import attention


class CrossAttention(nn.Module):
    """Perceiver cross-attention: ``out = out_proj(attn(q_proj(LN(latents)), k_proj(LN(inputs)), v_proj(LN(inputs))))``.

    Args:
        latent_dim: channels of the latent array (the queries' input), ``D_latent``.
        input_dim: channels of the input array (keys' and values' input), ``C``.
        num_heads: attention heads (Perceiver uses 1 for cross-attention).
        qk_channels: total query/key channels (default ``latent_dim``); must divide by ``num_heads``.
        v_channels: total value channels (default ``qk_channels``); must divide by ``num_heads``.
        out_dim: output channels (default ``latent_dim``).
        dropout: attention-probability dropout, in training mode only.
        query_residual: add the (un-normalised) latents to the output, as Perceiver's cross-attention does.
        backend: restrict fastattn's dispatch (a name or list), e.g. ``"triton"``.

    Shapes: ``latents [B, N, latent_dim]``, ``inputs [B, M, input_dim]``, optional ``input_mask [B, M]`` bool
    (True = a real input, False = padding); returns ``[B, N, out_dim]``.
    """

    def __init__(self, latent_dim: int, input_dim: int, num_heads: int = 1, qk_channels: Optional[int] = None,
                 v_channels: Optional[int] = None, out_dim: Optional[int] = None, dropout: float = 0.0,
                 query_residual: bool = True, bias: bool = True, *, backend=None,
                 device=None, dtype=None):
        super().__init__()
        qk_channels = latent_dim if qk_channels is None else qk_channels
        v_channels = qk_channels if v_channels is None else v_channels
        out_dim = latent_dim if out_dim is None else out_dim
        for name, channels in (("qk_channels", qk_channels), ("v_channels", v_channels)):
            if channels % num_heads != 0:
                raise ValueError(f"{name} ({channels}) must be divisible by num_heads ({num_heads})")
        if query_residual and out_dim != latent_dim:
            raise ValueError(f"query_residual needs out_dim == latent_dim, got {out_dim} and {latent_dim}")
        factory = dict(device=device, dtype=dtype)
        self.num_heads, self.dropout, self.query_residual, self.backend = num_heads, dropout, query_residual, backend
        self.norm_latents = nn.LayerNorm(latent_dim, **factory)
        self.norm_inputs = nn.LayerNorm(input_dim, **factory)
        self.q_proj = nn.Linear(latent_dim, qk_channels, bias=bias, **factory)
        self.k_proj = nn.Linear(input_dim, qk_channels, bias=bias, **factory)
        self.v_proj = nn.Linear(input_dim, v_channels, bias=bias, **factory)
        self.out_proj = nn.Linear(v_channels, out_dim, bias=bias, **factory)

    def forward(self, latents: Tensor, inputs: Tensor, input_mask: Optional[Tensor] = None) -> Tensor:
        for name, t in (("latents", latents), ("inputs", inputs)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if latents.dim() != 3 or inputs.dim() != 3:
            raise ValueError(f"latents, inputs: expected [B, N, C] and [B, M, C], got {tuple(latents.shape)} "
                             f"and {tuple(inputs.shape)}")
        if latents.shape[0] != inputs.shape[0]:
            raise ValueError(f"inputs: batch size {inputs.shape[0]} differs from latents' {latents.shape[0]}")
        for name, t, norm in (("latents", latents, self.norm_latents), ("inputs", inputs, self.norm_inputs)):
            if t.shape[-1] != norm.normalized_shape[0]:
                raise ValueError(f"{name}: expected {norm.normalized_shape[0]} channels, got {t.shape[-1]}")
        B, N, _ = latents.shape
        M = inputs.shape[1]
        mask = None
        if input_mask is not None:
            if input_mask.dtype != torch.bool or tuple(input_mask.shape) != (B, M):
                raise ValueError(f"input_mask: expected a bool tensor of shape {(B, M)}, got "
                                 f"{input_mask.dtype} {tuple(input_mask.shape)}")
            mask = input_mask[:, None, None, :]  # [B, 1, 1, M]: broadcast over heads and latents
        x = self.norm_inputs(inputs)
        # [B, L, H*D] -> [B, H, L, D] strided views: the kernels read them in place
        q = self.q_proj(self.norm_latents(latents)).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        k = self.k_proj(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        out = attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                        backend=self.backend)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        return out + latents if self.query_residual else out
