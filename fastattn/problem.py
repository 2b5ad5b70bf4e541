"""Validation and normalisation of the inputs of one attention call.

Every public entry point turns its arguments into an :class:`AttentionProblem` first, so backends can
assume well-formed inputs and only have to say whether they *support* them (see ``backends/base.py``).
Errors name the offending argument and what was expected.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

MAX_HEAD_DIM = 512  # the largest head dim the fused Triton kernels take (reference/sdpa take any)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Causal alignments.  "top_left" is F.scaled_dot_product_attention(is_causal=True): query i sees keys
# j <= i.  "bottom_right" aligns the last query with the last key: query i sees keys
# j <= i + (Lk - Lq) -- what decoding with a KV cache needs (Lq new tokens after Lk - Lq cached ones).
CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT = "none", "top_left", "bottom_right"


def normalize_causal(causal) -> str:
    if causal is False or causal is None or causal == CAUSAL_NONE:
        return CAUSAL_NONE
    if causal is True or causal == CAUSAL_TOP_LEFT:
        return CAUSAL_TOP_LEFT
    if causal == CAUSAL_BOTTOM_RIGHT:
        return CAUSAL_BOTTOM_RIGHT
    raise ValueError(
        f"causal: expected False, True, 'top_left' or 'bottom_right', got {causal!r}")


@dataclass
class AttentionProblem:
    q: torch.Tensor            # [B, Hq, Lq, Dqk]
    k: torch.Tensor            # [B, Hkv, Lk, Dqk]
    v: torch.Tensor            # [B, Hkv, Lk, Dv]
    mask: Optional[torch.Tensor]  # bool (True = attend) or float (added), broadcastable to [B,Hq,Lq,Lk]
    causal: str
    scale: float
    dropout_p: float
    return_lse: bool
    mask_needs_grad: bool = False  # a float mask that requires grad gets its gradient

    @property
    def batch(self): return self.q.shape[0]
    @property
    def heads_q(self): return self.q.shape[1]
    @property
    def heads_kv(self): return self.k.shape[1]
    @property
    def len_q(self): return self.q.shape[2]
    @property
    def len_k(self): return self.k.shape[2]
    @property
    def dim_qk(self): return self.q.shape[3]
    @property
    def dim_v(self): return self.v.shape[3]
    @property
    def device(self): return self.q.device
    @property
    def dtype(self): return self.q.dtype

    @property
    def mask_kind(self) -> str:
        if self.mask is None:
            return "none"
        return "bool" if self.mask.dtype == torch.bool else "float"

    @property
    def scores_shape(self):
        return (self.batch, self.heads_q, self.len_q, self.len_k)


def _check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported; expected one of "
                        f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) and not (
            isinstance(value, torch.Tensor) and value.numel() == 1 and not value.requires_grad):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    return float(value)


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale as a float: ``head_dim ** -0.5`` when None (then head_dim must be >= 1), else a finite
    number."""
    if scale is None:
        if head_dim < 1:
            raise ValueError(f"q: head dim must be at least 1, got {head_dim}")
        return 1.0 / math.sqrt(head_dim)
    scale = _number(scale, "scale")
    if not math.isfinite(scale):
        raise ValueError(f"scale: must be finite, got {scale}")
    return scale


def check_dropout_p(dropout_p) -> float:
    dropout_p = _number(dropout_p, "dropout_p")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: must be in [0, 1), got {dropout_p}")
    return dropout_p


def make_problem(q, k, v, attn_mask=None, causal=False, scale=None, dropout_p=0.0,
                 return_lse=False) -> AttentionProblem:
    _check_tensor("q", q)
    _check_tensor("k", k)
    _check_tensor("v", v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v: dtypes must match, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v: must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    B, Hq, Lq, Dqk = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    Bv, Hv, Lv, Dv = v.shape
    if Bk != B or Bv != B:
        raise ValueError(f"k, v: batch size must equal q's ({B}), got k {Bk}, v {Bv}")
    if Hv != Hkv:
        raise ValueError(f"v: number of heads ({Hv}) must equal k's ({Hkv})")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"k: number of key/value heads ({Hkv}) must divide q's number of heads ({Hq}) (GQA/MQA)")
    if Lv != Lk:
        raise ValueError(f"v: sequence length ({Lv}) must equal k's ({Lk})")
    if Dk != Dqk:
        raise ValueError(f"k: head dim ({Dk}) must equal q's ({Dqk})")
    for name, d in (("q", Dqk), ("v", Dv)):
        if d < 1:
            raise ValueError(f"{name}: head dim must be at least 1, got {d}")

    causal = normalize_causal(causal)
    scale = check_scale(scale, Dqk)
    dropout_p = check_dropout_p(dropout_p)

    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask: expected a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask: expected a bool (True = attend) or floating-point (added to the "
                            f"scores) tensor, got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask: must be on q's device {q.device}, got {attn_mask.device}")
        target = (B, Hq, Lq, Lk)
        ok = attn_mask.dim() <= 4
        if ok:
            try:
                ok = tuple(torch.broadcast_shapes(attn_mask.shape, target)) == target
            except RuntimeError:
                ok = False
        if not ok:
            raise ValueError(f"attn_mask: shape {tuple(attn_mask.shape)} is not broadcastable to "
                             f"[batch, heads, Lq, Lk] = {list(target)}")
    mask_needs_grad = (attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled())
    return AttentionProblem(q, k, v, attn_mask, causal, scale, dropout_p, bool(return_lse), mask_needs_grad)
