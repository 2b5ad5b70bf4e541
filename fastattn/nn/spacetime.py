"""Video attention modules on ``fastattn.spacetime``: TimeSformer's divided space-time attention, axial and
local-global attention, and ViViT's factorised dot-product attention (model 4).

* ``DividedSpaceTimeAttention`` -- the attention part of transformers' ``TimesformerLayer`` with
  ``attention_type="divided_space_time"``: temporal norm, temporal attention, ``temporal_dense`` and the
  temporal residual, then the spatial norm, spatial attention (cls token averaged over frames) and the
  spatial residual.  Its parameters carry the layer's names (``temporal_layernorm``,
  ``temporal_attention.attention.qkv``, ``temporal_attention.output.dense``, ``temporal_dense``,
  ``layernorm_before``, ``attention.attention.qkv``, ``attention.output.dense``), so the layer's
  ``state_dict`` loads directly once its MLP entries (``layernorm_after``, ``intermediate.*``, ``output.*``)
  are left out -- ``load_state_dict({k: v for k, v in sd.items() if k in ours.state_dict()})``; the official
  TimeSformer's names map one to one (``temporal_norm1``, ``temporal_attn.qkv``, ``temporal_attn.proj``,
  ``temporal_fc``, ``norm1``, ``attn.qkv``, ``attn.proj``).  A TimeSformer block is then
  ``x = attn(x); x = x + mlp(norm(x))``.
* ``AxialAttention`` -- one attention sub-layer along an axis (or several, merged) of the token grid: three of
  them (``"t"``, ``"w"``, ``"h"``) make TimeSformer's axial scheme, ``"hw"`` then ``"t"`` ViViT model 3.
* ``LocalGlobalAttention`` -- one sub-layer of TimeSformer's L+G scheme (``scope="local"`` or ``"global"``,
  see ``fastattn.spacetime`` for the exact definition); an L+G block uses a local one, then a global one.
* ``FactorisedDotProductAttention`` -- ViViT model 4: one multi-head attention whose first half of heads
  attends over time and second half over space.

The last three are timm-style (no public reference with other names): ``qkv`` (Linear dim -> 3 * heads *
head_dim) and ``proj`` (Linear heads * head_dim -> dim), torch's default initialisation; ``forward(x, grid)``
with ``x`` ``[B, L, dim]`` (``L = prod(grid)``) or ``[B, *grid, dim]``, returning the same shape.  Norms,
residuals and cls tokens are the model's business (TimeSformer's axial and L+G variants and ViViT's
factorised models have no cls token inside the grid; pass the patch tokens).

The projections write q, k and v as contiguous ``[B, L, heads, head_dim]`` slices of one ``[3, B, L, ...]``
buffer (one batched matmul with the qkv weight viewed as ``[3, heads * head_dim, dim]``; the same weights and
the same math as ``qkv(x).view(B, L, 3, heads, head_dim)``): in that layout the heads merge with the token
axes, so the attention calls read them in place (the table in ``fastattn.spacetime``; the spatial call of
``DividedSpaceTimeAttention`` does so on a backend that returns the LSE -- Triton, reference -- and
concatenates the cls token to each frame, TimeSformer-style, on sdpa).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..spacetime import (TOKEN_ORDERS, _grid_and_layout, axial_attention, global_attention, local_attention,
                         spatial_attention, temporal_attention)

__all__ = ["DividedSpaceTimeAttention", "AxialAttention", "LocalGlobalAttention", "FactorisedDotProductAttention"]


def project_split(x: torch.Tensor, linear: nn.Linear, groups: int) -> List[torch.Tensor]:
    """``linear(x)`` split into ``groups`` equal chunks of its output channels, each a contiguous
    ``[..., out / groups]`` tensor (slices of one ``[groups, ...]`` buffer written by one batched matmul)."""
    lead, cin = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, cin).unsqueeze(0).expand(groups, -1, -1)
    w = linear.weight.view(groups, -1, cin).transpose(1, 2)                    # [groups, cin, out / groups]
    if linear.bias is None:
        out = torch.bmm(x2, w)
    else:
        out = torch.baddbmm(linear.bias.view(groups, 1, -1), x2, w)
    return [o.view(*lead, -1) for o in out.unbind(0)]


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth: zero whole samples (the first dim) of a residual branch with probability ``drop_prob``
    and rescale the kept ones by ``1 / (1 - drop_prob)`` -- timm's / transformers' ``drop_path``: identity in eval
    or at 0, zeros at 1 (no rescale: nothing is kept)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * (mask.div_(keep) if keep > 0.0 else mask)


def _heads(dim: int, num_heads: int, head_dim: Optional[int]) -> int:
    if num_heads < 1:
        raise ValueError(f"num_heads: must be positive, got {num_heads}")
    hd = head_dim or dim // num_heads
    if hd < 1:
        raise ValueError(f"num_heads: {num_heads} heads leave no channel per head for dim {dim}")
    return hd


# ---------------------------------------------------------------------------------------------------------
# TimeSformer: divided space-time attention, with transformers' parameter names.
# ---------------------------------------------------------------------------------------------------------
class _SelfAttention(nn.Module):
    """transformers' ``TimesformerSelfAttention``'s parameters: ``qkv``."""

    def __init__(self, dim, qkv_bias, **dd):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)


class _SelfOutput(nn.Module):
    """transformers' ``TimesformerSelfOutput``: ``dense`` then dropout."""

    def __init__(self, dim, proj_drop, **dd):
        super().__init__()
        self.dense = nn.Linear(dim, dim, **dd)
        self.dropout = nn.Dropout(proj_drop)

    def forward(self, x):
        return self.dropout(self.dense(x))


