"""Incremental (one-token-at-a-time) decoding with ``fastattn.nn.MultiheadAttention``.

An autoregressive decoder that runs ``MultiheadAttention`` over the whole prefix at every step redoes all the
projections and all the attention rows of the earlier tokens.  These helpers run the *same* module (its own
``in_proj_weight`` / ``q_proj_weight`` ... / ``in_proj_bias`` / ``out_proj``) on the new tokens only:

* ``self_attention_step(mha, x, cache)``: the new tokens' keys and values are appended to ``cache`` (a
  ``fastattn.nn.KVCache``) and their queries attend over everything cached so far with
  ``causal="bottom_right"`` -- the i-th new token sees the cached prefix and the new tokens up to itself.
  Feeding a sequence in pieces gives the same output as ``mha(x, x, x, attn_mask=causal mask)`` on all of it.
* ``cross_attention_step(mha, x, cache, memory)``: encoder-decoder attention.  The memory's keys and values
  are projected once, on the first call (the cache is empty), and read from ``cache`` afterwards.

Both take and return tensors in the module's layout (``(N, L, E)`` when ``mha.batch_first``, else
``(L, N, E)``) and a ``key_padding_mask`` in torch's convention (``(N, S)`` over *all* keys -- cached ones
included; bool True = ignore the key, or float added to the scores).  ``KVCache.reorder`` selects batch rows
(beam search).  ``bias_k`` / ``bias_v`` / ``add_zero_attn`` modules are not supported (they add keys that do
not belong to any position).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import attention
from .attention import KVCache
from .multihead_attention import MultiheadAttention

__all__ = ["self_attention_step", "cross_attention_step", "project_query", "project_key_value"]


def _check_module(mha) -> None:
    if not isinstance(mha, MultiheadAttention):
        raise TypeError(f"mha: expected a fastattn.nn.MultiheadAttention, got {type(mha).__name__}")
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("mha: incremental decoding does not support add_bias_kv / add_zero_attn")


def _batch_first(mha, x: Tensor, name: str, dim: int) -> Tensor:
    """``x`` in the module's layout -> ``(N, L, dim)``."""
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        layout = "(N, L, E)" if mha.batch_first else "(L, N, E)"
        raise ValueError(f"{name}: expected a 3-D tensor {layout} with E = {dim}, got {shape}")
    return x if mha.batch_first else x.transpose(0, 1)


def _weights(mha) -> Tuple[Tensor, Tensor, Tensor]:
    """The q, k, v projection matrices (views of ``in_proj_weight`` when kdim == vdim == embed_dim)."""
    if mha._qkv_same_embed_dim:
        return mha.in_proj_weight.chunk(3)
    return mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight


def _biases(mha) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    return (None, None, None) if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)


def _heads(mha, t: Tensor) -> Tensor:
    """``[N, L, E]`` -> ``[N, heads, L, head_dim]`` (a strided view, no copy)."""
    return t.unflatten(-1, (mha.num_heads, mha.head_dim)).transpose(1, 2)


def project_query(mha, x: Tensor) -> Tensor:
    """Queries ``[N, heads, L, head_dim]`` of batch-first ``x`` ``[N, L, E]``."""
    wq, _, _ = _weights(mha)
    bq, _, _ = _biases(mha)
    return _heads(mha, F.linear(x, wq, bq))


def project_key_value(mha, x: Tensor) -> Tuple[Tensor, Tensor]:
    """Keys and values ``[N, heads, S, head_dim]`` of batch-first ``x`` ``[N, S, kdim]`` (kdim == vdim here)."""
    _, wk, wv = _weights(mha)
    _, bk, bv = _biases(mha)
    return _heads(mha, F.linear(x, wk, bk)), _heads(mha, F.linear(x, wv, bv))


def _padding_to_mask(key_padding_mask: Optional[Tensor], N: int, S: int, dtype: torch.dtype) -> Optional[Tensor]:
    """torch's ``key_padding_mask`` ``(N, S)`` (bool True = ignore, or float added) -> fastattn's convention
    (bool True = attend, or float added), broadcastable to ``[N, heads, L, S]``."""
    if key_padding_mask is None:
        return None
    if not isinstance(key_padding_mask, Tensor) or tuple(key_padding_mask.shape) != (N, S):
        shape = tuple(key_padding_mask.shape) if isinstance(key_padding_mask, Tensor) else \
            type(key_padding_mask).__name__
        raise ValueError(f"key_padding_mask: expected shape {(N, S)} (batch, all keys so far), got {shape}")
    if key_padding_mask.dtype == torch.bool:
        return ~key_padding_mask[:, None, None, :]
    if not key_padding_mask.is_floating_point():
        raise TypeError(f"key_padding_mask: expected a bool or floating tensor, got {key_padding_mask.dtype}")
    return key_padding_mask[:, None, None, :].to(dtype)


