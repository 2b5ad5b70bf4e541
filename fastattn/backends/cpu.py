"""The `cpu` backend: fused C++ kernels for CPU tensors (csrc/cpu/attention_cpu.cpp, through fastattn._C).

FlashAttention-2's algorithm on the CPU: blocks of queries x blocks of keys with an online softmax (no [Lq, Lk]
buffer), float32 block products on AVX-512 or AVX2 register tiles of our own (csrc/cpu/small_gemm.cpp; torch's BLAS
for float64, on CPUs without AVX2 and with FASTATTN_CPU_GEMM=blas), `at::parallel_for` over (batch, head, query
block), a deterministic backward (no atomics).  float32, float64, bfloat16 and float16 (bf16/fp16 compute in float32,
except on CPUs with AMX-BF16, where bf16 block products run on the tile unit: csrc/cpu/amx*.h); any strides, GQA,
bool/float masks (broadcast by strides, float masks with their gradient), both causal alignments, dropout with the
Philox stream of the other backends (bit-identical keep-masks), the log-sum-exp and its gradient.

The ops are ``torch.ops.fastattn.attention_fwd`` / ``attention_bwd`` (schemas in csrc/ops.cpp, fake
implementations in fastattn/_ext.py), so torch.compile sees them as opaque ops.  The extension is loaded on the
first CPU call that could use it (and JIT-built if it was not built ahead of time, see fastattn/_ext.py).
"""
from __future__ import annotations

from typing import List

import torch

from .. import _ext
from ..problem import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT, AttentionProblem
from .base import Backend

CAUSAL_CODES = {CAUSAL_NONE: 0, CAUSAL_TOP_LEFT: 1, CAUSAL_BOTTOM_RIGHT: 2}
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class ExtensionBackend(Backend):
    """The calls into fastattn._C's ops, shared by the cpu and cuda backends (which differ in reasons() and in
    how they pass the mask: ``_mask``)."""

    @staticmethod
    def _mask(p: AttentionProblem):
        # [B, Hq, Lq, Lk] as a view: broadcast dimensions get stride 0, nothing is materialised.
        return None if p.mask is None else p.mask.expand(p.scores_shape)

    def forward(self, p, seed):
        return _ext.ops().attention_fwd(p.q, p.k, p.v, self._mask(p), seed, CAUSAL_CODES[p.causal], p.scale,
                                        p.dropout_p)

    def backward(self, p, seed, out, lse, dout, dlse):
        dq, dk, dv, dmask = _ext.ops().attention_bwd(p.q, p.k, p.v, self._mask(p), seed, out, lse, dout, dlse,
                                                     CAUSAL_CODES[p.causal], p.scale, p.dropout_p,
                                                     p.mask_needs_grad)
        if p.mask_needs_grad:
            # dS summed over the dimensions along which the mask was broadcast.
            dmask = dmask.sum_to_size(p.mask.shape).to(p.mask.dtype)
        else:
            dmask = None
        return dq, dk, dv, dmask


class CpuBackend(ExtensionBackend):
    name = "cpu"
    summary = ("fused C++ CPU kernels (fastattn._C): tiled online softmax, block products on AVX-512/AVX2 tiles "
               "(else BLAS), at::parallel_for, "
               "deterministic backward; fp32/fp64/bf16/fp16, any strides, GQA, masks with gradient, dropout, "
               "both causal alignments, LSE")

    def reasons(self, p: AttentionProblem) -> List[str]:
        why = []
        if p.device.type != "cpu":
            why.append(f"runs on CPU tensors only, got {p.device.type} tensors")
        if p.dtype not in DTYPES:
            why.append(f"dtype {p.dtype} is not supported (float32, float64, bfloat16, float16)")
        if not why:  # load (or build) the extension only for inputs it would serve
            err = _ext.error()
            if err is not None:
                why.append(err)
        return why

    def backward_into(self, p, seed, out, lse, dout, dlse, dq, dk, dv):
        """backward writing into the given dq, dk, dv (views with a contiguous last dim, e.g. the slices of one
        packed qkv gradient: fastattn.functional.PackedAttentionFunction); returns the mask gradient or None."""
        dmask = _ext.ops().attention_bwd_into(p.q, p.k, p.v, self._mask(p), seed, out, lse, dout, dlse,
                                              CAUSAL_CODES[p.causal], p.scale, p.dropout_p, p.mask_needs_grad,
                                              dq, dk, dv)
        return dmask.sum_to_size(p.mask.shape).to(p.mask.dtype) if p.mask_needs_grad else None