class _Attention(nn.Module):
    """transformers' ``TimeSformerAttention``'s structure: ``attention`` (qkv) + ``output`` (dense)."""

    def __init__(self, dim, qkv_bias, proj_drop, **dd):
        super().__init__()
        self.attention = _SelfAttention(dim, qkv_bias, **dd)
        self.output = _SelfOutput(dim, proj_drop, **dd)


class DividedSpaceTimeAttention(nn.Module):
    """TimeSformer's divided space-time attention: the attention part of a ``divided_space_time`` layer.

    Args:
        dim: channels (transformers' ``hidden_size``).
        num_heads: heads; ``dim`` must be a multiple.
        num_frames: T (default for ``forward``).
        qkv_bias: bias of the two qkv projections (transformers' ``qkv_bias``, default True).
        attn_drop: dropout on the attention probabilities (``attention_probs_dropout_prob``).
        proj_drop: dropout after each output dense (``hidden_dropout_prob``).
        drop_path: stochastic depth on the two residual branches, per video (TimeSformer's code drops per
            (video, patch position) in the temporal branch and per (video, frame) in the spatial one, an
            artefact of its reshapes; the same in eval / with 0).
        layer_norm_eps: of the two LayerNorms (transformers' default 1e-6).
        token_order: ``"nt"`` (TimeSformer's patch order, default) or ``"tn"``.
        backend: restricts the attention backend (see ``fastattn.explain``).

    ``forward(x, num_frames=None)``: ``x`` ``[B, 1 + T*N, dim]`` (cls token first).  Returns the hidden states
    after both residuals, ``[B, 1 + T*N, dim]`` -- transformers' ``TimesformerLayer`` input to its MLP:

        patches = x[:, 1:] + temporal_dense(drop_path(temporal_attention(temporal_layernorm(x[:, 1:]))))
        y = cat(x[:, :1], patches)
        return y + drop_path(attention(layernorm_before(y)))   # spatial, cls averaged over frames

    Parameters are created with torch's default initialisation (the official TimeSformer zeroes
    ``temporal_fc`` in every block but the first -- a model-level choice).
    """

    def __init__(self, dim: int, num_heads: int, num_frames: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, drop_path: float = 0.0, layer_norm_eps: float = 1e-6, *,
                 token_order: str = "nt", backend=None, device=None, dtype=None):
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads: dim {dim} must be a multiple of num_heads {num_heads}")
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames: expected a positive int, got {num_frames!r}")
        if token_order not in TOKEN_ORDERS:
            raise ValueError(f"token_order: expected one of {TOKEN_ORDERS}, got {token_order!r}")
        self.dim, self.num_heads, self.num_frames = dim, num_heads, num_frames
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.attn_drop, self.drop_path = float(attn_drop), float(drop_path)
        self.token_order, self.backend = token_order, backend
        # transformers' TimesformerLayer names (and registration order of the attention part).
        self.attention = _Attention(dim, qkv_bias, proj_drop, **dd)
        self.layernorm_before = nn.LayerNorm(dim, eps=layer_norm_eps, **dd)
        self.temporal_layernorm = nn.LayerNorm(dim, eps=layer_norm_eps, **dd)
        self.temporal_attention = _Attention(dim, qkv_bias, proj_drop, **dd)
        self.temporal_dense = nn.Linear(dim, dim, **dd)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_frames={self.num_frames}, "
                f"token_order={self.token_order!r}, attn_drop={self.attn_drop}, drop_path={self.drop_path}, "
                f"backend={self.backend!r}")

    def _qkv(self, x, attn: _Attention):
        return [t.view(*x.shape[:-1], self.num_heads, self.head_dim)
                for t in project_split(x, attn.attention.qkv, 3)]

    def forward(self, x: torch.Tensor, num_frames: Optional[int] = None) -> torch.Tensor:
        T = self.num_frames if num_frames is None else num_frames
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected [B, 1 + T*N, {self.dim}], got {shape}")
        B, L, C = x.shape
        if isinstance(T, bool) or not isinstance(T, int) or T < 1 or L - 1 < T or (L - 1) % T:
            raise ValueError(f"x: {L} tokens do not fit num_frames={T}; expected 1 + num_frames * N (cls first)")
        kw = dict(num_frames=T, token_order=self.token_order, scale=self.scale,
                  dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)
        cls, patches = x[:, :1], x[:, 1:]
        # Temporal: the patches only (TimeSformer leaves the cls token out of this sub-layer).
        q, k, v = self._qkv(self.temporal_layernorm(patches), self.temporal_attention)
        o = temporal_attention(q, k, v, **kw).view(B, L - 1, C)
        o = self.temporal_attention.output(o)
        o = self.temporal_dense(drop_path(o, self.drop_path, self.training))
        y = torch.cat([cls, patches + o], dim=1)
        # Spatial: each frame's patches and the cls token; the cls output averaged over the frames.
        q, k, v = self._qkv(self.layernorm_before(y), self.attention)
        o = spatial_attention(q, k, v, cls_token=True, **kw).view(B, L, C)
        o = self.attention.output(o)
        return y + drop_path(o, self.drop_path, self.training)


