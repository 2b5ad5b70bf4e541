"""The `cuda` backend (csrc/cuda: FlashAttention-2 CUDA C++ kernels on tensor cores) against the reference.

Three layers:

* CPU-runnable: the backend declines what it does not serve, with reasons; the CUDA kernels are registered for
  ``torch.ops.fastattn.attention_fwd`` / ``attention_bwd`` when the extension was built with them (skipped when it
  was built without, e.g. a JIT build on a machine without a GPU); registers and spills of the compiled kernels.
* CPU-runnable, emulated: the kernels' own source compiled for the host with ``FASTATTN_EMULATE``
  (csrc/cuda/fa_emulate.cuh runs each CUDA thread as a std::thread and exchanges the operands of shuffles,
  ldmatrix and mma.sync per the PTX fragment layouts), registered as ``torch.ops.fastattn_emu.*`` for CPU
  fp16/bf16 tensors and compared with the reference under the tolerance rule.  This exercises everything but the
  emulator's reading of the PTX ISA -- tile loops, fragment index math, online softmax, masking, dropout,
  pipelining, GQA, layouts, argument checks.  Needs a C++ compiler, ninja and the CUDA headers (cuda_fp16.h);
  skipped otherwise, or with FASTATTN_SKIP_EMULATOR=1.
* GPU (marked ``gpu``, skipped without one): parity through ``fastattn.attention(backend="cuda")`` on odd sizes,
  both causal alignments, GQA, masks with gradient, dropout, LSE; torch.library.opcheck on CUDA tensors; a
  bitwise-deterministic backward; fully masked rows.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import fastattn
import test_attention as ta
from fastattn import _ext
from fastattn.backends import BACKENDS
from fastattn.backends import cuda as cuda_backend
from fastattn.backends.reference import reference_attention, reference_attention_backward
from fastattn.problem import make_problem
from helpers import assert_close_rule, run_with_grads
from test_nan_semantics import check_dq_nan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO, "csrc")
CAUSAL_NAMES = {0: "none", 1: "top_left", 2: "bottom_right"}


# ==============================================================================================================
# CPU-runnable: reasons, registration, resource usage
# ==============================================================================================================
def _problem(device="cpu", dtype=torch.float16, dqk=64, dv=64):
    q = torch.randn(1, 2, 5, dqk, dtype=dtype, device=device)
    k = torch.randn(1, 2, 6, dqk, dtype=dtype, device=device)
    v = torch.randn(1, 2, 6, dv, dtype=dtype, device=device)
    return make_problem(q, k, v)


def test_registered_as_the_cuda_backend():
    assert isinstance(BACKENDS["cuda"], cuda_backend.CudaBackend)


def test_declines_cpu_tensors_with_a_reason():
    why = BACKENDS["cuda"].reasons(_problem("cpu"))
    assert any("runs on CUDA tensors only" in w for w in why), why


@pytest.mark.parametrize("dqk,dv,ok", [(64, 64, True), (8, 8, True), (96, 96, True), (128, 128, True),
                                       (24, 24, True), (130, 130, True), (60, 60, True), (1, 1, True),
                                       (256, 256, True), (64, 32, True), (257, 64, False), (64, 300, False),
                                       (0, 8, False)])
def test_head_dim_reasons(dqk, dv, ok):
    why = cuda_backend.head_dim_reasons(dqk, dv)
    assert (not why) == ok, why
    if not 1 <= dqk <= 256:
        assert any(w.startswith("q: head dim") for w in why)
    if not 1 <= dv <= 256:
        assert any(w.startswith("v: head dim") for w in why)


SM86_SMEM, SM90_SMEM = 99 * 1024, 227 * 1024  # opt-in shared memory per block


@pytest.mark.parametrize("dtype,dqk,dv,smem,forward,backward", [
    (torch.float16, 64, 64, SM86_SMEM, True, True), (torch.bfloat16, 128, 128, SM86_SMEM, True, True),
    (torch.float16, 136, 136, SM90_SMEM, True, True), (torch.bfloat16, 256, 256, None, True, True),
    (torch.float16, 136, 136, SM86_SMEM, True, False), (torch.bfloat16, 256, 256, SM86_SMEM, True, False),
    (torch.float16, 60, 60, SM90_SMEM, False, False), (torch.bfloat16, 64, 32, SM90_SMEM, False, False),
    (torch.float32, 64, 64, SM90_SMEM, False, False)])
def test_kernel_family_choice(dtype, dqk, dv, smem, forward, backward):
    """The Python mirror of fa_ops.cuh's kernel_family (fastattn.explain's plan names the kernels): the backward of
    head dims past 128 on tensor cores where the device has the wide tiles' shared memory (sm_80, sm_90)."""
    assert cuda_backend.tensor_core_directions(dtype, dqk, dv, smem) == (forward, backward)


def _extension_file():
    """The prebuilt fastattn._C shared library, if that is what _ext loaded."""
    if not _ext.load() or not (_ext.how_loaded() or "").startswith("prebuilt"):
        return None
    from fastattn import _C
    return _C.__file__


