"""The `triton` backend: FlashAttention-2 style kernels (fastattn/kernels/triton_attention.py).

The kernels are wrapped as torch.library custom ops with fake implementations, so torch.compile treats them
as opaque ops (no graph break) and the autograd.Function above stays traceable.

On CUDA tensors it needs compute capability >= 8.0.  On CPU tensors it runs only under TRITON_INTERPRET=1
(Triton's interpreter: slow, used by the test suite to check the kernels without a GPU).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..problem import MAX_HEAD_DIM, AttentionProblem
from .base import Backend

try:
    import triton  # noqa: F401
    _TRITON_IMPORT_ERROR = None
except Exception as e:  # pragma: no cover - triton ships with torch's Linux wheels
    _TRITON_IMPORT_ERROR = f"triton cannot be imported ({e})"


def interpreting() -> bool:
    """True when the kernels were built by Triton's interpreter (TRITON_INTERPRET=1 at import time): then
    they run on CPU tensors, and only on CPU tensors."""
    if _TRITON_IMPORT_ERROR is not None:
        return False
    return type(kernels._attn_fwd).__name__ == "InterpretedFunction"


if _TRITON_IMPORT_ERROR is None:
    from ..kernels import triton_attention as kernels

    @torch.library.custom_op("fastattn::triton_attention_forward", mutates_args=())
    def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                    seed: Optional[torch.Tensor], causal: str, scale: float,
                    dropout_p: float) -> Tuple[torch.Tensor, torch.Tensor]:
        return kernels.attention_forward(q, k, v, mask, causal, scale, dropout_p, seed)

    @_forward_op.register_fake
    def _(q, k, v, mask, seed, causal, scale, dropout_p):
        out = kernels._empty_like_layout(q, v.shape[-1], q.dtype)
        return out, q.new_empty(q.shape[:3], dtype=kernels._stats_dtype(q.dtype))

    @torch.library.custom_op("fastattn::triton_attention_backward", mutates_args=())
    def _backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                     seed: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                     dlse: Optional[torch.Tensor], causal: str, scale: float, dropout_p: float,
                     mask_needs_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dq, dk, dv, dmask = kernels.attention_backward(q, k, v, mask, causal, scale, dropout_p, seed, out, lse,
                                                       dout, dlse, mask_needs_grad)
        if dmask is None:
            dmask = q.new_empty((0,), dtype=torch.float32)
        return dq, dk, dv, dmask

    @_backward_op.register_fake
    def _(q, k, v, mask, seed, out, lse, dout, dlse, causal, scale, dropout_p, mask_needs_grad):
        dmask_shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) if mask_needs_grad else (0,)
        return (kernels._empty_like_layout(q, q.shape[-1], q.dtype),
                kernels._empty_like_layout(k, k.shape[-1], k.dtype),
                kernels._empty_like_layout(v, v.shape[-1], v.dtype),
                q.new_empty(dmask_shape, dtype=kernels._stats_dtype(q.dtype)))


    # --- Swin window attention: the same kernels with the window layout (LAYOUT 1) -------------------------
    def _geometry(geometry):
        return kernels.WindowGeometry(*geometry)

    @torch.library.custom_op("fastattn::triton_window_attention_forward", mutates_args=())
    def _window_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: Optional[torch.Tensor],
                           seed: Optional[torch.Tensor], geometry: List[int], scale: float,
                           dropout_p: float) -> Tuple[torch.Tensor, torch.Tensor]:
        return kernels.attention_forward(q, k, v, None, "none", scale, dropout_p, seed,
                                         window=_geometry(geometry), table=table)

    @_window_forward_op.register_fake
    def _(q, k, v, table, seed, geometry, scale, dropout_p):
        g = _geometry(geometry)
        out = q.new_empty(q.shape[:4] + (v.shape[-1],))
        return out, q.new_empty((q.shape[0] * g.num_windows, q.shape[3], g.tokens),
                                dtype=kernels._stats_dtype(q.dtype))

    @torch.library.custom_op("fastattn::triton_window_attention_backward", mutates_args=())
    def _window_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: Optional[torch.Tensor],
                            seed: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                            dout: torch.Tensor, geometry: List[int], scale: float, dropout_p: float,
                            table_needs_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        g = _geometry(geometry)
        dq, dk, dv, dscores = kernels.attention_backward(q, k, v, None, "none", scale, dropout_p, seed, out, lse,
                                                         dout, None, table_needs_grad, window=g, table=table)
        if not table_needs_grad:
            return dq, dk, dv, q.new_empty((0,), dtype=kernels._stats_dtype(q.dtype))
        # dTable[index(i, j), h] += sum over batch and windows of dS[., h, i, j]
        from ..window import relative_position_index
        heads, N = q.shape[3], g.tokens
        per_pair = dscores.view(-1, heads, N, N).sum(0).permute(1, 2, 0).reshape(N * N, heads)
        index = relative_position_index((g.win_h, g.win_w), device=q.device).view(-1)
        dtable = torch.zeros(table.shape, dtype=per_pair.dtype, device=q.device).index_add_(0, index, per_pair)
        return dq, dk, dv, dtable

    @_window_backward_op.register_fake
    def _(q, k, v, table, seed, out, lse, dout, geometry, scale, dropout_p, table_needs_grad):
        dtable = (q.new_empty(table.shape, dtype=kernels._stats_dtype(q.dtype)) if table_needs_grad
                  else q.new_empty((0,), dtype=kernels._stats_dtype(q.dtype)))
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dtable


def device_reasons(device: torch.device) -> List[str]:
    """Why the Triton kernels cannot run on tensors of this device (empty when they can)."""
    if _TRITON_IMPORT_ERROR is not None:
        return [_TRITON_IMPORT_ERROR]
    if device.type == "cuda":
        if interpreting():
            return ["the Triton interpreter is on (TRITON_INTERPRET=1 when fastattn was imported): "
                    "kernels run on CPU tensors only"]
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return [f"needs compute capability >= 8.0, the device has {major}.{minor}"]
        return []
    if device.type == "cpu":
        if not interpreting():
            return ["runs on CUDA tensors (on CPU tensors only when TRITON_INTERPRET=1 is set before "
                    "fastattn is imported: Triton's interpreter, for testing)"]
        return []
    return [f"does not run on {device.type} tensors"]


# Largest head dim per dtype (the kernels' table in fastattn/kernels/triton_attention.py; float64 stops at 256).
_MAX_HEAD_DIM_BY_DTYPE = {torch.float16: MAX_HEAD_DIM, torch.bfloat16: MAX_HEAD_DIM, torch.float32: MAX_HEAD_DIM,
                          torch.float64: 256}


def tensor_reasons(named_tensors, head_dims) -> List[str]:
    """Head dims within the kernels' range (which depends on the dtype) and contiguous head dimensions."""
    why = []
    dtype = named_tensors[0][1].dtype
    limit = _MAX_HEAD_DIM_BY_DTYPE.get(dtype, MAX_HEAD_DIM)
    for name, d in head_dims:
        if d > limit:
            why.append(f"{name}: head dim {d} exceeds the Triton kernels' maximum {limit} for {dtype}")
    for name, t in named_tensors:
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            # Strided head dims would work, but every load becomes a gather; dispatch has better options.
            why.append(f"{name}: the last (head) dimension must be contiguous (stride 1), got stride {t.stride(-1)}")
    return why