# ---------------------------------------------------------------------------------------------------------
# Grid sub-layers: qkv + proj (timm names).
# ---------------------------------------------------------------------------------------------------------
class _GridAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias, attn_drop, proj_drop, head_dim, layout, backend, dd):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = _heads(dim, num_heads, head_dim)
        self.scale = self.head_dim ** -0.5
        self.attn_drop = float(attn_drop)
        self.layout, self.backend = layout, backend
        attn_dim = self.head_dim * num_heads
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(attn_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def _tokens(self, x, grid):
        """x -> ([B, L, dim] tokens, grid, layout)."""
        if not isinstance(x, torch.Tensor) or x.dim() < 3 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected [B, L, {self.dim}] or [B, *grid, {self.dim}], got {shape}")
        if x.dim() > 3:
            if grid is not None and tuple(grid) != tuple(x.shape[1:-1]):
                raise ValueError(f"grid: {tuple(grid)} does not match x's grid dimensions {tuple(x.shape[1:-1])}")
            grid = tuple(x.shape[1:-1])
        elif grid is None:
            raise ValueError("grid: required for [B, L, dim] tokens, e.g. grid=(T, H, W)")
        grid, layout = _grid_and_layout(grid, self.layout)
        if x.dim() == 3 and x.shape[1] != math.prod(grid):
            raise ValueError(f"x: {x.shape[1]} tokens do not match the grid {grid} ({math.prod(grid)} tokens)")
        return x.reshape(x.shape[0], math.prod(grid), self.dim), grid, layout

    def _qkv(self, x, groups=3):
        return [t.view(*x.shape[:-1], -1, self.head_dim) for t in project_split(x, self.qkv, groups)]

    def _dropout_p(self):
        return self.attn_drop if self.training else 0.0


class AxialAttention(_GridAttention):
    """Multi-head self-attention along ``axis`` of a token grid (``fastattn.axial_attention``).

    Args:
        dim, num_heads, qkv_bias, attn_drop, proj_drop, head_dim: as timm's ``Attention``.
        axis: ``"t"``, ``"h"``, ``"w"``, or several letters (``"hw"``: within each frame -- ViViT model 3's
            spatial sub-layer), or grid indices.
        layout: the grid's axes outer to inner, default ``"thw"`` (``"hwt"``: TimeSformer's token order).
        backend: restricts the attention backend.

    ``forward(x, grid=None)``: ``x`` ``[B, L, dim]`` with ``grid`` (``L = prod(grid)``), or ``[B, *grid, dim]``.
    """

    def __init__(self, dim: int, num_heads: int, axis, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, *, head_dim: Optional[int] = None, layout: Optional[str] = None,
                 backend=None, device=None, dtype=None):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop, head_dim, layout, backend,
                         dict(device=device, dtype=dtype))
        self.axis = axis

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, axis={self.axis!r}, layout={self.layout!r}, "
                f"head_dim={self.head_dim}, backend={self.backend!r}")

    def forward(self, x: torch.Tensor, grid: Optional[Sequence[int]] = None) -> torch.Tensor:
        tokens, grid, layout = self._tokens(x, grid)
        q, k, v = self._qkv(tokens)
        o = axial_attention(q, k, v, grid=grid, axis=self.axis, layout=layout, scale=self.scale,
                            dropout_p=self._dropout_p(), backend=self.backend)
        return self.proj_drop(self.proj(o.flatten(2))).view(x.shape)


