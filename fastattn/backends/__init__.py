"""Backends of the attention op, by name.  See base.py for the interface and dispatch.py for the choice."""
from .base import Backend, UnavailableBackend
from .reference import ReferenceBackend
from .sdpa import SdpaBackend
from .triton import TritonBackend

BACKENDS = {
    "reference": ReferenceBackend(),
    "sdpa": SdpaBackend(),
    "triton": TritonBackend(),
    # Slots for the compiled C++ extension (csrc/, a later issue).
    "cuda": UnavailableBackend("cuda", "the CUDA C++ extension (fastattn._C) is not built yet"),
    "cpu": UnavailableBackend("cpu", "the fused CPU C++ extension (fastattn._C) is not built yet"),
}

__all__ = ["Backend", "BACKENDS"]
