"""The compiled extension: the ops ``torch.ops.fastattn.attention_fwd`` / ``attention_bwd`` / ``window_fwd`` /
``window_bwd`` / ``spatial_fwd`` / ``spatial_bwd`` (csrc/ops.cpp).

``load()`` makes them available, once per process:

1. ``import fastattn._C`` -- built ahead of time by ``pip install --no-build-isolation -e .`` (setup.py);
2. if that module is absent (or cannot be loaded), a JIT build with ``torch.utils.cpp_extension.load`` into
   torch's extension cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``): about a minute
   for the CPU kernels on 2 cores, announced on stderr, then cached.  The CUDA sources join the JIT build only
   where a GPU is present (FASTATTN_SKIP_CUDA=1 leaves them out).  ``FASTATTN_NO_JIT=1`` disables this step.
3. if both fail, ``load()`` returns False and ``error()`` says why and how to build; the backends that need the
   extension decline with that reason, the others keep working.

It also registers the ops' fake (meta) implementations, for torch.compile and torch.library.opcheck.  They
allocate exactly what the C++ implementations allocate (csrc/ops.h), so every device's implementation shares
them: backends must call ``load()`` rather than register fakes themselves.
"""
from __future__ import annotations

import glob
import os
import sys
import threading
from typing import Optional

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CSRC = os.path.join(_ROOT, "csrc")
BUILD_HINT = ("build it with `pip install --no-deps --no-build-isolation -e .` in the fastattn checkout "
              "(or let fastattn JIT-build it on first use: unset FASTATTN_NO_JIT; needs a C++ compiler and ninja)")

# Every op of csrc/ops.cpp: an older build without one of them counts as absent (and is rebuilt).
OPS = ("attention_fwd", "attention_bwd", "attention_bwd_into", "window_fwd", "window_bwd", "spatial_fwd",
       "spatial_bwd")

_lock = threading.Lock()
_state = {"done": False, "ok": False, "error": None, "how": None}


def _ops_registered() -> bool:
    try:
        for name in OPS:
            getattr(torch.ops.fastattn, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _stale_warning():
    """An in-place build older than the sources it was built from (an editable install after `git pull`)."""
    try:
        from . import _C
        built = os.path.getmtime(_C.__file__)
    except Exception:
        return
    sources = [p for p in glob.glob(os.path.join(_CSRC, "**", "*"), recursive=True) if os.path.isfile(p)]
    if sources and max(os.path.getmtime(p) for p in sources) > built:
        print(f"fastattn: warning: {os.path.basename(_C.__file__)} is older than csrc/; rebuild with "
              "`pip install --no-deps --no-build-isolation -e .`", file=sys.stderr)


def _jit_sources():
    sources = [os.path.join(_CSRC, "ops.cpp")] + sorted(glob.glob(os.path.join(_CSRC, "cpu", "*.cpp")))
    cuda = sorted(glob.glob(os.path.join(_CSRC, "cuda", "*.cu"))) + sorted(glob.glob(os.path.join(_CSRC, "cuda", "*.cpp")))
    use_cuda = bool(cuda) and torch.cuda.is_available() and os.environ.get("FASTATTN_SKIP_CUDA", "0") != "1"
    return sources + (cuda if use_cuda else []), use_cuda


def _cuda_library_header_flags(cuda_home):
    """As setup.py: the CUDA libraries' headers (cusparse.h, ...) from torch's pip dependencies when the toolkit
    lacks them."""
    if not cuda_home or os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    dirs = sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include"))
                  if os.path.exists(os.path.join(d, "cusparse.h")))
    return [flag for d in dirs for flag in ("-isystem", d)]


