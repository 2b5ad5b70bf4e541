"""SETR: SEgmentation TRansformer (Zheng et al., CVPR 2021, "Rethinking Semantic Segmentation from a
Sequence-to-Sequence Perspective with Transformers").

A plain ViT encoder (``models.vit.VisionTransformer``, no classifier) turns the image into ``H/16 x W/16`` patch
tokens; a decoder turns tokens back into a per-pixel class map ``[B, num_classes, H, W]`` (logits):

* **Naive** -- the last layer's tokens, LayerNorm, reshaped to a grid; ``1x1 conv - BN - ReLU - 1x1 conv`` to
  classes; bilinear upsampling to the image size.
* **PUP** (progressive upsampling) -- ``3x3 conv - BN - ReLU`` stages alternating with 2x bilinear upsampling,
  ``log2(patch_size)`` upsamplings in all (4 for 16x16 patches), the last after a ``1x1`` classifier conv.
* **MLA** (multi-level aggregation) -- ``M = 4`` streams reading evenly spaced layers (6, 12, 18, 24 of 24).
  Each stream: LayerNorm, ``1x1 conv`` to ``decoder_channels``; top-down aggregation (each stream adds the
  sum of the deeper ones); a ``3x3 conv``; then ``3x3 conv`` to ``decoder_channels / 2``, another ``3x3 conv``
  and 4x bilinear upsampling.  The streams are concatenated, classified by a ``3x3 conv`` and upsampled to the
  image size.  Every conv but the classifiers is followed by BN + ReLU.

Channel widths and layer choices follow the authors' code (fudan-zvg/SETR): 256 decoder channels (128 in the
MLA heads), LayerNorm eps 1e-6, batch norm after each conv.  The encoder keeps ViT's class token through the
blocks (as pre-trained ViT/DeiT weights expect) and the decoders drop it; the authors' MLA code instead drops
it before the blocks.  Auxiliary training heads of the authors' code are not part of the model.

Named configurations: ``setr_{naive,pup,mla}_{base,large}`` with the paper's T-Base (ViT-B/16: 12 layers, 768
wide, 12 heads) and T-Large (ViT-L/16: 24 layers, 1024 wide, 16 heads) encoders, at the Cityscapes setting of
the paper's Table 2 (768 x 768 crops, 19 classes); any size by keyword.
"""
from __future__ import annotations

import math
from typing import List, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_model
from .vit import VisionTransformer, resample_pos_embed

__all__ = ["SETR", "NaiveDecoder", "PUPDecoder", "MLADecoder"]

_LN_EPS = 1e-6
_MLA_STREAMS = 4


class ConvBNReLU(nn.Sequential):
    """``conv - BN - ReLU`` (the conv has a bias in Naive/PUP and none in MLA, as in the authors' code)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=bias)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU()


def _tokens_to_grid(tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Patch tokens ``[B, h*w, C]`` (row-major) to a feature map ``[B, C, h, w]``."""
    B, N, C = tokens.shape
    return tokens.transpose(1, 2).reshape(B, C, grid[0], grid[1])


class NaiveDecoder(nn.Module):
    """LayerNorm - ``1x1 conv - BN - ReLU`` - ``1x1 conv`` to classes - bilinear upsampling to the image."""

    def __init__(self, embed_dim: int, num_classes: int, channels: int = 256):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim, eps=_LN_EPS)
        self.conv = ConvBNReLU(embed_dim, channels, 1)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: List[torch.Tensor], grid: Tuple[int, int], out_size: Tuple[int, int]):
        x = _tokens_to_grid(self.norm(features[-1]), grid)
        x = self.cls(self.conv(x))
        return F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)


class PUPDecoder(nn.Module):
    """Progressive upsampling: LayerNorm, then ``n = log2(patch_size)`` stages of ``3x3 conv - BN - ReLU``
    with a 2x bilinear upsampling after each but the last, a ``1x1`` classifier conv, and a final upsampling
    to the image size (2x when the image is a multiple of the patch)."""

    def __init__(self, embed_dim: int, num_classes: int, num_upsample: int, channels: int = 256):
        super().__init__()
        if num_upsample < 1:
            raise ValueError(f"num_upsample: expected >= 1, got {num_upsample}")
        self.norm = nn.LayerNorm(embed_dim, eps=_LN_EPS)
        self.stages = nn.ModuleList(
            [ConvBNReLU(embed_dim if i == 0 else channels, channels, 3) for i in range(num_upsample)])
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: List[torch.Tensor], grid: Tuple[int, int], out_size: Tuple[int, int]):
        x = _tokens_to_grid(self.norm(features[-1]), grid)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.stages) - 1:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return F.interpolate(self.cls(x), size=out_size, mode="bilinear", align_corners=False)


