"""ViViT: A Video Vision Transformer (Arnab et al., ICCV 2021), its four models on ``fastattn.nn``.

    model = fastattn.models.create_model("vivit_b_16x2_model1", num_classes=10)
    logits = model(clips)                          # clips [B, T, C, H, W] -> [B, num_classes]
    ours = fastattn.models.from_transformers(hf)   # transformers' VivitModel / VivitForVideoClassification

Token embedding (the paper's section 3.2), ``TubeletEmbed``: a Conv3d with kernel and stride
``(tubelet_size, patch, patch)`` over the clip.  ``tubelet_size=1`` is *uniform frame sampling* (the same 2-D
patch embedding applied to every frame); ``tubelet_size > 1`` is *tubelet embedding*.
``TubeletEmbed.load_2d_patch_embed`` initialises the Conv3d from an image model's 2-D patch embedding by
*filter inflation* (the 2-D filter replicated over time and divided by ``t``) or *central frame* (the 2-D filter
at temporal index ``t // 2``, zeros elsewhere).

The four models (the tokens form a ``(T', H', W')`` grid, ``T' = T / tubelet_size``, ``H' = H / patch``, ...,
frame-major -- the order of Scenic and of transformers' ``VivitModel``):

* Model 1, spatio-temporal attention -- ``ViViT(attention="joint")``: a cls token, then ViT blocks
  (``models.layers.Block``) over all ``T'H'W'`` tokens; classify the cls token.
* Model 2, factorised encoder -- ``ViViTFactorisedEncoder``: a spatial encoder (ViT blocks, its own cls token
  and position embedding shared by the frames) runs over each frame's ``H'W'`` tokens; the per-frame cls
  outputs, with a temporal cls token, go through a temporal encoder; classify its cls token.
  ``temporal_depth=0`` is the paper's "average pool baseline" (the per-frame cls outputs averaged).
* Model 3, factorised self-attention -- ``ViViT(attention="factorised_self_attention")``: each block has a
  spatial self-attention sub-layer (``fastattn.nn.AxialAttention``, axis ``"hw"``), then a temporal one (axis
  ``"t"``), each with its own LayerNorm, projections and residual, then the MLP.
* Model 4, factorised dot-product attention -- ``ViViT(attention="factorised_dot_product")``: ViT blocks whose
  attention (``fastattn.nn.FactorisedDotProductAttention``) sends half the heads over time and half over space.

Models 3 and 4 have no cls token (as in the paper: it has no place in the token grid that the factorised
attention reshapes); they average the final normalised tokens.

Defaults follow the paper / Scenic: LayerNorm eps 1e-6, GELU in its tanh approximation (Flax's ``nn.gelu``
default, which Scenic uses; transformers' default ``hidden_act="gelu_fast"`` is the same function), qkv bias, a Kinetics-400 head.  Parameter counts of
the named ViViT-B/16x2 configurations (32 frames, 224x224, 400 classes) against the paper's Table 2:

    Model 1                  88,954,000   (paper 88.9M)
    Model 2                 115,062,928   (paper 115.1M)
    Model 3                 117,319,312   (paper 117.3M)
    Model 4                  88,952,464   (paper 88.9M)
    Model 2, average pool    86,696,080   (paper 86.7M; ``temporal_depth=0``)

(Model 1 equals transformers' ``VivitForVideoClassification`` with ``num_labels=400`` exactly; the paper's
88.9 for models 1 and 4 looks truncated rather than rounded, the other three rows are rounded.)
"""
from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fastattn.nn import AxialAttention, FactorisedDotProductAttention

from ._registry import register_converter, register_model
from .layers import Block, DropPath, Mlp, to_2tuple

__all__ = ["TubeletEmbed", "inflate_patch_embed_weight", "FactorisedSelfAttentionBlock",
           "FactorisedDotProductBlock", "ViViT", "ViViTFactorisedEncoder", "ATTENTION_TYPES"]

ATTENTION_TYPES = ("joint", "factorised_self_attention", "factorised_dot_product")
INFLATION_METHODS = ("filter_inflation", "central_frame")