def _jit_build():
    from torch.utils import cpp_extension

    if not os.path.exists(os.path.join(_CSRC, "ops.cpp")):
        raise RuntimeError(f"the C++ sources are not there ({_CSRC}/ops.cpp): fastattn was installed without them")
    # The ninja pip package lives next to the interpreter, which is not on PATH when a venv is not activated.
    bin_dir = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(bin_dir, "ninja")) and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    sources, use_cuda = _jit_sources()
    print(f"fastattn: fastattn._C is not built; JIT-building the C++ extension ({'CPU + CUDA' if use_cuda else 'CPU'} "
          "kernels) with torch.utils.cpp_extension.load -- a minute or two the first time, then cached "
          "(`pip install --no-deps --no-build-isolation -e .` builds it ahead of time)", file=sys.stderr, flush=True)
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []  # at::parallel_for needs it (setup.py)
    cuda_flags = ["-DFASTATTN_WITH_CUDA"] + _cuda_library_header_flags(cpp_extension.CUDA_HOME) if use_cuda else []
    cpp_extension.load(
        name="fastattn_C", sources=sources, extra_cflags=["-O3"] + openmp + cuda_flags, extra_ldflags=openmp,
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"] + cuda_flags if use_cuda else None,
        extra_include_paths=[_CSRC], is_python_module=False, verbose=os.environ.get("FASTATTN_JIT_VERBOSE") == "1")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def load() -> bool:
    """Make the ops available (import, else JIT-build); True on success.  Never raises."""
    if _state["done"]:
        return _state["ok"]
    with _lock:
        if _state["done"]:
            return _state["ok"]
        errors = []
        if not _ops_registered():
            try:
                from . import _C  # noqa: F401
                _state["how"] = "prebuilt fastattn._C"
                _stale_warning()
            except (ImportError, OSError) as e:
                errors.append(f"fastattn._C cannot be imported ({_first_line(e)})")
        else:
            _state["how"] = "already loaded"
        if not _ops_registered():
            if os.environ.get("FASTATTN_NO_JIT", "0") == "1":
                errors.append("the JIT build is disabled (FASTATTN_NO_JIT=1)")
            else:
                try:
                    _jit_build()
                    _state["how"] = "JIT build (torch.utils.cpp_extension.load)"
                except Exception as e:  # a compiler error, no compiler, no ninja, ...
                    errors.append(f"the JIT build failed ({_first_line(e)})")
        _state["ok"] = _ops_registered()
        if _state["ok"]:
            try:
                _register_fakes()
            except RuntimeError as e:  # registered already (by an older copy of this module): keep those
                if "already" not in str(e):
                    raise
        else:
            _state["error"] = ("the C++ extension is not available: " + "; ".join(errors) + "; " + BUILD_HINT)
        _state["done"] = True
        return _state["ok"]


def error() -> Optional[str]:
    """Why the extension is not available (None when it is)."""
    return None if load() else _state["error"]


def how_loaded() -> Optional[str]:
    load()
    return _state["how"]


def ops():
    """torch.ops.fastattn, after load(); raises RuntimeError with the reason when the extension is unavailable."""
    if not load():
        raise RuntimeError("fastattn: " + _state["error"])
    return torch.ops.fastattn


# --- fake (meta) implementations: shapes, dtypes and strides of the C++ outputs (csrc/ops.h) -----------------------
def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_like_layout(ref, last_dim, dtype):
    B, H, L, _ = ref.shape
    if ref.stride(1) < ref.stride(2):  # [B, L, H, D] memory order
        return ref.new_empty((B, L, H, last_dim), dtype=dtype).transpose(1, 2)
    return ref.new_empty((B, H, L, last_dim), dtype=dtype)


def _register_fakes():
    @torch.library.register_fake("fastattn::attention_fwd")
    def _(q, k, v, mask, seed, causal, scale, dropout_p):
        out = _empty_like_layout(q, v.shape[-1], q.dtype)
        return out, q.new_empty(q.shape[:3], dtype=_stats_dtype(q.dtype))

    @torch.library.register_fake("fastattn::attention_bwd")
    def _(q, k, v, mask, seed, out, lse, dout, dlse, causal, scale, dropout_p, mask_needs_grad):
        dmask_shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) if mask_needs_grad else (0,)
        return (_empty_like_layout(q, q.shape[-1], q.dtype), _empty_like_layout(k, k.shape[-1], k.dtype),
                _empty_like_layout(v, v.shape[-1], v.dtype), q.new_empty(dmask_shape, dtype=_stats_dtype(q.dtype)))

    @torch.library.register_fake("fastattn::attention_bwd_into")
    def _(q, k, v, mask, seed, out, lse, dout, dlse, causal, scale, dropout_p, mask_needs_grad, dq, dk, dv):
        dmask_shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) if mask_needs_grad else (0,)
        return q.new_empty(dmask_shape, dtype=_stats_dtype(q.dtype))

    @torch.library.register_fake("fastattn::window_fwd")
    def _(q, k, v, table, seed, geometry, scale, dropout_p):
        B, H, W, heads, _ = q.shape
        windows, tokens = (H // geometry[2]) * (W // geometry[3]), geometry[2] * geometry[3]
        return (q.new_empty(q.shape[:4] + (v.shape[-1],)),
                q.new_empty((B * windows, heads, tokens), dtype=_stats_dtype(q.dtype)))

    @torch.library.register_fake("fastattn::window_bwd")
    def _(q, k, v, table, seed, out, lse, dout, geometry, scale, dropout_p, table_needs_grad):
        dtable_shape = tuple(table.shape) if table_needs_grad else (0,)
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
                q.new_empty(dtable_shape, dtype=_stats_dtype(q.dtype)))

    @torch.library.register_fake("fastattn::spatial_fwd")
    def _(q, k, v, num_frames, token_order, scale):
        B, L, heads, _ = q.shape
        stats, dv = _stats_dtype(q.dtype), v.shape[-1]
        return (q.new_empty((B, L, heads, dv)), q.new_empty((B, num_frames, heads, dv), dtype=stats),
                q.new_empty((B, num_frames, heads, 1 + (L - 1) // num_frames), dtype=stats))

    @torch.library.register_fake("fastattn::spatial_bwd")
    def _(q, k, v, out, out_cls, lse, dout, num_frames, token_order, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