def _library_contains_cuda_kernels(path) -> bool:
    with open(path, "rb") as f:
        return b"attn_fwd_kernel" in f.read()


def test_cuda_kernels_registered_when_built():
    """The CUDA implementations of both ops are in the dispatcher whenever the extension was compiled with them."""
    if not _ext.load():
        pytest.skip(f"the extension is not available here: {_ext.error()}")
    registered = cuda_backend.has_cuda_kernels()
    lib = _extension_file()
    compiled = lib is not None and _library_contains_cuda_kernels(lib)
    if not registered and not compiled:
        pytest.skip(f"the extension was built without the CUDA kernels ({_ext.how_loaded()})")
    assert registered, f"{lib} contains the CUDA kernels but they are not registered"
    for op in ("fastattn::attention_fwd", "fastattn::attention_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
        assert re.search(r"^CUDA: registered", torch._C._dispatch_dump(op), re.M), torch._C._dispatch_dump(op)
    # the backend then declines CPU tensors for the device alone, not for a missing build
    assert BACKENDS["cuda"].reasons(_problem("cpu")) == ["runs on CUDA tensors only, got cpu tensors"]


def _cuobjdump():
    """The CUDA toolkit's cuobjdump, or the copy shipped in the triton wheel (backends/nvidia/bin)."""
    from torch.utils import cpp_extension
    homes = filter(None, [cpp_extension.CUDA_HOME, "/usr/local/cuda"])
    candidates = [os.path.join(d, "bin", "cuobjdump") for d in homes]
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if os.path.exists(c)), None) or shutil.which("cuobjdump")


