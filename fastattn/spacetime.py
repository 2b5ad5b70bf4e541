"""``fastattn.spacetime``: attention over the token grid of a video transformer.

    out = fastattn.temporal_attention(q, k, v, num_frames=8)          # TimeSformer, divided: time
    out = fastattn.spatial_attention(q, k, v, num_frames=8)           # TimeSformer, divided: space (+ cls)
    out = fastattn.axial_attention(q, k, v, grid=(T, H, W), axis="h") # axial (T+W+H); axis="hw": ViViT model 3
    out = fastattn.factorised_dot_product_attention(q, k, v, grid=(T, H, W))   # ViViT model 4
    out = fastattn.local_attention(q, k, v, grid=(T, H, W), window=(T, 4, 4))  # TimeSformer L+G: local
    out = fastattn.global_attention(q, k, v, grid=(T, H, W), stride=2)         # TimeSformer L+G: global

Layouts
-------
Token layout ``[B, L, heads, d]`` (``v`` may have another ``d``): the ``L`` tokens of a ``grid`` in row-major
order, which is what a qkv projection of ``[B, L, C]`` tokens gives after ``.view(B, L, heads, d)``.  The grid
ops also take the unflattened ``[B, *grid, heads, d]``.  ``grid`` is ``(T, H, W)`` (or ``(H, W)``) and
``layout`` names its axes from outer to inner: ``"thw"`` (default: frame-major, ViViT/Scenic's order) or any
other order, e.g. ``"hwt"`` -- TimeSformer's ``(h w t)`` token order.  The output has q's shape and is
contiguous.

TimeSformer's tokens are ``[B, 1 + T*N, heads, d]``: a cls token, then the patches.  TimeSformer (the
official code and transformers' ``TimesformerModel``) orders the patches **patch-major, frames inner**:
patch n of frame t is token ``1 + n*T + t`` (``rearrange(x, 'b (h w t) m')``) -- ``token_order="nt"``, the
default here.  ``token_order="tn"`` is the frame-major order (token ``1 + t*N + n``).

Semantics
---------
* ``temporal_attention``: each patch position attends over its T frames.  It takes the patch tokens only,
  ``[B, T*N, heads, d]``: TimeSformer excludes the cls token from the temporal sub-layer altogether (from its
  norm, its projection and its attention; the cls passes through unchanged), so a model projects
  ``x[:, 1:]``.
* ``spatial_attention``: every token of frame t -- its N patches and the cls token -- attends over
  ``[cls, the N patches of frame t]``; the cls token does this once per frame and its output is the mean of
  its T outputs.  Exactly TimeSformer's ``cls.repeat`` + ``cat`` + attention + ``mean``, without the repeat.
  ``cls_token=False``: plain per-frame attention over ``[B, T*N, heads, d]``.
* ``axial_attention``: attention along one axis of the grid (or several, merged: ``axis="hw"`` is the
  attention over the H*W tokens of each frame -- ViViT model 3 is ``axis="hw"`` then ``axis="t"``, with a
  projection in between).
* ``factorised_dot_product_attention`` (ViViT model 4): heads split in two halves, as Scenic's
  ``factorized_dot_product_attention``: the first half attends along time (within each spatial position), the
  second half over space (the H*W tokens of each frame); outputs concatenated along the heads.
* ``local_attention`` / ``global_attention``: TimeSformer's sparse local-global scheme (L+G).  The paper gives
  no code (the official repository implements divided, space-only and joint attention only), so the exact
  definition here is:

  - local: the grid is cut into non-overlapping blocks of ``window`` (the paper's "F x H/2 x W/2" neighbourhood
    is ``window=(T, ceil(H/2), ceil(W/2))``, the default of ``fastattn.nn.LocalGlobalAttention``), starting at
    the origin; every token attends over the tokens of its block (blocks at the far edges may be smaller);
  - global: every token attends over the stride-subsampled grid -- the tokens whose coordinates are all
    multiples of ``stride`` along every axis (``stride=2``: the paper's "stride of 2 patches along the temporal
    dimension and also the two spatial dimensions"; ``ceil(T/2) * ceil(H/2) * ceil(W/2)`` keys).

  The scheme applies the two as consecutive residual sub-layers, each with its own projections.

Implementation: composites over ``fastattn.attention`` -- and which copies they make
------------------------------------------------------------------------------------
``fastattn.attention`` takes ``[B', H', L', d]`` with any strides, so attention over one axis of a token grid
is a *view* whenever the other (batch-like) dimensions, ordered by stride, fall into two groups that each
merge into one strided dimension, and the attended dimensions merge into one.  For contiguous
``[B, L, heads, d]`` q/k/v (each its own buffer or a slice of one ``[3, B, L, heads, d]`` buffer -- what
``fastattn.nn``'s modules produce) the attention inputs are views, no copy:

=================================  ============================  ==========================================
op (layout)                        attention inputs              note
=================================  ============================  ==========================================
axial ``t`` (``thw``)              ``[B, H*W*heads, T, d]``      H, W and heads merge (heads: stride d)
axial ``h`` (``thw``)              ``[B*T, W*heads, H, d]``
axial ``w`` (``thw``)              ``[B*T*H, heads, W, d]``
axial ``hw`` (``thw``)             ``[B*T, heads, H*W, d]``      ViViT model 3 spatial; model 4 space half
axial ``t`` / ``h`` / ``w``        ``[B*H*W, heads, T, d]`` /    TimeSformer's ``(h w t)`` order
(``hwt``)                          ``[B, W*T*heads, H, d]`` /
                                   ``[B*H, T*heads, W, d]``
temporal (``nt``; patches only)    ``[B*N, heads, T, d]``
temporal (``tn``; patches only)    ``[B, N*heads, T, d]``
spatial patches (``nt``, cls)      ``[B, T*heads, N, d]``        a view starting past the cls token
global (queries)                   ``[B, heads, L, d]``
=================================  ============================  ==========================================

Where the dimensions cannot merge -- q/k/v that are views of one *interleaved* ``[B, L, 3, heads, d]`` qkv
output (heads no longer merge with a token axis), the ``tn`` spatial view (the cls token breaks the batch
merge), model 4's time half of a ``[B, L, heads, d]`` tensor -- that tensor is copied once (``reshape``) into
the attention layout; the result is exact either way.  Other copies, by op:

* output: one copy from the attention output to the token layout, unless the backend wrote it in token order
  (the Triton backend allocates its output in q's memory order, so for the views above it does, and the
  output is a free view);
* spatial, cls token: the patch-query/patch-key attention is one call on the views above; the cls *key* is
  merged in exactly by the log-sum-exp (``out = e^(lse_p - lse) out_p + e^(s_c - lse) v_cls`` with
  ``s_c = scale q.k_cls`` and ``lse = logaddexp(lse_p, s_c)``; ``s_c`` is one bmm reading the patch queries
  in place, the merge is elementwise on the output), and the cls *query* is a second call with
  Lq = 1 per (frame, head) (its query, ``[B, T, heads, d]``, is materialised: T tokens).  This needs a backend
  that returns the LSE (Triton, reference).  When the backend dispatch picks for the plain call cannot (sdpa,
  e.g. on CPU), when ``dropout_p > 0`` (the cls key's probability must be dropped like the others), or when
  the patch views would need copies anyway (``tn`` order, interleaved qkv), the spatial op instead concatenates the cls token to each frame's queries, keys and values (one
  ``[B, T, 1+N, heads, d]`` copy each, TimeSformer's own composite) and makes one call.  The output
  ``[B, 1+T*N, heads, dv]`` is written once (the cls row and the patch rows into one new tensor).
  Where the dispatch picks the ``cpu`` backend (fastattn._C) and there is no dropout, neither: the op
  ``fastattn::spatial_fwd`` / ``spatial_bwd`` (csrc/cpu/spacetime_cpu.cpp) addresses each (video, frame, head)'s
  ``[cls, N patches]`` rows by index math -- gathered into per-thread buffers (the forward's keys straight into
  K^T), one (1+N) x (1+N) problem per item -- and writes the rows back: no concatenation, no output copy, the cls
  mean and its gradients' frame sums in the kernel;
* model 4: the two halves' outputs are written into one new ``[.., heads, dv]`` tensor (the concatenation);
* local: when ``window`` divides the grid, the blocks are views of the grid and only the block dims are
  merged (a copy unless a block spans whole rows/frames); otherwise one gather per q/k/v into
  ``[blocks, B*heads, window tokens, d]`` with the padding keys masked (a bool key mask, one row per block),
  and one gather back;
* global: the subsampled keys/values, ``[B, L/8, heads, d]`` for stride 2, are copied (a strided subsample
  does not merge into one dimension); the queries are a view.

Backward: autograd through these views and copies and through ``fastattn.attention`` (including its LSE
output in the spatial op's merge); the spatial op's fused CPU path has its own backward op.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import dispatch
from .functional import attention, respects_qkv_hooks
from .problem import check_scale, make_problem

__all__ = ["axial_attention", "temporal_attention", "spatial_attention", "factorised_dot_product_attention",
           "local_attention", "global_attention"]

AxisSpec = Union[str, int, Sequence[int]]
IntOrTuple = Union[int, Sequence[int]]

TOKEN_ORDERS = ("nt", "tn")


# ---------------------------------------------------------------------------------------------------------
# The core: attention over some dimensions of a grid-shaped tensor, as strided views where possible.
# ---------------------------------------------------------------------------------------------------------
def _attention_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_dims: Sequence[int]):
    """The permutation and the split into two groups that turn ``[..., d]`` grid tensors into attention's
    ``[B', H', L', d]`` (``perm``: group-1 dims, group-2 dims, the attended dims, the last dim).

    The group (batch-like) dims of size > 1 are ordered by q's strides, outer first; a "break" is a place
    where two neighbours cannot merge into one strided dimension.  With at most one break over q, k and v
    together, all three are views; with more, q's break is taken (q stays a view) and k/v may be copied."""
    nd = q.dim() - 1
    seq = sorted(seq_dims)
    group = [i for i in range(nd) if i not in seq]
    unit = [i for i in group if q.shape[i] == 1]
    big = sorted((i for i in group if q.shape[i] > 1), key=lambda i: -q.stride(i))

    def breaks(t):
        return {j for j in range(len(big) - 1) if t.stride(big[j]) != t.shape[big[j + 1]] * t.stride(big[j + 1])}

    bq = breaks(q)
    every = bq | breaks(k) | breaks(v)
    if not every:
        # No break: put the dims inside the attended one into the second group (then the Triton backend writes
        # its output in the token order, and mapping it back is a view).
        inner = q.stride(seq[-1])
        split = sum(1 for i in big if q.stride(i) > inner)
    elif len(every) == 1:
        split = min(every) + 1
    else:
        split = min(bq if bq else every) + 1
    g1, g2 = unit + big[:split], big[split:]
    return g1, g2, seq, g1 + g2 + seq + [nd]


def _to_attention(t: torch.Tensor, g1, g2, seq, perm) -> torch.Tensor:
    """``t`` as ``[prod g1, prod g2, prod seq, d]``: a view when the dims merge, else a copy (``reshape``)."""
    size = lambda dims: math.prod(t.shape[i] for i in dims)  # noqa: E731
    return t.permute(perm).reshape(size(g1), size(g2), size(seq), t.shape[-1])


def _attend(q, k, v, seq_dims, *, scale, dropout_p, backend, return_lse=False, attn_mask=None):
    """Attention over the ``seq_dims`` of grid-shaped ``[..., d]`` tensors, independently for every index of
    their other leading dims (equal in q, k, v; the attended sizes may differ between q and k/v).

    Returns ``out`` with q's leading shape and v's last dim (a permuted view of the attention output), and the
    LSE with q's leading shape (or None).  ``attn_mask`` must already be in the attention layout."""
    g1, g2, seq, perm = _attention_layout(q, k, v, seq_dims)
    q4, k4, v4 = (_to_attention(t, g1, g2, seq, perm) for t in (q, k, v))
    res = attention(q4, k4, v4, attn_mask=attn_mask, scale=scale, dropout_p=dropout_p, return_lse=return_lse,
                    backend=backend)
    out, lse = res if return_lse else (res, None)
    sizes = [q.shape[i] for i in perm[:-1]]
    inverse = [perm.index(i) for i in range(len(perm))]
    out = out.reshape(*sizes, out.shape[-1]).permute(inverse)
    if lse is not None:
        lse = lse.reshape(sizes).permute(inverse[:-1])
    return out, lse


# ---------------------------------------------------------------------------------------------------------
# Argument checking.
# ---------------------------------------------------------------------------------------------------------
def _check_qkv(q, k, v, what: str):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k: shape {tuple(k.shape)} must equal q's {tuple(q.shape)} {what}")
    if v.dim() != q.dim() or tuple(v.shape[:-1]) != tuple(q.shape[:-1]):
        raise ValueError(f"v: shape {tuple(v.shape)} must match q's {tuple(q.shape[:-1])} in every dimension "
                         f"but the last (its head dim)")


def _positive_ints(value, name: str, n: Optional[int] = None) -> Tuple[int, ...]:
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int or a tuple of ints, got {value!r}")
    if isinstance(value, int):
        value = (value,) * (1 if n is None else n)
    if not isinstance(value, (tuple, list, torch.Size)) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise TypeError(f"{name}: expected an int or a tuple of ints, got {value!r}")
    value = tuple(int(x) for x in value)
    if n is not None and len(value) != n:
        raise ValueError(f"{name}: expected {n} values (one per grid axis), got {value}")
    if any(x < 1 for x in value):
        raise ValueError(f"{name}: every value must be positive, got {value}")
    return value


def _grid_and_layout(grid, layout) -> Tuple[Tuple[int, ...], str]:
    if isinstance(grid, (tuple, list, torch.Size)) and len(grid) not in (2, 3):
        raise ValueError(f"grid: expected (T, H, W) or (H, W), got {tuple(grid)}")
    grid = _positive_ints(grid, "grid")
    if len(grid) not in (2, 3):
        raise ValueError(f"grid: expected (T, H, W) or (H, W), got {grid}")
    if layout is None:
        layout = "thw" if len(grid) == 3 else "hw"
    if (not isinstance(layout, str) or len(layout) != len(grid) or len(set(layout)) != len(layout)
            or not set(layout) <= set("thw")):
        raise ValueError(f"layout: expected {len(grid)} distinct letters of 't', 'h', 'w' naming the grid axes from "
                         f"outer to inner (e.g. 'thw', or 'hwt' for TimeSformer's token order), got {layout!r}")
    return grid, layout


def _axes(axis: AxisSpec, layout: str) -> List[int]:
    """Grid axis indices named by ``axis``: letters of the layout ("t", "h", "w", "hw", ...) or ints."""
    if isinstance(axis, str):
        if not axis or len(set(axis)) != len(axis) or not set(axis) <= set(layout):
            raise ValueError(f"axis: expected one of {', '.join(repr(c) for c in layout)} or several of them "
                             f"(e.g. 'hw'), naming axes of the layout {layout!r}; got {axis!r}")
        return sorted(layout.index(c) for c in axis)
    axes = [axis] if isinstance(axis, int) and not isinstance(axis, bool) else axis
    if (not isinstance(axes, (tuple, list)) or not axes
            or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes)):
        raise ValueError(f"axis: expected a letter of {layout!r}, a string of them, an int or a tuple of ints, "
                         f"got {axis!r}")
    n = len(layout)
    norm = sorted({a + n if a < 0 else a for a in axes})
    if len(norm) != len(axes) or not all(0 <= a < n for a in norm):
        raise ValueError(f"axis: grid axis indices must be distinct and in [0, {n}), got {axis!r}")
    return norm


