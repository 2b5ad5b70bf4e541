"""Backends of the attention op, by name.  See base.py for the interface and dispatch.py for the choice."""
from .base import Backend, UnavailableBackend
from .cpu import CpuBackend
from .cuda import CudaBackend
from .reference import ReferenceBackend
from .sdpa import SdpaBackend
from .triton import TritonBackend

BACKENDS = {
    "reference": ReferenceBackend(),
    "sdpa": SdpaBackend(),
    "triton": TritonBackend(),
    # The compiled C++ extension (csrc/, issue 5).
    "cuda": CudaBackend(),  # FlashAttention-2 CUDA C++ kernels (csrc/cuda); sm_80+, fp16/bf16
    "cpu": CpuBackend(),  # fused C++ kernels (csrc/cpu); declines, saying why, when fastattn._C cannot be loaded
}

__all__ = ["Backend", "BACKENDS"]