def test_compiled_kernels_resource_usage():
    """Registers and spills of every CUDA kernel in the built extension (its sm_80 / sm_90 cubins): at most 255
    registers and no spills (STACK and LOCAL 0).  The tiles are dynamic shared memory, sized at launch."""
    lib = _extension_file()
    if lib is None or not _library_contains_cuda_kernels(lib):
        pytest.skip("no prebuilt fastattn._C with CUDA kernels")
    exe = _cuobjdump()
    if exe is None:
        pytest.skip("cuobjdump not found")
    text = subprocess.run([exe, "--dump-resource-usage", lib], capture_output=True, text=True, timeout=300).stdout
    print(text)
    rows = re.findall(r"Function (\S*attn_\w+kernel\S*):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    assert len(rows) >= 14, f"expected the 14 fastattn kernels per architecture, found {len(rows)}"
    for name, reg, stack, shared, local in rows:
        assert int(reg) <= 255, name
        assert int(stack) == 0 and int(local) == 0, f"{name}: STACK {stack} LOCAL {local} (register spills)"


# ==============================================================================================================
# CPU-runnable: the kernels' source on the host emulator
# ==============================================================================================================
EMULATOR_SOURCE = '#define FASTATTN_EMULATE 1\n#include "fa_emulate_ops.cuh"\n'


@pytest.fixture(scope="module")
def emu():
    """torch.ops.fastattn_emu: the CUDA kernels built for the host (cached in torch's extension directory).
    FASTATTN_EMULATOR_FLAGS adds compiler flags -- a kernel variant's defines, e.g.
    ``-DFASTATTN_FWD_D128_WARPS=4`` (built in a directory of its own)."""
    if os.environ.get("FASTATTN_SKIP_EMULATOR", "0") == "1":
        pytest.skip("FASTATTN_SKIP_EMULATOR=1")
    from torch.utils import cpp_extension
    cuda_include = next((os.path.join(d, "include") for d in filter(None, [cpp_extension.CUDA_HOME, "/usr/local/cuda"])
                         if os.path.exists(os.path.join(d, "include", "cuda_fp16.h"))), None)
    if cuda_include is None:
        pytest.skip("the CUDA headers (cuda_fp16.h) are not installed")
    bin_dir = os.path.dirname(sys.executable)  # the ninja pip package, when the venv is not activated
    if os.path.exists(os.path.join(bin_dir, "ninja")) and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    if not cpp_extension.is_ninja_available() or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("ninja or a C++ compiler is missing")
    variant_flags = os.environ.get("FASTATTN_EMULATOR_FLAGS", "").split()
    variant = "".join(c if c.isalnum() else "_" for c in "_".join(variant_flags))
    build_dir = os.path.join(cpp_extension.get_default_build_root(), "fastattn_emu" + (f"_{variant}" if variant else ""))
    os.makedirs(build_dir, exist_ok=True)
    source = os.path.join(build_dir, "fastattn_emu.cpp")
    if not os.path.exists(source) or open(source).read() != EMULATOR_SOURCE:
        with open(source, "w") as f:
            f.write(EMULATOR_SOURCE)
    cpp_extension.load(name="fastattn_emu", sources=[source], build_directory=build_dir,
                       extra_cflags=["-O1"] + variant_flags, extra_include_paths=[os.path.join(CSRC, "cuda"), CSRC, cuda_include],
                       is_python_module=False, verbose=False)
    return torch.ops.fastattn_emu


def emulated_check(ops, shape, dtype=torch.float16, causal=0, mask=None, dropout_p=0.0, mask_grad=False,
                   dlse=False, layout="bhld"):
    """Forward and backward of the emulated op against the reference in the same dtype and in float64, all three
    on the same low-precision inputs (so the rule measures the kernels' arithmetic, not the inputs' rounding)."""
    B, Hq, Hkv, Lq, Lk, D, *rest = shape  # (..., D) or (..., Dqk, Dv)
    Dv = rest[0] if rest else D
    q, k, v = (torch.randn(B, H, L, d).to(dtype).double() for H, L, d in ((Hq, Lq, D), (Hkv, Lk, D), (Hkv, Lk, Dv)))
    dout = torch.randn(B, Hq, Lq, Dv).to(dtype).double()
    g_lse = torch.randn(B, Hq, Lq) if dlse else None
    seed = torch.tensor([987654321], dtype=torch.int64) if dropout_p > 0 else None
    scale = D ** -0.5

    def low(t):
        t = t.to(dtype)
        return t.transpose(1, 2).contiguous().transpose(1, 2) if layout == "blhd" else t

    out, lse = ops.attention_fwd(low(q), low(k), low(v), mask, seed, causal, scale, dropout_p)
    dq, dk, dv, dmask = ops.attention_bwd(low(q), low(k), low(v), mask, seed, out, lse, low(dout), g_lse, causal,
                                          scale, dropout_p, mask_grad)
    if layout == "blhd":  # outputs keep the inputs' memory order
        assert out.stride(1) < out.stride(2) and dq.stride(1) < dq.stride(2) and dk.stride(1) < dk.stride(2)
    refs = []
    for ref_dtype in (dtype, torch.float64):
        m = mask if mask is None or mask.dtype == torch.bool else mask.to(
            torch.float64 if ref_dtype == torch.float64 else torch.float32)
        args = (q.to(ref_dtype), k.to(ref_dtype), v.to(ref_dtype), m, CAUSAL_NAMES[causal], scale, dropout_p, seed)
        o, l = reference_attention(*args)
        grads = reference_attention_backward(*args, dout.to(ref_dtype), g_lse, mask_grad)
        refs.append((o, l) + tuple(grads))
    fast = (out, lse, dq, dk, dv, dmask.sum_to_size(mask.shape) if mask_grad else None)
    for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv", "dmask"), fast, *refs):
        if a is not None:
            assert_close_rule(a, b, c, name)


def _fully_masked_bool():
    m = torch.ones(9, 12, dtype=torch.bool)
    m[3] = False
    return m


def _fully_masked_float():
    m = torch.zeros(9, 12)
    m[5] = float("-inf")
    return m


# (B, Hq, Hkv, Lq, Lk, D) and options: lengths 1/7/odd, several tiles of every kernel, both padded head dims
# (64: 8..64, 128: 72..128), causal alignments with Lq < Lk and Lq > Lk (rows that see no key), GQA/MQA, masks
# (made inside the test, after the seed is fixed).
EMULATED_CASES = {
    "tiny_d8": dict(shape=(1, 1, 1, 1, 1, 8)),
    "d24_causal_7": dict(shape=(1, 2, 1, 7, 7, 24), causal=1),
    "d80_one_key": dict(shape=(1, 1, 1, 129, 1, 80), causal=2),
    "d96_one_query_bf16": dict(shape=(1, 1, 1, 1, 129, 96), causal=2, dtype=torch.bfloat16),
    "d64_tiles_causal": dict(shape=(1, 2, 2, 200, 200, 64), causal=1),
    "d128_bottom_right_lq_lt_lk_bf16": dict(shape=(1, 1, 1, 150, 260, 128), causal=2, dtype=torch.bfloat16),
    "d112_bottom_right_lq_gt_lk": dict(shape=(1, 1, 1, 260, 150, 112), causal=2),
    "blhd_layout": dict(shape=(2, 3, 3, 17, 20, 40), layout="blhd"),
    "mqa_6_to_1": dict(shape=(1, 6, 1, 21, 26, 32), causal=1),
    "float_head_bias_grad": dict(shape=(2, 4, 2, 19, 23, 32), mask=lambda: torch.randn(1, 4, 19, 23),
                                 mask_grad=True, causal=2, dlse=True),
    "float_alibi_grad": dict(shape=(2, 4, 2, 19, 23, 32), mask=lambda: torch.randn(4, 1, 23), mask_grad=True),
    "bool_2d_bf16": dict(shape=(2, 2, 1, 19, 23, 64), mask=lambda: torch.rand(19, 23) > 0.3, dtype=torch.bfloat16),
    "dropout_bool_causal_lse": dict(shape=(2, 2, 2, 70, 90, 64), mask=lambda: torch.rand(2, 2, 70, 90) > 0.5,
                                    dropout_p=0.2, causal=1, dlse=True),
    "dropout_d128_float_grad_bf16": dict(shape=(1, 2, 1, 66, 140, 128), dropout_p=0.5, mask_grad=True,
                                         mask=lambda: torch.randn(1, 1, 66, 140), dtype=torch.bfloat16),
    "fully_masked_bool_row": dict(shape=(1, 2, 2, 9, 12, 16), mask=_fully_masked_bool),
    "fully_masked_float_row": dict(shape=(1, 2, 2, 9, 12, 16), mask=_fully_masked_float, mask_grad=True, dlse=True),
    "rows_without_keys": dict(shape=(1, 2, 2, 9, 4, 16), causal=2, dlse=True),
    # the CUDA-core kernels (fa_simt.cuh): float32, head dims past 128 or not multiples of 8, Dv != Dqk
    "simt_f32_causal_odd": dict(shape=(1, 2, 1, 37, 45, 40), causal=1, dtype=torch.float32),
    # head dims 136..256 in float16 / bfloat16: the tensor-core forward and backward (DT 256; the emulator has an
    # H100's shared memory, so the wide dK/dV kernel runs)
    "d256_causal_bf16": dict(shape=(1, 2, 1, 70, 90, 256), causal=1, dtype=torch.bfloat16),
    "d136_dropout_float_grad": dict(shape=(1, 2, 2, 40, 50, 136), dropout_p=0.2, mask_grad=True,
                                    mask=lambda: torch.randn(1, 2, 40, 50)),
    "d192_one_query_bottom_right_lse": dict(shape=(1, 1, 1, 1, 129, 192), causal=2, dlse=True),
    "wide_d256_gqa_dropout_bool_blhd": dict(shape=(2, 4, 2, 45, 130, 256), mask=lambda: torch.rand(45, 130) > 0.3,
                                            dropout_p=0.2, layout="blhd"),
    "wide_d200_fully_masked_float_grad_bf16": dict(shape=(1, 2, 2, 9, 12, 200), mask=_fully_masked_float,
                                                   mask_grad=True, dlse=True, dtype=torch.bfloat16),
    "wide_d144_rows_without_keys": dict(shape=(1, 2, 2, 9, 4, 144), causal=2, dlse=True),
    "simt_f32_d256_float_grad_lse": dict(shape=(1, 2, 2, 19, 33, 256), mask=lambda: torch.randn(2, 1, 33),
                                         mask_grad=True, dlse=True, dtype=torch.float32),
    "simt_f16_d200_dv72_bottom_right": dict(shape=(1, 2, 1, 20, 35, 200, 72), causal=2),
    "simt_bf16_d12_dropout_bool": dict(shape=(2, 2, 2, 40, 50, 12), mask=lambda: torch.rand(40, 50) > 0.3,
                                       dropout_p=0.3, dtype=torch.bfloat16),
    "simt_f32_d5_rows_without_keys": dict(shape=(1, 2, 2, 9, 4, 5), causal=2, dlse=True, dtype=torch.float32),
    "simt_f32_gqa_dropout_dv160": dict(shape=(1, 4, 2, 33, 70, 24, 160), dropout_p=0.1, causal=1,
                                       dtype=torch.float32),
    "simt_f32_blhd_fully_masked": dict(shape=(1, 2, 2, 9, 12, 33), mask=_fully_masked_float, mask_grad=True,
                                       layout="blhd", dtype=torch.float32),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(EMULATED_CASES))
def test_emulated_kernels_match_reference(emu, case):
    cfg = dict(EMULATED_CASES[case])
    if callable(cfg.get("mask")):
        cfg["mask"] = cfg["mask"]()
    emulated_check(emu, **cfg)


# Split-KV forward (the keys split across CTAs, partial results merged by their LSE): forced with
# FASTATTN_NUM_SPLITS, on both kernel families; splits that see no key (causal) and rows no split sees included.
SPLIT_CASES = {
    "tc_causal_bottom_right_lq_lt_lk": dict(shape=(1, 2, 1, 20, 300, 64), causal=2, dlse=True),
    "tc_d128_float_grad_dropout_bf16": dict(shape=(1, 2, 2, 3, 200, 128), mask=lambda: torch.randn(1, 2, 3, 200),
                                            mask_grad=True, dropout_p=0.2, dtype=torch.bfloat16),
    "tc_rows_without_keys": dict(shape=(1, 1, 1, 40, 150, 32), causal=1, dlse=True),
    "simt_f32_gqa_bool_mask": dict(shape=(1, 4, 2, 5, 230, 40), mask=lambda: torch.rand(5, 230) > 0.4,
                                   dtype=torch.float32),
    "simt_f16_d200_dv72_causal": dict(shape=(1, 1, 1, 9, 140, 200, 72), causal=2),
    "tc_d256_bottom_right_bf16": dict(shape=(1, 2, 1, 9, 300, 256), causal=2, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_emulated_split_kv_forward(emu, case, splits, monkeypatch):
    monkeypatch.setenv("FASTATTN_NUM_SPLITS", str(splits))
    cfg = dict(SPLIT_CASES[case])
    if callable(cfg.get("mask")):
        cfg["mask"] = cfg["mask"]()
    emulated_check(emu, **cfg)


# The Hopper forward (csrc/cuda/fa_wgmma_fwd.cuh; FASTATTN_CUDA_WGMMA=1 -- the emulator plays an sm_90a device):
# wgmma for both products, 128-key tiles, two warpgroups.  Every tensor-core case with a head dim up to 128 runs
# through it (the backward is the mma.sync one either way), plus shapes that need several 128-key tiles in one CTA
# (num_splits=1: the emulator plays 132 SMs, so small problems split their keys), a warpgroup past Lq, and (split
# tests) 128-key tiles that reach past a split's keys.  The simpler schedule: FASTATTN_EMULATOR_FLAGS=
# -DFASTATTN_WGMMA_OVERLAP=0.  tests/test_wgmma_layouts.py checks its
# descriptors and register layouts against CuTe.
def _wgmma_eligible(cfg):
    B, Hq, Hkv, Lq, Lk, D, *rest = cfg["shape"]
    return cfg.get("dtype", torch.float16) != torch.float32 and D <= 128 and D % 8 == 0 and (not rest or rest[0] == D)


WGMMA_CASES = {name: cfg for name, cfg in EMULATED_CASES.items() if _wgmma_eligible(cfg)}
WGMMA_CASES.update({
    "wgmma_d96_three_key_tiles_gqa_dropout_bf16": dict(shape=(1, 4, 2, 190, 333, 96), causal=2, dropout_p=0.1,
                                                       dtype=torch.bfloat16, dlse=True, num_splits=1),
    "wgmma_d64_float_mask_grad_two_query_blocks": dict(shape=(1, 1, 1, 257, 260, 64), mask_grad=True,
                                                       mask=lambda: torch.randn(1, 1, 257, 260), num_splits=1),
    # five 128-key tiles: the overlapped schedule's loads two tiles ahead (K_{j+3}, V_{j+2}) all run
    "wgmma_d128_five_key_tiles_bool_mask_bf16": dict(shape=(1, 2, 1, 70, 600, 128), dtype=torch.bfloat16,
                                                     mask=lambda: torch.rand(70, 600) > 0.2, num_splits=1),
})


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(WGMMA_CASES))
def test_emulated_wgmma_forward(emu, case, monkeypatch):
    monkeypatch.setenv("FASTATTN_CUDA_WGMMA", "1")
    cfg = dict(WGMMA_CASES[case])
    if "num_splits" in cfg:  # (few query blocks: the forward would split the keys and see fewer tiles per CTA)
        monkeypatch.setenv("FASTATTN_NUM_SPLITS", str(cfg.pop("num_splits")))
    if callable(cfg.get("mask")):
        cfg["mask"] = cfg["mask"]()
    emulated_check(emu, **cfg)


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("case", sorted(c for c, cfg in SPLIT_CASES.items() if _wgmma_eligible(cfg)))
def test_emulated_wgmma_split_kv_forward(emu, case, splits, monkeypatch):
    monkeypatch.setenv("FASTATTN_CUDA_WGMMA", "1")
    monkeypatch.setenv("FASTATTN_NUM_SPLITS", str(splits))
    cfg = dict(SPLIT_CASES[case])
    if callable(cfg.get("mask")):
        cfg["mask"] = cfg["mask"]()
    emulated_check(emu, **cfg)


# NaN inputs (the rule of tests/test_nan_semantics.py): a NaN in a query row or in a key makes exactly the rows
# that see it NaN, in the output, the LSE and the gradients; rows that see no key stay 0 with LSE -inf.  A row
# whose scores are all NaN has max -inf (fmaxf skips NaN): its l is NaN, not 0, and must not read as "no key".
NAN_CASES = {  # (B, Hq, Hkv, Lq, Lk, D[, Dv]), dtype, causal, FASTATTN_NUM_SPLITS, the wgmma forward
    "tc_f16": ((1, 2, 1, 37, 45, 64), torch.float16, 2, None, False),
    "tc_bf16_split": ((1, 2, 1, 9, 300, 32), torch.bfloat16, 2, 2, False),
    "tc_wide_d136": ((1, 2, 2, 20, 30, 136), torch.float16, 1, None, False),
    "wgmma_f16": ((1, 2, 1, 37, 45, 64), torch.float16, 2, None, True),
    "wgmma_bf16_split": ((1, 2, 1, 9, 300, 32), torch.bfloat16, 2, 2, True),
    "simt_f32": ((1, 2, 2, 37, 45, 40), torch.float32, 2, None, False),
    "simt_f32_split": ((1, 2, 2, 9, 300, 40), torch.float32, 0, 3, False),
}


@pytest.mark.parametrize("case", sorted(NAN_CASES))
def test_emulated_nan_inputs_propagate_as_the_reference(emu, case, monkeypatch):
    shape, dtype, causal, splits, wgmma = NAN_CASES[case]
    if splits:
        monkeypatch.setenv("FASTATTN_NUM_SPLITS", str(splits))
    monkeypatch.setenv("FASTATTN_CUDA_WGMMA", "1" if wgmma else "0")
    B, Hq, Hkv, Lq, Lk, D, *rest = shape
    Dv = rest[0] if rest else D
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, H, L, d, generator=g).to(dtype)
               for H, L, d in ((Hq, Lq, D), (Hkv, Lk, D), (Hkv, Lk, Dv)))
    q[0, 0, 3, 1] = float("nan")       # every score of row 3, head 0 (a causal row that sees keys)
    k[0, Hkv - 1, Lk - 5, 0] = float("nan")  # one late key of the last kv head: only the rows that see it
    dout = torch.randn(B, Hq, Lq, Dv, generator=g).to(dtype)
    scale = D ** -0.5
    out, lse = emu.attention_fwd(q, k, v, None, None, causal, scale, 0.0)
    dq, dk, dv, _ = emu.attention_bwd(q, k, v, None, None, out, lse, dout, None, causal, scale, 0.0, False)
    args = (q.double(), k.double(), v.double(), None, CAUSAL_NAMES[causal], scale, 0.0, None)
    ref = reference_attention(*args)
    ref_grads = reference_attention_backward(*args, dout.double(), None, False)
    check_dq_nan(dq, ref_grads[0], torch.isnan(ref[0]).any(-1))
    for name, a, b in zip(("out", "lse", "dk", "dv"), (out, lse, dk, dv), (ref[0], ref[1], *ref_grads[1:])):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), (
            f"{name}: NaN at {torch.isnan(a).sum().item()} elements, the reference at {torch.isnan(b).sum().item()}")
        assert torch.equal(torch.isinf(a), torch.isinf(b)), f"{name}: the infinities differ"
    rows = torch.isnan(out).any(-1)
    assert rows.any() and not rows.all()


