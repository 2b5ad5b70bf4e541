"""The Hopper forward's shared-memory descriptors and register layouts, checked against CuTe without a GPU.

csrc/cuda/fa_wgmma.cuh encodes wgmma descriptors by hand; the host emulator decodes them by the same reading of
the PTX ISA, so the emulated kernel tests alone could not catch a misreading.  tests/cpp/wgmma_layout_check.cpp
compares the encoders, the swizzled tile layout and the emulator's register model with CuTe's make_gmma_desc,
Layout_{K,MN}_SW128_Atom, ALayout_64x16 and CLayout_64xN (the nvidia-cutlass wheel's headers, host code only).
"""
import importlib.util
import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC_CUDA = os.path.join(os.path.dirname(HERE), "csrc", "cuda")


def _cutlass_include():
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "source", "include")
    return path if os.path.exists(os.path.join(path, "cute", "tensor.hpp")) else None


def _cuda_includes():
    """The toolkit's include directory and, on CUDA 13, its cccl/ directory (cuda/std/..., which CuTe includes)."""
    homes = [h for h in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if h]
    for home in homes:
        inc = os.path.join(home, "include")
        if os.path.exists(os.path.join(inc, "cuda_fp16.h")):
            return [d for d in (os.path.join(inc, "cccl"), inc) if os.path.isdir(d)]
    return None


def test_wgmma_descriptors_and_layouts_match_cute(tmp_path):
    cutlass = _cutlass_include()
    if cutlass is None:
        pytest.skip("nvidia-cutlass is not installed (requirements.txt installs it)")
    cuda = _cuda_includes()
    if cuda is None:
        pytest.skip("the CUDA headers (cuda_fp16.h) are not installed")
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "wgmma_layout_check"
    cmd = [cxx, "-std=c++20", "-O0", f"-I{CSRC_CUDA}", f"-I{cutlass}"] + [f"-I{d}" for d in cuda]
    cmd += [os.path.join(HERE, "cpp", "wgmma_layout_check.cpp"), "-o", str(exe), "-pthread"]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    # (CuTe prints a note for each descriptor it builds on the host: it can only read shared addresses on a GPU)
    report = "\n".join(line for line in run.stdout.splitlines() if "cast_smem_ptr_to_uint" not in line)
    assert run.returncode == 0 and report.strip().endswith("OK (0 mismatches)"), report