def _as_grid(q, k, v, grid):
    """Token-layout or grid-layout inputs -> grid-shaped views ``[B, *grid, heads, d]`` (free: ``unflatten``
    splits a dimension, which is always a view)."""
    _check_qkv(q, k, v, "[B, L, heads, d] or [B, *grid, heads, d]")
    L = math.prod(grid)
    if q.dim() == 4:
        if q.shape[1] != L:
            raise ValueError(f"q: {q.shape[1]} tokens do not match the grid {grid} ({L} tokens); expected "
                             f"[B, {L}, heads, d]")
        return tuple(t.unflatten(1, grid) for t in (q, k, v))
    if q.dim() == 3 + len(grid):
        if tuple(q.shape[1:1 + len(grid)]) != grid:
            raise ValueError(f"q: grid dimensions {tuple(q.shape[1:1 + len(grid)])} of shape {tuple(q.shape)} do "
                             f"not match grid {grid}")
        return q, k, v
    raise ValueError(f"q: expected [B, L, heads, d] (4-D) or [B, *grid, heads, d] ({3 + len(grid)}-D), got shape "
                     f"{tuple(q.shape)}")


def _finish(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Grid-shaped output -> like's rank, contiguous (a view when the backend wrote it in token order)."""
    if like.dim() == 4:
        out = out.reshape(out.shape[0], -1, *out.shape[-2:])
    return out.contiguous()


def _scale(scale, d) -> float:
    # d ** -0.5 as this module always computed it; check_scale raises for a bad scale or (default) head dim
    return float(d) ** -0.5 if scale is None and d >= 1 else check_scale(scale, d)


# ---------------------------------------------------------------------------------------------------------
# Axial attention and ViViT's factorised models.
# ---------------------------------------------------------------------------------------------------------
@respects_qkv_hooks
def axial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: IntOrTuple, axis: AxisSpec,
                    layout: Optional[str] = None, scale: Optional[float] = None, dropout_p: float = 0.0,
                    backend=None) -> torch.Tensor:
    """Attention along ``axis`` of a token grid: every token attends over the tokens that differ from it only
    along that axis (or those axes, merged: ``axis="hw"`` is the attention within each frame).

    Args:
        q, k: ``[B, L, heads, d]`` with ``L = prod(grid)`` (row-major over ``grid``), or ``[B, *grid, heads,
            d]``; v: the same with its own head dim.  Any strides (see the module docstring for which are
            read in place).
        grid: ``(T, H, W)`` or ``(H, W)``, outer to inner in memory.
        axis: ``"t"``, ``"h"``, ``"w"``, several letters (``"hw"``), a grid index or a tuple of them.
        layout: letters naming the grid axes outer to inner; default ``"thw"`` (``"hw"`` for a 2-D grid).
            TimeSformer's patch order is ``"hwt"``.
        scale, dropout_p, backend: as in ``fastattn.attention`` (scale default ``d ** -0.5``).

    Returns: q's shape with v's head dim, contiguous.
    """
    grid, layout = _grid_and_layout(grid, layout)
    axes = _axes(axis, layout)
    qg, kg, vg = _as_grid(q, k, v, grid)
    out, _ = _attend(qg, kg, vg, [1 + a for a in axes], scale=scale, dropout_p=dropout_p, backend=backend)
    return _finish(out, q)


