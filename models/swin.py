"""Swin Transformer (Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows").

    model = fastattn.models.create_model("swin_tiny_patch4_window7_224", num_classes=10)
    logits = model(images)                                # [B, 3, 224, 224] -> [B, 10]
    feats = model.forward_intermediates(images, intermediates_only=True)   # one NCHW map per stage
    ours = fastattn.models.from_timm(timm_swin)           # or from_transformers(SwinForImageClassification/SwinModel)

Layout (timm's, so a timm ``SwinTransformer`` state_dict loads with ``strict=True``): patch partition
(``patch_embed``: a ``patch_size``-strided conv + LayerNorm, NHWC out), then ``layers``: stages of Swin blocks;
stage ``i > 0`` starts with a ``PatchMerging`` (``downsample``: 2x2 neighbours concatenated to 4C, LayerNorm,
Linear 4C -> 2C, no bias), and its blocks alternate W-MSA (even blocks) and SW-MSA (odd blocks, shift
``window // 2``).  Features stay NHWC ``[B, H, W, C]`` throughout; ``forward_features`` ends with the final
LayerNorm ``norm``; the head averages over H, W and applies ``head.fc``.

Every attention is a ``fastattn.nn.WindowAttention`` (the shift, the padding to window multiples, the window
partition, the relative position bias and the region mask are its business, fused on the triton backend).

Where the window meets the image edge, the two public implementations differ, and ``window_convention``
picks one (the converters set it):

* ``"timm"`` (timm >= 1.0, the default): per axis, the window is clamped to the stage resolution and the shift
  is 0 on an axis whose resolution is <= the window (``SwinTransformerBlock._calc_window_shift``); with a shift
  and padding, the features are rolled first, then padded (the roll wraps within the unpadded image).
* ``"transformers"`` (HF ``SwinLayer``, and the original Microsoft code): when the *smaller* side of the stage
  resolution is <= the window, both shifts are 0 and the window becomes that side (square); padding comes
  first, then the roll (which wraps over the padded grid).

Both libraries put the region mask over the padded grid; both pad with zeros at the bottom/right after the
block's first LayerNorm.  Window and shift of each block are fixed at construction from ``img_size`` (timm's
behaviour; with ``strict_img_size=False`` other image sizes run with those windows, padded as needed).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fastattn.nn import WindowAttention

from ._registry import register_converter, register_model
from .layers import DropPath, Mlp, PatchEmbed, to_2tuple

__all__ = ["SwinTransformer", "SwinBlock", "SwinStage", "PatchMerging", "window_and_shift"]

_CONVENTIONS = ("timm", "transformers")


def window_and_shift(resolution: Tuple[int, int], window_size: Tuple[int, int], shifted: bool,
                     convention: str = "timm") -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """The (window, shift) a Swin block uses on a ``resolution`` feature map, for a target ``window_size`` and
    whether it is a shifted-window block (shift ``window // 2``); see the module docstring for the conventions."""
    target_shift = tuple(w // 2 for w in window_size) if shifted else (0, 0)
    if convention == "timm":
        window = tuple(min(r, w) for r, w in zip(resolution, window_size))
        shift = tuple(0 if r <= w else s for r, w, s in zip(resolution, window, target_shift))
        return window, shift
    if convention == "transformers":
        side = min(resolution)
        if side <= min(window_size):
            return (min(side, window_size[0]), min(side, window_size[1])), (0, 0)
        return tuple(window_size), target_shift
    raise ValueError(f"window_convention: expected one of {_CONVENTIONS}, got {convention!r}")


class PatchMerging(nn.Module):
    """Downsampling between stages: ``[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), out_dim]``.

    Odd H/W are zero-padded at the bottom/right; each 2x2 neighbourhood is concatenated to 4C channels in the
    order ``x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]`` (top-left, bottom-left, top-right,
    bottom-right -- the order of both timm and transformers), then ``norm`` (LayerNorm 4C) and ``reduction``
    (Linear 4C -> out_dim, no bias)."""

    def __init__(self, dim: int, out_dim: Optional[int] = None):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1], x.shape[2]
        if H % 2 or W % 2:
            x = nn.functional.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinBlock(nn.Module):
    """One Swin block on NHWC features: ``x + drop_path(attn(norm1(x), shift))``, then
    ``x + drop_path(mlp(norm2(x)))`` (timm's names: ``norm1``, ``attn.{qkv, proj, relative_position_bias_table}``,
    ``norm2``, ``mlp.{fc1, fc2}``).

    ``window_size`` / ``shift_size`` are the ones actually used (already clamped, see ``window_and_shift``)."""

    def __init__(self, dim: int, num_heads: int, window_size: Tuple[int, int], shift_size: Tuple[int, int] = (0, 0),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, roll_before_pad: bool = True, backend=None):
        super().__init__()
        self.dim = dim
        self.window_size = tuple(window_size)
        self.shift_size = tuple(shift_size)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, self.window_size, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                    proj_drop=proj_drop, roll_before_pad=roll_before_pad, backend=backend)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift_size={self.shift_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), self.shift_size))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """``downsample`` (``PatchMerging`` dim -> out_dim, or Identity for the first stage), then ``depth`` blocks
    alternating W-MSA and SW-MSA at ``resolution`` (the stage's feature-map size after the downsample)."""

    def __init__(self, dim: int, out_dim: int, resolution: Tuple[int, int], depth: int, num_heads: int,
                 window_size: Tuple[int, int], downsample: bool = True, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: Union[float, Sequence[float]] = 0.0, window_convention: str = "timm", backend=None):
        super().__init__()
        if not downsample and dim != out_dim:
            raise ValueError(f"out_dim: a stage without downsample keeps its width, got dim {dim} -> {out_dim}")
        self.resolution = tuple(resolution)
        self.downsample = PatchMerging(dim, out_dim) if downsample else nn.Identity()
        rates = list(drop_path) if isinstance(drop_path, (list, tuple)) else [float(drop_path)] * depth
        blocks = []
        for i in range(depth):
            window, shift = window_and_shift(self.resolution, window_size, shifted=i % 2 == 1,
                                             convention=window_convention)
            blocks.append(SwinBlock(out_dim, num_heads, window, shift, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                    proj_drop=proj_drop, attn_drop=attn_drop, drop_path=rates[i],
                                    roll_before_pad=window_convention == "timm", backend=backend))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class _PooledHead(nn.Module):
    """Global average over H, W of NHWC features, dropout, ``fc`` (timm's ``ClassifierHead`` names)."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean(dim=(1, 2)))
        return x if pre_logits else self.fc(x)


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


class SwinTransformer(nn.Module):
    """Swin Transformer image classifier; images ``[B, in_chans, H, W]`` -> logits ``[B, num_classes]``
    (pooled features ``[B, num_features]`` when ``num_classes=0``).

    Args:
        img_size: input size (int or (h, w)); fixes each stage's resolution, hence each block's window and shift.
        patch_size: patch partition size (int or (h, w)); ``img_size`` must be a multiple of it.
        in_chans: image channels.
        num_classes: classes of the linear head (0: no head, ``forward`` returns pooled features).
        embed_dim: channels of stage 0; stage ``i`` has ``embed_dim * 2**i``.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window (int or (h, w)), clamped per stage as ``window_convention`` says.
        mlp_ratio: MLP hidden width / channels.
        qkv_bias: bias of the qkv projections.
        drop_rate: dropout before the head's ``fc``.
        proj_drop_rate: dropout after the attention projection and in the MLP.
        attn_drop_rate: dropout on the attention probabilities.
        drop_path_rate: stochastic depth, rising linearly from 0 (first block) to this (last block).
        strict_img_size: require inputs of exactly ``img_size`` (else any multiple of ``patch_size``, run with
            the windows and shifts computed for ``img_size``).
        window_convention: ``"timm"`` or ``"transformers"``: how windows are clamped and whether the shift comes
            before or after the padding (module docstring).
        backend: restricts the attention backend (see ``fastattn.explain``).
    """

    def __init__(self, img_size: Union[int, Sequence[int]] = 224, patch_size: Union[int, Sequence[int]] = 4,
                 in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: Union[int, Sequence[int]] = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, strict_img_size: bool = True, window_convention: str = "timm",
                 backend=None):
        super().__init__()
        img_size = to_2tuple(img_size, "img_size")
        patch_size = to_2tuple(patch_size, "patch_size")
        window_size = to_2tuple(window_size, "window_size")
        for name, pair in (("img_size", img_size), ("patch_size", patch_size), ("window_size", window_size)):
            if min(pair) < 1:
                raise ValueError(f"{name}: must be positive, got {pair}")
        if img_size[0] % patch_size[0] or img_size[1] % patch_size[1]:
            raise ValueError(f"img_size: {img_size} must be a multiple of patch_size {patch_size}")
        _check_positive_int(in_chans, "in_chans")
        _check_positive_int(embed_dim, "embed_dim")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes: expected an int >= 0, got {num_classes!r}")
        depths, num_heads = tuple(depths), tuple(num_heads)
        if not depths:
            raise ValueError("depths: expected at least one stage")
        for i, d in enumerate(depths):
            _check_positive_int(d, f"depths[{i}]")
        if len(num_heads) != len(depths):
            raise ValueError(f"num_heads: expected one entry per stage ({len(depths)}), got {num_heads}")
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        for i, (dim, heads) in enumerate(zip(dims, num_heads)):
            _check_positive_int(heads, f"num_heads[{i}]")
            if dim % heads:
                raise ValueError(f"num_heads: stage {i} width {dim} is not divisible by {heads} heads")
        if window_convention not in _CONVENTIONS:
            raise ValueError(f"window_convention: expected one of {_CONVENTIONS}, got {window_convention!r}")

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_layers = len(depths)
        self.num_features = dims[-1]
        self.window_size = window_size
        self.window_convention = window_convention

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, norm_layer=nn.LayerNorm,
                                      flatten=False, strict_img_size=strict_img_size)
        grid = self.patch_embed.grid_size
        # Linear stochastic-depth rates over all blocks, split per stage.
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, self.feature_info = [], []
        in_dim, start = embed_dim, 0
        for i, (dim, depth, heads) in enumerate(zip(dims, depths, num_heads)):
            # Each PatchMerging halves the resolution, rounding up (it pads odd sizes).
            resolution = tuple(math.ceil(g / 2 ** i) for g in grid)
            stages.append(SwinStage(in_dim, dim, resolution, depth, heads, window_size, downsample=i > 0,
                                    mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                                    attn_drop=attn_drop_rate, drop_path=rates[start:start + depth],
                                    window_convention=window_convention, backend=backend))
            self.feature_info.append(dict(num_chs=dim, reduction=max(patch_size) * 2 ** i, module=f"layers.{i}"))
            in_dim, start = dim, start + depth
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = _PooledHead(self.num_features, num_classes, drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # timm's Swin initialisation: Linear weights trunc-normal(0.02), biases 0 (the bias tables are
        # initialised by WindowAttention; convs and LayerNorms keep torch's defaults).
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set:
        """Parameter names that should get no weight decay (the relative position bias tables)."""
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() == 4 and not self.patch_embed.strict_img_size:
            ph, pw = self.patch_embed.patch_size
            if x.shape[2] % ph or x.shape[3] % pw:
                raise ValueError(f"x: image size {tuple(x.shape[2:])} must be a multiple of the patch size "
                                 f"{(ph, pw)}")
        return self.patch_embed(x)  # checks the shape and channel count; NHWC out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> last stage features ``[B, H/(p*2**(S-1)), W/(...), num_features]`` (NHWC),
        after the final LayerNorm."""
        return self.norm(self.layers(self._embed(x)))

    def forward_intermediates(self, x: torch.Tensor, indices: Union[int, Sequence[int], None] = None,
                              norm: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Per-stage feature maps (each stage's output, after its blocks).

        Args:
            indices: which stages: None = all, an int n = the last n, a sequence = those indices (negative ok).
            norm: apply the final LayerNorm to the last stage's map (the only one it is sized for).
            output_fmt: ``"NCHW"`` (timm's default) or ``"NHWC"``.
            intermediates_only: return only the list.

        Returns ``(forward_features(x), [maps])``, or the list of maps."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt: expected 'NCHW' or 'NHWC', got {output_fmt!r}")
        n = self.num_layers
        if indices is None:
            take = list(range(n))
        elif isinstance(indices, int) and not isinstance(indices, bool):
            if not 0 < indices <= n:
                raise ValueError(f"indices: the last n stages needs 1 <= n <= {n}, got {indices}")
            take = list(range(n - indices, n))
        else:
            take = [int(i) + n if int(i) < 0 else int(i) for i in indices]
            if any(not 0 <= i < n for i in take):
                raise ValueError(f"indices: stage indices must lie in [-{n}, {n}), got {list(indices)}")
        x = self._embed(x)
        maps = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i in take:
                y = self.norm(x) if norm and i == n - 1 else x
                maps.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return maps
        return self.norm(x), maps

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """NHWC features -> logits (or the pooled features when ``pre_logits``)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------------
# Named configurations (the paper's Table 1 sizes; ImageNet-1k heads).
# ---------------------------------------------------------------------------------------------------------
def _create(defaults: Dict, overrides: Dict) -> SwinTransformer:
    return SwinTransformer(**{**defaults, **overrides})


_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_LARGE = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
_224 = dict(img_size=224, patch_size=4, window_size=7)
_384 = dict(img_size=384, patch_size=4, window_size=12)


@register_model
def swin_tiny_patch4_window7_224(**overrides) -> SwinTransformer:
    """Swin-T (about 28M parameters)."""
    return _create({**_224, **_TINY}, overrides)


@register_model
def swin_small_patch4_window7_224(**overrides) -> SwinTransformer:
    """Swin-S (about 50M parameters)."""
    return _create({**_224, **_SMALL}, overrides)


@register_model
def swin_base_patch4_window7_224(**overrides) -> SwinTransformer:
    """Swin-B (about 88M parameters)."""
    return _create({**_224, **_BASE}, overrides)


@register_model
def swin_large_patch4_window7_224(**overrides) -> SwinTransformer:
    """Swin-L (about 197M parameters)."""
    return _create({**_224, **_LARGE}, overrides)


@register_model
def swin_base_patch4_window12_384(**overrides) -> SwinTransformer:
    """Swin-B at 384x384 with 12x12 windows."""
    return _create({**_384, **_BASE}, overrides)


@register_model
def swin_large_patch4_window12_384(**overrides) -> SwinTransformer:
    """Swin-L at 384x384 with 12x12 windows."""
    return _create({**_384, **_LARGE}, overrides)


# ---------------------------------------------------------------------------------------------------------
# Converters.
# ---------------------------------------------------------------------------------------------------------
def _copy_params(dst: nn.Module, src: nn.Module, what: str) -> None:
    """Copies the weight/bias of a Linear, Conv or LayerNorm (and a LayerNorm's eps) from ``src`` to ``dst``."""
    for name in ("weight", "bias"):
        d, s = getattr(dst, name, None), getattr(src, name, None)
        if (d is None) != (s is None):
            raise ValueError(f"model: {what}.{name} is present in one model only")
        if d is not None:
            if d.shape != s.shape:
                raise ValueError(f"model: {what}.{name} has shape {tuple(s.shape)}, expected {tuple(d.shape)}")
            d.copy_(s)
    if isinstance(dst, nn.LayerNorm):
        dst.eps = src.eps


def _same_for_all(values, what: str):
    values = list(values)
    if any(v != values[0] for v in values):
        raise ValueError(f"model: {what} differs between blocks/stages ({values}); fastattn's SwinTransformer "
                         f"uses one value")
    return values[0]


def _finish(ours: SwinTransformer, src: nn.Module) -> SwinTransformer:
    ref = next(src.parameters())
    return ours.to(device=ref.device, dtype=ref.dtype).train(src.training)


@register_converter("timm", "SwinTransformer")
def _from_timm_swin(src: nn.Module) -> SwinTransformer:
    """timm ``SwinTransformer`` (v1) -> ours, with ``window_convention="timm"``; state_dict loaded strictly."""
    pe = src.patch_embed
    if getattr(pe, "dynamic_img_pad", False):
        raise ValueError("model: timm's dynamic_img_pad=True is not supported (inputs must be patch multiples)")
    if getattr(src, "global_pool", "avg") != "avg":
        raise ValueError(f"model: only global_pool='avg' is supported, got {src.global_pool!r}")
    blocks = [b for stage in src.layers for b in stage.blocks]
    if any(type(n) is not nn.LayerNorm for n in (pe.norm, src.norm)):
        raise ValueError("model: only nn.LayerNorm norm layers are supported")
    ref_windows = getattr(src, "_ref_window_sizes", None)
    window = (_same_for_all([tuple(w) for w in ref_windows], "window_size") if ref_windows is not None
              else tuple(src.layers[0].blocks[0].attn.window_size))
    embed_dim = pe.proj.out_channels
    for i, stage in enumerate(src.layers):
        dim = stage.blocks[0].norm1.normalized_shape[0]
        if dim != embed_dim * 2 ** i:
            raise ValueError(f"model: stage {i} width {dim} is not embed_dim * 2**{i}")
        if any(b.attn.qkv.out_features != 3 * dim for b in stage.blocks):
            raise ValueError("model: a head_dim other than dim // num_heads is not supported")
    last = blocks[-1].drop_path1
    ours = SwinTransformer(
        img_size=tuple(pe.img_size), patch_size=tuple(pe.patch_size), in_chans=pe.proj.in_channels,
        num_classes=src.num_classes, embed_dim=embed_dim, depths=[len(s.blocks) for s in src.layers],
        num_heads=[s.blocks[0].attn.num_heads for s in src.layers], window_size=window,
        mlp_ratio=_same_for_all([b.mlp.fc1.out_features / b.norm1.normalized_shape[0] for b in blocks],
                                "mlp_ratio"),
        qkv_bias=blocks[0].attn.qkv.bias is not None,
        drop_rate=float(getattr(getattr(src.head, "drop", None), "p", 0.0)),
        proj_drop_rate=float(blocks[0].attn.proj_drop.p), attn_drop_rate=float(blocks[0].attn.attn_drop.p),
        drop_path_rate=float(getattr(last, "drop_prob", 0.0)), strict_img_size=bool(pe.strict_img_size),
        window_convention="timm")
    # The windows and shifts must be those timm's blocks actually use (e.g. always_partition=True differs).
    for i, (b_ours, b_src) in enumerate(zip((b for s in ours.layers for b in s.blocks), blocks)):
        if (b_ours.window_size, b_ours.shift_size) != (tuple(b_src.window_size), tuple(b_src.shift_size)):
            raise ValueError(f"model: block {i} uses window {tuple(b_src.window_size)} / shift "
                             f"{tuple(b_src.shift_size)}; fastattn derives {b_ours.window_size} / "
                             f"{b_ours.shift_size} (always_partition / set_input_size are not supported)")
    ours.load_state_dict(src.state_dict(), strict=True)
    src_modules = dict(src.named_modules())
    for name, m in ours.named_modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = src_modules[name].eps
    return _finish(ours, src)


@register_converter("transformers", "SwinModel", "SwinForImageClassification")
def _from_transformers_swin(src: nn.Module) -> SwinTransformer:
    """transformers ``SwinForImageClassification`` (head included) or ``SwinModel`` (``num_classes=0``: our
    ``forward`` gives its ``pooler_output``, ``forward_features`` its ``last_hidden_state`` as NHWC) -> ours,
    with ``window_convention="transformers"``.

    Training-only differences: transformers drops out (``hidden_dropout_prob``) after the patch embedding and
    after each attention / MLP branch; ours applies that rate after the attention projection and inside the
    MLP (timm's places)."""
    cfg = src.config
    base = src.swin if hasattr(src, "swin") else src
    if getattr(cfg, "use_absolute_embeddings", False):
        raise ValueError("model: use_absolute_embeddings=True is not supported")
    if cfg.hidden_act != "gelu":
        raise ValueError(f"model: hidden_act must be 'gelu' (exact), got {cfg.hidden_act!r}")
    classifier = getattr(src, "classifier", None)
    num_classes = classifier.out_features if isinstance(classifier, nn.Linear) else 0
    ours = SwinTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.num_channels, num_classes=num_classes,
        embed_dim=cfg.embed_dim, depths=cfg.depths, num_heads=cfg.num_heads, window_size=cfg.window_size,
        mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, proj_drop_rate=cfg.hidden_dropout_prob,
        attn_drop_rate=cfg.attention_probs_dropout_prob, drop_path_rate=cfg.drop_path_rate,
        strict_img_size=True, window_convention="transformers")
    with torch.no_grad():
        _copy_params(ours.patch_embed.proj, base.embeddings.patch_embeddings.projection, "patch embedding")
        _copy_params(ours.patch_embed.norm, base.embeddings.norm, "embedding norm")
        for i, (stage, src_stage) in enumerate(zip(ours.layers, base.encoder.layers)):
            for j, (blk, src_blk) in enumerate(zip(stage.blocks, src_stage.blocks)):
                at, src_at, where = blk.attn, src_blk.attention, f"layers.{i}.blocks.{j}"
                if at.window_size != tuple(src_at.relative_position_bias.window_size):
                    raise ValueError(f"model: {where}: the stage resolution {stage.resolution} is smaller than "
                                     f"the window {cfg.window_size}, which transformers' bias table cannot serve")
                _copy_params(blk.norm1, src_blk.layernorm_before, f"{where}.norm1")
                qkv = nn.Linear(at.qkv.in_features, at.qkv.out_features, bias=at.qkv.bias is not None)
                qkv.weight.copy_(torch.cat([src_at.q_proj.weight, src_at.k_proj.weight, src_at.v_proj.weight]))
                if qkv.bias is not None:
                    qkv.bias.copy_(torch.cat([src_at.q_proj.bias, src_at.k_proj.bias, src_at.v_proj.bias]))
                _copy_params(at.qkv, qkv, f"{where}.attn.qkv")
                _copy_params(at.proj, src_at.o_proj, f"{where}.attn.proj")
                at.relative_position_bias_table.copy_(src_at.relative_position_bias.relative_position_bias_table)
                _copy_params(blk.norm2, src_blk.layernorm_after, f"{where}.norm2")
                _copy_params(blk.mlp.fc1, src_blk.mlp.fc1, f"{where}.mlp.fc1")
                _copy_params(blk.mlp.fc2, src_blk.mlp.fc2, f"{where}.mlp.fc2")
            # transformers downsamples at the end of stage i; ours (timm's layout) at the start of stage i + 1.
            if src_stage.downsample is not None:
                merge = ours.layers[i + 1].downsample
                _copy_params(merge.norm, src_stage.downsample.norm, f"layers.{i + 1}.downsample.norm")
                _copy_params(merge.reduction, src_stage.downsample.reduction, f"layers.{i + 1}.downsample.reduction")
        _copy_params(ours.norm, base.layernorm, "final norm")
        if num_classes:
            _copy_params(ours.head.fc, classifier, "classifier")
    return _finish(ours, src)
