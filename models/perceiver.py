"""Perceiver (Jaegle et al., 2021) and the Perceiver IO image classifier (Jaegle et al., 2022).

A small learned latent array (N latents x D channels) reads a large input array (M inputs x C channels) through
cross-attention, then refines itself with a latent transformer; the pair may repeat, attending to the inputs
again ("iterative attention").  The cost is O(M N) per cross-attend and O(N^2) per latent layer, never O(M^2),
so the Perceiver takes raw pixels, audio samples or points directly.

    model = create_model("perceiver_imagenet")                         # 44.9M, images [B, 3, H, W]
    model = create_model("perceiver_imagenet", num_latents=8, latent_dim=32, depth=1, num_heads=2,
                         num_cross_attends=2, in_chans=1, num_bands=4)  # any size by keyword
    model = create_model("perceiver_modelnet40")                        # point clouds [B, N, 3]
    model = create_model("perceiver_imagenet", input_adapter="audio", samples_per_patch=128)  # raw audio
    ours = from_transformers(hf_model)        # transformers' PerceiverForImageClassificationFourier

Layout (our names):

    input_adapter     a modality's raw input -> input array [B, M, C]: its features concatenated with Fourier
                      features of its position ([features, pos, sin, cos], transformers' layout); see the
                      *Input classes (image, video, raw audio, spectrogram, points) and MultimodalInput
    latents           [N, D], learned
    cross_attends[i]  PerceiverCrossAttentionBlock: x = x + CrossAttention(LN(x), LN(inputs));
                      x = x + mlp(norm(x)).  fastattn.nn.CrossAttention: separate qk / v channels, default
                      qk = v = C (the input width, e.g. 261 for RGB + 2-D Fourier features with 64 bands)
    transformers[j]   LatentTransformer: ``depth`` pre-LN self-attention blocks (models.layers.Block)
    pool / head       "mean": mean over latents -> Linear (Perceiver);  "query": a learned query
                      cross-attends to the latents -> Linear (Perceiver IO's classification decoder)

Schedule: ``num_blocks`` applications of a latent transformer; a cross-attend precedes each of the first
``num_cross_attends`` of them.  Perceiver (ImageNet): 8 cross-attends, 8 blocks of 6 layers.  Perceiver IO:
1 cross-attend, then 8 blocks of 6 layers.  With ``share_weights`` (the papers' setting) there is one latent
transformer, reused by every block, and two sets of cross-attend weights: the first cross-attend's own, and
one shared by all later cross-attends; without it every application has its own weights.
"""
from __future__ import annotations

import inspect
import math
from typing import Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from fastattn.nn import CrossAttention

from ._registry import register_converter, register_model
from .layers import Block, Mlp

__all__ = ["fourier_features", "grid_positions", "ImageInput", "VideoInput", "AudioInput", "SpectrogramInput",
           "PointCloudInput", "MultimodalInput", "make_input_adapter", "PerceiverCrossAttentionBlock",
           "LatentTransformer", "QueryPool", "Perceiver", "perceiver_imagenet", "perceiver_modelnet40",
           "perceiver_io_imagenet_fourier"]


# ---------------------------------------------------------------------------------------------------------------
# Fourier-feature position encoding
# ---------------------------------------------------------------------------------------------------------------

def fourier_features(pos: Tensor, num_bands: int, max_resolution: Sequence[float]) -> Tensor:
    """Fourier features of positions ``pos [..., d]`` (coordinates in [-1, 1]): ``[..., d * (2 * num_bands + 1)]``.

    Band k of dimension i has frequency ``f_k`` spaced linearly from 1 to the Nyquist frequency
    ``max_resolution[i] / 2``; the features are, in this order (transformers' layout, ``concat_pos=True``),
    ``[x_1 .. x_d,  sin(pi f_k x_i) for i, k,  cos(pi f_k x_i) for i, k]`` (i outer, k inner).
    Computed in float64 and returned in ``pos``'s dtype."""
    d = pos.shape[-1]
    if len(max_resolution) != d:
        raise ValueError(f"max_resolution: expected {d} values (one per position dimension), got {max_resolution}")
    freqs = torch.stack([torch.linspace(1.0, r / 2, num_bands, dtype=torch.float64, device=pos.device)
                         for r in max_resolution])  # [d, K]
    x = pos.to(torch.float64)
    angles = (math.pi * x[..., :, None] * freqs).flatten(-2)  # [..., d * K]
    return torch.cat([x, angles.sin(), angles.cos()], dim=-1).to(pos.dtype)