_ACTIVATIONS = {
    "gelu": nn.GELU,                                   # exact (erf)
    "gelu_tanh": partial(nn.GELU, approximate="tanh"),  # ViViT's (Flax's default nn.gelu)
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def _act_layer(act_layer) -> Callable[[], nn.Module]:
    """``act_layer``: a module class / factory, or one of the names in ``_ACTIVATIONS``."""
    if isinstance(act_layer, str):
        if act_layer not in _ACTIVATIONS:
            raise ValueError(f"act_layer: expected one of {sorted(_ACTIVATIONS)} or a module class, got {act_layer!r}")
        return _ACTIVATIONS[act_layer]
    if not callable(act_layer):
        raise TypeError(f"act_layer: expected a module class or a name, got {type(act_layer).__name__}")
    return act_layer


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------
# Token embedding: uniform frame sampling / tubelet embedding.
# ---------------------------------------------------------------------------------------------------------
def inflate_patch_embed_weight(weight: torch.Tensor, tubelet_size: int,
                               method: str = "filter_inflation") -> torch.Tensor:
    """A Conv3d weight ``[C_out, C_in, t, p, p]`` from a 2-D patch-embedding weight ``[C_out, C_in, p, p]``.

    ``"filter_inflation"``: the 2-D filter repeated over the ``t`` frames and divided by ``t`` -- a clip of
    ``t`` identical frames embeds as the 2-D model embeds that frame.  ``"central_frame"``: the 2-D filter at
    temporal index ``t // 2``, zeros elsewhere -- each tubelet embeds as its central frame would in 2-D."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected a 2-D conv weight [C_out, C_in, p, p], got {shape}")
    t = _positive_int(tubelet_size, "tubelet_size")
    if method == "filter_inflation":
        return weight.unsqueeze(2).repeat(1, 1, t, 1, 1) / t
    if method == "central_frame":
        out = weight.new_zeros(weight.shape[0], weight.shape[1], t, *weight.shape[2:])
        out[:, :, t // 2] = weight
        return out
    raise ValueError(f"method: expected one of {INFLATION_METHODS}, got {method!r}")


class TubeletEmbed(nn.Module):
    """Clip ``[B, T, C, H, W]`` to tokens ``[B, T'*H'*W', embed_dim]`` (frame-major: ``(t h w)`` order) by a
    Conv3d (``proj``) with kernel = stride = ``(tubelet_size, patch_h, patch_w)``.

    ``tubelet_size=1`` is uniform frame sampling: the same 2-D patch embedding on every frame.  The clip size is
    fixed (``num_frames``, ``img_size``; they must be multiples of the tubelet), as the models' position
    embeddings are."""

    def __init__(self, img_size: Union[int, Sequence[int]] = 224, num_frames: int = 32,
                 patch_size: Union[int, Sequence[int]] = 16, tubelet_size: int = 2, in_chans: int = 3,
                 embed_dim: int = 768, bias: bool = True):
        super().__init__()
        self.img_size = to_2tuple(img_size, "img_size")
        self.patch_size = to_2tuple(patch_size, "patch_size")
        self.num_frames = _positive_int(num_frames, "num_frames")
        self.tubelet_size = _positive_int(tubelet_size, "tubelet_size")
        self.in_chans = _positive_int(in_chans, "in_chans")
        for s, p in zip(self.img_size, self.patch_size):
            if s < 1 or p < 1 or s % p:
                raise ValueError(f"img_size: {self.img_size} must be a positive multiple of patch_size "
                                 f"{self.patch_size}")
        if num_frames % tubelet_size:
            raise ValueError(f"num_frames: {num_frames} must be a multiple of tubelet_size {tubelet_size}")
        self.grid_size: Tuple[int, int, int] = (num_frames // tubelet_size, self.img_size[0] // self.patch_size[0],
                                                self.img_size[1] // self.patch_size[1])
        self.num_patches = math.prod(self.grid_size)
        kernel = (self.tubelet_size, *self.patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected clips [B, T, C, H, W], got {shape}")
        T, C, H, W = x.shape[1:]
        if C != self.in_chans:
            raise ValueError(f"x: {C} channels in clips [B, T, C, H, W] of shape {tuple(x.shape)}; the model takes "
                             f"in_chans={self.in_chans}")
        if T != self.num_frames:
            raise ValueError(f"x: {T} frames in clips [B, T, C, H, W] of shape {tuple(x.shape)}; the model takes "
                             f"num_frames={self.num_frames}")
        if (H, W) != self.img_size:
            raise ValueError(f"x: frame size {(H, W)} differs from the model's img_size {self.img_size}")
        x = self.proj(x.transpose(1, 2))            # [B, embed_dim, T', H', W']
        return x.flatten(2).transpose(1, 2)         # [B, T'*H'*W', embed_dim]

    @torch.no_grad()
    def load_2d_patch_embed(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                            method: str = "filter_inflation") -> None:
        """Initialise ``proj`` from a 2-D patch embedding's weight ``[embed_dim, in_chans, p_h, p_w]`` (and
        bias) by ``method`` -- see ``inflate_patch_embed_weight``."""
        w3 = inflate_patch_embed_weight(weight, self.tubelet_size, method)
        if w3.shape != self.proj.weight.shape:
            raise ValueError(f"weight: shape {tuple(weight.shape)} does not match this embedding's 2-D filter "
                             f"{tuple(self.proj.weight.shape[:2]) + tuple(self.proj.weight.shape[3:])}")
        self.proj.weight.copy_(w3)
        if bias is not None:
            if self.proj.bias is None or bias.shape != self.proj.bias.shape:
                raise ValueError(f"bias: shape {tuple(bias.shape)} does not match this embedding's bias")
            self.proj.bias.copy_(bias)


# ---------------------------------------------------------------------------------------------------------
# Blocks of models 3 and 4 (model 1 and model 2's encoders use models.layers.Block).
# ---------------------------------------------------------------------------------------------------------
class FactorisedSelfAttentionBlock(nn.Module):
    """ViViT model 3's block: spatial self-attention (each frame's tokens), temporal self-attention (each
    position's frames), MLP -- three pre-LN residual sub-layers, each with its own norm:

        x = x + attn_space(norm_space(x));  x = x + attn_time(norm_time(x));  x = x + mlp(norm_mlp(x))

    ``forward(x, grid)``: ``x`` ``[B, T'*H'*W', dim]`` in ``(t h w)`` order, ``grid = (T', H', W')``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        attn = partial(AxialAttention, dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm_space = norm_layer(dim)
        self.attn_space = attn(axis="hw")
        self.norm_time = norm_layer(dim)
        self.attn_time = attn(axis="t")
        self.norm_mlp = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn_space(self.norm_space(x), grid))
        x = x + self.drop_path(self.attn_time(self.norm_time(x), grid))
        return x + self.drop_path(self.mlp(self.norm_mlp(x)))


class FactorisedDotProductBlock(nn.Module):
    """ViViT model 4's block: a ViT block (timm names) whose attention is factorised dot-product attention
    (half the heads over time, half over space; ``num_heads`` even).  ``forward(x, grid)`` as model 3's."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = FactorisedDotProductAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                                  proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), grid))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


# ---------------------------------------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------------------------------------
def _init_vit_weights(module: nn.Module) -> None:
    """timm's ViT initialisation: truncated-normal(0.02) Linear weights, zero biases; LayerNorm and the patch
    Conv3d keep torch's defaults."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _drop_path_rates(drop_path_rate: float, depth: int) -> list:
    """Stochastic-depth rates rising linearly from 0 to ``drop_path_rate`` over ``depth`` blocks (timm's
    schedule; plain floats, so a model builds under ``torch.device("meta")``)."""
    return [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


def _check_common(num_heads, depth, embed_dim, num_classes):
    _positive_int(embed_dim, "embed_dim")
    _positive_int(depth, "depth")
    _positive_int(num_heads, "num_heads")
    if embed_dim % num_heads:
        raise ValueError(f"num_heads: embed_dim {embed_dim} must be a multiple of num_heads {num_heads}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes: expected an int >= 0 (0: no head), got {num_classes!r}")


class ViViT(nn.Module):
    """ViViT models 1, 3 and 4: one encoder over the ``(T', H', W')`` token grid of a clip.

    Args:
        img_size, num_frames, patch_size, tubelet_size, in_chans: the clip ``[B, num_frames, in_chans, *img_size]``
            and its tubelets (``tubelet_size`` frames x ``patch_size``; ``tubelet_size=1``: uniform frame
            sampling).
        num_classes: classifier outputs (0: no head, ``forward`` returns the pooled features).
        attention: ``"joint"`` (model 1; with a cls token), ``"factorised_self_attention"`` (model 3) or
            ``"factorised_dot_product"`` (model 4; even ``num_heads``) -- models 3 and 4 average their tokens.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the transformer's sizes (ViViT-B = ViT-B's).
        representation_size: a ``Linear + tanh`` "pre-logits" layer of this width before the head (the ViT
            paper's pre-training head; transformers' ``VivitModel`` pooler), or None.
        drop_rate, attn_drop_rate, drop_path_rate: dropout after the position embedding, the projections and
            before the head; on attention probabilities; stochastic depth (linear over the blocks).
        act_layer: MLP activation: a module class or ``"gelu_tanh"`` (default, ViViT's), ``"gelu"`` (exact),
            ``"relu"``, ``"silu"``.
        norm_layer: LayerNorm factory (default ``LayerNorm(eps=1e-6)``).

    ``forward(x)``: ``x`` ``[B, T, C, H, W]`` -> logits ``[B, num_classes]``.  ``forward_features`` returns the
    normalised tokens (``[B, 1 + T'H'W', dim]`` for model 1, cls first; ``[B, T'H'W', dim]`` otherwise).
    """

    def __init__(self, img_size: Union[int, Sequence[int]] = 224, num_frames: int = 32,
                 patch_size: Union[int, Sequence[int]] = 16, tubelet_size: int = 2, in_chans: int = 3,
                 num_classes: int = 400, attention: str = "joint", embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 representation_size: Optional[int] = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, act_layer: Union[str, Callable] = "gelu_tanh",
                 norm_layer: Optional[Callable] = None):
        super().__init__()
        if attention not in ATTENTION_TYPES:
            raise ValueError(f"attention: expected one of {ATTENTION_TYPES}, got {attention!r}")
        _check_common(num_heads, depth, embed_dim, num_classes)
        if attention == "factorised_dot_product" and num_heads % 2:
            raise ValueError(f"num_heads: model 4 sends half the heads over time and half over space, so it must "
                             f"be even; got {num_heads}")
        if representation_size is not None:
            _positive_int(representation_size, "representation_size")
        act_layer = _act_layer(act_layer)
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.attention = attention
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim

        self.patch_embed = TubeletEmbed(img_size, num_frames, patch_size, tubelet_size, in_chans, embed_dim)
        self.grid_size = self.patch_embed.grid_size
        self.num_prefix_tokens = 1 if attention == "joint" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if self.num_prefix_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.patch_embed.num_patches,
                                                  embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)

        block = {"joint": Block, "factorised_self_attention": FactorisedSelfAttentionBlock,
                 "factorised_dot_product": FactorisedDotProductBlock}[attention]
        dpr = _drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], act_layer=act_layer, norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)

        if representation_size:
            self.pre_logits = nn.Sequential(OrderedDict(fc=nn.Linear(embed_dim, representation_size),
                                                        act=nn.Tanh()))
            self.num_features = representation_size
        else:
            self.pre_logits = nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(_init_vit_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x) if self.attention == "joint" else blk(x, self.grid_size)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        x = self.head_drop(self.pre_logits(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ViViTFactorisedEncoder(nn.Module):
    """ViViT model 2, the factorised encoder: a spatial ViT encoder over each temporal index's ``H'W'`` tokens
    (one cls token and one position embedding shared by all of them, its own final norm), then a temporal ViT
    encoder over the ``T'`` per-frame cls outputs with its own cls token, position embedding and norm; the head
    classifies the temporal cls token.

    Args as ``ViViT`` (``depth``: the spatial encoder's, the paper's L_s), plus ``temporal_depth`` (L_t; same
    width and heads).  ``temporal_depth=0`` is the paper's average-pool baseline: the per-frame cls outputs are
    averaged (no temporal encoder).

    ``forward_features`` returns the temporal encoder's normalised tokens ``[B, 1 + T', dim]`` (cls first), or
    the per-frame cls features ``[B, T', dim]`` when ``temporal_depth=0``.
    """

    def __init__(self, img_size: Union[int, Sequence[int]] = 224, num_frames: int = 32,
                 patch_size: Union[int, Sequence[int]] = 16, tubelet_size: int = 2, in_chans: int = 3,
                 num_classes: int = 400, embed_dim: int = 768, depth: int = 12, temporal_depth: int = 4,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 act_layer: Union[str, Callable] = "gelu_tanh", norm_layer: Optional[Callable] = None):
        super().__init__()
        _check_common(num_heads, depth, embed_dim, num_classes)
        if isinstance(temporal_depth, bool) or not isinstance(temporal_depth, int) or temporal_depth < 0:
            raise ValueError(f"temporal_depth: expected an int >= 0 (0: average pooling), got {temporal_depth!r}")
        act_layer = _act_layer(act_layer)
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim

        self.patch_embed = TubeletEmbed(img_size, num_frames, patch_size, tubelet_size, in_chans, embed_dim)
        self.grid_size = self.patch_embed.grid_size
        frames, tokens_per_frame = self.grid_size[0], self.grid_size[1] * self.grid_size[2]
        self.pos_drop = nn.Dropout(drop_rate)

        def encoder(n: int) -> nn.ModuleList:
            dpr = _drop_path_rates(drop_path_rate, n)
            return nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                        proj_drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i],
                                        act_layer=act_layer, norm_layer=norm_layer) for i in range(n)])

        # Spatial encoder: shared by the T' temporal indices.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + tokens_per_frame, embed_dim))
        self.blocks = encoder(depth)
        self.norm = norm_layer(embed_dim)
        # Temporal encoder over the per-frame cls outputs.
        self.temporal_depth = temporal_depth
        if temporal_depth:
            self.temporal_cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.temporal_pos_embed = nn.Parameter(torch.zeros(1, 1 + frames, embed_dim))
            self.temporal_blocks = encoder(temporal_depth)
            self.temporal_norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.temporal_depth:
            nn.init.trunc_normal_(self.temporal_pos_embed, std=0.02)
            nn.init.normal_(self.temporal_cls_token, std=1e-6)
        self.apply(_init_vit_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)                                       # [B, T'*H'*W', C], frame-major
        B, frames = x.shape[0], self.grid_size[0]
        x = x.reshape(B * frames, -1, self.embed_dim)                 # one row per (clip, temporal index)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)[:, 0].reshape(B, frames, self.embed_dim)    # per-frame cls outputs
        if not self.temporal_depth:
            return x
        x = torch.cat([self.temporal_cls_token.expand(B, -1, -1), x], dim=1)
        x = self.pos_drop(x + self.temporal_pos_embed)
        for blk in self.temporal_blocks:
            x = blk(x)
        return self.temporal_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.temporal_depth else x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------------
