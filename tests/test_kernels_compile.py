"""Every Triton kernel configuration the launchers can pick compiles ahead of time for sm_80 and sm_90, and
uses no local memory (no register spills).  No GPU is needed: triton.compile targets a GPUTarget.

The compilation runs in a subprocess without TRITON_INTERPRET (this test process has the interpreter on when
there is no GPU, and interpreted kernels cannot be compiled); the table it prints is the same as
`python -m fastattn.tools.kernel_report`.
"""
import json
import os
import subprocess
import sys

import pytest

from fastattn.kernels.triton_attention import kernel_specs

ARCHS = (80, 90)
LABELS = [s.label for s in kernel_specs()]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastattn.tools.kernel_report", "--arch", *map(str, ARCHS),
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=3000)
    print(proc.stdout[-20000:])  # the registers / shared memory table (shown with pytest -s or on failure)
    assert out.exists(), f"kernel_report did not run:\n{proc.stderr[-5000:]}"
    return {(r["arch"], r["label"]): r for r in json.loads(out.read_text())["results"]}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("label", LABELS)
def test_kernel_compiles_without_spills(compiled, arch, label):
    r = compiled[(arch, label)]
    assert r["error"] is None, f"sm_{arch} {label}: {r['error']}"
    assert r["local_bytes"] == 0, f"sm_{arch} {label}: {r['local_bytes']} bytes of local memory (register spills)"
    assert r["registers"] <= 255
    limit_kib = {80: 163, 90: 227}[arch]  # opt-in shared memory per block: A100, H100
    assert r["shared_bytes"] <= limit_kib * 1024, f"uses {r['shared_bytes']} B of shared memory > {limit_kib} KiB"


def _wgmma_expected(label: str) -> bool:
    """Half-precision forward and backward tiles of head dims up to 128 give every warpgroup >= 64 rows: on sm_90
    their dots must lower to wgmma.  (The 16-row query tile and the d256/d512 tiles that fit 99 KiB of shared
    memory are mma.sync by design.)"""
    kernel, dtype, head = label.split()[:3]
    return (dtype in ("float16", "bfloat16") and kernel in ("fwd", "fwd_window", "bwd_dkdv", "bwd_dq")
            and int(head[1:]) <= 128)


@pytest.mark.parametrize("label", [l for l in LABELS if _wgmma_expected(l)])
def test_hopper_tiles_use_wgmma(compiled, label):
    """A configuration whose dots fall back to mma.sync on sm_90 runs at roughly half speed (the d128 dK/dV tiles
    did, bench/NOTES.md entry 10): the SASS must hold HGMMA and no HMMA."""
    r = compiled[(90, label)]
    assert r["hgmma"] and not r["hmma"], f"sm_90 {label}: {r['hgmma']} HGMMA, {r['hmma']} HMMA (mma.sync fallback)"