def grid_positions(index_dims: Sequence[int], device=None) -> Tensor:
    """Coordinates of a regular grid ``index_dims`` (row-major), each axis spanning [-1, 1]: ``[prod, d]`` float64."""
    axes = [torch.linspace(-1.0, 1.0, n, dtype=torch.float64, device=device) for n in index_dims]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(index_dims))


def _as_tuple(value, n: int, name: str) -> Tuple:
    if value is None or isinstance(value, (int, float)):
        return (value,) * n
    t = tuple(value)
    if len(t) != n:
        raise ValueError(f"{name}: expected a number or {n} values, got {value!r}")
    return t


def _check_positive(**values) -> None:
    for name, v in values.items():
        for item in v if isinstance(v, tuple) else (v,):
            if item is not None and (not isinstance(item, (int, float)) or item <= 0):
                raise ValueError(f"{name}: expected positive values, got {v!r}")


class _GridInput(nn.Module):
    """Base of the grid modalities: features on a regular ``d``-D grid ``[B, *grid, F]`` become the input array
    ``[B, prod(grid), F + d (2 num_bands + 1)]``, each token's features followed by its Fourier position features.

    ``max_resolution``: per grid axis, the resolution whose Nyquist frequency is the highest band; None (an axis's
    entry or all) uses the input's own grid size on that axis."""

    def __init__(self, num_features: int, num_index_dims: int, num_bands: int,
                 max_resolution: Union[None, float, Sequence[Optional[float]]]):
        super().__init__()
        self.max_resolution = _as_tuple(max_resolution, num_index_dims, "max_resolution")
        _check_positive(num_bands=num_bands, max_resolution=self.max_resolution)
        self.num_features = num_features
        self.num_index_dims = num_index_dims
        self.num_bands = num_bands
        self.num_channels = num_features + num_index_dims * (2 * num_bands + 1)

    def _tokens(self, grid: Tensor) -> Tensor:
        """``grid [B, *index_dims, F]`` -> ``[B, M, num_channels]``."""
        B, index_dims = grid.shape[0], tuple(grid.shape[1:-1])
        res = [n if r is None else r for r, n in zip(self.max_resolution, index_dims)]
        pos = fourier_features(grid_positions(index_dims, grid.device), self.num_bands, res).to(grid.dtype)
        feats = grid.reshape(B, -1, grid.shape[-1])
        return torch.cat([feats, pos.expand(B, -1, -1)], dim=-1)

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, num_bands={self.num_bands}, max_resolution={self.max_resolution}"


def _check_divisible(x: Tensor, sizes: Sequence[int], patch: Sequence[int], what: str) -> None:
    if any(s % p for s, p in zip(sizes, patch)):
        raise ValueError(f"x: {what} {tuple(sizes)} are not divisible by patch_size {tuple(patch)}")