@respects_qkv_hooks
def factorised_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: IntOrTuple,
                                     layout: Optional[str] = None, scale: Optional[float] = None,
                                     dropout_p: float = 0.0, backend=None) -> torch.Tensor:
    """ViViT model 4 (factorised dot-product attention), as Scenic's ``factorized_dot_product_attention``:
    heads ``[0, heads/2)`` attend along time (each spatial position over its T frames), heads
    ``[heads/2, heads)`` over space (each frame's tokens); the outputs are concatenated along the heads.

    Args as ``axial_attention``; ``grid`` must have a ``t`` axis (default layout ``"thw"``) and heads must be
    even.  Returns q's shape with v's head dim, contiguous.  The space half of contiguous ``[B, L, heads, d]``
    inputs is read in place; the time half is copied unless each half is its own buffer (``fastattn.nn.
    FactorisedDotProductAttention`` projects them so and calls ``axial_attention`` on each half).
    """
    grid, layout = _grid_and_layout(grid, layout)
    if "t" not in layout:
        raise ValueError(f"layout: factorised dot-product attention needs a time axis 't', got {layout!r}")
    qg, kg, vg = _as_grid(q, k, v, grid)
    heads = qg.shape[-2]
    if heads % 2:
        raise ValueError(f"q: the number of heads ({heads}) must be even: half attend over time, half over space")
    half = heads // 2
    time_dims = [1 + layout.index("t")]
    space_dims = [1 + i for i, c in enumerate(layout) if c != "t"]
    kw = dict(scale=scale, dropout_p=dropout_p, backend=backend)
    out_t, _ = _attend(qg[..., :half, :], kg[..., :half, :], vg[..., :half, :], time_dims, **kw)
    out_s, _ = _attend(qg[..., half:, :], kg[..., half:, :], vg[..., half:, :], space_dims, **kw)
    out = out_t.new_empty(*qg.shape[:-1], vg.shape[-1])
    out[..., :half, :] = out_t
    out[..., half:, :] = out_s
    return _finish(out, q)


