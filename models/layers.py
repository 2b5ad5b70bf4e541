"""Building blocks shared by the model families (timm's style: small modules with typed keyword arguments)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fastattn.nn import Attention
from fastattn.nn.spacetime import drop_path  # timm's, shared with the space-time blocks

__all__ = ["to_2tuple", "drop_path", "DropPath", "Mlp", "PatchEmbed", "Block", "sinusoidal_position_encoding"]


def to_2tuple(x: Union[int, Sequence[int]], name: str = "size") -> Tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    t = tuple(int(v) for v in x)
    if len(t) != 2:
        raise ValueError(f"{name}: expected an int or a pair, got {x!r}")
    return t


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    """``fc1 -> act -> drop -> fc2 -> drop`` (timm's names: ``fc1``, ``fc2``)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer=nn.GELU, drop: float = 0.0, bias: bool = True):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """Image ``[B, C, H, W]`` to patch tokens: a ``patch_size``-strided conv (``proj``, timm's name), then
    ``[B, N, embed_dim]`` (``flatten=True``) or ``[B, H/p, W/p, embed_dim]`` (``flatten=False``, Swin)."""

    def __init__(self, img_size: Union[int, Sequence[int], None] = 224, patch_size: Union[int, Sequence[int]] = 16,
                 in_chans: int = 3, embed_dim: int = 768, norm_layer=None, flatten: bool = True,
                 bias: bool = True, strict_img_size: bool = True):
        super().__init__()
        self.patch_size = to_2tuple(patch_size, "patch_size")
        if img_size is not None:
            self.img_size = to_2tuple(img_size, "img_size")
            self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
            self.num_patches = self.grid_size[0] * self.grid_size[1]
        else:
            self.img_size = self.grid_size = self.num_patches = None
        self.in_chans = in_chans
        self.flatten = flatten
        self.strict_img_size = strict_img_size and img_size is not None
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_chans:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected images [B, {self.in_chans}, H, W], got {shape}")
        if self.strict_img_size and tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"x: image size {tuple(x.shape[2:])} differs from the model's {self.img_size}")
        x = self.proj(x)
        x = x.flatten(2).transpose(1, 2) if self.flatten else x.permute(0, 2, 3, 1)
        return self.norm(x)


class Block(nn.Module):
    """Pre-LN transformer block (ViT): ``x + drop_path(attn(norm1(x)))``, then ``x + drop_path(mlp(norm2(x)))``.

    timm's ``vision_transformer.Block`` names (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``,
    ``mlp.fc2``), so its state_dict loads; no layer scale (ViT/DeiT/ViViT/TimeSformer use none).
    ``forward(x, attn_mask=None)``: ``attn_mask`` as in ``fastattn.nn.Attention``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm, backend=None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                              backend=backend)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), attn_mask=attn_mask))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def sinusoidal_position_encoding(length: int, dim: int, *, base: float = 10000.0, interleaved: bool = True,
                                 device=None, dtype=None) -> torch.Tensor:
    """Vaswani et al.'s ``PE(pos, 2i) = sin(pos / base^(2i/dim))``, ``PE(pos, 2i+1) = cos(...)``: ``[length, dim]``.

    ``interleaved=True`` puts sin and cos in alternating channels (the paper's formula); False puts all sines
    first, then all cosines (tensor2tensor's layout)."""
    pos = torch.arange(length, dtype=torch.float64, device=device)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64, device=device) * (-math.log(base) / dim))
    ang = pos * freq  # [length, ceil(dim/2)]
    pe = torch.empty(length, dim, dtype=torch.float64, device=device)
    if interleaved:
        pe[:, 0::2] = torch.sin(ang)
        pe[:, 1::2] = torch.cos(ang[:, : dim // 2])
    else:
        half = (dim + 1) // 2
        pe[:, :half] = torch.sin(ang)
        pe[:, half:] = torch.cos(ang[:, : dim - half])
    return pe.to(dtype or torch.get_default_dtype())