# Named configurations (the paper's ViViT-B/L/H; "16x2": 16x16 patches, tubelets of 2 frames; 32 frames).
# ---------------------------------------------------------------------------------------------------------
_VIT_B = dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0)
_VIT_L = dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0)
_VIT_H = dict(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0)
_CLIP = dict(img_size=224, num_frames=32, tubelet_size=2)


def _build(cls, defaults: dict, overrides: dict):
    return cls(**{**defaults, **overrides})


@register_model
def vivit_b_16x2_model1(**overrides) -> ViViT:
    """ViViT-B/16x2, model 1 (spatio-temporal attention), 32x224x224 clips, Kinetics-400 head (88.95M)."""
    return _build(ViViT, dict(_CLIP, patch_size=16, attention="joint", **_VIT_B), overrides)


@register_model
def vivit_b_16x2_model2(**overrides) -> ViViTFactorisedEncoder:
    """ViViT-B/16x2, model 2 (factorised encoder: 12 spatial + 4 temporal layers) (115.06M)."""
    return _build(ViViTFactorisedEncoder, dict(_CLIP, patch_size=16, temporal_depth=4, **_VIT_B), overrides)


@register_model
def vivit_b_16x2_model3(**overrides) -> ViViT:
    """ViViT-B/16x2, model 3 (factorised self-attention) (117.32M)."""
    return _build(ViViT, dict(_CLIP, patch_size=16, attention="factorised_self_attention", **_VIT_B), overrides)


