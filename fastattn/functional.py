"""The functional API: ``attention`` and the drop-in ``scaled_dot_product_attention``.

Three thin layers: the public function validates and normalises its inputs (problem.py), dispatch picks a
backend (dispatch.py), and ``AttentionFunction`` -- a torch.autograd.Function -- runs that backend's
forward and backward.  ``PackedAttentionFunction`` is its variant for q, k, v cut from one tensor (a fused qkv
projection) on backends that write gradients into given buffers.
"""
from __future__ import annotations

import contextvars
import functools
import os
from typing import Optional

import torch

from . import dispatch
from .backends import BACKENDS
from .problem import AttentionProblem, make_problem


class AttentionFunction(torch.autograd.Function):
    """out, lse = backend.forward(...); the backward calls the same backend's backward.

    Saved for backward: q, k, v, the mask, the dropout seed, out and lse -- never the [Lq, Lk] probabilities
    (fused backends recompute them)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, seed, backend_name: str, causal: str, scale: float, dropout_p: float,
                return_lse: bool, mask_needs_grad: bool):
        p = AttentionProblem(q, k, v, mask, causal, scale, dropout_p, return_lse, mask_needs_grad)
        out, lse = BACKENDS[backend_name].forward(p, seed)
        ctx.save_for_backward(q, k, v, mask, seed, out, lse)
        ctx.problem_args = (backend_name, causal, scale, dropout_p, return_lse)
        if lse is None:
            return out, None
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, mask, seed, out, lse = ctx.saved_tensors
        backend_name, causal, scale, dropout_p, return_lse = ctx.problem_args
        p = AttentionProblem(q, k, v, mask, causal, scale, dropout_p, return_lse,
                             mask_needs_grad=bool(ctx.needs_input_grad[3]))
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dmask = BACKENDS[backend_name].backward(p, seed, out, lse, dout.contiguous(), dlse)
        return dq, dk, dv, dmask, None, None, None, None, None, None, None


class PackedAttentionFunction(torch.autograd.Function):
    """AttentionFunction for q, k, v that are views of one tensor ``base`` -- ``qkv.unbind(2)`` of a fused
    projection, ``chunk``, slicing -- which together cover it exactly.  Its input is ``base`` itself, so
    autograd's view backwards (``UnbindBackward``: a ``torch.stack`` of dq, dk, dv into a fresh tensor of base's
    size) do not run: the backward allocates base's gradient once and the backend writes dq, dk, dv straight into
    its slices (``backward_into``).  The results are the same as AttentionFunction's, bit for bit.
    ``geometry``: (size, stride, storage offset relative to base) of q, k and v."""

    @staticmethod
    def _views(t, geometry):
        """q, k, v (or their gradients) as views of t, which has base's shape and strides."""
        return [t.as_strided(size, stride, t.storage_offset() + offset) for size, stride, offset in geometry]

    @staticmethod
    def forward(ctx, base, geometry, mask, seed, backend_name: str, causal: str, scale: float, dropout_p: float,
                return_lse: bool, mask_needs_grad: bool):
        q, k, v = PackedAttentionFunction._views(base, geometry)
        p = AttentionProblem(q, k, v, mask, causal, scale, dropout_p, return_lse, mask_needs_grad)
        out, lse = BACKENDS[backend_name].forward(p, seed)
        ctx.save_for_backward(base, mask, seed, out, lse)
        ctx.problem_args = (geometry, backend_name, causal, scale, dropout_p, return_lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        base, mask, seed, out, lse = ctx.saved_tensors
        geometry, backend_name, causal, scale, dropout_p, return_lse = ctx.problem_args
        q, k, v = PackedAttentionFunction._views(base, geometry)
        p = AttentionProblem(q, k, v, mask, causal, scale, dropout_p, return_lse,
                             mask_needs_grad=bool(ctx.needs_input_grad[2]))
        if dout is None:
            dout = torch.zeros_like(out)
        # Every element of base belongs to exactly one of q, k, v (_packed_geometry), so nothing is left unwritten.
        dbase = torch.empty_strided(base.shape, base.stride(), dtype=base.dtype, device=base.device)
        dq, dk, dv = PackedAttentionFunction._views(dbase, geometry)
        dmask = BACKENDS[backend_name].backward_into(p, seed, out, lse, dout.contiguous(), dlse, dq, dk, dv)
        return dbase, None, dmask, None, None, None, None, None, None, None


def _dense_span(sizes, strides) -> Optional[int]:
    """The number of elements a strided layout spans if it is non-overlapping and dense (it covers exactly
    [start, start + numel) of its storage), else None."""
    dims = sorted((st, sz) for sz, st in zip(sizes, strides) if sz != 1)
    expected = 1
    for st, sz in dims:
        if sz == 0:
            return None
        if st != expected:
            return None
        expected *= sz
    return expected


def _packed_geometry(q, k, v):
    """(base, geometry) when q, k, v are same-shaped, same-strided views of one dense tensor, a constant distance
    apart, that together cover every element of it (so the backward can write its gradient without zeroing
    it first); else None."""
    base = q._base
    if base is None or k._base is not base or v._base is not base:
        return None
    if not (base.requires_grad and q.requires_grad and k.requires_grad and v.requires_grad):
        return None
    if not (q.shape == k.shape == v.shape and q.stride() == k.stride() == v.stride()):
        return None
    if q.dtype != base.dtype or _dense_span(base.shape, base.stride()) != base.numel():
        return None
    offsets = [t.storage_offset() - base.storage_offset() for t in (q, k, v)]
    first, second, third = sorted(offsets)
    step = second - first
    if first != 0 or step <= 0 or third - second != step:
        return None
    if _dense_span((3,) + tuple(q.shape), (step,) + tuple(q.stride())) != base.numel():
        return None
    return base, tuple((tuple(t.shape), tuple(t.stride()), off) for t, off in zip((q, k, v), offsets))


# The packed path takes q, k, v out of the autograd graph (its input is their base), so hooks registered on them
# and retain_grad() would not see their gradients: it stands aside when it can see either -- on the tensors passed
# to attention, and (respects_qkv_hooks) on those passed to the functions that hand views of them on.  Views in
# between that it is not given (a hook on k, then attention(k.transpose(1, 2), ...)) it cannot see: README,
# "Packed q, k, v".  FASTATTN_PACKED_QKV=0 turns the path off.
_PACK_QKV = contextvars.ContextVar("fastattn_pack_qkv", default=True)


def _grad_observed(*tensors) -> bool:
    return any(isinstance(t, torch.Tensor) and (t.retains_grad or bool(t._backward_hooks)) for t in tensors)


def respects_qkv_hooks(fn):
    """Decorator of the public functions that pass views of their q, k, v (first three arguments) on to
    ``attention``: with a hook or retain_grad() on one of them, no packed path below."""
    @functools.wraps(fn)
    def wrapper(q, k, v, *args, **kwargs):
        if torch.compiler.is_compiling() or not _grad_observed(q, k, v):
            return fn(q, k, v, *args, **kwargs)
        token = _PACK_QKV.set(False)
        try:
            return fn(q, k, v, *args, **kwargs)
        finally:
            _PACK_QKV.reset(token)
    return wrapper


def _draw_seed(dropout_p: float) -> Optional[torch.Tensor]:
    """The dropout seed: drawn from torch's default CPU generator, so torch.manual_seed fixes it."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)


def attention(q, k, v, *, attn_mask=None, causal=False, scale=None, dropout_p=0.0, return_lse=False,
              backend=None):
    """Fused softmax attention.

    Args:
        q: ``[B, Hq, Lq, Dqk]``; k: ``[B, Hkv, Lk, Dqk]``; v: ``[B, Hkv, Lk, Dv]``.  ``Hq % Hkv == 0``
            (grouped-query / multi-query attention: query head h reads key/value head ``h // (Hq/Hkv)``).
            Any strides: a ``[B, L, H, D]`` tensor ``.transpose(1, 2)``-ed to this layout is read in place.
            Any head dims (the Triton kernels take 1..512, 1..256 in float64, see ``fastattn.MAX_HEAD_DIM``; wider heads go to
            the other backends); ``Dv`` may differ from ``Dqk``.  float16, bfloat16, float32, float64.
        attn_mask: bool (True = attend) or float (added to the scaled scores), broadcastable to
            ``[B, Hq, Lq, Lk]``.  A float mask that requires grad receives its gradient, summed over the
            dimensions it was broadcast along.
        causal: ``False``; ``True`` or ``"top_left"`` (query i sees keys j <= i, as
            ``F.scaled_dot_product_attention(is_causal=True)``); ``"bottom_right"`` (query i sees keys
            ``j <= i + Lk - Lq``: the last query sees every key -- decoding with a KV cache).
            Combines with ``attn_mask``.
        scale: multiplier of ``q k^T``; default ``1 / sqrt(Dqk)``.
        dropout_p: dropout on the probabilities (applied whenever > 0, as in SDPA).  The mask is a function
            of a seed drawn from torch's default generator: ``torch.manual_seed`` makes it reproducible.
        return_lse: also return the row log-sum-exp ``[B, Hq, Lq]`` (float32; float64 for float64 inputs;
            natural log; -inf for a fully masked row), e.g. to merge partial results over key chunks.
            It is differentiable.
        backend: a backend name or list of names to restrict dispatch to (see ``fastattn.explain``).

    A fully masked row gives output 0 and zero gradients.
    """
    p = make_problem(q, k, v, attn_mask, causal, scale, dropout_p, return_lse)
    chosen = dispatch.select(p, backend)
    if chosen.differentiable:
        out, lse = chosen.forward(p)
        return (out, lse) if return_lse else out
    seed = _draw_seed(p.dropout_p)
    if not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (p.q, p.k, p.v, p.mask))):
        # Nothing to differentiate (inference, a decoding step): the backend directly, without the
        # autograd.Function layer -- a few microseconds per call, which a small model's decoding step notices.
        out, lse = chosen.forward(p, seed)
        return (out, lse) if return_lse else out
    packed = None
    if (getattr(chosen, "backward_into", None) is not None and torch.is_grad_enabled() and p.q.requires_grad
            and not torch.compiler.is_compiling() and _PACK_QKV.get() and os.environ.get("FASTATTN_PACKED_QKV") != "0"
            and not _grad_observed(q, k, v, p.q, p.k, p.v)):
        packed = _packed_geometry(p.q, p.k, p.v)
    if packed is not None:
        out, lse = PackedAttentionFunction.apply(packed[0], packed[1], p.mask, seed, chosen.name, p.causal, p.scale,
                                                 p.dropout_p, p.return_lse, p.mask_needs_grad)
    else:
        out, lse = AttentionFunction.apply(p.q, p.k, p.v, p.mask, seed, chosen.name, p.causal, p.scale,
                                           p.dropout_p, p.return_lse, p.mask_needs_grad)
    return (out, lse) if return_lse else out


def explain(q, k, v, *, attn_mask=None, causal=False, scale=None, dropout_p=0.0, return_lse=False,
            backend=None) -> str:
    """Which backend ``attention`` would run on these inputs, and why each other one was rejected."""
    p = make_problem(q, k, v, attn_mask, causal, scale, dropout_p, return_lse)
    return dispatch.explain_problem(p, backend)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: same signature, same semantics.

    Shapes ``(..., L, E)`` for query and ``(..., S, E)`` / ``(..., S, Ev)`` for key / value, with any number of
    leading dimensions (the second-to-last leading one is the head dimension when there are several); the
    dimensions before the heads broadcast, as in torch's.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name}: expected at least 2 dimensions (..., seq, head_dim), got {t.dim()}")
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask: must be None when is_causal=True (as in F.scaled_dot_product_attention)")
    if query.dim() != key.dim() or query.dim() != value.dim():
        raise ValueError(f"query, key, value: must have the same number of dimensions, got "
                         f"{query.dim()}, {key.dim()}, {value.dim()}")
    if query.dim() >= 3 and query.shape[-3] != key.shape[-3] and not enable_gqa:
        raise ValueError(f"key: number of heads ({key.shape[-3]}) differs from query's ({query.shape[-3]}); "
                         f"pass enable_gqa=True for grouped-query attention")

    if query.dim() >= 4:
        # Batch dimensions (those before the heads) broadcast, as in torch's math attention: e.g. one key/value
        # sequence shared by the whole batch.  Expanded views: no copy, and autograd sums the gradients back.
        try:
            batch = torch.broadcast_shapes(*(t.shape[:-3] for t in (query, key, value)))
        except RuntimeError:
            raise ValueError(f"query, key, value: batch dimensions {tuple(query.shape[:-3])}, "
                             f"{tuple(key.shape[:-3])}, {tuple(value.shape[:-3])} do not broadcast") from None
        query, key, value = (t if t.shape[:-3] == batch else t.expand(batch + t.shape[-3:])
                             for t in (query, key, value))

    # Bring every input to [B, H, L, E].
    lead = query.shape[:-2]
    L, S = query.shape[-2], key.shape[-2]
    if query.dim() == 4:
        q, k, v, mask = query, key, value, attn_mask
    elif query.dim() < 4:
        pad = 4 - query.dim()
        q, k, v = (t.reshape((1,) * pad + tuple(t.shape)) for t in (query, key, value))
        mask = attn_mask
    else:
        def to4(t):
            return t.reshape((-1,) + tuple(t.shape[-3:]))
        q, k, v = to4(query), to4(key), to4(value)
        mask = None
        if attn_mask is not None:
            mask = attn_mask.expand(tuple(lead) + (L, S)).reshape((-1,) + (q.shape[1], L, S))
    out = attention(q, k, v, attn_mask=mask, causal=bool(is_causal), scale=scale, dropout_p=dropout_p)
    return out.reshape(tuple(lead) + (L, value.shape[-1]))