class MLADecoder(nn.Module):
    """Multi-level aggregation over ``len(features)`` streams (shallowest first), see the module docstring."""

    def __init__(self, embed_dim: int, num_classes: int, num_streams: int = _MLA_STREAMS, channels: int = 256):
        super().__init__()
        head_channels = channels // 2
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dim, eps=_LN_EPS) for _ in range(num_streams)])
        self.reduce = nn.ModuleList([ConvBNReLU(embed_dim, channels, 1, bias=False) for _ in range(num_streams)])
        self.aggregate = nn.ModuleList([ConvBNReLU(channels, channels, 3, bias=False) for _ in range(num_streams)])
        self.heads = nn.ModuleList([
            nn.Sequential(ConvBNReLU(channels, head_channels, 3, bias=False),
                          ConvBNReLU(head_channels, head_channels, 3, bias=False))
            for _ in range(num_streams)])
        self.cls = nn.Conv2d(num_streams * head_channels, num_classes, 3, padding=1)

    def forward(self, features: List[torch.Tensor], grid: Tuple[int, int], out_size: Tuple[int, int]):
        if len(features) != len(self.norms):
            raise ValueError(f"features: expected {len(self.norms)} tapped layers, got {len(features)}")
        reduced = [red(_tokens_to_grid(norm(f), grid)) for f, norm, red in zip(features, self.norms, self.reduce)]
        # Top-down: each stream adds the (already summed) features of every deeper stream.
        summed = [None] * len(reduced)
        running = None
        for i in reversed(range(len(reduced))):
            running = reduced[i] if running is None else running + reduced[i]
            summed[i] = running
        outs = []
        for x, agg, head in zip(summed, self.aggregate, self.heads):
            x = head(agg(x))
            # The authors' code upsamples the streams with align_corners=True (the final resize does not).
            outs.append(F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=True))
        x = self.cls(torch.cat(outs, dim=1))
        return F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)


