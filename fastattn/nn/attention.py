"""``fastattn.nn.Attention``: batch-first multi-head self-attention with timm's parameter names.

The attention layer of ViT, DeiT, SETR, ViViT (models 1-2), TimeSformer (space-only, joint) and BERT-style
encoders: ``qkv`` (one Linear ``dim -> 3 * heads * head_dim``) and ``proj`` (Linear ``heads * head_dim ->
dim``), as ``timm.models.vision_transformer.Attention`` -- so timm's ``state_dict`` loads with ``strict=True``.

The q/k/v heads are *views* of the qkv projection (``[B, L, 3, heads, d]`` unbound and transposed), read in
place by the Triton kernels; the output comes back in ``[B, L, heads, d]`` memory order, so the merge of the
heads before ``proj`` is free.

Incremental decoding: pass a ``KVCache`` and the new tokens only; their keys/values are appended to the cache
and the queries attend over everything cached so far (``causal="bottom_right"`` when ``causal=True``: the
i-th new token sees the cached prefix and the new tokens up to itself).  Gradients flow through the cached
steps (the cache is then rebuilt out of place at each step; without gradients it appends in place).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..functional import attention

__all__ = ["Attention", "KVCache"]


class KVCache:
    """Keys and values of the tokens seen so far, ``[B, heads, L, d]`` each, grown by ``append``.

    The storage is over-allocated (doubling) so appending one token per decoding step is amortised O(1) copies;
    ``keys``/``values`` are views of the filled part.  ``reorder(index)`` selects batch rows (beam search)."""

    def __init__(self):
        self._k: Optional[torch.Tensor] = None
        self._v: Optional[torch.Tensor] = None
        self.length = 0
        self._in_graph = False  # the storage may be saved by an autograd graph (see append)

    def __len__(self) -> int:
        return self.length

    @property
    def keys(self) -> Optional[torch.Tensor]:
        return None if self._k is None else self._k[:, :, :self.length]

    @property
    def values(self) -> Optional[torch.Tensor]:
        return None if self._v is None else self._v[:, :, :self.length]

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Append ``[B, heads, n, d]`` keys/values; returns the cached keys and values including them.

        Under autograd (k or v requiring grad, grad mode on) the cache is rebuilt out of place, O(L) per step:
        the earlier steps' attention saved views of the cached tensors for their backward, which an in-place
        write into the same storage would invalidate.  Decoding without gradients appends in place."""
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name}: expected a [B, heads, n, d] tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if v.shape[:3] != k.shape[:3]:
            raise ValueError(f"v: batch, heads and length {tuple(v.shape[:3])} must equal k's {tuple(k.shape[:3])}")
        n = k.shape[2]
        if self._k is not None:
            if k.shape[:2] != self._k.shape[:2]:
                raise ValueError(f"k: batch/heads {tuple(k.shape[:2])} differ from the cache's "
                                 f"{tuple(self._k.shape[:2])}")
            if k.shape[3] != self._k.shape[3] or v.shape[3] != self._v.shape[3]:
                raise ValueError(f"k, v: head dims {k.shape[3]}, {v.shape[3]} differ from the cache's "
                                 f"{self._k.shape[3]}, {self._v.shape[3]}")
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad or self._in_graph):
            self._k = k if self._k is None else torch.cat([self.keys, k], dim=2)
            self._v = v if self._v is None else torch.cat([self.values, v], dim=2)
            self.length += n
            self._in_graph = True
            return self.keys, self.values
        if self._k is None:
            cap = max(16, n)
            self._k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            self._v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
        elif self.length + n > self._k.shape[2] or self._in_graph:
            # new storage: the old one is full, or a graph may hold views of it (see above)
            cap = max(2 * self._k.shape[2], self.length + n)
            grow = lambda t: torch.cat([t[:, :, :self.length], t.new_empty(*t.shape[:2], cap - self.length,  # noqa: E731
                                                                            t.shape[3])], dim=2)
            self._k, self._v = grow(self._k), grow(self._v)
            self._in_graph = False
        self._k[:, :, self.length:self.length + n] = k
        self._v[:, :, self.length:self.length + n] = v
        self.length += n
        return self.keys, self.values

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (e.g. the surviving beams), in that order."""
        if self._k is not None:
            self._k = self._k.index_select(0, index)
            self._v = self._v.index_select(0, index)


class Attention(nn.Module):
    """Multi-head self-attention on batch-first tokens ``[B, L, dim]``.

    Args:
        dim: channels.
        num_heads: heads.
        qkv_bias: bias of the qkv projection (timm's default False; ViT checkpoints use True).
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
        head_dim: channels per head (default ``dim // num_heads``).
        backend: restricts the attention backend (see ``fastattn.explain``).

    ``forward(x, attn_mask=None, causal=False, kv_cache=None)``: ``attn_mask`` as in ``fastattn.attention``
    (bool True = attend, or float added to the scores; broadcastable to ``[B, heads, L, L]`` -- a padding mask
    is ``mask[:, None, None, :]``); ``causal`` masks future tokens; ``kv_cache`` see the module docstring.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, *, head_dim: Optional[int] = None, backend=None, device=None, dtype=None):
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads: must be positive, got {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        if self.head_dim < 1:
            raise ValueError(f"num_heads: {num_heads} heads leave no channel per head for dim {dim}")
        self.scale = self.head_dim ** -0.5
        self.attn_drop = float(attn_drop)
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * num_heads * self.head_dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(num_heads * self.head_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"attn_drop={self.attn_drop}, backend={self.backend!r}")

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, causal: bool = False,
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a 3-D tensor [B, L, {self.dim}], got {shape}")
        if isinstance(causal, str) or causal not in (True, False):
            raise TypeError(f"causal: expected True or False, got {causal!r}")
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, heads, L, d] views
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
            causal_mode = "bottom_right" if causal else False
        else:
            causal_mode = bool(causal)
        out = attention(q, k, v, attn_mask=attn_mask, causal=causal_mode, scale=self.scale,
                        dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)
        out = out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(out))