def _attend(mha, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal) -> Tensor:
    """Attention over ``[N, heads, *, head_dim]`` heads, merged and projected: ``[N, L, E]``."""
    N, _, L, _ = q.shape
    dropout_p = float(mha.dropout) if mha.training else 0.0
    out = attention(q, k, v, attn_mask=mask, causal=causal, dropout_p=dropout_p, backend=mha.backend)
    out = out.transpose(1, 2).reshape(N, L, mha.embed_dim)
    return F.linear(out, mha.out_proj.weight, mha.out_proj.bias)


def self_attention_step(mha: MultiheadAttention, x: Tensor, cache: KVCache,
                        key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """Causal self-attention of the new tokens ``x`` over the cached prefix and themselves.

    Args:
        mha: the layer's ``fastattn.nn.MultiheadAttention`` (kdim == vdim == embed_dim).
        x: the new tokens, ``(N, L_new, E)`` (``(L_new, N, E)`` when not ``mha.batch_first``).
        cache: a ``KVCache``; the new keys/values are appended to it.
        key_padding_mask: optional ``(N, L_cached + L_new)``, torch's convention.

    Returns the attention output for the new tokens, in ``x``'s layout.
    """
    _check_module(mha)
    if not mha._qkv_same_embed_dim:
        raise ValueError(f"mha: self-attention steps need kdim == vdim == embed_dim, got kdim={mha.kdim}, "
                         f"vdim={mha.vdim}, embed_dim={mha.embed_dim}")
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache: expected a fastattn.nn.KVCache, got {type(cache).__name__}")
    xb = _batch_first(mha, x, "x", mha.embed_dim)
    q = project_query(mha, xb)
    k, v = cache.append(*project_key_value(mha, xb))
    mask = _padding_to_mask(key_padding_mask, xb.shape[0], k.shape[2], xb.dtype)
    out = _attend(mha, q, k, v, mask, causal="bottom_right")
    return out if mha.batch_first else out.transpose(0, 1)


def cross_attention_step(mha: MultiheadAttention, x: Tensor, cache: KVCache, memory: Optional[Tensor] = None,
                         key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """Attention of the new tokens ``x`` over the encoder's ``memory``, whose keys/values are projected once.

    Args:
        mha: the layer's encoder-decoder ``fastattn.nn.MultiheadAttention``.
        x: the new tokens, ``(N, L_new, E)`` (``(L_new, N, E)`` when not ``mha.batch_first``).
        cache: a ``KVCache``: empty on the first call (then ``memory`` is projected into it), filled after.
        memory: the encoder output ``(N, S, kdim)`` (module layout); needed only while ``cache`` is empty.
        key_padding_mask: optional ``(N, S)`` memory padding mask, torch's convention.
    """
    _check_module(mha)
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache: expected a fastattn.nn.KVCache, got {type(cache).__name__}")
    if not mha._qkv_same_embed_dim and mha.kdim != mha.vdim:
        raise ValueError(f"mha: cached cross-attention needs kdim == vdim, got {mha.kdim} and {mha.vdim}")
    xb = _batch_first(mha, x, "x", mha.embed_dim)
    if len(cache) == 0:
        if memory is None:
            raise ValueError("memory: required on the first call (the cross-attention cache is empty)")
        cache.append(*project_key_value(mha, _batch_first(mha, memory, "memory", mha.kdim)))
    k, v = cache.keys, cache.values
    if k.shape[0] != xb.shape[0]:
        raise ValueError(f"x: batch size {xb.shape[0]} differs from the cached memory's {k.shape[0]}")
    q = project_query(mha, xb)
    mask = _padding_to_mask(key_padding_mask, xb.shape[0], k.shape[2], xb.dtype)
    out = _attend(mha, q, k, v, mask, causal=False)
    return out if mha.batch_first else out.transpose(0, 1)