def mla_layers(depth: int, num_streams: int = _MLA_STREAMS) -> List[int]:
    """0-based indices of the evenly spaced blocks MLA taps: every ``depth / num_streams``-th, ending with the
    last (``[5, 11, 17, 23]`` for 24 blocks, ``[2, 5, 8, 11]`` for 12)."""
    if depth < num_streams:
        raise ValueError(f"depth: MLA taps {num_streams} distinct layers, got depth {depth}")
    return [m * depth // num_streams - 1 for m in range(1, num_streams + 1)]


class SETR(nn.Module):
    """SETR: images ``[B, in_chans, H, W]`` to per-pixel class logits ``[B, num_classes, H, W]``.

    Args:
        decoder: ``"naive"``, ``"pup"`` or ``"mla"``.
        img_size, patch_size, in_chans: input resolution (fixed, see ``set_input_size``), patch side, channels.
        num_classes: segmentation classes.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the ViT encoder (T-Base: 768/12/12, T-Large:
            1024/24/16).
        decoder_channels: decoder width (256 in the paper's code; the MLA heads use half of it).
        drop_rate, attn_drop_rate, drop_path_rate: encoder dropout (after embeddings and projections), attention
            dropout, stochastic depth.
    """

    def __init__(self, decoder: str = "pup", img_size: Union[int, Tuple[int, int]] = 768,
                 patch_size: int = 16, in_chans: int = 3, num_classes: int = 19, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 decoder_channels: int = 256, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        if decoder not in ("naive", "pup", "mla"):
            raise ValueError(f"decoder: expected 'naive', 'pup' or 'mla', got {decoder!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        if not isinstance(decoder_channels, int) or decoder_channels < 2:
            raise ValueError(f"decoder_channels: expected an int >= 2, got {decoder_channels!r}")
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size: expected a positive int, got {patch_size!r}")
        self.decoder_name = decoder
        self.num_classes = num_classes
        # The decoders normalise the tokens they read, so the encoder has no final norm and no head.
        self.encoder = VisionTransformer(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, final_norm=False,
            pos_drop_rate=drop_rate, proj_drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate)
        if decoder == "naive":
            self.tap_layers = [depth - 1]
            self.decoder = NaiveDecoder(embed_dim, num_classes, decoder_channels)
        elif decoder == "pup":
            num_upsample = math.log2(patch_size)
            if num_upsample != int(num_upsample) or patch_size < 2:
                raise ValueError(f"patch_size: PUP upsamples by 2x steps, needs a power of two >= 2, "
                                 f"got {patch_size}")
            self.tap_layers = [depth - 1]
            self.decoder = PUPDecoder(embed_dim, num_classes, int(num_upsample), decoder_channels)
        else:
            self.tap_layers = mla_layers(depth)
            self.decoder = MLADecoder(embed_dim, num_classes, len(self.tap_layers), decoder_channels)
        self._init_decoder()

    def _init_decoder(self) -> None:
        for m in self.decoder.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Accept ``img_size`` inputs from now on (the encoder's position embedding is resampled)."""
        self.encoder.set_input_size(img_size)

    def load_encoder(self, vit: VisionTransformer) -> None:
        """Initialise the encoder from a (pre-trained) ``VisionTransformer`` of the same width, depth, heads and
        patch size -- e.g. ``fastattn.models.from_timm(timm_vit)`` -- as the paper does from ViT/DeiT weights;
        the position embedding is resampled to this model's patch grid, the classifier is dropped."""
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"vit: expected a fastattn VisionTransformer, got {type(vit).__name__}")
        enc = self.encoder
        if vit.num_prefix_tokens != enc.num_prefix_tokens:
            raise ValueError("vit: a distilled ViT (two prefix tokens) does not fit the SETR encoder")
        state = {k: v for k, v in vit.state_dict().items()
                 if k.startswith(("patch_embed.", "blocks.", "cls_token", "pos_embed"))}
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], enc.patch_embed.grid_size,
                                                vit.patch_embed.grid_size, vit.num_prefix_tokens)
        try:
            enc.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"vit: its weights do not fit this SETR encoder: {e}") from None

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The patch tokens ``[B, N, embed_dim]`` (class token dropped) of the tapped blocks: the last for
        Naive/PUP, four evenly spaced for MLA (shallowest first)."""
        taps = self.encoder.forward_intermediates(x, self.tap_layers)
        return [t[:, self.encoder.num_prefix_tokens:] for t in taps]

    def forward_head(self, features: List[torch.Tensor], out_size: Tuple[int, int]) -> torch.Tensor:
        return self.decoder(features, self.encoder.patch_embed.grid_size, tuple(out_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), x.shape[-2:])


# ------------------------------------------------------------------------------------ named configurations
_T_BASE = dict(embed_dim=768, depth=12, num_heads=12)
_T_LARGE = dict(embed_dim=1024, depth=24, num_heads=16)


def _setr(decoder: str, encoder: dict, overrides: dict) -> SETR:
    return SETR(**{"decoder": decoder, "img_size": 768, "patch_size": 16, "num_classes": 19, **encoder,
                   **overrides})


@register_model
def setr_naive_base(**overrides) -> SETR:
    """SETR-Naive with the T-Base encoder (ViT-B/16)."""
    return _setr("naive", _T_BASE, overrides)


@register_model
def setr_pup_base(**overrides) -> SETR:
    """SETR-PUP with the T-Base encoder (ViT-B/16)."""
    return _setr("pup", _T_BASE, overrides)


@register_model
def setr_mla_base(**overrides) -> SETR:
    """SETR-MLA with the T-Base encoder (ViT-B/16; taps layers 3, 6, 9, 12)."""
    return _setr("mla", _T_BASE, overrides)


@register_model
def setr_naive_large(**overrides) -> SETR:
    """SETR-Naive with the T-Large encoder (ViT-L/16)."""
    return _setr("naive", _T_LARGE, overrides)


@register_model
def setr_pup_large(**overrides) -> SETR:
    """SETR-PUP with the T-Large encoder (ViT-L/16)."""
    return _setr("pup", _T_LARGE, overrides)


@register_model
def setr_mla_large(**overrides) -> SETR:
    """SETR-MLA with the T-Large encoder (ViT-L/16; taps layers 6, 12, 18, 24)."""
    return _setr("mla", _T_LARGE, overrides)