# ---------------------------------------------------------------------------------------------------------
# TimeSformer's divided space-time attention.
# ---------------------------------------------------------------------------------------------------------
def _patch_grid(order: str, T: int, N: int) -> Tuple[Tuple[int, int], int, int]:
    """(grid, dim of the frames, dim of the patches) of the ``[B, *grid, heads, d]`` patch view."""
    if order not in TOKEN_ORDERS:
        raise ValueError(f"token_order: expected 'nt' (TimeSformer's: patch-major, frames inner) or 'tn' "
                         f"(frame-major), got {order!r}")
    return ((N, T), 2, 1) if order == "nt" else ((T, N), 1, 2)


def _check_frames(num_frames) -> int:
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames: expected a positive int, got {num_frames!r}")
    return num_frames


@respects_qkv_hooks
def temporal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_frames: int,
                       token_order: str = "nt", scale: Optional[float] = None, dropout_p: float = 0.0,
                       backend=None) -> torch.Tensor:
    """TimeSformer's temporal attention: each patch position attends over its ``num_frames`` frames.

    Args:
        q, k: ``[B, T*N, heads, d]`` -- the patch tokens only (TimeSformer's temporal sub-layer leaves the cls
            token out: project ``x[:, 1:]``); v: the same with its own head dim.
        num_frames: T.
        token_order: ``"nt"`` (TimeSformer's: patch n of frame t is token ``n*T + t``) or ``"tn"``
            (frame-major: ``t*N + n``).  Both are read in place when q/k/v are contiguous.
        scale, dropout_p, backend: as in ``fastattn.attention``.

    Returns ``[B, T*N, heads, dv]``, contiguous.
    """
    T = _check_frames(num_frames)
    _check_qkv(q, k, v, "[B, T*N, heads, d]")
    if q.dim() != 4:
        raise ValueError(f"q: expected [B, T*N, heads, d] (the patch tokens), got shape {tuple(q.shape)}")
    L = q.shape[1]
    if L % T:
        raise ValueError(f"q: {L} tokens are not a multiple of num_frames={T}; temporal attention takes the patch "
                         f"tokens only, [B, T*N, heads, d] (TimeSformer leaves the cls token out: pass x[:, 1:])")
    grid, t_dim, _ = _patch_grid(token_order, T, L // T)
    qg, kg, vg = (t.unflatten(1, grid) for t in (q, k, v))
    out, _ = _attend(qg, kg, vg, [t_dim], scale=scale, dropout_p=dropout_p, backend=backend)
    return _finish(out, q)


def _are_views(tensors, seq_dims) -> bool:
    """Whether ``_attend`` reads all of ``tensors`` in place (no ``reshape`` copy)."""
    g1, g2, seq, perm = _attention_layout(*tensors, seq_dims)
    for t in tensors:
        try:
            t.permute(perm).view(-1, math.prod(t.shape[i] for i in g2), math.prod(t.shape[i] for i in seq),
                                 t.shape[-1])
        except RuntimeError:
            return False
    return True


def _spatial_backend(q, k, v, scale, backend):
    """The backend the dispatch picks for the spatial op's per-frame attention (probed with 1-token views of
    q, k, v, so the choice sees their device and dtype), and the problem probe for asking it about the LSE."""
    def one_token(t):
        if t.numel() == 0:  # an empty batch: a stand-in of the same dtype, device and autograd state
            return t.new_zeros(1, 1, 1, t.shape[-1]).requires_grad_(t.requires_grad)
        return t[(slice(0, 1),) * (t.dim() - 1)].reshape(1, 1, 1, t.shape[-1])
    probe = [one_token(t) for t in (q, k, v)]
    return dispatch.select(make_problem(*probe, None, False, scale, 0.0, False), backend), probe


def _lse_path(chosen, probe, patches, n_dim, scale, dropout_p) -> bool:
    """Whether the spatial op merges the cls key by the LSE: no dropout, the patch views are read in place
    (otherwise concatenating the cls token costs fewer copies), and the backend dispatch picks for the plain
    call also returns the LSE (Triton, reference).  Not on the "cpu" backend (its own op serves it without
    dropout; with dropout the concatenation is cheaper than the merge's elementwise passes: bench/NOTES.md
    entry 7)."""
    if dropout_p > 0.0 or chosen.name == "cpu" or not _are_views(patches, [n_dim]):
        return False
    return not chosen.reasons(make_problem(*probe, None, False, scale, 0.0, True))


class _SpatialCPU(torch.autograd.Function):
    """The fused CPU spatial op (ops fastattn::spatial_fwd / spatial_bwd, csrc/cpu/spacetime_cpu.cpp)."""

    @staticmethod
    def forward(ctx, q, k, v, num_frames, token_order, scale):
        from . import _ext
        out, out_cls, lse = _ext.ops().spatial_fwd(q, k, v, num_frames, token_order, scale)
        ctx.save_for_backward(q, k, v, out, out_cls, lse)
        ctx.args = (num_frames, token_order, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        from . import _ext
        q, k, v, out, out_cls, lse = ctx.saved_tensors
        dq, dk, dv = _ext.ops().spatial_bwd(q, k, v, out, out_cls, lse, dout, *ctx.args)
        return dq, dk, dv, None, None, None


def _key_scores(tokens: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``[B, M, heads]``: the dot product of every token's query with its video's one key per head
    (``tokens`` ``[B, M, heads, d]``, ``key`` ``[B, heads, d]``).  An einsum, which copies the strided tokens
    into [B, heads, M, d] for its bmm.  (A bmm of the tokens read in place as [B, M, heads*d] rows with a
    block-diagonal [B, heads*d, heads] key matrix saves that copy, but multiplies every head's query by the
    other heads' zeros: a NaN in one head's query or key then spreads to every head, 0 * NaN = NaN.)"""
    return torch.einsum("bmhd,bhd->bmh", tokens, key)


def _merge_one_key(out: torch.Tensor, lse: torch.Tensor, score: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The attention output over a key set plus one more key: ``out``, ``lse`` over the set (``[..., dv]``,
    ``[...]``), ``score`` the extra key's scaled score per query and ``value`` its value (broadcast).  With
    a = exp(lse) and c = exp(score), the merged output is (a out + c value) / (a + c) = out + w (value - out) with
    w = c / (a + c) = sigmoid(score - lse): one lerp (and no LSE), instead of separate exp / multiply / add passes
    over the [..., dv] outputs.  A set no query saw (lse = -inf) gives w = 1: the extra key alone."""
    w = torch.sigmoid(score - lse).unsqueeze(-1)
    return torch.lerp(out.to(w.dtype), value.to(w.dtype), w).to(out.dtype)


@respects_qkv_hooks
def spatial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_frames: int,
                      cls_token: bool = True, token_order: str = "nt", scale: Optional[float] = None,
                      dropout_p: float = 0.0, backend=None) -> torch.Tensor:
    """TimeSformer's spatial attention of divided space-time attention.

    Every token of frame t -- the frame's N patches and the cls token -- attends over ``[cls, the N patches of
    frame t]``; the cls token's output is the mean of its ``num_frames`` per-frame outputs.  Exactly the
    ``cls.repeat(1, T, 1)`` + ``cat`` + attention + ``mean`` of TimeSformer / transformers'
    ``TimesformerLayer``, without the repeat and the concatenation (see the module docstring).

    Args:
        q, k: ``[B, 1 + T*N, heads, d]`` (cls first; ``[B, T*N, heads, d]`` with ``cls_token=False``); v: the
            same with its own head dim.
        num_frames: T.
        cls_token: whether token 0 is a cls token.  False: plain attention within each frame.
        token_order: ``"nt"`` (TimeSformer's, default) or ``"tn"``, of the patch tokens.
        scale: default ``d ** -0.5``; dropout_p, backend: as in ``fastattn.attention``.

    Returns q's shape with v's head dim, contiguous.
    """
    T = _check_frames(num_frames)
    _check_qkv(q, k, v, "[B, 1 + T*N, heads, d]")
    if q.dim() != 4:
        raise ValueError(f"q: expected [B, 1 + T*N, heads, d], got shape {tuple(q.shape)}")
    B, L, heads, d = q.shape
    dv = v.shape[-1]
    first = 1 if cls_token else 0
    if L - first < T or (L - first) % T:
        expected = "1 + num_frames * N (a cls token, then N patches per frame)" if cls_token else \
            "num_frames * N"
        raise ValueError(f"q: {L} tokens do not fit num_frames={T}; expected {expected}")
    N = (L - first) // T
    grid, t_dim, n_dim = _patch_grid(token_order, T, N)
    patches = [t[:, first:].unflatten(1, grid) for t in (q, k, v)]           # views [B, *grid, heads, d]
    scale = _scale(scale, d)
    kw = dict(scale=scale, dropout_p=dropout_p, backend=backend)
    if not cls_token:
        out, _ = _attend(*patches, [n_dim], **kw)
        return _finish(out, q)

    chosen, probe = _spatial_backend(q, k, v, scale, backend)
    if chosen.name == "cpu" and dropout_p == 0.0:
        return _SpatialCPU.apply(q, k, v, T, token_order, scale)

    qp, kp, vp = patches
    qc, kc, vc = q[:, 0], k[:, 0], v[:, 0]                                    # [B, heads, d]
    one = [B, 1, 1, heads]                                                    # the cls broadcast over the grid
    if _lse_path(chosen, probe, patches, n_dim, scale, dropout_p):
        # Patch queries: one call over the frame's patch keys, then the cls key merged in by the LSE.
        out_p, lse_p = _attend(qp, kp, vp, [n_dim], **kw, return_lse=True)
        s = _key_scores(q[:, 1:], kc).view(B, *grid, heads).to(lse_p.dtype) * scale  # scale q.k_cls per query
        out_p = _merge_one_key(out_p, lse_p, s, vc.view(*one, dv))
        # The cls query: per frame and head, one query over the frame's patch keys, then its own key merged.
        shape = list(qp.shape)
        shape[n_dim] = 1
        qcr = qc.view(*one, d).expand(shape).contiguous()                      # [B, .., 1, .., heads, d]: T tokens
        out_c, lse_c = _attend(qcr, kp, vp, [n_dim], **kw, return_lse=True)
        s_cc = ((qc * kc).sum(-1).to(lse_c.dtype) * scale).view(B, 1, 1, heads)
        out_c = _merge_one_key(out_c, lse_c, s_cc, vc.view(*one, dv))
        out_c = out_c.squeeze(n_dim).mean(1)                                     # mean over the frames
    else:
        # The backend cannot return the LSE (or dropout is on): the cls token joins each frame's tokens.
        def with_cls(tc, tp):
            shape = list(tp.shape)
            shape[n_dim] = 1
            return torch.cat([tc.view(*one, tc.shape[-1]).expand(shape), tp], dim=n_dim)

        out, _ = _attend(with_cls(qc, qp), with_cls(kc, kp), with_cls(vc, vp), [n_dim], **kw)
        out_c = out.select(n_dim, 0).mean(1)                                     # [B, heads, dv]
        out_p = out.narrow(n_dim, 1, N)

    result = out_p.new_empty(B, L, heads, dv)
    result[:, 0] = out_c
    result[:, 1:].view(B, *grid, heads, dv).copy_(out_p)
    return result


# ---------------------------------------------------------------------------------------------------------
# TimeSformer's sparse local-global attention (L+G).
# ---------------------------------------------------------------------------------------------------------
@respects_qkv_hooks
def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: IntOrTuple, window: IntOrTuple,
                    layout: Optional[str] = None, scale: Optional[float] = None, dropout_p: float = 0.0,
                    backend=None) -> torch.Tensor:
    """Local attention of TimeSformer's L+G scheme: the grid is cut into non-overlapping blocks of ``window``
    tokens per axis, starting at the origin (the last block along an axis is smaller when ``window`` does not
    divide it), and every token attends over the tokens of its block.

    Args as ``axial_attention``; ``window``: an int (every axis) or one int per grid axis (one at least the
    grid's size along an axis spans that whole axis).  The paper's neighbourhood "F x H/2 x W/2" is
    ``window=(T, ceil(H/2), ceil(W/2))``.
    Returns q's shape with v's head dim, contiguous.
    """
    grid, layout = _grid_and_layout(grid, layout)
    window = _positive_ints(window, "window", len(grid))
    window = tuple(min(w, g) for w, g in zip(window, grid))  # a window past the grid's edge: the whole axis
    qg, kg, vg = _as_grid(q, k, v, grid)
    kw = dict(scale=scale, dropout_p=dropout_p, backend=backend)
    if all(g % w == 0 for g, w in zip(grid, window)):
        # Blocks are views: [B, n0, w0, n1, w1, (n2, w2), heads, d]; attention over the w dims.
        split = [x for g, w in zip(grid, window) for x in (g // w, w)]
        blocked = [t.view(t.shape[0], *split, *t.shape[-2:]) for t in (qg, kg, vg)]  # splits: always a view
        out, _ = _attend(*blocked, [2 + 2 * i for i in range(len(grid))], **kw)
        return _finish(out.reshape(qg.shape[:-1] + (vg.shape[-1],)), q)

    # Ragged blocks: gather each block's tokens (the padding slots read token 0 and are masked as keys).
    device = q.device
    nblocks = [-(-g // w) for g, w in zip(grid, window)]
    nd = len(grid)
    token = torch.zeros((), dtype=torch.long, device=device)
    valid = torch.ones((), dtype=torch.bool, device=device)
    stride = 1
    for axis in reversed(range(nd)):
        pos = (torch.arange(nblocks[axis], device=device)[:, None] * window[axis]
               + torch.arange(window[axis], device=device)[None, :])            # [n, w]
        shape = [1] * (2 * nd)
        shape[axis], shape[nd + axis] = nblocks[axis], window[axis]
        pos = pos.view(shape)
        token = token + pos * stride
        valid = valid & (pos < grid[axis])
        stride *= grid[axis]
    nb, lw = math.prod(nblocks), math.prod(window)
    token, valid = token.reshape(nb, lw), valid.reshape(nb, lw)
    token = torch.where(valid, token, torch.zeros_like(token))                   # padding slots read token 0
    B, heads = qg.shape[0], qg.shape[-2]
    L = math.prod(grid)

    def gather(t):  # [B, L, heads, e] -> [nb, lw, B, heads, e] (one copy) -> view [nb, B*heads, lw, e]
        g = t.reshape(B, L, heads, t.shape[-1]).transpose(0, 1)[token]
        return g.view(nb, lw, B * heads, t.shape[-1]).transpose(1, 2)

    mask = valid.view(nb, 1, 1, lw)                                              # padding keys masked out
    out = attention(gather(qg), gather(kg), gather(vg), attn_mask=mask, **kw)   # [nb, B*heads, lw, dv]
    # One gather back: token -> (block, slot).
    flat = torch.arange(nb * lw, device=device).view(nb, lw)[valid]
    owner = torch.empty(L, dtype=torch.long, device=device)
    owner[token[valid]] = flat
    out = out.reshape(nb, B, heads, lw, out.shape[-1])
    b_idx = torch.arange(B, device=device).view(B, 1, 1)
    h_idx = torch.arange(heads, device=device).view(1, 1, heads)
    out = out[(owner // lw).view(1, L, 1), b_idx, h_idx, (owner % lw).view(1, L, 1)]   # [B, L, heads, dv]
    return out if q.dim() == 4 else out.view(qg.shape[:-1] + (out.shape[-1],))


@respects_qkv_hooks
def global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: IntOrTuple,
                     stride: IntOrTuple = 2, layout: Optional[str] = None, scale: Optional[float] = None,
                     dropout_p: float = 0.0, backend=None) -> torch.Tensor:
    """Global attention of TimeSformer's L+G scheme: every token attends over the stride-subsampled grid, the
    tokens whose coordinates are multiples of ``stride`` along every axis (``ceil(T/s) * ceil(H/s) * ceil(W/s)``
    keys for ``stride=s``).

    Args as ``axial_attention``; ``stride``: an int (every axis) or one per grid axis.
    Returns q's shape with v's head dim, contiguous.
    """
    grid, layout = _grid_and_layout(grid, layout)
    strides = _positive_ints(stride, "stride", len(grid))
    qg, kg, vg = _as_grid(q, k, v, grid)
    sub = (slice(None),) + tuple(slice(None, None, s) for s in strides)
    seq = list(range(1, 1 + len(grid)))
    out, _ = _attend(qg, kg[sub], vg[sub], seq, scale=scale, dropout_p=dropout_p, backend=backend)
    return _finish(out, q)
