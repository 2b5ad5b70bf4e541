"""``fastattn.nn.WindowAttention``: Swin's window attention module on ``fastattn.window_attention``.

Parameters carry timm's names, shapes and initialisation (``timm.models.swin_transformer.WindowAttention``):
``qkv`` (Linear dim -> 3 * heads * head_dim), ``proj`` (Linear heads * head_dim -> dim),
``relative_position_bias_table`` (``[(2*wh-1)*(2*ww-1), heads]``, trunc-normal std 0.02) and the
non-persistent ``relative_position_index`` buffer -- so ``load_state_dict`` with ``strict=True`` works both
ways with timm's module.

Unlike timm's module, which takes already partitioned windows ``[B*nW, N, C]`` and a mask, this one takes
the (normalised) feature map ``x`` ``[B, H, W, C]`` and the shift: the shift, padding, partition and mask
are its business, so a Swin block is just ``x = x + drop_path(attn(norm1(x), shift_size))`` plus the MLP.
The shift is a ``forward`` argument (not constructor state) because it is the block's choice and one module
serves both block kinds.

What stays with the block / model: timm clamps the window to the input resolution and sets the shift to 0
on an axis when ``resolution <= window`` (``SwinTransformerBlock._calc_window_shift``); build this module
with the clamped window and pass the resulting shift.  Given a window larger than ``x`` this module pads
(timm's ``always_partition=True`` behaviour).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..window import IntOrPair, _pair, pad_to_window, relative_position_index, window_attention

__all__ = ["WindowAttention"]


class WindowAttention(nn.Module):
    """Window (W-MSA) / shifted-window (SW-MSA) multi-head self-attention with relative position bias.

    Args:
        dim: channels of ``x``.
        num_heads: attention heads.
        window_size: ``int`` or ``(wh, ww)``.
        qkv_bias: bias of the qkv projection.
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
        head_dim: channels per head (default ``dim // num_heads``), as timm's ``head_dim``.
        roll_before_pad: when ``H``/``W`` are not multiples of the window and the shift is non-zero, the order
            of the cyclic shift and the zero padding: True (default) = roll, then pad -- timm >= 1.0's
            ``SwinTransformerBlock``; False = pad, then roll -- HF transformers' ``SwinLayer`` and the original
            Swin detection code.  Irrelevant when no padding is needed.
        backend: restricts the attention backend (see ``fastattn.explain``).

    ``forward(x, shift_size=0)``: ``x`` ``[B, H, W, dim]`` (the block's normalised features), ``shift_size``
    ``int`` or ``(sh, sw)`` in ``[0, window)``.  Returns ``[B, H, W, dim]``.  ``H``, ``W`` need not be
    multiples of the window: the features are padded with zeros at the bottom/right before the qkv
    projection, and the output is cropped -- exactly as timm's block (or transformers', see
    ``roll_before_pad``).
    """

    def __init__(self, dim: int, num_heads: int, window_size: IntOrPair, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, *, head_dim: Optional[int] = None,
                 roll_before_pad: bool = True, backend=None, device=None, dtype=None):
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads: must be positive, got {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = _pair(window_size, "window_size")
        win_h, win_w = self.window_size
        if win_h < 1 or win_w < 1:
            raise ValueError(f"window_size: must be positive, got {self.window_size}")
        self.window_area = win_h * win_w
        self.head_dim = head_dim or dim // num_heads
        if self.head_dim < 1:
            raise ValueError(f"num_heads: {num_heads} heads leave no channel per head for dim {dim}")
        attn_dim = self.head_dim * num_heads
        self.scale = self.head_dim ** -0.5
        self.attn_drop = float(attn_drop)
        self.roll_before_pad = bool(roll_before_pad)
        self.backend = backend

        # Same registration order and names as timm (state_dict keys: relative_position_bias_table, qkv.*, proj.*).
        self.relative_position_bias_table = nn.Parameter(
            torch.empty((2 * win_h - 1) * (2 * win_w - 1), num_heads, **dd))
        # Non-persistent, as timm's (kept for parity: code that reads it; the op recomputes the same index).
        self.register_buffer("relative_position_index",
                             relative_position_index(self.window_size, device=device), persistent=False)
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(attn_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's initialisation: the bias table trunc-normal (std 0.02, cut at +-2); Linears torch's default."""
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        with torch.no_grad():
            self.relative_position_index.copy_(
                relative_position_index(self.window_size, device=self.relative_position_index.device))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"head_dim={self.head_dim}, attn_drop={self.attn_drop}, roll_before_pad={self.roll_before_pad}, "
                f"backend={self.backend!r}")

    def forward(self, x: torch.Tensor, shift_size: IntOrPair = 0) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a 4-D tensor [B, H, W, {self.dim}], got {shape}")
        B, H, W, _ = x.shape
        sh, sw = _pair(shift_size, "shift_size")
        xp = pad_to_window(x, self.window_size)
        Hp, Wp = xp.shape[1], xp.shape[2]
        padded = (Hp, Wp) != (H, W)
        qkv = self.qkv(xp).view(B, Hp, Wp, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(3)  # [B, Hp, Wp, heads, head_dim] views, read in place
        out = window_attention(
            q, k, v, window_size=self.window_size, shift_size=(sh, sw),
            rel_pos_bias_table=self.relative_position_bias_table, scale=self.scale,
            dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend,
            unpadded_size=(H, W) if (padded and self.roll_before_pad) else None)
        if padded:
            out = out[:, :H, :W]
        out = out.reshape(B, H, W, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(out))
