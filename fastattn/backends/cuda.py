"""The `cuda` backend: FlashAttention-2 CUDA C++ kernels on tensor cores (csrc/cuda/, through fastattn._C).

Forward: one CTA per 128 queries of a (batch, head), 32-key K/V tiles double-buffered through shared memory with
cp.async, S = Q K^T and O += P V on mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulators), the online softmax in
registers (exp2 with log2(e) folded into the scale), the row log-sum-exp saved.  Backward: Delta =
rowsum(dO * O) - dLSE, then a dK/dV kernel per key tile looping over the query tiles of every query head of its
GQA group, and a separate dQ kernel -- no atomics, so the backward is bitwise reproducible.  Head dims 136..256
(padded to 256): 64-query forward CTAs, and a dK/dV kernel of 8 warps that splits the head dim between warp pairs
(the scores of a step computed once, shared through shared memory; ~143 KiB of it, so sm_80 / sm_90 only).

When the forward's query blocks cannot fill the GPU (few queries, many keys: Perceiver's latents, decoding), the
keys are split across CTAs and the partial results merged by their LSE (split-KV, the Triton backend's rule;
``FASTATTN_NUM_SPLITS`` forces a count).

Everything the tensor cores cannot take runs on CUDA-core kernels of the same design (csrc/cuda/fa_simt.cuh):
float32 (IEEE products and sums, no TF32), head dims not multiples of 8, Dv != Dqk, and the backward of head dims
136..256 on devices without the wide dK/dV kernel's shared memory (sm_86 / sm_89).  They are a complete fallback, not a fast path: in
float32 the triton backend comes first in dispatch.

Supported: CUDA tensors on compute capability >= 8.0; float16, bfloat16 (tensor cores for head dims 8..256 in
steps of 8 with Dv == Dqk, padded to 64, 128 or 256; the backward past 128 on sm_80 / sm_90) and float32; head dims 1..256 for q/k
and v each; GQA/MQA; causal
top-left and bottom-right; bool and float masks broadcast by strides (the float mask's gradient too); dropout with
the Philox stream of the other backends (bit-identical keep-masks); the log-sum-exp and its gradient; any (batch,
head, sequence) strides with a contiguous head dim.  Declined, with the reason: other devices, float64 (the triton
backend), head dims past 256.

The ops are ``torch.ops.fastattn.attention_fwd`` / ``attention_bwd`` (schemas in csrc/ops.cpp, fake
implementations in fastattn/_ext.py), so torch.compile sees them as opaque ops.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch

from .. import _ext
from ..problem import AttentionProblem
from .cpu import ExtensionBackend

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TENSOR_CORE_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256                # the CUDA-core kernels' limit, for q/k and v each
MAX_NARROW_BWD_HEAD_DIM = 128  # past it, the tensor-core backward needs WIDE_BWD_SMEM_BYTES of shared memory
WIDE_BWD_SMEM_BYTES = 145_920  # csrc/cuda/fa_kernels.cuh kWideBwdSmemBytes (BwdKVWideTile<256>, fp16/bf16)
MAX_GRID_DIM = 65535  # batch and heads are CUDA grid dimensions (z, y)


_registered = []  # [True] once the CUDA kernels were found registered (it cannot change afterwards)


def has_cuda_kernels() -> bool:
    """Are CUDA implementations of the ops registered (the extension was built with csrc/cuda)?"""
    if _registered:
        return True
    if not _ext.load():
        return False
    if torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::attention_fwd", "CUDA"):
        _registered.append(True)
        return True
    return False


def device_reasons(device: torch.device) -> List[str]:
    if device.type != "cuda":
        return [f"runs on CUDA tensors only, got {device.type} tensors"]
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return [f"needs compute capability >= 8.0 (mma.sync for fp16/bf16, cp.async), the device has {major}.{minor}"]
    return []


def head_dim_reasons(dim_qk: int, dim_v: int) -> List[str]:
    why = []
    if not 1 <= dim_qk <= MAX_HEAD_DIM:
        why.append(f"q: head dim {dim_qk} is not supported by the CUDA kernels (1 to {MAX_HEAD_DIM})")
    if not 1 <= dim_v <= MAX_HEAD_DIM:
        why.append(f"v: head dim {dim_v} is not supported by the CUDA kernels (1 to {MAX_HEAD_DIM})")
    return why


def smem_optin(device) -> Optional[int]:
    """Opt-in shared memory per block of a CUDA device in bytes (None when torch does not report it)."""
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.device(device))
    return getattr(props, "shared_memory_per_block_optin", None)


def tensor_core_directions(dtype: torch.dtype, dim_qk: int, dim_v: int,
                           smem_bytes: Optional[int] = None) -> Tuple[bool, bool]:
    """(forward, backward) on tensor cores? -- csrc/cuda/fa_ops.cuh kernel_family: float16/bfloat16 with
    Dv == Dqk, a multiple of 8, up to 256; the backward past 128 only where the device's opt-in shared memory
    (``smem_bytes``; None: assume an sm_80 / sm_90 device, which have it) holds the wide tiles; the CUDA-core
    kernels otherwise."""
    ok = dtype in TENSOR_CORE_DTYPES and dim_qk == dim_v and dim_qk % 8 == 0 and dim_qk <= MAX_HEAD_DIM
    wide_fits = smem_bytes is None or smem_bytes >= WIDE_BWD_SMEM_BYTES
    return ok, ok and (dim_qk <= MAX_NARROW_BWD_HEAD_DIM or wide_fits)


def wgmma_forward_requested(device) -> bool:
    """Will the tensor-core forward of head dims up to 128 run on the Hopper wgmma kernel (csrc/cuda/fa_wgmma_fwd.cuh)?
    fa_ops.cuh use_wgmma_fwd: FASTATTN_CUDA_WGMMA=1 and a compute capability 9.0 device -- and an extension built
    with sm_90a code (FASTATTN_CUDA_ARCHS containing 9.0a, the default), which Python cannot see."""
    if os.environ.get("FASTATTN_CUDA_WGMMA") != "1":
        return False
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(torch.device(device)) == (9, 0)


def window_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> List[str]:
    """Why the CUDA window kernels (ops fastattn::window_fwd / window_bwd on CUDA; fastattn.window_attention's
    fused path) cannot serve these [B, H, W, heads, d] inputs -- empty when they can."""
    why = device_reasons(q.device)
    if q.dtype not in DTYPES:
        why.append(f"dtype {q.dtype} is not supported by the CUDA window kernels (float16, bfloat16, float32)")
    why += head_dim_reasons(q.shape[-1], v.shape[-1])
    if not why:
        err = _ext.error()
        if err is not None:
            why.append(err)
        elif not torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::window_fwd", "CUDA"):
            why.append("fastattn._C has no CUDA window kernels (built without csrc/cuda, or from older sources); "
                       "rebuild with `pip install --no-deps --no-build-isolation -e .`")
    return why


class CudaBackend(ExtensionBackend):
    name = "cuda"
    summary = ("FlashAttention-2 CUDA C++ kernels (fastattn._C): sm_80+, fp16/bf16 on mma.sync tensor cores (head "
               "dims multiples of 8 with Dv == Dqk, up to 256; the backward past 128 on sm_80 / sm_90), float32 and any other "
               "head dims up to 256 (Dv may differ) on CUDA cores; any strides, GQA, masks with gradient, dropout, "
               "both causal alignments, LSE, deterministic backward")

    def reasons(self, p: AttentionProblem) -> List[str]:
        why = device_reasons(p.device)
        if p.dtype not in DTYPES:
            why.append(f"dtype {p.dtype} is not supported (float16, bfloat16, float32; float64 runs on the triton "
                       "backend)")
        why += head_dim_reasons(p.dim_qk, p.dim_v)
        if p.batch > MAX_GRID_DIM or p.heads_q > MAX_GRID_DIM:
            why.append(f"q: batch ({p.batch}) and heads ({p.heads_q}) must each be at most {MAX_GRID_DIM}")
        if not why:  # load (or build) the extension only for inputs it would serve
            err = _ext.error()
            if err is not None:
                why.append(err)
            elif not has_cuda_kernels():
                why.append("fastattn._C was built without the CUDA kernels (needs a CUDA build of torch and nvcc at "
                           "build time, and FASTATTN_SKIP_CUDA unset); rebuild with "
                           "`pip install --no-deps --no-build-isolation -e .`")
        return why

    def plan(self, p: AttentionProblem) -> str:
        """The launch configuration, for fastattn.explain."""
        forward, backward = tensor_core_directions(p.dtype, p.dim_qk, p.dim_v, smem_optin(p.device))
        simt = ("CUDA-core kernels (float32 arithmetic, head dims {}/{}): forward and dQ CTAs of 16 queries (4 warps "
                "x 4 rows) over 32-key tiles, dK/dV CTAs of 16 keys over 32-query tiles".format(p.dim_qk, p.dim_v))
        split = "; split-KV forward when the query blocks cannot fill the GPU"
        if not forward:
            return simt + split
        if not backward:
            return (f"CUDA FlashAttention-2 forward, head dim {p.dim_qk} padded to 256: CTAs of 64 queries (4 warps x "
                    f"16 rows) over 32-key tiles{split}; backward on the " + simt)
        if p.dim_qk > MAX_NARROW_BWD_HEAD_DIM:
            return (f"CUDA FlashAttention-2, head dim {p.dim_qk} padded to 256: forward CTAs of 64 queries (4 warps "
                    f"x 16 rows) over 32-key tiles{split}; backward dK/dV CTAs of 64 keys x 32-query tiles (8 warps, "
                    "the head dim split between warp pairs), dQ CTAs of 64 queries x 32-key tiles (4 warps)")
        padded = 64 if p.dim_qk <= 64 else 128
        warps = "4 warps x 32 rows" if padded == 64 else "8 warps x 16 rows"
        fwd = f"forward CTAs of 128 queries ({warps}) over 32-key tiles"
        if wgmma_forward_requested(p.device):
            fwd = ("forward on wgmma (sm_90a; FASTATTN_CUDA_WGMMA=1): CTAs of 128 queries (2 warpgroups x 64 rows) "
                   "over 128-key tiles")
        return (f"CUDA FlashAttention-2, head dim {p.dim_qk} padded to {padded}: {fwd}; backward dK/dV CTAs of 64 "
                f"keys x {64 if padded == 64 else 32}-query "
                f"tiles, dQ CTAs of 64 queries x {64 if padded == 64 else 32}-key tiles (4 warps); split-KV forward "
                "when the query blocks cannot fill the GPU")

    @staticmethod
    def _mask(p: AttentionProblem):
        """[B, Hq, Lq, Lk] as a view (stride 0 along broadcast dimensions).  The kernels read bool or float32
        masks: other float dtypes are converted before the expand, so nothing [Lq, Lk]-sized is materialised."""
        if p.mask is None:
            return None
        m = p.mask
        if m.dtype != torch.bool and m.dtype != torch.float32:
            m = m.to(torch.float32)
        return m.expand(p.scores_shape)
