"""``fastattn.window_attention``: Swin's window attention (W-MSA) and shifted-window attention (SW-MSA).

    out = fastattn.window_attention(q, k, v, window_size=7, shift_size=3, rel_pos_bias_table=table)

q, k, v are in image layout ``[B, H, W, heads, d]`` (``v`` may have another ``d``); views of one qkv
projection output (``qkv.view(B, H, W, 3, heads, d).unbind(3)``) are read as they are.  The output is
``[B, H, W, heads, dv]``, contiguous.  The semantics are exactly those of Swin / timm's
``SwinTransformerBlock`` attention branch:

1. cyclic shift: ``torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))`` (only when a shift is non-zero);
2. window partition into ``nW = (H / wh) * (W / ww)`` windows of ``N = wh * ww`` tokens (row-major);
3. per window and head: ``softmax(scale * q k^T + bias + region_mask) v``, where ``bias[h, i, j] =
   table[relative_position_index[i, j], h]`` (timm's ``get_relative_position_index``), and, when a shift is
   non-zero, ``region_mask[i, j] = -100.0`` (not -inf) between tokens of different regions -- region ids
   from timm's ``slice`` construction ``(0, -w), (-w, -s), (-s, None)`` per axis over the input grid;
4. window reverse, and the inverse roll.

Sizes that are not multiples of the window
------------------------------------------
The op itself needs ``H % wh == 0`` and ``W % ww == 0`` and raises a ``ValueError`` otherwise: padding has to
happen on the *features before the qkv projection* (the padded tokens' keys are then ``qkv.bias``, not 0,
and they are not masked -- that is what Swin does), so it cannot be done inside the op.  Use
``pad_to_window(x, window_size)`` on the normalised ``[B, H, W, C]`` features (zeros at the bottom/right,
as timm's ``SwinTransformerBlock`` and HF transformers' ``SwinLayer`` do), project, call the op, and crop
``out[:, :H, :W]``.  Two orders of shift and padding exist in the wild:

* pad, then roll (original Swin detection code, HF transformers): call the op on the padded inputs with the
  default ``unpadded_size=None`` -- the shift wraps over the whole padded grid;
* roll, then pad (timm >= 1.0's ``SwinTransformerBlock._attn``): pass ``unpadded_size=(H, W)`` -- the shift
  wraps within the top-left ``H x W`` region, the padding tokens stay at the bottom/right.
  The region mask is computed over the padded grid in both cases, as both libraries do.

``fastattn.nn.WindowAttention`` does this for you (``roll_before_pad`` selects the order).

A window larger than the image is an error here.  timm's block clamps the window to the input resolution
and sets the shift to 0 on that axis when ``resolution <= window`` (``_calc_window_shift``); that is a
decision of the block / model, which builds its attention module (and its bias table) with the clamped
window -- not of this op.

Implementation: two paths
-------------------------
**Fused.**  The same layout in two kernel families, picked by the backend dispatch (``_fused_impl``):

* ``triton`` (CUDA by default; CPU tensors under Triton's interpreter when asked for): the FlashAttention-2
  kernels of ``fastattn.kernels.triton_attention`` in their window layout: a program owns one (batch, window,
  head) group; token i of window w is addressed at its pixel through the shift and partition index map (no
  roll, no partition copy, no output reverse); the bias is read from the table by the in-window coordinate
  difference and the region mask computed from coordinates, inside the kernel (no mask tensor); the backward
  kernels write the score gradient of each (batch, window, head), which is summed over batch and windows and
  scattered into the table's gradient.
* ``cpu`` (the default on CPU when fastattn._C is built): the C++ kernels of csrc/cpu/window_cpu.cpp (ops
  ``fastattn::window_fwd`` / ``window_bwd``), the same index map, bias lookup and region mask; a work item is
  one window (all its heads: each token's rows are gathered once), its [N, N] scores one tile; the table's
  gradient is summed in the kernel, deterministically (fixed chunks of windows, independent of the thread
  count).
* ``cuda``: fastattn._C's CUDA kernels serve the same ops for CUDA tensors when they are built with the window
  layout (``fastattn.backends.cuda.window_reasons`` says why not otherwise).

**Composite (any other backend: "sdpa", "reference", or a fused kernel that cannot run).**
PyTorch ops around one ``fastattn.attention`` call; it makes these copies:

* q, k, v: one gather each (advanced indexing with a precomputed token index), which performs the roll,
  the window partition and the head transpose in a single copy, to a contiguous ``[B, nW, heads, N, d]``;
* the bias: ``table[index]`` gathered to ``[N, N, heads]`` (as timm does), passed as a permuted view
  ``[1, heads, N, N]``;
* shift > 0: the float mask ``bias + region_mask`` is materialised once as ``[nW, heads, N, N]`` (the
  region mask depends on the window, the bias on the head, and ``fastattn.attention`` takes one mask
  broadcastable to its ``[batch, heads, Lq, Lk]``); the attention then runs on the layout
  ``[B, nW * heads, N, d]`` (a view of the gathered q/k/v) with that mask as ``[1, nW * heads, N, N]`` -- so
  the mask is never expanded over the batch, unlike timm's fused path.  shift = 0: the layout is
  ``[B * nW, heads, N, d]`` and the mask is the bias view, nothing materialised;
* the output: one gather back (window reverse + inverse roll in one copy) to ``[B, H, W, heads, dv]``.

Composite backward: autograd through the gathers (scatter-adds of the same sizes), through the attention op (whose
float-mask gradient, summed over the broadcast dimensions, flows to the table through the bias gather).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import dispatch
from .functional import _draw_seed, attention
from .problem import check_dropout_p, check_scale

__all__ = ["window_attention", "pad_to_window", "relative_position_index", "region_ids"]

REGION_MASK_VALUE = -100.0  # Swin's value between tokens of different regions (not -inf)

IntOrPair = Union[int, Sequence[int]]


def _pair(value, name: str) -> Tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return value, value
    if isinstance(value, torch.Size) or isinstance(value, (tuple, list)):
        if len(value) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return int(value[0]), int(value[1])
    raise TypeError(f"{name}: expected an int or a pair of ints (h, w), got {value!r}")


# ---------------------------------------------------------------------------------------------------------
# Geometry helpers (public: the module and the tests use them).
# ---------------------------------------------------------------------------------------------------------
def relative_position_index(window_size: IntOrPair, device=None) -> torch.Tensor:
    """``[N, N]`` int64, N = wh * ww: the row of the bias table for (query token i, key token j) of a window,
    tokens numbered row-major.  The same formula as timm's ``get_relative_position_index``:
    ``(dy + wh - 1) * (2 * ww - 1) + (dx + ww - 1)`` with ``(dy, dx) = pos(i) - pos(j)``."""
    wh, ww = _pair(window_size, "window_size")
    ys = torch.arange(wh, device=device).repeat_interleave(ww)  # token -> row
    xs = torch.arange(ww, device=device).repeat(wh)             # token -> column
    dy = ys[:, None] - ys[None, :] + (wh - 1)
    dx = xs[:, None] - xs[None, :] + (ww - 1)
    return dy * (2 * ww - 1) + dx


def region_ids(length: int, window: int, shift: int, device=None) -> torch.Tensor:
    """``[length]`` int64: Swin's region id of each position of one axis of the (shifted) grid -- the
    ``slice`` assignments ``(0, -window) -> 0, (-window, -shift) -> 1, (-shift, None) -> 2``, later ones
    overriding earlier ones, with Python's slice semantics (so a shift of 0 gives one region, 2).  The 2-D id
    is ``3 * id_h(y) + id_w(x)``, which equals timm's ``img_mask`` counter."""
    ids = torch.zeros(length, dtype=torch.int64, device=device)
    for region, (start, stop) in enumerate(((0, -window), (-window, -shift), (-shift, None))):
        ids[start:stop] = region
    return ids