@register_model
def vivit_b_16x2_model4(**overrides) -> ViViT:
    """ViViT-B/16x2, model 4 (factorised dot-product attention) (88.95M)."""
    return _build(ViViT, dict(_CLIP, patch_size=16, attention="factorised_dot_product", **_VIT_B), overrides)


@register_model
def vivit_l_16x2_model1(**overrides) -> ViViT:
    """ViViT-L/16x2, model 1 (ViT-L sizes)."""
    return _build(ViViT, dict(_CLIP, patch_size=16, attention="joint", **_VIT_L), overrides)


@register_model
def vivit_l_16x2_model2(**overrides) -> ViViTFactorisedEncoder:
    """ViViT-L/16x2 FE, model 2 (ViT-L spatial encoder) -- the paper's Kinetics model.  The temporal encoder's
    depth, 4, is ViViT-B model 2's (Table 2); no table here gives the L model's."""
    return _build(ViViTFactorisedEncoder, dict(_CLIP, patch_size=16, temporal_depth=4, **_VIT_L), overrides)


@register_model
def vivit_h_14x2_model1(**overrides) -> ViViT:
    """ViViT-H/14x2, model 1 (ViT-H sizes, 14x14 patches)."""
    return _build(ViViT, dict(_CLIP, patch_size=14, attention="joint", **_VIT_H), overrides)