def test_emulated_op_argument_errors(emu):
    """The op's checks (csrc/cuda/fa_ops.cuh, shared with the CUDA build) name the argument."""
    h = lambda *s: torch.randn(*s, dtype=torch.float16)
    q, k, v = h(1, 2, 5, 64), h(1, 1, 6, 64), h(1, 1, 6, 64)
    cases = [
        ((q.double(), k.double(), v.double(), None, None, 0, 1.0, 0.0),
         "q: the CUDA kernels take float16, bfloat16 or float32"),
        ((h(1, 2, 5, 264), h(1, 1, 6, 264), h(1, 1, 6, 264), None, None, 0, 1.0, 0.0), "q: head dim 264"),
        ((q, k, h(1, 1, 6, 300), None, None, 0, 1.0, 0.0), "v: head dim 300"),
        ((q, h(1, 3, 6, 64), h(1, 3, 6, 64), None, None, 0, 1.0, 0.0), "k: the number of key/value heads"),
        ((q, k, v, torch.ones(3, 6, dtype=torch.bool), None, 0, 1.0, 0.0), "mask: shape"),
        ((q, k, v, torch.ones(5, 6, dtype=torch.int32), None, 0, 1.0, 0.0), "mask: expected a bool"),
        ((q, k, v, None, None, 0, 1.0, 0.1), "seed: required"),
        ((q, k, v, None, None, 3, 1.0, 0.0), "causal: expected 0"),
        ((q, k, v, None, None, 0, 1.0, 1.0), "dropout_p: must be in"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            emu.attention_fwd(*args)
    out, lse = emu.attention_fwd(q, k, v, None, None, 0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="mask_needs_grad"):
        emu.attention_bwd(q, k, v, None, None, out, lse, out, None, 0, 1.0, 0.0, True)
    with pytest.raises(RuntimeError, match="lse: expected a float32 tensor"):
        emu.attention_bwd(q, k, v, None, None, out, lse[:, :, :2], out, None, 0, 1.0, 0.0, False)


def test_emulated_strided_and_misaligned_inputs(emu):
    """Inputs whose strides the 16-byte copies cannot take (a strided head dim, a row stride that is not a multiple
    of 8 elements) are copied once by the op; the result is unchanged."""
    q, k, v = (torch.randn(1, 2, 9, 16, dtype=torch.float16) for _ in range(3))
    ref_out, ref_lse = emu.attention_fwd(q, k, v, None, None, 0, 0.25, 0.0)
    strided_head = torch.randn(1, 2, 9, 32, dtype=torch.float16)[..., ::2]
    strided_head.copy_(q)
    odd_rows = torch.randn(1, 2, 9, 17, dtype=torch.float16)[..., 1:]
    odd_rows.copy_(q)
    for q2 in (strided_head, odd_rows):
        out, lse = emu.attention_fwd(q2, k, v, None, None, 0, 0.25, 0.0)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


# ==============================================================================================================
# GPU
# ==============================================================================================================
def _cuda_or_skip():
    err = cuda_backend.device_reasons(torch.device("cuda")) if torch.cuda.is_available() else ["no GPU"]
    if err:
        pytest.skip("; ".join(err))
    if not cuda_backend.has_cuda_kernels():
        pytest.skip(f"the CUDA kernels are not built: {_ext.error() or _ext.how_loaded()}")


def _check(dtype, shape, **kw):
    """shape = (B, Hq, Hkv, Lq, Lk, D) or (..., Dqk, Dv): fastattn.attention(backend="cuda") vs the reference
    (tolerance rule)."""
    _cuda_or_skip()
    B, Hq, Hkv, Lq, Lk, D, *rest = shape
    return ta.check_against_reference("cuda", "cuda", dtype, (B, Hq, Hkv, Lq, Lk, D, rest[0] if rest else D), **kw)


GPU_SHAPES = [((2, 4, 2, 128, 128, 64), False), ((1, 3, 3, 257, 511, 128), True),
              ((2, 2, 1, 97, 129, 80), "bottom_right"), ((1, 2, 2, 1, 129, 64), "bottom_right"),
              ((1, 2, 2, 129, 1, 128), "bottom_right"), ((2, 2, 2, 7, 7, 24), "top_left"),
              ((1, 2, 1, 1000, 777, 96), "top_left"), ((1, 8, 1, 300, 300, 40), False),
              ((1, 2, 2, 1, 1, 8), False), ((2, 2, 2, 2048, 2048, 128), True)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,causal", GPU_SHAPES)
def test_gpu_odd_sizes(dtype, shape, causal):
    _check(dtype, shape, causal=causal)


# The Hopper wgmma forward (sm_90a, FASTATTN_CUDA_WGMMA=1) on the same shapes, where the GPU is compute capability 9.0:
# it is opt-in until these have passed on one, so the plain GPU tests above run the mma.sync forward.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,causal", [c for c in GPU_SHAPES if c[0][5] <= 128])
def test_gpu_wgmma_forward(dtype, shape, causal, monkeypatch):
    _cuda_or_skip()
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"wgmma needs compute capability 9.0, this GPU has {torch.cuda.get_device_capability()}")
    monkeypatch.setenv("FASTATTN_CUDA_WGMMA", "1")
    assert cuda_backend.wgmma_forward_requested(torch.device("cuda"))
    _check(dtype, shape, causal=causal)


def test_wgmma_forward_is_opt_in(monkeypatch):
    """The Python mirror of use_wgmma_fwd (fa_ops.cuh): only with FASTATTN_CUDA_WGMMA=1, only on CUDA devices."""
    monkeypatch.delenv("FASTATTN_CUDA_WGMMA", raising=False)
    assert not cuda_backend.wgmma_forward_requested(torch.device("cpu"))
    monkeypatch.setenv("FASTATTN_CUDA_WGMMA", "1")
    assert not cuda_backend.wgmma_forward_requested(torch.device("cpu"))
    assert not cuda_backend.wgmma_forward_requested(None)


# The CUDA-core kernels (fa_simt.cuh): float32 at every size above, and the head dims the tensor cores do not take.
SIMT_SHAPES = [((1, 3, 3, 257, 511, 256), True), ((2, 2, 1, 97, 129, 200, 72), "bottom_right"),
               ((1, 2, 2, 129, 300, 20), False), ((1, 4, 2, 1000, 777, 136, 256), "top_left"),
               ((2, 2, 2, 7, 7, 1), "top_left")]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,causal", GPU_SHAPES + SIMT_SHAPES)
def test_gpu_float32(shape, causal):
    _check(torch.float32, shape, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,causal", SIMT_SHAPES)
def test_gpu_head_dims_past_128_and_uneven(dtype, shape, causal):
    """Head dims 136..256 (tensor cores both ways on sm_80 / sm_90), Dv != Dqk and odd head dims (CUDA cores)."""
    _check(dtype, shape, causal=causal)


@pytest.mark.gpu
def test_gpu_float32_masks_dropout_lse():
    _check(torch.float32, (2, 4, 2, 121, 137, 48), dropout_p=0.3, causal="top_left", return_lse=True,
           mask=torch.randn(2, 1, 137, dtype=torch.float64).requires_grad_())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("splits", ["auto", "5"])
def test_gpu_split_kv_forward(dtype, splits, monkeypatch):
    """Few queries, many keys (Perceiver's latents over pixels): 8 query blocks cannot fill the GPU, so the forward
    splits the keys (auto), or a forced count; causal bottom-right leaves some splits without a visible key."""
    if splits != "auto":
        monkeypatch.setenv("FASTATTN_NUM_SPLITS", splits)
    _check(dtype, (1, 4, 2, 70, 9000, 64), causal="bottom_right", return_lse=True)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(4, 2), (6, 1), (8, 8)])
@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
def test_gpu_gqa(hq, hkv, causal):
    _check(torch.float16, (2, hq, hkv, 71, 133, 64), causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ta.MASK_KINDS)
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_gpu_masks(kind, causal):
    _check(torch.bfloat16, (ta.B, ta.H, 2, ta.LQ, ta.LK, 32), causal=causal, mask=ta._mask(kind))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_gpu_lse_and_its_gradient(causal):
    _check(torch.float16, (2, 2, 1, 13, 30, 16), causal=causal, return_lse=True,
           mask=torch.randn(2, 1, 30, dtype=torch.float64).requires_grad_())


@pytest.mark.gpu
def test_gpu_blhd_layout():
    _check(torch.float16, (2, 3, 3, 170, 200, 40), layout="blhd")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_dropout_matches_reference_rng(d):
    _check(torch.float16, (2, 2, 1, 121, 137, d), dropout_p=0.3, causal="top_left",
           mask=torch.randn(2, 1, 137, dtype=torch.float64).requires_grad_())


@pytest.mark.gpu
def test_gpu_fully_masked_rows_give_zero_output_and_zero_grads():
    _cuda_or_skip()
    q, k, v = (torch.randn(1, 2, n, 16, device="cuda", dtype=torch.float16, requires_grad=True) for n in (9, 12, 12))
    mask = torch.ones(9, 12, dtype=torch.bool, device="cuda")
    mask[3] = False
    bias = torch.zeros(9, 12, device="cuda")
    bias[5] = float("-inf")
    attn = lambda q, k, v, **kw: fastattn.attention(q, k, v, backend="cuda", **kw)
    for m, dead in ((mask, 3), (bias, 5)):
        out, _, (dq, dk, dv) = run_with_grads(attn, [q, k, v], attn_mask=m)
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in (dq, dk, dv))
        assert (out[:, :, dead] == 0).all() and (dq[:, :, dead] == 0).all()
    out, lse, (dq, dk, dv) = run_with_grads(attn, [q[:, :, :9], k[:, :, :4], v[:, :, :4]], causal="bottom_right",
                                            return_lse=True)
    assert (out[:, :, :5] == 0).all() and (dq[:, :, :5] == 0).all()
    assert torch.isinf(lse[:, :, :5]).all() and (lse[:, :, :5] < 0).all()


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    """Bitwise equal gradients run to run: dK/dV sum the GQA group in registers, dQ is its own kernel, no atomics."""
    _cuda_or_skip()
    torch.manual_seed(1)
    q = torch.randn(2, 4, 333, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 517, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 2, 517, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(1, 4, 333, 517, device="cuda", requires_grad=True)
    g_out, g_lse = torch.randn(2, 4, 333, 64, device="cuda"), torch.randn(2, 4, 333, device="cuda")
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(run_with_grads(lambda *t, **kw: fastattn.attention(*t[:3], attn_mask=t[3], **kw),
                                   [q, k, v, bias], g_out, g_lse, causal=True, dropout_p=0.1, return_lse=True,
                                   backend="cuda"))
    (o1, l1, g1), (o2, l2, g2) = runs
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def _op_samples_cuda():
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(2, 4, 13, 64, device=dev, dtype=torch.float16)
    k, v = (torch.randn(2, 2, 21, 64, device=dev, dtype=torch.float16) for _ in range(2))
    seed = torch.tensor([42], dtype=torch.int64)
    fmask = torch.randn(1, 4, 1, 21, device=dev).expand(2, 4, 13, 21)
    bmask = (torch.rand(2, 1, 13, 21, device=dev) > 0.2).expand(2, 4, 13, 21)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    return [
        (q, k, v, None, None, 0, 0.25, 0.0),
        (q_t, k, v, fmask, None, 1, 0.25, 0.0),
        (q, k, v, bmask, seed, 2, 0.3, 0.2),
        (q.bfloat16(), k.bfloat16(), v.bfloat16(), fmask, None, 2, 0.25, 0.0),
        (q.float(), k.float(), v.float(), bmask, seed, 1, 0.25, 0.1),       # CUDA cores: float32
        (q[..., :40], k[..., :40], v, fmask, None, 0, 0.25, 0.0),          # CUDA cores: Dqk 40, Dv 64
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("i", range(6))
def test_gpu_opcheck(i):
    _cuda_or_skip()
    ops = torch.ops.fastattn
    q, k, v, mask, seed, causal, scale, p = _op_samples_cuda()[i]
    torch.library.opcheck(ops.attention_fwd.default, (q, k, v, mask, seed, causal, scale, p))
    out, lse = ops.attention_fwd(q, k, v, mask, seed, causal, scale, p)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if i % 2 else None
    needs = mask is not None and mask.dtype != torch.bool
    torch.library.opcheck(ops.attention_bwd.default,
                          (q, k, v, mask, seed, out, lse, dout, dlse, causal, scale, p, needs))


@pytest.mark.gpu
def test_gpu_dispatch_and_reasons():
    _cuda_or_skip()
    q = torch.randn(1, 2, 5, 64, device="cuda", dtype=torch.float16)
    assert BACKENDS["cuda"].reasons(make_problem(q, q, q)) == []
    assert BACKENDS["cuda"].reasons(make_problem(q.float(), q.float(), q.float())) == []
    why = BACKENDS["cuda"].reasons(make_problem(q.double(), q.double(), q.double()))
    assert any("dtype torch.float64" in w for w in why)
    assert "CUDA FlashAttention-2" in fastattn.explain(q, q, q, backend="cuda")
    assert "CUDA-core kernels" in fastattn.explain(q.float(), q.float(), q.float(), backend="cuda")
