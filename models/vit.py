"""Vision Transformer (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words") and DeiT (Touvron et al., 2021).

The image is cut into ``patch_size`` x ``patch_size`` patches, each linearly embedded (``PatchEmbed``); a learned
class token is prepended (DeiT's distilled variant adds a distillation token after it), a learned position
embedding is added, and the sequence runs through ``depth`` pre-LN transformer blocks (``models.layers.Block``:
attention through ``fastattn.nn.Attention``, 2-layer GELU MLP).  The head reads the final class token (or the
mean of the patch tokens, ``global_pool="avg"``).

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.attn.qkv``, ``norm``, ``fc_norm``, ``head``, ``dist_token``, ``head_dist``), so a timm state_dict
loads as is; ``from_transformers`` maps Hugging Face's ``ViTModel`` / ``ViTForImageClassification`` (separate
q/k/v projections concatenated into ``qkv``; the ``ViTModel`` pooler becomes ``pre_logits``).

Named configurations (the papers' tables; any size by keyword)::

    create_model("vit_base_patch16_224")                 # ViT-B/16, 86.6M parameters with 1000 classes
    create_model("deit_small_patch16_224", num_classes=10)
    create_model("vit_base_patch16_224", img_size=32, patch_size=4, depth=2, embed_dim=64, num_heads=4)
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Callable, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_converter, register_model
from .layers import Block, PatchEmbed, to_2tuple

__all__ = ["VisionTransformer", "resample_pos_embed"]

# timm's default LayerNorm epsilon for ViT/DeiT (torch's default is 1e-5, Hugging Face ViT's 1e-12).
_DEFAULT_NORM = partial(nn.LayerNorm, eps=1e-6)


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: Tuple[int, int], old_grid: Tuple[int, int],
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize a learned position embedding ``[1, prefix + Ho*Wo, C]`` to another patch grid ``(Hn, Wn)``.

    The prefix tokens' (class / distillation) embeddings are kept; the patch embeddings are treated as a ``C``-
    channel image of size ``old_grid`` and resized bicubically with anti-aliasing (as timm's
    ``resample_abs_pos_embed``), computed in float32 at least."""
    new_grid, old_grid = to_2tuple(new_grid, "new_grid"), to_2tuple(old_grid, "old_grid")
    if pos_embed.dim() != 3 or pos_embed.shape[1] != num_prefix_tokens + old_grid[0] * old_grid[1]:
        raise ValueError(f"pos_embed: expected [1, {num_prefix_tokens} + {old_grid[0]}*{old_grid[1]}, C], "
                         f"got {tuple(pos_embed.shape)}")
    if new_grid == old_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    work_dtype = torch.promote_types(grid.dtype, torch.float32)
    grid = grid.to(work_dtype).reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class VisionTransformer(nn.Module):
    """ViT / DeiT image classifier: images ``[B, in_chans, H, W]`` to logits ``[B, num_classes]``.

    Args:
        img_size: input resolution (int or (H, W)); inputs must have exactly this size (see ``set_input_size``).
        patch_size: patch side (the stride of the patch-embedding conv).
        in_chans: image channels.
        num_classes: classes of the linear head; 0 for none (``forward`` then returns the pooled features).
        global_pool: ``"token"`` (the class token, the paper's choice) or ``"avg"`` (mean of the patch tokens;
            as in timm the final norm then moves after the pooling, into ``fc_norm``).
        embed_dim, depth, num_heads, mlp_ratio: width, blocks, heads, MLP hidden width / ``embed_dim``.
        qkv_bias: bias of the qkv projection (True in all ViT/DeiT checkpoints).
        representation_size: if set, a ``Linear(embed_dim, representation_size) + tanh`` before the head (the
            paper's pre-training head "MLP with one hidden layer"; Hugging Face ``ViTModel``'s pooler).
        distilled: DeiT's distillation token and second head (``head_dist``); the prediction is the mean of
            the two heads' logits, or both logits as a tuple in training with ``set_distilled_training(True)``.
        final_norm: LayerNorm after the last block (False: the caller normalises, e.g. SETR's decoders).
        drop_rate: dropout before the head.  pos_drop_rate: after adding the position embedding.
        proj_drop_rate, attn_drop_rate: dropout after the attention / MLP projections and on the attention
            probabilities.  drop_path_rate: stochastic depth, rising linearly over the blocks to this rate.
        norm_layer: normalisation constructor (LayerNorm, eps 1e-6 by default).
        act_layer: MLP activation constructor (exact GELU by default).
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: Union[int, Tuple[int, int]] = 16,
                 in_chans: int = 3, num_classes: int = 1000, global_pool: str = "token", embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 representation_size: Optional[int] = None, distilled: bool = False, final_norm: bool = True,
                 drop_rate: float = 0.0, pos_drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer: Optional[Callable[[int], nn.Module]] = None,
                 act_layer: Optional[Callable[[], nn.Module]] = None):
        super().__init__()
        for name, value in (("in_chans", in_chans), ("embed_dim", embed_dim), ("depth", depth),
                            ("num_heads", num_heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes: expected an int >= 0, got {num_classes!r}")
        if embed_dim % num_heads:
            raise ValueError(f"num_heads: embed_dim {embed_dim} is not divisible by {num_heads} heads")
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool: expected 'token' or 'avg', got {global_pool!r}")
        if distilled and (global_pool != "token" or representation_size):
            raise ValueError("distilled: the distillation head reads the class and distillation tokens; "
                             "it needs global_pool='token' and no representation_size")
        img_size, patch_size = to_2tuple(img_size, "img_size"), to_2tuple(patch_size, "patch_size")
        if any(i < p for i, p in zip(img_size, patch_size)):
            raise ValueError(f"img_size: {img_size} is smaller than one patch {patch_size}")
        norm_layer = norm_layer or _DEFAULT_NORM
        act_layer = act_layer or nn.GELU

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = embed_dim
        self.distilled = bool(distilled)
        self.distilled_training = False  # set_distilled_training(True): both heads' logits in training
        self.num_prefix_tokens = 2 if distilled else 1

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens,
                                                  embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        # Stochastic depth rises linearly from 0 (first block) to drop_path_rate (last), as in timm.
        drop_path = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                  attn_drop=attn_drop_rate, drop_path=drop_path[i], act_layer=act_layer, norm_layer=norm_layer)
            for i in range(depth)])
        # With average pooling the final norm is applied to the pooled vector (timm's fc_norm), not the tokens.
        use_fc_norm = global_pool == "avg"
        self.norm = norm_layer(embed_dim) if final_norm and not use_fc_norm else nn.Identity()
        self.fc_norm = norm_layer(embed_dim) if final_norm and use_fc_norm else nn.Identity()
        if representation_size:
            self.pre_logits = nn.Sequential(OrderedDict([("fc", nn.Linear(embed_dim, representation_size)),
                                                         ("act", nn.Tanh())]))
            self.num_features = representation_size
        else:
            self.pre_logits = nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.head_dist = nn.Linear(embed_dim, num_classes) if distilled and num_classes else None
        self.init_weights()

    # ---------------------------------------------------------------------------------------------- setup
    def init_weights(self) -> None:
        """timm's default ViT initialisation: truncated normal (std 0.02) for the position embedding, the
        prefix tokens and every Linear weight, zero Linear biases; LayerNorm to identity; the patch-embedding
        conv keeps PyTorch's default."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> Set[str]:
        """Parameters that optimisers conventionally exclude from weight decay."""
        return {"pos_embed", "cls_token", "dist_token"}

    def set_distilled_training(self, enable: bool = True) -> None:
        """Distilled models only: in training mode, return ``(class logits, distillation logits)``."""
        if not self.distilled:
            raise ValueError("enable: set_distilled_training needs a model built with distilled=True")
        self.distilled_training = bool(enable)

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Accept ``img_size`` inputs from now on: the position embedding is resampled to the new patch grid
        (bicubic, see ``resample_pos_embed``)."""
        img_size = to_2tuple(img_size, "img_size")
        pe = self.patch_embed
        new_grid = tuple(s // p for s, p in zip(img_size, pe.patch_size))
        if min(new_grid) < 1:
            raise ValueError(f"img_size: {img_size} is smaller than one patch {pe.patch_size}")
        with torch.no_grad():
            resized = resample_pos_embed(self.pos_embed.detach(), new_grid, pe.grid_size, self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(resized.clone(), requires_grad=self.pos_embed.requires_grad)
        # PatchEmbed keeps the size it checks inputs against in these three attributes.
        pe.img_size, pe.grid_size, pe.num_patches = img_size, new_grid, new_grid[0] * new_grid[1]

    # -------------------------------------------------------------------------------------------- forward
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens, prefix tokens prepended, position embedding added: ``[B, prefix + N, C]``."""
        x = self.patch_embed(x)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` to the final tokens ``[B, prefix + N, embed_dim]`` (class token first)."""
        return self.norm(self.blocks(self._embed(x)))

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The tokens ``[B, prefix + N, embed_dim]`` output by the blocks ``indices`` (0-based, ascending, no
        norm applied); the blocks after the last index are not run."""
        indices = [int(i) for i in indices]
        if not indices or sorted(set(indices)) != indices or indices[0] < 0 or indices[-1] >= len(self.blocks):
            raise ValueError(f"indices: expected ascending distinct block indices in [0, {len(self.blocks)}), "
                             f"got {indices}")
        x = self._embed(x)
        out = []
        for i, block in enumerate(self.blocks[:indices[-1] + 1]):
            x = block(x)
            if i in indices:
                out.append(x)
        return out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """Final tokens to logits (``pre_logits=True``: the pooled features before the head)."""
        if self.distilled:
            cls, dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
            if pre_logits:
                return (cls + dist) / 2
            cls = self.head(cls)
            dist = self.head_dist(dist) if self.head_dist is not None else dist
            if self.distilled_training and self.training:
                return cls, dist
            return (cls + dist) / 2
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(self.pre_logits(self.fc_norm(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------------ named configurations
def _vit(defaults: dict, overrides: dict) -> VisionTransformer:
    return VisionTransformer(**{**defaults, **overrides})


@register_model
def vit_base_patch16_224(**overrides) -> VisionTransformer:
    """ViT-B/16 (ViT paper, Table 1: 12 layers, width 768, MLP 3072, 12 heads; 86M parameters)."""
    return _vit(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), overrides)


@register_model
def vit_base_patch32_224(**overrides) -> VisionTransformer:
    """ViT-B/32."""
    return _vit(dict(patch_size=32, embed_dim=768, depth=12, num_heads=12), overrides)


@register_model
def vit_large_patch16_224(**overrides) -> VisionTransformer:
    """ViT-L/16 (24 layers, width 1024, MLP 4096, 16 heads).

    304.3M parameters with a 1000-class head -- the paper's Table 1 says 307M.  The paper does not say how it
    counted; summing the layers of its own Table 1 configuration gives 304.3M (as timm's
    ``vit_large_patch16_224``), so that is what we build and test."""
    return _vit(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), overrides)


@register_model
def vit_large_patch32_224(**overrides) -> VisionTransformer:
    """ViT-L/32."""
    return _vit(dict(patch_size=32, embed_dim=1024, depth=24, num_heads=16), overrides)


@register_model
def vit_huge_patch14_224(**overrides) -> VisionTransformer:
    """ViT-H/14 (32 layers, width 1280, MLP 5120, 16 heads; 632M parameters)."""
    return _vit(dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16), overrides)


@register_model
def deit_tiny_patch16_224(**overrides) -> VisionTransformer:
    """DeiT-Ti (DeiT paper, Table 1: width 192, 3 heads, 12 layers; 5M parameters)."""
    return _vit(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), overrides)


@register_model
def deit_small_patch16_224(**overrides) -> VisionTransformer:
    """DeiT-S (width 384, 6 heads, 12 layers; 22M parameters)."""
    return _vit(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), overrides)


@register_model
def deit_base_patch16_224(**overrides) -> VisionTransformer:
    """DeiT-B (the ViT-B/16 architecture, trained differently; 86M parameters)."""
    return _vit(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), overrides)


@register_model
def deit_tiny_distilled_patch16_224(**overrides) -> VisionTransformer:
    """DeiT-Ti with the distillation token (DeiT-Ti⚗)."""
    return _vit(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, distilled=True), overrides)


@register_model
def deit_small_distilled_patch16_224(**overrides) -> VisionTransformer:
    """DeiT-S with the distillation token (DeiT-S⚗)."""
    return _vit(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, distilled=True), overrides)


@register_model
def deit_base_distilled_patch16_224(**overrides) -> VisionTransformer:
    """DeiT-B with the distillation token (DeiT-B⚗; 87M parameters)."""
    return _vit(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, distilled=True), overrides)


# ---------------------------------------------------------------------------------------------- converters
def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _gelu_like(act: nn.Module, where: str) -> Callable[[], nn.Module]:
    """The constructor of an activation module equal to ``act`` (exact or tanh-approximated GELU)."""
    if type(act) is nn.GELU:
        return partial(nn.GELU, approximate=act.approximate)
    raise ValueError(f"model: {where} activation {type(act).__name__} is not supported (GELU only)")


def _layer_norm_like(norm: nn.Module, where: str) -> Callable[[int], nn.Module]:
    if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine or norm.bias is None:
        raise ValueError(f"model: {where} must be an affine LayerNorm, got {type(norm).__name__}")
    return partial(nn.LayerNorm, eps=norm.eps)


def _finish(ours: VisionTransformer, source: nn.Module, state: dict) -> VisionTransformer:
    """Load ``state`` (strict), move ``ours`` to the source's device/dtype and training mode."""
    ref = next(source.parameters())
    ours.to(device=ref.device, dtype=ref.dtype)
    ours.load_state_dict(state, strict=True)
    return ours.train(source.training)


@register_converter("timm", "VisionTransformer")
def _from_timm_vit(model) -> VisionTransformer:
    """timm ``VisionTransformer`` (ViT, DeiT) or ``VisionTransformerDistilled`` (DeiT⚗) to ours.

    The configuration is read from the model; features of timm's class that the ViT/DeiT papers do not have
    (register tokens, layer scale, qk-norm, pre-norm, attention pooling, ...) raise a ``ValueError``."""
    cls_name = type(model).__name__
    if cls_name not in ("VisionTransformer", "VisionTransformerDistilled"):
        raise TypeError(f"model: {cls_name} is not a plain timm VisionTransformer")
    blocks = list(model.blocks)
    if not blocks:
        raise ValueError("model: a VisionTransformer without blocks")
    b0 = blocks[0]
    pe = model.patch_embed
    unsupported = {
        "class_token=False": not getattr(model, "has_class_token", True) or model.cls_token is None,
        "reg_tokens": bool(getattr(model, "num_reg_tokens", 0)),
        "no_embed_class": bool(getattr(model, "no_embed_class", False)),
        "pos_embed='none'": model.pos_embed is None,
        "dynamic_img_size": bool(getattr(model, "dynamic_img_size", False)),
        "pre_norm": not _is_identity(getattr(model, "norm_pre", None)),
        "patch_drop_rate": not _is_identity(getattr(model, "patch_drop", None)),
        "attention pooling": getattr(model, "attn_pool", None) is not None,
        "global_pool other than 'token'/'avg'": model.global_pool not in ("token", "avg"),
        "fc_norm with token pooling": model.global_pool == "token" and not _is_identity(model.fc_norm),
        "final norm before average pooling (fc_norm=False)": model.global_pool == "avg"
        and not _is_identity(model.norm),
        "pool_include_prefix": bool(getattr(model, "pool_include_prefix", False)),
        "patch_embed norm / dynamic padding": not _is_identity(getattr(pe, "norm", None))
        or bool(getattr(pe, "dynamic_img_pad", False)) or not getattr(pe, "flatten", True),
        "patch_embed without bias": pe.proj.bias is None,
    }
    for i, b in enumerate(blocks):
        attn = b.attn
        unsupported.update({
            f"block {i}: {type(b).__name__}": type(b).__name__ != "Block",
            f"block {i}: {type(attn).__name__}": type(attn).__name__ != "Attention",
            f"block {i}: layer scale (init_values)": not (_is_identity(b.ls1) and _is_identity(b.ls2)),
            f"block {i}: qk_norm": not (_is_identity(getattr(attn, "q_norm", None))
                                        and _is_identity(getattr(attn, "k_norm", None))),
            f"block {i}: scale_attn_norm": not _is_identity(getattr(attn, "norm", None)),
            f"block {i}: gated attention": getattr(attn, "gate", None) is not None,
            f"block {i}: scale_mlp_norm": not _is_identity(getattr(b.mlp, "norm", None)),
            f"block {i}: proj_bias=False": attn.proj.bias is None or b.mlp.fc1.bias is None,
            f"block {i}: mlp type {type(b.mlp).__name__}": type(b.mlp).__name__ != "Mlp",
            f"block {i}: attn_head_dim": attn.head_dim * attn.num_heads != model.embed_dim,
        })
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"model: timm VisionTransformer features not in ViT/DeiT: {', '.join(bad)}")

    distilled = cls_name == "VisionTransformerDistilled"
    final_norm = not (_is_identity(model.norm) and _is_identity(model.fc_norm))
    norm_src = model.norm if not _is_identity(model.norm) else (
        model.fc_norm if not _is_identity(model.fc_norm) else b0.norm1)
    embed_dim = model.embed_dim
    mlp_hidden = b0.mlp.fc1.out_features
    ours = VisionTransformer(
        img_size=tuple(pe.img_size), patch_size=tuple(pe.patch_size), in_chans=pe.proj.in_channels,
        num_classes=model.num_classes if isinstance(model.head, nn.Linear) else 0,
        global_pool=model.global_pool, embed_dim=embed_dim, depth=len(blocks), num_heads=b0.attn.num_heads,
        mlp_ratio=mlp_hidden / embed_dim, qkv_bias=b0.attn.qkv.bias is not None, distilled=distilled,
        final_norm=final_norm, drop_rate=getattr(getattr(model, "head_drop", None), "p", 0.0),
        pos_drop_rate=model.pos_drop.p,
        proj_drop_rate=b0.attn.proj_drop.p, attn_drop_rate=b0.attn.attn_drop.p,
        drop_path_rate=float(getattr(blocks[-1].drop_path1, "drop_prob", 0.0)),
        norm_layer=_layer_norm_like(norm_src, "the norm layers"), act_layer=_gelu_like(b0.mlp.act, "the MLP"))
    if ours.blocks[0].mlp.fc1.out_features != mlp_hidden:
        raise ValueError(f"model: MLP width {mlp_hidden} is not int(embed_dim * mlp_ratio)")
    if distilled:
        ours.distilled_training = bool(getattr(model, "distilled_training", False))
    return _finish(ours, model, model.state_dict())


_HF_ACTS = {"gelu": partial(nn.GELU, approximate="none"),
            "gelu_new": partial(nn.GELU, approximate="tanh"),
            "gelu_pytorch_tanh": partial(nn.GELU, approximate="tanh")}


@register_converter("transformers", "ViTModel", "ViTForImageClassification")
def _from_transformers_vit(model) -> VisionTransformer:
    """Hugging Face ``ViTForImageClassification`` (head ``classifier`` -> ``head``) or ``ViTModel`` (no head;
    its pooler, if present, -> ``pre_logits``, so ``forward`` returns ``pooler_output`` and
    ``forward_features`` ``last_hidden_state``).  The separate ``q_proj``/``k_proj``/``v_proj`` are
    concatenated (in that order) into ``qkv``.  The masked-image-modelling ``mask_token`` is not carried.

    ``hidden_dropout_prob`` becomes our ``pos_drop_rate`` and ``proj_drop_rate``; in training the dropout sites
    differ slightly (timm's layout also drops after the MLP activation), so only eval outputs are equal."""
    cfg = model.config
    if type(model).__name__ == "ViTForImageClassification":
        vit, classifier = model.vit, model.classifier
    else:
        vit, classifier = model, None
    if cfg.hidden_act not in _HF_ACTS:
        raise ValueError(f"model: config.hidden_act {cfg.hidden_act!r} is not supported; "
                         f"expected one of {sorted(_HF_ACTS)}")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        raise ValueError(f"model: {cfg.num_attention_heads} heads of {head_dim} channels != "
                         f"hidden_size {cfg.hidden_size}")
    pooler = getattr(vit, "pooler", None)
    if pooler is not None and getattr(cfg, "pooler_act", "tanh") != "tanh":
        raise ValueError(f"model: config.pooler_act {cfg.pooler_act!r} is not supported (tanh only)")
    num_classes = classifier.out_features if isinstance(classifier, nn.Linear) else 0
    ours = VisionTransformer(
        img_size=to_2tuple(cfg.image_size, "config.image_size"),
        patch_size=to_2tuple(cfg.patch_size, "config.patch_size"), in_chans=cfg.num_channels,
        num_classes=num_classes, embed_dim=cfg.hidden_size, depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads, mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
        qkv_bias=cfg.qkv_bias, representation_size=pooler.dense.out_features if pooler is not None else None,
        pos_drop_rate=cfg.hidden_dropout_prob, proj_drop_rate=cfg.hidden_dropout_prob,
        attn_drop_rate=cfg.attention_probs_dropout_prob,
        norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps), act_layer=_HF_ACTS[cfg.hidden_act])
    if ours.blocks[0].mlp.fc1.out_features != cfg.intermediate_size:
        raise ValueError(f"model: config.intermediate_size {cfg.intermediate_size} is not "
                         f"int(hidden_size * mlp_ratio)")

    src = {k: v for k, v in vit.state_dict().items()}
    state = {
        "cls_token": src["embeddings.cls_token"],
        "pos_embed": src["embeddings.position_embeddings"],
        "patch_embed.proj.weight": src["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": src["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": src["layernorm.weight"], "norm.bias": src["layernorm.bias"],
    }
    for i in range(cfg.num_hidden_layers):
        s, d = f"layers.{i}.", f"blocks.{i}."
        for ours_name, theirs in (("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                                  ("attn.proj", "attention.o_proj"), ("mlp.fc1", "mlp.fc1"),
                                  ("mlp.fc2", "mlp.fc2")):
            state[d + ours_name + ".weight"] = src[s + theirs + ".weight"]
            state[d + ours_name + ".bias"] = src[s + theirs + ".bias"]
        # Our qkv output is [3, heads, head_dim]: q, k and v projections stacked in that order.
        state[d + "attn.qkv.weight"] = torch.cat([src[f"{s}attention.{n}_proj.weight"] for n in "qkv"], dim=0)
        if cfg.qkv_bias:
            state[d + "attn.qkv.bias"] = torch.cat([src[f"{s}attention.{n}_proj.bias"] for n in "qkv"], dim=0)
    if pooler is not None:
        state["pre_logits.fc.weight"], state["pre_logits.fc.bias"] = pooler.dense.weight, pooler.dense.bias
    if num_classes:
        state["head.weight"], state["head.bias"] = classifier.weight, classifier.bias
    return _finish(ours, model, state)