def pad_to_window(x: torch.Tensor, window_size: IntOrPair) -> torch.Tensor:
    """Pads ``[B, H, W, C]`` features with zeros at the bottom and right to multiples of the window, as timm's
    ``SwinTransformerBlock`` (``F.pad(x, (0, 0, 0, pad_w, 0, pad_h))``, on the normalised features, before
    the qkv projection) and HF transformers' ``SwinLayer.maybe_pad`` do.  Returns ``x`` itself when no
    padding is needed.  Crop the attention output with ``out[:, :H, :W]``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x: expected a 4-D tensor [B, H, W, C], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    wh, ww = _pair(window_size, "window_size")
    if wh < 1 or ww < 1:
        raise ValueError(f"window_size: must be positive, got {(wh, ww)}")
    H, W = x.shape[1], x.shape[2]
    pad_h, pad_w = (wh - H % wh) % wh, (ww - W % ww) % ww
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h))


def _token_index(H, W, wh, ww, sh, sw, uh, uw, device):
    """(ys, xs): ``[nW, N]`` image coordinates of token n of window w in the shifted, partitioned order.
    Position (y', x') of the shifted grid reads pixel ``((y' + sh) mod uh, (x' + sw) mod uw)`` when it lies in
    the top-left ``uh x uw`` region the shift wraps in (``torch.roll(x[:, :uh, :uw], (-sh, -sw))``), and
    itself outside it (padding stays in place)."""
    def grid(length, window):                           # [windows along the axis, window] positions
        return torch.arange(length, device=device).view(length // window, window)
    yp, xp = grid(H, wh), grid(W, ww)
    nWh, nWw = yp.shape[0], xp.shape[0]
    yp = yp.view(nWh, 1, wh, 1).expand(nWh, nWw, wh, ww).reshape(nWh * nWw, wh * ww)
    xp = xp.view(1, nWw, 1, ww).expand(nWh, nWw, wh, ww).reshape(nWh * nWw, wh * ww)
    inside = (yp < uh) & (xp < uw)
    ys = torch.where(inside, (yp + sh) % uh, yp)
    xs = torch.where(inside, (xp + sw) % uw, xp)
    return ys, xs


def _region_mask(H, W, wh, ww, sh, sw, dtype, device):
    """``[nW, N, N]``: 0 within a region, -100 between regions (timm's ``get_attn_mask``)."""
    idh = region_ids(H, wh, sh, device).view(H // wh, 1, wh, 1)
    idw = region_ids(W, ww, sw, device).view(1, W // ww, 1, ww)
    ids = (3 * idh + idw).reshape(-1, wh * ww)          # [nW, N]
    differ = ids[:, :, None] != ids[:, None, :]
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(differ, torch.full((), REGION_MASK_VALUE, dtype=dtype, device=device), zero)


# ---------------------------------------------------------------------------------------------------------
# The fused path: the Triton attention kernels in their window layout (fastattn/kernels/triton_attention.py,
# LAYOUT 1): the shift, the partition and their reverse are index math on the image layout, the bias table is
# read by coordinate difference and the region mask computed from coordinates inside the kernels; the
# table's gradient is reduced from the kernels' score gradient.  No roll, no partition copy, no mask tensor.
# ---------------------------------------------------------------------------------------------------------
def _fused_ops(impl: str):
    """(forward, backward) ops of a fused window implementation; both have the signatures of the C++ schemas
    ``fastattn::window_fwd`` / ``window_bwd`` (csrc/ops.cpp)."""
    if impl == "triton":
        from .backends.triton import _window_backward_op, _window_forward_op
        return _window_forward_op, _window_backward_op
    from . import _ext
    ops = _ext.ops()
    return ops.window_fwd, ops.window_bwd


class _FusedWindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, seed, geometry, scale, dropout_p, impl):
        forward_op, _ = _fused_ops(impl)
        out, lse = forward_op(q, k, v, table, seed, geometry, scale, dropout_p)
        ctx.save_for_backward(q, k, v, table, seed, out, lse)
        ctx.args = (geometry, scale, dropout_p, impl)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, table, seed, out, lse = ctx.saved_tensors
        geometry, scale, dropout_p, impl = ctx.args
        _, backward_op = _fused_ops(impl)
        table_needs_grad = bool(ctx.needs_input_grad[3])
        dq, dk, dv, dtable = backward_op(q, k, v, table, seed, out, lse, dout.contiguous(), geometry, scale,
                                         dropout_p, table_needs_grad)
        dtable = dtable.to(table.dtype) if table_needs_grad else None
        return dq, dk, dv, dtable, None, None, None, None, None


_EXTENSION_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _fused_impl(q, k, v, backend) -> Optional[str]:
    """Dispatch for the window op: walk the allowed backends (``backend=``, ``use_backend``,
    ``FASTATTN_BACKEND``, else the device's priority list) and return the first fused implementation that can
    serve -- "triton" (the Triton kernels' window layout), "cpu" or "cuda" (fastattn._C's C++ / CUDA kernels,
    ops fastattn::window_fwd / window_bwd) -- or None for the composite, which hands the same restriction to
    ``fastattn.attention``.  "reference" and "sdpa" mean the composite; so does "cuda" on a CUDA tensor its
    window kernels decline (head dims past 256, float64: another backend may still serve the composite)."""
    from .backends.triton import device_reasons, tensor_reasons
    allowed, _ = dispatch._allowed(backend)
    order = allowed if allowed is not None else dispatch._PRIORITY.get(q.device.type, dispatch._DEFAULT_PRIORITY)
    for name in order:
        if name == "triton":
            reasons = device_reasons(q.device) + tensor_reasons(
                (("q", q), ("k", k), ("v", v)), (("q", q.shape[-1]), ("v", v.shape[-1])))
            if not reasons:
                return "triton"
        elif name == "cpu":
            from . import _ext
            if q.device.type == "cpu" and q.dtype in _EXTENSION_DTYPES and _ext.error() is None:
                return "cpu"
        elif name == "cuda":
            from .backends.cuda import window_reasons
            if not window_reasons(q, k, v):
                return "cuda"
            if q.device.type == "cuda":
                return None
        elif name in ("reference", "sdpa"):
            return None
    return None


# ---------------------------------------------------------------------------------------------------------
# The op.
# ---------------------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, window_size, shift_size, table, unpadded_size):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 5:
            raise ValueError(f"{name}: expected a 5-D tensor [B, H, W, heads, head_dim], got shape "
                             f"{tuple(t.shape)}")
    B, H, W, heads, d = q.shape
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k: shape {tuple(k.shape)} must equal q's {tuple(q.shape)} [B, H, W, heads, d]")
    if tuple(v.shape[:4]) != tuple(q.shape[:4]):
        raise ValueError(f"v: shape {tuple(v.shape)} must match q's [B, H, W, heads] = {tuple(q.shape[:4])} "
                         f"(only its head dim may differ)")
    wh, ww = _pair(window_size, "window_size")
    if wh < 1 or ww < 1:
        raise ValueError(f"window_size: must be positive, got {(wh, ww)}")
    sh, sw = _pair(shift_size, "shift_size")
    if not (0 <= sh < wh and 0 <= sw < ww):
        raise ValueError(f"shift_size: each shift must be in [0, window), got shift {(sh, sw)} for window "
                         f"{(wh, ww)}")
    for axis, size, win in (("height", H, wh), ("width", W, ww)):
        if win > size:
            raise ValueError(f"window_size: window {axis} {win} is larger than the image {axis} {size} of q; "
                             f"Swin models clamp the window to the image (and set that shift to 0) before "
                             f"building the attention, or pad (see fastattn.window.pad_to_window)")
        if size % win:
            raise ValueError(f"q: image {axis} {size} is not a multiple of window {axis} {win}; pad first "
                             f"(see fastattn.window.pad_to_window)")
    if unpadded_size is None:
        uh, uw = H, W
    else:
        uh, uw = _pair(unpadded_size, "unpadded_size")
        if not (1 <= uh <= H and 1 <= uw <= W):
            raise ValueError(f"unpadded_size: {(uh, uw)} must be within the (padded) image size {(H, W)}")
    if table is not None:
        if not isinstance(table, torch.Tensor):
            raise TypeError(f"rel_pos_bias_table: expected a torch.Tensor or None, got {type(table).__name__}")
        expected = ((2 * wh - 1) * (2 * ww - 1), heads)
        if tuple(table.shape) != expected:
            raise ValueError(f"rel_pos_bias_table: expected shape [(2*wh-1)*(2*ww-1), heads] = {list(expected)} "
                             f"for window {(wh, ww)} and {heads} heads, got {tuple(table.shape)}")
        if not table.is_floating_point():
            raise TypeError(f"rel_pos_bias_table: expected a floating-point tensor, got {table.dtype}")
        if table.device != q.device:
            raise ValueError(f"rel_pos_bias_table: must be on q's device {q.device}, got {table.device}")
    return (wh, ww), (sh, sw), (uh, uw)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window_size: IntOrPair,
                     shift_size: IntOrPair = 0, rel_pos_bias_table: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, dropout_p: float = 0.0, backend=None,
                     unpadded_size: Optional[IntOrPair] = None) -> torch.Tensor:
    """Swin window attention (W-MSA, or SW-MSA when ``shift_size`` is non-zero) in image layout.

    Args:
        q, k: ``[B, H, W, heads, d]``; v: ``[B, H, W, heads, dv]``.  Any strides (views of one qkv projection
            output are fine).  ``H``, ``W`` must be multiples of the window (see ``pad_to_window``).
        window_size: ``int`` or ``(wh, ww)``.
        shift_size: ``int`` or ``(sh, sw)``, each in ``[0, window)``; 0 = W-MSA.  Otherwise the image is
            rolled by ``(-sh, -sw)`` before the partition and back after, and -100 is added to the scores
            between tokens of different regions (Swin's mask) -- whenever any shift is non-zero, as timm.
        rel_pos_bias_table: ``[(2*wh-1)*(2*ww-1), heads]`` or None; looked up with timm's relative position
            index and added to the scaled scores.  Its gradient flows (autograd).
        scale: multiplier of ``q k^T``; default ``d ** -0.5``.
        dropout_p: dropout on the attention probabilities (applied whenever > 0; pass 0 in eval).
        backend: restricts the backend of the underlying ``fastattn.attention`` call.
        unpadded_size: ``(h, w)`` of the image inside inputs padded at the bottom/right, for timm's
            roll-then-pad order: the cyclic shift wraps within that region and the padding stays in place.
            None (default): the shift wraps over the whole input (pad-then-roll, or no padding).

    Returns:
        ``[B, H, W, heads, dv]`` (contiguous).
    """
    (wh, ww), (sh, sw), (uh, uw) = _check_inputs(q, k, v, window_size, shift_size, rel_pos_bias_table,
                                                 unpadded_size)
    B, H, W, heads, _ = q.shape
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None and d >= 1 else check_scale(scale, d)
    dropout_p = check_dropout_p(dropout_p)
    impl = _fused_impl(q, k, v, backend)
    if impl is not None:
        geometry = [H, W, wh, ww, sh, sw, uh, uw]
        seed = _draw_seed(float(dropout_p))
        return _FusedWindowAttention.apply(q, k, v, rel_pos_bias_table, seed, geometry, float(scale),
                                           float(dropout_p), impl)
    dv = v.shape[-1]
    N, nW = wh * ww, (H // wh) * (W // ww)
    device = q.device
    shifted = sh > 0 or sw > 0

    # One gather per tensor: roll + window partition + head transpose -> contiguous [B, nW, heads, N, d].
    ys, xs = _token_index(H, W, wh, ww, sh, sw, uh, uw, device)            # [nW, N] each
    heads_idx = torch.arange(heads, device=device).view(1, heads, 1)
    iy, ix = ys[:, None, :], xs[:, None, :]                               # [nW, 1, N]

    def partition(t):
        return t[:, iy, ix, heads_idx]                                    # [B, nW, heads, N, d]

    qw, kw, vw = partition(q), partition(k), partition(v)

    bias = None
    if rel_pos_bias_table is not None:
        index = relative_position_index((wh, ww), device=device)
        bias = rel_pos_bias_table[index.view(-1)].view(N, N, heads).permute(2, 0, 1)  # [heads, N, N] view

    if shifted:
        mask_dtype = rel_pos_bias_table.dtype if rel_pos_bias_table is not None else q.dtype
        region = _region_mask(H, W, wh, ww, sh, sw, mask_dtype, device)  # [nW, N, N]
        if bias is not None:
            mask = region[:, None] + bias[None]                           # [nW, heads, N, N], materialised
        else:
            # No bias: the region mask still has to be laid out per (window, head) for the [B, nW*heads]
            # layout below; the simplest correct thing is to materialise it (nW * heads * N * N, no batch).
            mask = region[:, None].expand(nW, heads, N, N).contiguous()
        # Attention over [B, nW*heads, N, d] (a view of the gathered tensors): the mask, which depends on the
        # window and the head but not the batch, broadcasts as [1, nW*heads, N, N].
        out = attention(qw.view(B, nW * heads, N, -1), kw.view(B, nW * heads, N, -1),
                        vw.view(B, nW * heads, N, dv), attn_mask=mask.reshape(1, nW * heads, N, N),
                        scale=scale, dropout_p=dropout_p, backend=backend)
    else:
        # Attention over [B*nW, heads, N, d]: the bias [1, heads, N, N] broadcasts as a view.
        out = attention(qw.view(B * nW, heads, N, -1), kw.view(B * nW, heads, N, -1),
                        vw.view(B * nW, heads, N, dv), attn_mask=None if bias is None else bias[None],
                        scale=scale, dropout_p=dropout_p, backend=backend)

    # One gather back: window reverse + inverse roll -> [B, H, W, heads, dv].
    out = out.reshape(B, nW, heads, N, dv)
    pixel = (ys * W + xs).view(-1)                                        # window-token -> pixel
    inverse = torch.empty_like(pixel)
    inverse[pixel] = torch.arange(nW * N, device=device)                  # pixel -> window-token
    win_of, tok_of = (inverse // N)[:, None], (inverse % N)[:, None]      # [H*W, 1]
    out = out[:, win_of, heads_idx.view(1, heads), tok_of]                # [B, H*W, heads, dv]
    return out.view(B, H, W, heads, dv)