class ImageInput(_GridInput):
    """Images ``[B, in_chans, H, W]`` -> one token per pixel (or per ``patch_size`` patch: its pixels flattened
    in (row, column, channel) order) with 2-D Fourier features of its grid position.  Any image size."""

    def __init__(self, in_chans: int = 3, num_bands: int = 64, max_resolution=None, patch_size=1):
        patch = _as_tuple(patch_size, 2, "patch_size")
        _check_positive(in_chans=in_chans, patch_size=patch)
        super().__init__(in_chans * patch[0] * patch[1], 2, num_bands, max_resolution)
        self.in_chans, self.patch_size = in_chans, patch

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_chans:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected images [B, {self.in_chans}, H, W], got {shape}")
        B, C, H, W = x.shape
        (ph, pw) = self.patch_size
        _check_divisible(x, (H, W), self.patch_size, "image size")
        grid = x.view(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 3, 5, 1)  # [B, H', W', ph, pw, C]
        return self._tokens(grid.reshape(B, H // ph, W // pw, -1))


class VideoInput(_GridInput):
    """Clips ``[B, T, in_chans, H, W]`` -> one token per ``patch_size`` (t, h, w) patch (default: per pixel of
    every frame), its values flattened in (t, h, w, channel) order, with 3-D Fourier features."""

    def __init__(self, in_chans: int = 3, num_bands: int = 64, max_resolution=None, patch_size=1):
        patch = _as_tuple(patch_size, 3, "patch_size")
        _check_positive(in_chans=in_chans, patch_size=patch)
        super().__init__(in_chans * math.prod(patch), 3, num_bands, max_resolution)
        self.in_chans, self.patch_size = in_chans, patch

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 5 or x.shape[2] != self.in_chans:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected clips [B, T, {self.in_chans}, H, W], got {shape}")
        B, T, C, H, W = x.shape
        pt, ph, pw = self.patch_size
        _check_divisible(x, (T, H, W), self.patch_size, "clip size (T, H, W)")
        grid = x.view(B, T // pt, pt, C, H // ph, ph, W // pw, pw).permute(0, 1, 4, 6, 2, 5, 7, 3)
        return self._tokens(grid.reshape(B, T // pt, H // ph, W // pw, -1))


class AudioInput(_GridInput):
    """Raw audio ``[B, samples]`` -> one token per ``samples_per_patch`` consecutive samples, with 1-D Fourier
    features of the patch index (transformers' ``PerceiverAudioPreprocessor`` layout)."""

    def __init__(self, samples_per_patch: int = 128, num_bands: int = 64, max_resolution=None):
        _check_positive(samples_per_patch=samples_per_patch)
        super().__init__(samples_per_patch, 1, num_bands, max_resolution)
        self.samples_per_patch = samples_per_patch

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected raw audio [B, samples], got {shape}")
        if x.shape[1] % self.samples_per_patch:
            raise ValueError(f"x: {x.shape[1]} samples are not divisible by samples_per_patch "
                             f"{self.samples_per_patch}")
        return self._tokens(x.reshape(x.shape[0], -1, self.samples_per_patch))


class SpectrogramInput(_GridInput):
    """Spectrograms ``[B, F, T]`` (frequency bins x frames) -> one token per ``patch_size`` (f, t) patch
    (default: per bin) with 2-D Fourier features over the (frequency, time) grid."""

    def __init__(self, num_bands: int = 64, max_resolution=None, patch_size=1):
        patch = _as_tuple(patch_size, 2, "patch_size")
        _check_positive(patch_size=patch)
        super().__init__(patch[0] * patch[1], 2, num_bands, max_resolution)
        self.patch_size = patch

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected spectrograms [B, F, T], got {shape}")
        B, F_, T = x.shape
        pf, pt = self.patch_size
        _check_divisible(x, (F_, T), self.patch_size, "spectrogram size (F, T)")
        grid = x.view(B, F_ // pf, pf, T // pt, pt).permute(0, 1, 3, 2, 4)
        return self._tokens(grid.reshape(B, F_ // pf, T // pt, -1))


class PointCloudInput(nn.Module):
    """Point clouds ``[B, N, 3]`` (coordinates scaled to [-1, 1]) -> one token per point: the Fourier features of
    its own xyz (which include xyz itself).  Defaults: the paper's ModelNet40 setting, 64 bands up to a maximum
    frequency of 1120 (``max_resolution`` 2240, ten times ImageNet's)."""

    def __init__(self, num_bands: int = 64, max_resolution=2240.0, num_dims: int = 3):
        super().__init__()
        self.max_resolution = _as_tuple(max_resolution, num_dims, "max_resolution")
        _check_positive(num_bands=num_bands, num_dims=num_dims, max_resolution=self.max_resolution)
        if any(r is None for r in self.max_resolution):
            raise ValueError("max_resolution: points have no grid size to default to; give a number")
        self.num_bands, self.num_dims = num_bands, num_dims
        self.num_channels = num_dims * (2 * num_bands + 1)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.num_dims:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected point clouds [B, N, {self.num_dims}], got {shape}")
        return fourier_features(x, self.num_bands, self.max_resolution)

    def extra_repr(self) -> str:
        return f"num_dims={self.num_dims}, num_bands={self.num_bands}, max_resolution={self.max_resolution}"


class MultimodalInput(nn.Module):
    """Several modalities at once (e.g. video + audio): each modality's input array is padded to a common width
    with its learned modality embedding (``padding[name]``, the same vector at every position), and the arrays
    are concatenated along the input axis in sorted-name order (as transformers' ``PerceiverMultimodalPreprocessor``).

    ``forward(x)``: ``x`` a dict ``{name: raw input}`` with exactly the adapters' names.
    The common width is the widest modality's plus ``min_padding``, so every modality gets an embedding."""

    def __init__(self, adapters: Mapping[str, nn.Module], min_padding: int = 2):
        super().__init__()
        if not isinstance(adapters, Mapping) or not adapters:
            raise ValueError(f"adapters: expected a non-empty dict of input adapters, got {adapters!r}")
        if not isinstance(min_padding, int) or min_padding < 0:
            raise ValueError(f"min_padding: expected a non-negative int, got {min_padding!r}")
        self.adapters = nn.ModuleDict(dict(adapters))
        self.num_channels = max(a.num_channels for a in self.adapters.values()) + min_padding
        self.padding = nn.ParameterDict({name: nn.Parameter(torch.zeros(self.num_channels - a.num_channels))
                                         for name, a in self.adapters.items()})
        for p in self.padding.values():
            nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)

    def forward(self, x: Mapping[str, Tensor]) -> Tensor:
        if not isinstance(x, Mapping) or set(x) != set(self.adapters):
            got = sorted(x) if isinstance(x, Mapping) else type(x).__name__
            raise ValueError(f"x: expected a dict with the modalities {sorted(self.adapters)}, got {got}")
        arrays = []
        for name in sorted(self.adapters):
            tokens = self.adapters[name](x[name])
            pad = self.padding[name].to(tokens.dtype).expand(tokens.shape[0], tokens.shape[1], -1)
            arrays.append(torch.cat([tokens, pad], dim=-1))
        if len({a.shape[0] for a in arrays}) != 1:
            raise ValueError(f"x: the modalities' batch sizes differ: {[a.shape[0] for a in arrays]}")
        return torch.cat(arrays, dim=1)


_INPUT_ADAPTERS = {"image": ImageInput, "video": VideoInput, "audio": AudioInput,
                   "spectrogram": SpectrogramInput, "points": PointCloudInput}


def make_input_adapter(kind: str, **kwargs) -> nn.Module:
    """The input adapter of one modality: ``"image"`` ``[B, C, H, W]``, ``"video"`` ``[B, T, C, H, W]``,
    ``"audio"`` (raw) ``[B, samples]``, ``"spectrogram"`` ``[B, F, T]`` or ``"points"`` ``[B, N, 3]``; ``kwargs`` go
    to its class (``in_chans``, ``num_bands``, ``max_resolution``, ``patch_size``, ``samples_per_patch``)."""
    if kind not in _INPUT_ADAPTERS:
        raise ValueError(f"input_adapter: unknown kind {kind!r}; expected one of {sorted(_INPUT_ADAPTERS)}")
    cls = _INPUT_ADAPTERS[kind]
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(f"{', '.join(unknown)}: not arguments of the {kind!r} input adapter "
                        f"({cls.__name__} takes {', '.join(sorted(accepted))})")
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Perceiver blocks
# ---------------------------------------------------------------------------------------------------------------

class PerceiverCrossAttentionBlock(nn.Module):
    """A cross-attend: ``x = x + CrossAttention(LN(x), LN(inputs))``, then ``x = x + mlp(norm(x))``.

    ``qk_channels`` / ``v_channels``: total query-key / value channels of the attention (default: the input
    width ``input_dim`` for both, as the Perceiver's cross-attention, which shapes attention like its inputs)."""

    def __init__(self, latent_dim: int, input_dim: int, num_heads: int = 1, qk_channels: Optional[int] = None,
                 v_channels: Optional[int] = None, mlp_ratio: float = 1.0, drop: float = 0.0,
                 attn_drop: float = 0.0):
        super().__init__()
        qk_channels = input_dim if qk_channels is None else qk_channels
        self.attn = CrossAttention(latent_dim, input_dim, num_heads=num_heads, qk_channels=qk_channels,
                                   v_channels=v_channels, dropout=attn_drop, query_residual=True)
        self.norm = nn.LayerNorm(latent_dim)
        self.mlp = Mlp(latent_dim, int(latent_dim * mlp_ratio), drop=drop)

    def forward(self, x: Tensor, inputs: Tensor, input_mask: Optional[Tensor] = None) -> Tensor:
        x = self.attn(x, inputs, input_mask)  # includes the residual (query_residual=True)
        return x + self.mlp(self.norm(x))


class LatentTransformer(nn.Module):
    """``depth`` pre-LN self-attention blocks over the latents (``blocks[i]``: models.layers.Block)."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 1.0, drop: float = 0.0,
                 attn_drop: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=drop,
                                           attn_drop=attn_drop) for _ in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x


class QueryPool(nn.Module):
    """Perceiver IO's classification read-out: one learned query (``query [1, dim]``) cross-attends to the latents
    (one head, MLP ratio 1, with the query residual), giving ``[B, dim]``."""

    def __init__(self, dim: int, drop: float = 0.0, attn_drop: float = 0.0):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, dim))
        self.attend = PerceiverCrossAttentionBlock(dim, dim, num_heads=1, mlp_ratio=1.0, drop=drop,
                                                   attn_drop=attn_drop)

    def forward(self, latents: Tensor) -> Tensor:
        q = self.query.to(latents.dtype).expand(latents.shape[0], -1, -1)
        return self.attend(q, latents)[:, 0]


class Perceiver(nn.Module):
    """The Perceiver classifier.

    Args:
        input_adapter: the modality: a kind for ``make_input_adapter`` (``"image"``, ``"video"``, ``"audio"``,
            ``"spectrogram"``, ``"points"``, built with its defaults), an adapter module (anything with
            ``num_channels`` mapping the raw input to ``[B, M, num_channels]``), or a dict of adapters
            (mixed modalities, wrapped in ``MultimodalInput``).
        num_classes: logits; 0 gives the pooled features.
        num_latents, latent_dim: the latent array, N x D.
        num_cross_attends: how many times the latents attend to the inputs.
        num_blocks: latent-transformer applications (default ``num_cross_attends``); the cross-attends precede
            the first ``num_cross_attends`` of them.
        depth: self-attention layers per latent transformer.
        cross_num_heads, num_heads: heads of the cross-attention and of the latent self-attention.
        cross_qk_channels, cross_v_channels: the cross-attention's query-key / value channels (default: the input
            width, e.g. 261).
        mlp_ratio, cross_mlp_ratio: MLP widening factors of the latent and of the cross-attend blocks.
        share_weights: one latent transformer for all blocks, and cross-attends after the first share weights.
        head_type: ``"mean"`` (average the latents, Perceiver) or ``"query"`` (a learned query cross-attends to
            the latents, Perceiver IO's classification decoder).
        drop_rate, attn_drop_rate: dropout after the MLPs / attention projections and on attention probabilities.

    ``forward(x, input_mask=None)``: ``x`` the adapter's raw input; ``input_mask [B, M]`` bool over the input
    array (True = a real input) for padded inputs, e.g. point clouds of different sizes.
    """

    def __init__(self, input_adapter: Union[str, nn.Module, Mapping[str, nn.Module]] = "image",
                 num_classes: int = 1000, num_latents: int = 512, latent_dim: int = 1024, num_cross_attends: int = 8,
                 num_blocks: Optional[int] = None, depth: int = 6, cross_num_heads: int = 1, num_heads: int = 8,
                 cross_qk_channels: Optional[int] = None, cross_v_channels: Optional[int] = None,
                 mlp_ratio: float = 1.0, cross_mlp_ratio: float = 1.0, share_weights: bool = True,
                 head_type: str = "mean", drop_rate: float = 0.0, attn_drop_rate: float = 0.0):
        super().__init__()
        if isinstance(input_adapter, str):
            input_adapter = make_input_adapter(input_adapter)
        elif isinstance(input_adapter, Mapping):
            input_adapter = MultimodalInput(input_adapter)
        if not isinstance(input_adapter, nn.Module) or not isinstance(getattr(input_adapter, "num_channels", None),
                                                                      int):
            raise TypeError(f"input_adapter: expected a kind name, a dict of adapters or an nn.Module with an int "
                            f"num_channels, got {type(input_adapter).__name__}")
        num_blocks = num_cross_attends if num_blocks is None else num_blocks
        for name, v in dict(num_classes=num_classes, num_latents=num_latents, latent_dim=latent_dim,
                            num_cross_attends=num_cross_attends, num_blocks=num_blocks, depth=depth,
                            cross_num_heads=cross_num_heads, num_heads=num_heads).items():
            least = 0 if name in ("num_classes", "depth") else 1
            if not isinstance(v, int) or v < least:
                raise ValueError(f"{name}: expected an int >= {least}, got {v!r}")
        if num_cross_attends > num_blocks:
            raise ValueError(f"num_cross_attends ({num_cross_attends}) exceeds num_blocks ({num_blocks}): each "
                             f"cross-attend precedes a latent-transformer block")
        if latent_dim % num_heads:
            raise ValueError(f"num_heads: latent_dim {latent_dim} is not divisible by {num_heads} heads")
        if head_type not in ("mean", "query"):
            raise ValueError(f"head_type: expected 'mean' or 'query', got {head_type!r}")
        self.num_classes, self.num_features, self.head_type = num_classes, latent_dim, head_type
        self.num_cross_attends, self.num_blocks, self.share_weights = num_cross_attends, num_blocks, share_weights

        self.input_adapter = input_adapter
        input_dim = input_adapter.num_channels
        self.latents = nn.Parameter(torch.zeros(num_latents, latent_dim))
        n_cross = min(num_cross_attends, 2) if share_weights else num_cross_attends
        self.cross_attends = nn.ModuleList([
            PerceiverCrossAttentionBlock(latent_dim, input_dim, cross_num_heads, cross_qk_channels, cross_v_channels,
                                         mlp_ratio=cross_mlp_ratio, drop=drop_rate, attn_drop=attn_drop_rate)
            for _ in range(n_cross)])
        self.transformers = nn.ModuleList([
            LatentTransformer(latent_dim, depth, num_heads, mlp_ratio, drop=drop_rate, attn_drop=attn_drop_rate)
            for _ in range(1 if share_weights else num_blocks)])
        self.pool = QueryPool(latent_dim, drop=drop_rate, attn_drop=attn_drop_rate) if head_type == "query" else None
        self.head = nn.Linear(latent_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """Linear weights, the latents and the head's learned query ~ N(0, std) truncated at 2 std; biases 0;
        LayerNorms 1 and 0.  (A MultimodalInput initialises its modality embeddings itself.)"""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.latents, std=std, a=-2 * std, b=2 * std)
        if self.pool is not None:
            nn.init.trunc_normal_(self.pool.query, std=std, a=-2 * std, b=2 * std)

    def _cross_attend(self, i: int) -> PerceiverCrossAttentionBlock:
        """The weights of the i-th cross-attend (shared: the first has its own, all later ones share one)."""
        return self.cross_attends[min(i, 1) if self.share_weights else i]

    def _transformer(self, j: int) -> LatentTransformer:
        return self.transformers[0 if self.share_weights else j]

    def forward_features(self, x, input_mask: Optional[Tensor] = None) -> Tensor:
        """Raw input -> the final latents ``[B, num_latents, latent_dim]``."""
        inputs = self.input_adapter(x)
        if input_mask is not None and (not isinstance(input_mask, Tensor) or input_mask.dtype != torch.bool
                                       or tuple(input_mask.shape) != tuple(inputs.shape[:2])):
            got = f"{input_mask.dtype} {tuple(input_mask.shape)}" if isinstance(input_mask, Tensor) else input_mask
            raise ValueError(f"input_mask: expected a bool tensor of shape {tuple(inputs.shape[:2])} (batch, "
                             f"inputs), got {got}")
        latents = self.latents.to(inputs.dtype).expand(inputs.shape[0], -1, -1)
        for j in range(self.num_blocks):
            if j < self.num_cross_attends:
                latents = self._cross_attend(j)(latents, inputs, input_mask)
            latents = self._transformer(j)(latents)
        return latents

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Latents ``[B, N, D]`` -> pooled ``[B, D]`` (``pre_logits``) or logits ``[B, num_classes]``."""
        x = x.mean(dim=1) if self.pool is None else self.pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x, input_mask: Optional[Tensor] = None) -> Tensor:
        return self.forward_head(self.forward_features(x, input_mask))


# ---------------------------------------------------------------------------------------------------------------
# Named configurations
# ---------------------------------------------------------------------------------------------------------------

_MODEL_ARGS = set(inspect.signature(Perceiver).parameters) - {"input_adapter"}


def _create(model_defaults: dict, adapter_kind: str, adapter_defaults: dict, overrides: dict) -> Perceiver:
    """Builds a Perceiver from a configuration's defaults and keyword ``overrides``: the Perceiver's own arguments
    go to it, the rest to the input adapter (``input_adapter=`` a kind name switches the modality; the
    configuration's adapter defaults that the new kind does not take are dropped)."""
    model_kwargs = {**model_defaults, **{k: v for k, v in overrides.items() if k in _MODEL_ARGS}}
    adapter_kwargs = {k: v for k, v in overrides.items() if k not in _MODEL_ARGS and k != "input_adapter"}
    adapter = overrides.get("input_adapter", adapter_kind)
    if isinstance(adapter, str):
        if adapter not in _INPUT_ADAPTERS:
            raise ValueError(f"input_adapter: unknown kind {adapter!r}; expected one of {sorted(_INPUT_ADAPTERS)}")
        accepted = set(inspect.signature(_INPUT_ADAPTERS[adapter]).parameters)
        defaults = {k: v for k, v in adapter_defaults.items() if k in accepted} if adapter == adapter_kind else {}
        adapter = make_input_adapter(adapter, **{**defaults, **adapter_kwargs})
    elif adapter_kwargs:
        raise TypeError(f"{', '.join(sorted(adapter_kwargs))}: unexpected with an input_adapter module (they "
                        f"configure the input adapter; set them on it)")
    return Perceiver(input_adapter=adapter, **model_kwargs)


@register_model
def perceiver_imagenet(**overrides) -> Perceiver:
    """Perceiver on ImageNet (Jaegle et al. 2021, 44.9M parameters): 224x224 RGB pixels with 2-D Fourier features
    (64 bands, max resolution 224: 3 + 258 = 261 input channels), 512 x 1024 latents, 8 cross-attends (1 head,
    qk/v channels 261) each followed by a 6-layer latent transformer (8 heads, MLP ratio 1), weights shared
    (the latent transformer everywhere, cross-attends after the first); mean-pooled latents -> linear head."""
    return _create(dict(num_classes=1000, num_latents=512, latent_dim=1024, num_cross_attends=8, depth=6,
                        cross_num_heads=1, num_heads=8, mlp_ratio=1.0, cross_mlp_ratio=1.0, head_type="mean"),
                   "image", dict(in_chans=3, num_bands=64, max_resolution=224), overrides)


@register_model
def perceiver_modelnet40(**overrides) -> Perceiver:
    """Perceiver on ModelNet40 point clouds (Jaegle et al. 2021): the ImageNet architecture with 2 cross-attends
    and 6 self-attention layers per block, xyz Fourier features with 64 bands up to frequency 1120 (3 * 129 = 387
    input channels), 40 classes."""
    return _create(dict(num_classes=40, num_latents=512, latent_dim=1024, num_cross_attends=2, depth=6,
                        cross_num_heads=1, num_heads=8, mlp_ratio=1.0, cross_mlp_ratio=1.0, head_type="mean"),
                   "points", dict(num_bands=64, max_resolution=2240.0), overrides)


@register_model
def perceiver_io_imagenet_fourier(**overrides) -> Perceiver:
    """Perceiver IO on ImageNet with 2-D Fourier features (Jaegle et al. 2022; transformers'
    ``PerceiverForImageClassificationFourier`` / deepmind/vision-perceiver-fourier): pixels + Fourier features
    (64 bands, max resolution 224), 512 x 1024 latents, one cross-attend, then a 6-layer latent transformer applied
    8 times (shared weights), and a learned-query cross-attention decoder -> linear head."""
    return _create(dict(num_classes=1000, num_latents=512, latent_dim=1024, num_cross_attends=1, num_blocks=8,
                        depth=6, cross_num_heads=1, num_heads=8, mlp_ratio=1.0, cross_mlp_ratio=1.0,
                        head_type="query"),
                   "image", dict(in_chans=3, num_bands=64, max_resolution=224), overrides)


# ---------------------------------------------------------------------------------------------------------------
# Converter from transformers
# ---------------------------------------------------------------------------------------------------------------

def _hf_cross_layer_state(src: str, sd: dict, dst: str) -> dict:
    """transformers' cross-attention ``PerceiverLayer`` -> our PerceiverCrossAttentionBlock."""
    names = {"attention.self.layernorm1": "attn.norm_latents", "attention.self.layernorm2": "attn.norm_inputs",
             "attention.self.query": "attn.q_proj", "attention.self.key": "attn.k_proj",
             "attention.self.value": "attn.v_proj", "attention.output.dense": "attn.out_proj",
             "layernorm": "norm", "mlp.dense1": "mlp.fc1", "mlp.dense2": "mlp.fc2"}
    return {f"{dst}.{ours}.{p}": sd[f"{src}.{theirs}.{p}"]
            for theirs, ours in names.items() for p in ("weight", "bias")}


def _hf_self_layer_state(src: str, sd: dict, dst: str) -> dict:
    """transformers' self-attention ``PerceiverLayer`` -> our Block (query/key/value stacked into ``qkv``)."""
    out = {}
    for p in ("weight", "bias"):
        out[f"{dst}.attn.qkv.{p}"] = torch.cat([sd[f"{src}.attention.self.{n}.{p}"] for n in ("query", "key", "value")])
        for theirs, ours in {"attention.self.layernorm1": "norm1", "attention.output.dense": "attn.proj",
                             "layernorm": "norm2", "mlp.dense1": "mlp.fc1", "mlp.dense2": "mlp.fc2"}.items():
            out[f"{dst}.{ours}.{p}"] = sd[f"{src}.{theirs}.{p}"]
    return out


@register_converter("transformers", "PerceiverForImageClassificationFourier")
def _from_transformers_perceiver_fourier(hf) -> Perceiver:
    """transformers' ``PerceiverForImageClassificationFourier`` (its Fourier image preprocessor, PerceiverModel
    and classification decoder) -> our Perceiver with ``head_type="query"``, weights loaded.

    Needs what our blocks express: GELU (exact) MLPs, the query residual in the encoder's cross-attention, and
    self-attention with equal query-key and value channels (``config.qk_channels``/``v_channels`` None or
    ``d_latents``); anything else raises a ValueError naming the setting."""
    cfg = hf.config
    pre = hf.perceiver.input_preprocessor
    pe = pre.position_embeddings
    problems = []
    if cfg.hidden_act != "gelu":
        problems.append(f"hidden_act {cfg.hidden_act!r} (ours: exact GELU)")
    if not cfg.use_query_residual:
        problems.append("use_query_residual=False (ours: the cross-attention adds its query)")
    for name in ("qk_channels", "v_channels"):
        if getattr(cfg, name) not in (None, cfg.d_latents):
            problems.append(f"{name}={getattr(cfg, name)} (the latent self-attention's q/k/v share one width)")
    if pre.prep_type != "pixels" or pre.spatial_downsample != 1 or pre.concat_or_add_pos != "concat" \
            or pre.project_pos_dim > 0 or not pe.concat_pos or pe.sine_only:
        problems.append("an image preprocessor other than pixels + concatenated [pos, sin, cos] Fourier features")
    if problems:
        raise ValueError(f"hf: cannot map {type(hf).__name__} with " + "; ".join(problems))
    if cfg.cross_attention_shape_for_attention == "kv":
        cross_qk = cfg.qk_channels if cfg.qk_channels is not None else pre.num_channels
    else:
        cross_qk = cfg.qk_channels if cfg.qk_channels is not None else cfg.d_latents
    adapter = ImageInput(in_chans=pre.in_channels, num_bands=pe.num_bands, max_resolution=tuple(pe.max_resolution))
    ours = Perceiver(input_adapter=adapter, num_classes=cfg.num_labels, num_latents=cfg.num_latents,
                     latent_dim=cfg.d_latents, num_cross_attends=1, num_blocks=cfg.num_blocks,
                     depth=cfg.num_self_attends_per_block, cross_num_heads=cfg.num_cross_attention_heads,
                     num_heads=cfg.num_self_attention_heads, cross_qk_channels=cross_qk,
                     cross_v_channels=cfg.v_channels, mlp_ratio=cfg.self_attention_widening_factor,
                     cross_mlp_ratio=cfg.cross_attention_widening_factor, share_weights=True, head_type="query",
                     attn_drop_rate=cfg.attention_probs_dropout_prob)
    sd = hf.state_dict()
    state = {"latents": sd["perceiver.embeddings.latents"]}
    state.update(_hf_cross_layer_state("perceiver.encoder.cross_attention", sd, "cross_attends.0"))
    for i in range(cfg.num_self_attends_per_block):
        state.update(_hf_self_layer_state(f"perceiver.encoder.self_attends.{i}", sd, f"transformers.0.blocks.{i}"))
    d = "perceiver.decoder.decoder"
    state["pool.query"] = sd[f"{d}.output_position_encodings.position_embeddings"]
    state.update(_hf_cross_layer_state(f"{d}.decoding_cross_attention", sd, "pool.attend"))
    state["head.weight"], state["head.bias"] = sd[f"{d}.final_layer.weight"], sd[f"{d}.final_layer.bias"]
    ours.load_state_dict(state, strict=True)
    return ours.to(dtype=next(hf.parameters()).dtype).train(hf.training)