class TritonBackend(Backend):
    name = "triton"
    summary = ("FlashAttention-2 style Triton kernels: CUDA sm_80+ (CPU tensors only under "
               "TRITON_INTERPRET=1); any strides, GQA, masks with gradient, dropout, both causal alignments")

    def reasons(self, p: AttentionProblem) -> List[str]:
        why = device_reasons(p.device)
        if _TRITON_IMPORT_ERROR is None:
            why += tensor_reasons((("q", p.q), ("k", p.k), ("v", p.v)), (("q", p.dim_qk), ("v", p.dim_v)))
        return why

    def plan(self, p: AttentionProblem) -> str:
        """The forward launch for these inputs: kernel, tile configuration, key splits."""
        kernel, cfg, splits = kernels.forward_plan(p.q, p.k, p.v)
        text = (f"{kernel} kernel, BLOCK_M={cfg.block_m} BLOCK_N={cfg.block_n} warps={cfg.num_warps} "
                f"stages={cfg.num_stages}")
        if splits > 1:
            text += f"; split-KV: keys in {splits} splits, partial results merged by their LSE"
        return text

    def forward(self, p, seed):
        return _forward_op(p.q, p.k, p.v, p.mask, seed, p.causal, p.scale, p.dropout_p)

    def backward(self, p, seed, out, lse, dout, dlse):
        dq, dk, dv, dmask = _backward_op(p.q, p.k, p.v, p.mask, seed, out, lse, dout, dlse, p.causal, p.scale,
                                         p.dropout_p, p.mask_needs_grad)
        if p.mask_needs_grad:
            # dS summed over the dimensions along which the mask was broadcast.
            dmask = dmask.sum_to_size(p.mask.shape).to(p.mask.dtype)
        else:
            dmask = None
        return dq, dk, dv, dmask
