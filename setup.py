"""fastattn build.

The Python packages: `fastattn` (kernels, dispatch, modules) and `fastattn.models` (mapped from the top-level
models/ directory), and the C++/CUDA extension `fastattn._C` (csrc/):

* the CPU kernels always: csrc/ops.cpp (the op schemas) + csrc/cpu/*.cpp;
* the CUDA kernels (csrc/cuda/*.cu) when torch is a CUDA build, nvcc is found (CUDA_HOME) and
  FASTATTN_SKIP_CUDA is not set -- no GPU is needed to compile them.

Environment:
  FASTATTN_CUDA_ARCHS   GPU architectures, default "8.0;9.0a" -> -gencode arch=compute_80,code=sm_80 ...
                        ("+PTX" to embed PTX as well, e.g. "8.0;9.0a;9.0+PTX").  9.0a (H100 / H200 code with
                        the Hopper-only wgmma instructions) adds the wgmma forward (csrc/cuda/fa_wgmma_fwd.cuh);
                        plain 9.0 builds everything else for the same GPUs.
  FASTATTN_SKIP_CUDA=1  build the CPU kernels only
  FASTATTN_SKIP_EXT=1   no extension at all (fastattn then JIT-builds it on first use, see fastattn/_ext.py)
  MAX_JOBS              parallel compile jobs (ninja)
  FASTATTN_NVCC_FLAGS   extra nvcc flags, e.g. "-DFASTATTN_FWD_BN_D128=64" (kernel variants for an A/B run)

`pip install --no-deps --no-build-isolation -e .` (the Makefile) builds the extension in place, next to
fastattn/__init__.py.  Without torch importable at build time (an isolated build), the extension is skipped with
a warning and built on first use instead.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

packages = find_packages(include=["fastattn", "fastattn.*"])
packages += ["fastattn.models"] + ["fastattn.models." + p for p in find_packages("models")]


# at::parallel_for runs its body on one thread unless the caller is compiled with OpenMP (ATen's OpenMP backend is
# a header template).  Linking with -fopenmp adds a dependency on libgomp.so.1, which resolves to the copy torch
# has already loaded.
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []


def _cuda_arch_flags(archs: str):
    """"8.0;9.0+PTX" -> ['-gencode=arch=compute_80,code=sm_80', '-gencode=arch=compute_90,code=sm_90',
    '-gencode=arch=compute_90,code=compute_90']."""
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        num = arch[:-4] if ptx else arch
        suffix = "a" if num.endswith("a") else ""
        num = num.rstrip("a").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num}{suffix},code=sm_{num}{suffix}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num}{suffix},code=compute_{num}{suffix}")
    return flags


def _cuda_library_header_flags(cuda_home):
    """torch's CUDA headers include the CUDA libraries' headers (cusparse.h, cublas_v2.h, ...).  A toolkit
    installed without them (nvcc only) finds them in torch's pip dependencies (site-packages/nvidia/*/include),
    searched after the toolkit's own include directory (-isystem)."""
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    import torch
    site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    dirs = sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include"))
                  if os.path.exists(os.path.join(d, "cusparse.h")))
    return [flag for d in dirs for flag in ("-isystem", d)]


def _put_ninja_on_path():
    """The ninja pip package installs its binary next to the interpreter; `.venv/bin/python -m pip` does not put
    that directory on PATH, and without ninja torch compiles serially."""
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja  # noqa: F401
        candidates.insert(0, ninja.BIN_DIR)
    except Exception:
        pass
    for d in candidates:
        if os.path.exists(os.path.join(d, "ninja")) and d not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return


def _extensions():
    if os.environ.get("FASTATTN_SKIP_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fastattn: torch is not importable at build time, so the C++ extension is not built now "
              "(fastattn builds it on first use; or install with --no-build-isolation)", file=sys.stderr)
        return [], {}
    _put_ninja_on_path()
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = ["csrc/ops.cpp"] + rel("csrc/cpu/*.cpp")
    cuda_sources = rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
    use_cuda = (bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                and os.environ.get("FASTATTN_SKIP_CUDA", "0") != "1")
    if cuda_sources and not use_cuda:
        why = ("FASTATTN_SKIP_CUDA=1" if os.environ.get("FASTATTN_SKIP_CUDA", "0") == "1" else
               "torch is not a CUDA build" if torch.version.cuda is None else "nvcc not found (set CUDA_HOME)")
        print(f"fastattn: building the CPU kernels only ({why})", file=sys.stderr)

    # Plain -O3, no -march: the binary must run on any x86-64 (CI, the GPU machines).  The vectorised row loops
    # and the float32 register tiles pick AVX2/AVX-512 at run time (csrc/cpu/row_kernels.cpp, small_gemm.cpp).
    # The C++ standard is torch's choice (C++20 for torch >= 2.10, C++17 before).
    cxx = ["-O3"] + OPENMP_FLAGS
    kwargs = dict(include_dirs=[os.path.join(HERE, "csrc")], extra_compile_args={"cxx": cxx},
                  extra_link_args=list(OPENMP_FLAGS))
    if use_cuda:
        archs = os.environ.get("FASTATTN_CUDA_ARCHS", "8.0;9.0a")
        extra = ["-DFASTATTN_WITH_CUDA"] + _cuda_library_header_flags(cpp_extension.CUDA_HOME)
        if any(a.strip().split("+")[0] == "9.0a" for a in archs.replace(",", ";").split(";")):
            extra.append("-DFASTATTN_HAS_SM90A")  # the wgmma forward has code for compute capability 9.0
        kwargs["extra_compile_args"]["cxx"] = cxx + extra
        kwargs["extra_compile_args"]["nvcc"] = (["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + extra
                                                + _cuda_arch_flags(archs)
                                                + os.environ.get("FASTATTN_NVCC_FLAGS", "").split())
        ext = cpp_extension.CUDAExtension("fastattn._C", sources + cuda_sources, **kwargs)
    else:
        ext = cpp_extension.CppExtension("fastattn._C", sources, **kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastattn",
    version="0.1.0",
    description="Fused attention kernels (Triton, CUDA C++, C++ CPU) for PyTorch: dense, causal, masked, GQA; "
                "drop-in modules",
    python_requires=">=3.9",
    packages=packages,
    package_dir={"fastattn.models": "models"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.5", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark"], "bench": ["matplotlib"]},
)
