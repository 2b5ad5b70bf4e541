"""TimeSformer (Bertasius et al., 2021, "Is Space-Time Attention All You Need for Video Understanding?").

A ViT over the patches of every frame of a clip ``[B, T, C, H, W]``, with one of the paper's five attention
schemes in each block (``attention_type``):

* ``"space_only"`` (S) -- each frame on its own: the frames are batched (``[B*T, 1 + N, dim]``, a cls token per
  frame), plain ViT blocks, and the frames' final tokens are averaged before the norm and the head (the
  official code's "space-only baseline"; no time embedding).
* ``"joint_space_time"`` (ST) -- plain ViT blocks over all ``1 + T*N`` tokens.
* ``"divided_space_time"`` (T+S, TimeSformer proper) -- temporal attention (each patch position over its T
  frames), then spatial attention (each frame's patches plus the cls token), then the MLP
  (``fastattn.nn.DividedSpaceTimeAttention``).
* ``"local_global"`` (L+G) -- local attention (blocks of ``T x H/2 x W/2`` patches), then global attention
  (over the patches at every second position along t, h and w), then the MLP (``fastattn.nn.LocalGlobalAttention``).
* ``"axial"`` (T+W+H) -- attention along time, then width, then height, then the MLP
  (``fastattn.nn.AxialAttention``).

Tokens.  The patches are ordered as TimeSformer orders them (official code and transformers): patch-major,
frames inner -- patch ``n`` of frame ``t`` is token ``n*T + t`` after the cls token (``rearrange(x, 'b (h w t)
m')``; the grid layout ``"hwt"``).  Every frame's patches get the same spatial position embedding
(``pos_embed``, ``[1, 1 + N, dim]``; its first row belongs to the cls token) and, except in space-only, every
patch of frame t gets the time embedding ``time_embed[:, t]``.

The L+G and axial schemes.  The paper gives no code for them (the official repository implements S, ST and
T+S), so two choices are made here:

* Sub-layers mirror the divided block: every attention sub-layer is ``x + fc(drop_path(attn(norm(x))))``,
  where the extra ``fc`` (as divided attention's ``temporal_fc``) is present in every sub-layer but the last.
  This reproduces the paper's parameter counts (Table 1: L+G 121.4M = divided; axial 156.8M, ours 157.0M --
  without the extra ``fc`` axial would have 142.8M).
* No cls token: ``fastattn.nn``'s grid modules attend over the patch grid only, and a cls token outside the
  grid would never see the patches, so these two schemes classify the mean of the final patch tokens
  (after the norm).

Parameter names follow the official TimeSformer / timm: ``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``time_embed``, ``blocks.<i>``, ``norm``, ``head``.  Inside a block: ``norm1``/``attn.qkv``/``attn.proj``/
``norm2``/``mlp.fc1``/``mlp.fc2`` (S, ST: ``models.layers.Block``); ``attn.*`` with transformers'
``TimesformerLayer`` names plus ``norm2``/``mlp.*`` (T+S); ``sublayers.<name>.{norm, attn.qkv, attn.proj, fc}``
plus ``norm2``/``mlp.*`` (L+G: ``local``, ``global``; axial: ``t``, ``w``, ``h``).

``from_transformers`` converts ``TimesformerModel`` / ``TimesformerForVideoClassification`` (divided, space-only
and joint).  Note that transformers' space-only path classifies every frame (its logits are ``[B*T,
classes]``); ours averages the frames as the official code does -- ``forward_tokens`` gives the per-frame
tokens that transformers' encoder returns.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, Sequence, Tuple, Union

import torch
from torch import nn

from fastattn.nn import AxialAttention, DividedSpaceTimeAttention, LocalGlobalAttention

from ._registry import register_converter, register_model
from .layers import Block, DropPath, Mlp, PatchEmbed

__all__ = ["TimeSformer", "DividedSpaceTimeBlock", "GridSubLayer", "GridBlock", "ATTENTION_TYPES"]

ATTENTION_TYPES = ("space_only", "joint_space_time", "divided_space_time", "local_global", "axial")
_GRID_SCHEMES = ("local_global", "axial")   # the schemes without a cls token (see the module docstring)


class DividedSpaceTimeBlock(nn.Module):
    """TimeSformer's block: divided space-time attention (temporal, then spatial, each with its norm and
    residual; ``attn``), then ``x + drop_path(mlp(norm2(x)))``.

    ``forward(x)``: ``x`` ``[B, 1 + T*N, dim]`` (cls first, patches in TimeSformer's ``(n t)`` order)."""

    def __init__(self, dim: int, num_heads: int, num_frames: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6,
                 backend=None):
        super().__init__()
        self.attn = DividedSpaceTimeAttention(dim, num_heads, num_frames, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                              proj_drop=proj_drop, drop_path=drop_path, layer_norm_eps=norm_eps,
                                              backend=backend)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class GridSubLayer(nn.Module):
    """One attention sub-layer of the L+G and axial blocks: ``x + fc(drop_path(attn(norm(x), grid)))``.

    ``attn`` is a ``fastattn.nn`` grid module (``AxialAttention`` / ``LocalGlobalAttention``); ``fc`` (a Linear,
    as divided attention's ``temporal_fc``) when ``with_fc``, else the identity."""

    def __init__(self, dim: int, attn: nn.Module, with_fc: bool, drop_path: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.fc = nn.Linear(dim, dim) if with_fc else nn.Identity()

    def forward(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        return x + self.fc(self.drop_path(self.attn(self.norm(x), grid)))


class GridBlock(nn.Module):
    """A block of the L+G (``scheme="local_global"``: sub-layers ``local``, ``global``) or axial
    (``scheme="axial"``: sub-layers ``t``, ``w``, ``h``, in that order) scheme, then the MLP.

    ``forward(x, grid)``: the patch tokens ``x`` ``[B, L, dim]`` in TimeSformer's order, ``grid = (H/p, W/p, T)``
    (layout ``"hwt"``: frames inner)."""

    def __init__(self, dim: int, num_heads: int, scheme: str, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6,
                 backend=None):
        super().__init__()
        kw = dict(qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, layout="hwt", backend=backend)
        if scheme == "local_global":
            attns = {scope: LocalGlobalAttention(dim, num_heads, scope=scope, **kw) for scope in ("local", "global")}
        elif scheme == "axial":
            attns = {axis: AxialAttention(dim, num_heads, axis=axis, **kw) for axis in ("t", "w", "h")}
        else:
            raise ValueError(f"scheme: expected 'local_global' or 'axial', got {scheme!r}")
        last = list(attns)[-1]
        self.sublayers = nn.ModuleDict({
            name: GridSubLayer(dim, attn, with_fc=name != last, drop_path=drop_path, norm_eps=norm_eps)
            for name, attn in attns.items()})
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        for sublayer in self.sublayers.values():
            x = sublayer(x, grid)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TimeSformer(nn.Module):
    """TimeSformer video classifier (see the module docstring for the five attention schemes).

    Args:
        img_size: frame size (square int or ``(H, W)``); fixed -- other sizes are an error.
        patch_size: patch size (per frame).
        in_chans: channels of the frames.
        num_frames: T; fixed.
        num_classes: classifier outputs (0: no head, ``forward`` returns the pooled features).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the ViT's sizes.
        attention_type: one of ``ATTENTION_TYPES``.
        drop_rate: dropout after the position / time embeddings and after each attention and MLP projection.
        attn_drop_rate: dropout on the attention probabilities.
        drop_path_rate: stochastic depth, rising linearly over the blocks from 0.
        norm_eps: LayerNorm epsilon (TimeSformer and transformers: 1e-6).
        backend: restricts the attention backend of every attention (see ``fastattn.explain``).

    ``forward(x)``: clips ``[B, T, C, H, W]`` -> logits ``[B, num_classes]``.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_frames: int = 8, num_classes: int = 400, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attention_type: str = "divided_space_time", drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6, backend=None):
        super().__init__()
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type: expected one of {ATTENTION_TYPES}, got {attention_type!r}")
        for name, value in (("num_frames", num_frames), ("embed_dim", embed_dim), ("depth", depth),
                            ("num_heads", num_heads), ("in_chans", in_chans)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes: expected an int >= 0, got {num_classes!r}")
        if embed_dim % num_heads:
            raise ValueError(f"num_heads: embed_dim {embed_dim} must be a multiple of num_heads {num_heads}")
        self.attention_type = attention_type
        self.num_frames = num_frames
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.in_chans = in_chans
        self.has_cls_token = attention_type not in _GRID_SCHEMES

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.img_size, self.grid_size = self.patch_embed.img_size, self.patch_embed.grid_size
        num_patches = self.patch_embed.num_patches
        if num_patches < 1:
            raise ValueError(f"patch_size: {patch_size} is larger than img_size {img_size}")
        n_cls = 1 if self.has_cls_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if self.has_cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n_cls + num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        if attention_type != "space_only":
            self.time_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
            self.time_drop = nn.Dropout(drop_rate)
        else:
            self.time_embed = self.time_drop = None

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        kw = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                  backend=backend)
        if attention_type in ("space_only", "joint_space_time"):
            norm = partial(nn.LayerNorm, eps=norm_eps)
            blocks = [Block(embed_dim, num_heads, drop_path=dpr[i], norm_layer=norm, **kw) for i in range(depth)]
        elif attention_type == "divided_space_time":
            blocks = [DividedSpaceTimeBlock(embed_dim, num_heads, num_frames, drop_path=dpr[i], norm_eps=norm_eps,
                                            **kw) for i in range(depth)]
        else:
            blocks = [GridBlock(embed_dim, num_heads, attention_type, drop_path=dpr[i], norm_eps=norm_eps, **kw)
                      for i in range(depth)]
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # -- initialisation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """The official TimeSformer's: truncated normal (std 0.02) for the Linear weights, the cls token and the
        position embedding; zero biases and time embedding; LayerNorms at (1, 0); the patch conv at torch's
        default; and the temporal ``fc`` of every block but the first zeroed (so a block starts as its spatial
        part -- applied here to every extra ``fc`` of the L+G and axial sub-layers too)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.time_embed is not None:
            nn.init.zeros_(self.time_embed)
        for block in list(self.blocks)[1:]:
            if isinstance(block, DividedSpaceTimeBlock):
                fcs = [block.attn.temporal_dense]
            elif isinstance(block, GridBlock):
                fcs = [s.fc for s in block.sublayers.values() if isinstance(s.fc, nn.Linear)]
            else:
                fcs = []
            for fc in fcs:
                nn.init.zeros_(fc.weight)
                nn.init.zeros_(fc.bias)

    # -- forward -----------------------------------------------------------------------------------------
    def _check_clips(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a tensor of clips [B, T, C, H, W], got {type(x).__name__}")
        if x.dim() != 5:
            raise ValueError(f"x: expected clips [B, T, C, H, W] (5-D), got shape {tuple(x.shape)}")
        _, T, C, H, W = x.shape
        if T != self.num_frames:
            raise ValueError(f"x: {T} frames, but the model was built for num_frames={self.num_frames}")
        if C != self.in_chans:
            raise ValueError(f"x: {C} channels, but the model was built for in_chans={self.in_chans}")
        if (H, W) != tuple(self.img_size):
            raise ValueError(f"x: frame size {(H, W)} differs from the model's img_size {tuple(self.img_size)}")

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Clips -> tokens: ``[B*T, 1 + N, dim]`` (space-only), ``[B, 1 + N*T, dim]`` (joint, divided) or
        ``[B, N*T, dim]`` (L+G, axial), patches in TimeSformer's ``(n t)`` order."""
        B, T = x.shape[:2]
        patches = self.patch_embed(x.flatten(0, 1))                         # [B*T, N, dim]
        N = patches.shape[1]
        if self.attention_type == "space_only":
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(B * T, -1, -1)
            return self.pos_drop(torch.cat([cls, patches + self.pos_embed[:, 1:]], dim=1))
        n_cls = 1 if self.has_cls_token else 0
        patches = self.pos_drop(patches + self.pos_embed[:, n_cls:])
        # [B*T, N, dim] -> [B, N, T, dim]: frames inner, each frame's time embedding added.
        patches = patches.view(B, T, N, -1).transpose(1, 2) + self.time_embed[:, None]
        patches = self.time_drop(patches.reshape(B, N * T, -1))
        if not self.has_cls_token:
            return patches
        cls = self.pos_drop((self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1))
        return torch.cat([cls, patches], dim=1)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings and blocks, before the final norm: ``[B, 1 + N*T, dim]`` (joint, divided),
        ``[B, N*T, dim]`` (L+G, axial: patch tokens only) or, for space-only, the per-frame tokens
        ``[B, T, 1 + N, dim]`` (transformers' ``TimesformerModel`` output before its norm, ``[B*T, ...]``)."""
        self._check_clips(x)
        B, T = x.shape[:2]
        tokens = self._embed(x)
        if self.attention_type in _GRID_SCHEMES:
            grid = (*self.grid_size, T)                                        # layout "hwt"
            for block in self.blocks:
                tokens = block(tokens, grid)
        else:
            for block in self.blocks:
                tokens = block(tokens)
        if self.attention_type == "space_only":
            tokens = tokens.view(B, T, *tokens.shape[1:])
        return tokens

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised final tokens: ``[B, 1 + N*T, dim]`` (joint, divided), ``[B, N*T, dim]`` (L+G, axial),
        ``[B, 1 + N, dim]`` (space-only: the frames' tokens averaged, then normalised -- the official code)."""
        tokens = self.forward_tokens(x)
        if self.attention_type == "space_only":
            tokens = tokens.mean(dim=1)
        return self.norm(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``forward_features`` output -> logits (``pre_logits``: the pooled features): the cls token, or the
        mean of the patch tokens for L+G and axial."""
        x = x.mean(dim=1) if not self.has_cls_token else x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------------
# Named configurations: TimeSformer base (ViT-B/16), the five schemes of the paper's Table 1 at 8 x 224, and
# the divided TimeSformer-HR (16 x 448) and TimeSformer-L (96 x 224).
# ---------------------------------------------------------------------------------------------------------
def _base(attention_type: str, num_frames: int, img_size: int, overrides: Dict) -> TimeSformer:
    kw = dict(img_size=img_size, patch_size=16, num_frames=num_frames, num_classes=400, embed_dim=768, depth=12,
              num_heads=12, attention_type=attention_type)
    kw.update(overrides)
    return TimeSformer(**kw)


@register_model
def timesformer_base_space_only_8x224(**overrides) -> TimeSformer:
    """Space-only attention (S), 8 frames of 224 x 224 (the paper: 85.9M parameters)."""
    return _base("space_only", 8, 224, overrides)


@register_model
def timesformer_base_joint_8x224(**overrides) -> TimeSformer:
    """Joint space-time attention (ST), 8 x 224 (the paper: 85.9M parameters)."""
    return _base("joint_space_time", 8, 224, overrides)


@register_model
def timesformer_base_divided_8x224(**overrides) -> TimeSformer:
    """Divided space-time attention (T+S), 8 x 224: TimeSformer (the paper: 121.4M parameters)."""
    return _base("divided_space_time", 8, 224, overrides)


@register_model
def timesformer_base_local_global_8x224(**overrides) -> TimeSformer:
    """Sparse local-global attention (L+G), 8 x 224 (the paper: 121.4M parameters)."""
    return _base("local_global", 8, 224, overrides)


@register_model
def timesformer_base_axial_8x224(**overrides) -> TimeSformer:
    """Axial attention (T+W+H), 8 x 224 (the paper: 156.8M parameters)."""
    return _base("axial", 8, 224, overrides)


@register_model
def timesformer_hr_divided_16x448(**overrides) -> TimeSformer:
    """TimeSformer-HR: divided attention, 16 frames of 448 x 448."""
    return _base("divided_space_time", 16, 448, overrides)


@register_model
def timesformer_l_divided_96x224(**overrides) -> TimeSformer:
    """TimeSformer-L: divided attention, 96 frames of 224 x 224."""
    return _base("divided_space_time", 96, 224, overrides)


# ---------------------------------------------------------------------------------------------------------
# Converter: transformers' TimesformerModel / TimesformerForVideoClassification.
# ---------------------------------------------------------------------------------------------------------
# transformers' names inside a TimesformerLayer -> ours inside a block, by attention type (the divided block's
# ``attn`` carries transformers' names itself).
_HF_MLP = {"layernorm_after": "norm2", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
_HF_VIT_ATTN = {"layernorm_before": "norm1", "attention.attention.qkv": "attn.qkv",
                "attention.output.dense": "attn.proj"}
_HF_EMBED = {"embeddings.patch_embeddings.projection": "patch_embed.proj", "embeddings.cls_token": "cls_token",
             "embeddings.position_embeddings": "pos_embed", "embeddings.time_embeddings": "time_embed",
             "layernorm": "norm"}


def _hf_key(key: str, divided: bool) -> str:
    """A ``TimesformerModel`` state_dict key -> ours."""
    if key.startswith("encoder.layer."):
        index, rest = key[len("encoder.layer."):].split(".", 1)
        for table in (_HF_MLP, {} if divided else _HF_VIT_ATTN):
            for src, dst in table.items():
                if rest.startswith(src + "."):
                    return f"blocks.{index}.{dst}{rest[len(src):]}"
        if divided:
            return f"blocks.{index}.attn.{rest}"
        raise KeyError(key)
    for src, dst in _HF_EMBED.items():
        if key == src or key.startswith(src + "."):
            return dst + key[len(src):]
    raise KeyError(key)


@register_converter("transformers", "TimesformerModel", "TimesformerForVideoClassification")
def _from_transformers_timesformer(model) -> TimeSformer:
    """transformers' TimeSformer (``divided_space_time``, ``space_only``, ``joint_space_time``) -> ours, with the
    same configuration and weights (the classifier as ``head``; ``TimesformerModel`` -> ``num_classes=0``)."""
    cfg = model.config
    if cfg.hidden_act != "gelu":
        raise ValueError(f"model: hidden_act {cfg.hidden_act!r} is not supported (TimeSformer uses exact 'gelu')")
    if cfg.attention_type not in ("divided_space_time", "space_only", "joint_space_time"):
        raise ValueError(f"model: unknown attention_type {cfg.attention_type!r}")
    mlp_ratio = cfg.intermediate_size / cfg.hidden_size
    if int(cfg.hidden_size * mlp_ratio) != cfg.intermediate_size:
        raise ValueError(f"model: intermediate_size {cfg.intermediate_size} is not representable as a ratio of "
                         f"hidden_size {cfg.hidden_size}")
    body = getattr(model, "timesformer", model)
    classifier = getattr(model, "classifier", None)
    num_classes = classifier.out_features if isinstance(classifier, nn.Linear) else 0
    patch = cfg.patch_size if isinstance(cfg.patch_size, int) else tuple(cfg.patch_size)
    img = cfg.image_size if isinstance(cfg.image_size, int) else tuple(cfg.image_size)
    ours = TimeSformer(img_size=img, patch_size=patch, in_chans=cfg.num_channels, num_frames=cfg.num_frames,
                       num_classes=num_classes, embed_dim=cfg.hidden_size, depth=cfg.num_hidden_layers,
                       num_heads=cfg.num_attention_heads, mlp_ratio=mlp_ratio, qkv_bias=cfg.qkv_bias,
                       attention_type=cfg.attention_type, drop_rate=float(cfg.hidden_dropout_prob),
                       attn_drop_rate=float(cfg.attention_probs_dropout_prob),
                       drop_path_rate=float(cfg.drop_path_rate), norm_eps=cfg.layer_norm_eps)
    divided = cfg.attention_type == "divided_space_time"
    state = {_hf_key(k, divided): v for k, v in body.state_dict().items()}
    if num_classes:
        state.update({f"head.{k}": v for k, v in classifier.state_dict().items()})
    ours.load_state_dict(state, strict=True)
    return ours.to(next(body.parameters()).dtype)