class LocalGlobalAttention(_GridAttention):
    """One sub-layer of TimeSformer's sparse local-global attention (L+G): ``scope="local"`` -- every token
    attends over its block of ``window`` tokens (``fastattn.local_attention``; default window
    ``(T, ceil(H/2), ceil(W/2))``, the paper's F x H/2 x W/2) -- or ``scope="global"`` -- over the
    ``stride``-subsampled grid (``fastattn.global_attention``).  An L+G block applies a local sub-layer, then a
    global one, each with its own norm and residual.

    Args: as ``AxialAttention``, plus ``scope``, ``window`` (ints per grid axis, or None for the default) and
    ``stride`` (int or one per axis).  ``forward(x, grid=None)`` as ``AxialAttention``.
    """

    def __init__(self, dim: int, num_heads: int, scope: str = "local", qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, *, window=None, stride=2,
                 head_dim: Optional[int] = None, layout: Optional[str] = None, backend=None, device=None,
                 dtype=None):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop, head_dim, layout, backend,
                         dict(device=device, dtype=dtype))
        if scope not in ("local", "global"):
            raise ValueError(f"scope: expected 'local' or 'global', got {scope!r}")
        self.scope, self.window, self.stride = scope, window, stride

    def extra_repr(self) -> str:
        extra = f"window={self.window!r}" if self.scope == "local" else f"stride={self.stride!r}"
        return (f"dim={self.dim}, num_heads={self.num_heads}, scope={self.scope!r}, {extra}, "
                f"layout={self.layout!r}, head_dim={self.head_dim}, backend={self.backend!r}")

    def default_window(self, grid, layout) -> tuple:
        """The paper's neighbourhood: all frames, half the height and half the width (rounded up)."""
        return tuple(g if c == "t" else -(-g // 2) for g, c in zip(grid, layout))

    def forward(self, x: torch.Tensor, grid: Optional[Sequence[int]] = None) -> torch.Tensor:
        tokens, grid, layout = self._tokens(x, grid)
        q, k, v = self._qkv(tokens)
        kw = dict(grid=grid, layout=layout, scale=self.scale, dropout_p=self._dropout_p(), backend=self.backend)
        if self.scope == "local":
            window = self.default_window(grid, layout) if self.window is None else self.window
            o = local_attention(q, k, v, window=window, **kw)
        else:
            o = global_attention(q, k, v, stride=self.stride, **kw)
        return self.proj_drop(self.proj(o.flatten(2))).view(x.shape)


class FactorisedDotProductAttention(_GridAttention):
    """ViViT model 4, factorised dot-product attention (``fastattn.factorised_dot_product_attention``): one
    multi-head attention whose heads ``[0, heads/2)`` attend over time and ``[heads/2, heads)`` over space
    (Scenic's order); ``num_heads`` must be even.

    The projection writes the six (q, k, v) x (time, space) head groups as six contiguous buffers, so both
    halves are read in place (the functional op on one ``[B, L, heads, d]`` tensor copies the time half), and
    the output projection is applied to the two halves' outputs separately and summed -- the same as ``proj``
    of their concatenation, without writing it.

    Args and ``forward(x, grid=None)`` as ``AxialAttention`` (the grid needs a ``t`` axis).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, *, head_dim: Optional[int] = None, layout: Optional[str] = None,
                 backend=None, device=None, dtype=None):
        if num_heads % 2:
            raise ValueError(f"num_heads: must be even (half attend over time, half over space), got {num_heads}")
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop, head_dim, layout, backend,
                         dict(device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, layout={self.layout!r}, head_dim={self.head_dim}, "
                f"backend={self.backend!r}")

    def forward(self, x: torch.Tensor, grid: Optional[Sequence[int]] = None) -> torch.Tensor:
        tokens, grid, layout = self._tokens(x, grid)
        if "t" not in layout:
            raise ValueError(f"layout: factorised dot-product attention needs a time axis 't', got {layout!r}")
        B, L, _ = tokens.shape
        q_t, q_s, k_t, k_s, v_t, v_s = self._qkv(tokens, groups=6)                # [B, L, heads/2, hd] each
        kw = dict(grid=grid, layout=layout, scale=self.scale, dropout_p=self._dropout_p(), backend=self.backend)
        o_t = axial_attention(q_t, k_t, v_t, axis="t", **kw)
        o_s = axial_attention(q_s, k_s, v_s, axis=layout.replace("t", ""), **kw)
        half = self.proj.in_features // 2
        out = F.linear(o_t.reshape(B, L, half), self.proj.weight[:, :half])
        out = out + F.linear(o_s.reshape(B, L, half), self.proj.weight[:, half:], self.proj.bias)
        return self.proj_drop(out).view(x.shape)
