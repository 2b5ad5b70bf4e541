"""Compile every Triton kernel configuration ahead of time and report its resources.

    python -m fastattn.tools.kernel_report [--arch 80 90] [--dtypes float16 ...] [--jobs N]

No GPU is needed: triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) produces the cubin, and
cuobjdump (shipped inside the triton wheel) reads registers, shared memory and local memory (spills) off it.
Exits non-zero when a configuration fails to compile or spills (uses local memory).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


@dataclass
class CompileResult:
    label: str
    arch: int
    registers: Optional[int] = None
    shared_bytes: Optional[int] = None   # static shared memory in the cubin + Triton's dynamic shared memory
    local_bytes: Optional[int] = None    # > 0 means register spills
    hgmma: Optional[int] = None          # sm_90 SASS: warpgroup MMA (wgmma) instructions
    hmma: Optional[int] = None           # SASS: warp-level MMA (mma.sync) instructions
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.local_bytes == 0


def _cuobjdump() -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found in the triton wheel at {path}")
    return path


def _resource_usage(cubin: bytes):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump output: {text!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def _mma_counts(cubin: bytes):
    """(HGMMA, HMMA) instruction counts in the SASS: which tensor-core path Triton lowered the dots to.  On sm_90 a
    half-precision dot with fewer than 64 rows per warpgroup falls back to mma.sync (HMMA), well below wgmma."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_cuobjdump(), "--dump-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    return len(re.findall(r"\bHGMMA\b", sass)), len(re.findall(r"\bHMMA\b", sass))


def compile_spec(spec, arch: int) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    try:
        src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
        regs, static_shared, local = _resource_usage(compiled.asm["cubin"])
        hgmma, hmma = _mma_counts(compiled.asm["cubin"])
        return CompileResult(spec.label, arch, regs, static_shared + compiled.metadata.shared, local, hgmma, hmma)
    except Exception as e:  # noqa: BLE001 - reported, and the exit code says it failed
        return CompileResult(spec.label, arch, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")


def _compile_index(args):
    index, arch, dtype_names = args
    from fastattn.kernels.triton_attention import kernel_specs
    specs = kernel_specs(tuple(getattr(torch, n) for n in dtype_names))
    return compile_spec(specs[index], arch)


def compile_all(archs: Sequence[int] = (80, 90), dtypes: Sequence[torch.dtype] = None,
                jobs: int = 0) -> List[CompileResult]:
    from fastattn.kernels.triton_attention import SPEC_DTYPES, kernel_specs
    dtypes = tuple(dtypes or SPEC_DTYPES)
    names = tuple(str(d).replace("torch.", "") for d in dtypes)
    n = len(kernel_specs(dtypes))
    work = [(i, arch, names) for arch in archs for i in range(n)]
    jobs = jobs or max(1, os.cpu_count() or 1)
    if jobs == 1:
        return [_compile_index(w) for w in work]
    with cf.ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_index, work))


def format_table(results: Sequence[CompileResult]) -> str:
    lines = [f"{'arch':<6}{'kernel / dtype / head dim / variant / config':<61}{'regs':>6}{'smem (B)':>10}"
             f"{'spill (B)':>10}{'MMA':>10}  status"]
    for r in results:
        if r.error:
            lines.append(f"sm_{r.arch:<3}{r.label:<61}{'-':>6}{'-':>10}{'-':>10}  FAILED: {r.error}")
        else:
            status = "ok" if r.ok else "SPILLS"
            mma = "wgmma" if r.hgmma else "mma.sync" if r.hmma else "-"
            lines.append(f"sm_{r.arch:<3}{r.label:<61}{r.registers:>6}{r.shared_bytes:>10}{r.local_bytes:>10}"
                         f"{mma:>10}  {status}")
    bad = sum(not r.ok for r in results)
    lines.append(f"{len(results)} kernels compiled, {bad} failed or spilled")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (e.g. 80 90)")
    parser.add_argument("--dtypes", nargs="+", default=None, help="float16 bfloat16 float32 float64")
    parser.add_argument("--jobs", type=int, default=0, help="parallel compile processes (default: all cores)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, d) for d in args.dtypes] if args.dtypes else None
    results = compile_all(args.arch, dtypes, args.jobs)
    print(format_table(results))
    if args.json:
        import dataclasses
        import json
        import triton
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "torch": torch.__version__,
                       "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