# ---------------------------------------------------------------------------------------------------------
# Converter: transformers' ViViT (model 1, tubelet embedding, joint attention).
# ---------------------------------------------------------------------------------------------------------
_HF_ACTIVATIONS = {
    "gelu": "gelu",
    # transformers' tanh approximations of GELU; "gelu_fast" writes sqrt(2/pi) as 0.7978845608 (differs from
    # torch's tanh GELU by ~1e-11 relative).
    "gelu_fast": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu", "silu": "silu", "swish": "silu",
}


@register_converter("transformers", "VivitForVideoClassification", "VivitModel")
def from_transformers_vivit(source: nn.Module) -> ViViT:
    """transformers' ``VivitForVideoClassification`` (classifier -> ``head``) or ``VivitModel`` (its pooler
    ``dense + tanh``, if any, -> ``pre_logits``; no head) as a model-1 ``ViViT`` with the weights loaded.

    transformers' q/k/v projections are concatenated into ``qkv``; its input is also ``[B, T, C, H, W]``, its
    tokens frame-major, so outputs match (``forward_features`` = ``last_hidden_state``)."""
    cfg = source.config
    classifier = getattr(source, "classifier", None)
    backbone = source.vivit if classifier is not None else source
    pooler = getattr(backbone, "pooler", None)
    if cfg.hidden_act not in _HF_ACTIVATIONS:
        raise ValueError(f"source: hidden_act {cfg.hidden_act!r} has no equivalent here; supported: "
                         f"{sorted(_HF_ACTIVATIONS)}")
    if pooler is not None and cfg.pooler_act != "tanh":
        raise ValueError(f"source: pooler_act {cfg.pooler_act!r} is not supported (only 'tanh')")
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    if getattr(cfg, "head_dim", None) not in (None, hidden // heads):
        raise ValueError(f"source: head_dim {cfg.head_dim} != hidden_size / num_attention_heads")
    mlp_ratio = cfg.intermediate_size / hidden
    if int(hidden * mlp_ratio) != cfg.intermediate_size:
        raise ValueError(f"source: intermediate_size {cfg.intermediate_size} is not representable as "
                         f"int(hidden_size * mlp_ratio)")
    t, ph, pw = (int(s) for s in cfg.tubelet_size)
    num_classes = classifier.out_features if isinstance(classifier, nn.Linear) else 0
    model = ViViT(img_size=cfg.image_size, num_frames=cfg.num_frames, patch_size=(ph, pw), tubelet_size=t,
                  in_chans=cfg.num_channels, num_classes=num_classes, attention="joint", embed_dim=hidden,
                  depth=cfg.num_hidden_layers, num_heads=heads, mlp_ratio=mlp_ratio, qkv_bias=cfg.qkv_bias,
                  representation_size=pooler.dense.out_features if pooler is not None else None,
                  drop_rate=cfg.hidden_dropout_prob, attn_drop_rate=cfg.attention_probs_dropout_prob,
                  act_layer=_HF_ACTIVATIONS[cfg.hidden_act],
                  norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps))

    src = backbone.state_dict()
    sd = {
        "cls_token": src["embeddings.cls_token"],
        "pos_embed": src["embeddings.position_embeddings"],
        "patch_embed.proj.weight": src["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": src["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": src["layernorm.weight"],
        "norm.bias": src["layernorm.bias"],
    }
    for i in range(cfg.num_hidden_layers):
        s, d = f"layers.{i}.", f"blocks.{i}."
        sd[d + "attn.qkv.weight"] = torch.cat([src[s + f"attention.{n}_proj.weight"] for n in "qkv"])
        if cfg.qkv_bias:
            sd[d + "attn.qkv.bias"] = torch.cat([src[s + f"attention.{n}_proj.bias"] for n in "qkv"])
        pairs = [("attention.o_proj", "attn.proj"), ("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
                 ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]
        for theirs, ours in pairs:
            for p in ("weight", "bias"):
                sd[d + f"{ours}.{p}"] = src[s + f"{theirs}.{p}"]
    if pooler is not None:
        sd["pre_logits.fc.weight"], sd["pre_logits.fc.bias"] = pooler.dense.weight, pooler.dense.bias
    if num_classes:
        sd["head.weight"], sd["head.bias"] = classifier.weight, classifier.bias
    ref = next(source.parameters())
    model.to(device=ref.device, dtype=ref.dtype)
    model.load_state_dict(sd, strict=True)
    return model.train(source.training)
