#!/usr/bin/env bash
# The whole GPU check in one short lease (called by `bench/gpu_session.sh lease`; run from the repository root).
# Stages, each with its own time limit so that a hang or a slow stage cannot eat the next one:
#   0. environment, and the machine's two ceilings (HBM copy bandwidth, bf16 matmul rate)
#   1. the extension build for sm_90a (background)  ||  the Triton kernels' GPU tests (pytest-xdist)
#   2. the CUDA C++ kernels' GPU tests (dense and window ops), in their own processes: a sticky CUDA error there
#      cannot spoil the Triton results; then tests/test_nan_semantics.py (Triton and CUDA C++ on the GPU, <= 60 s)
#   3. bench.run, bf16, L = 1k / 4k / 16k, d 64 / 128: triton vs cuda vs torch's flash / cuDNN kernels; then fp32,
#      L = 1k / 4k: triton vs the CUDA-core kernels (csrc/cuda/fa_simt.cuh; bench/NOTES.md entry 13)
#   4. bench.ops, bf16: the layout variants on Triton and on CUDA vs the composites users write
# Logs and JSON land in $1 (at most 8 files come back from the device tool: keep the count down).
set -uo pipefail
OUT=${1:?output folder}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PY=python3
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2
  git rev-parse HEAD 2>/dev/null; git status --short | head -20
  $PY - <<'PYEOF'
import torch, triton.testing as tt
x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()   # 1 GiB
y = torch.empty_like(x)
ms = tt.do_bench(lambda: y.copy_(x), return_mode="median")
print(f"ceiling: device copy {2 * x.numel() / ms / 1e6:.0f} GB/s (read + write)")
a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
ms = tt.do_bench(lambda: a @ b, return_mode="median")
print(f"ceiling: bf16 8192^3 matmul {2 * 8192 ** 3 / ms / 1e9:.0f} TFLOP/s")
PYEOF
} 2>&1 | tee "$OUT/env.txt"

stamp "stage 1: build (background) + Triton GPU tests"
# In place (setup.py build_ext --inplace, PYTHONPATH above): pip's editable install of a setup.py project runs pip
# again for setuptools, which an offline GPU image cannot fetch.
( FASTATTN_CUDA_ARCHS=9.0a MAX_JOBS=16 timeout 240 $PY setup.py build_ext --inplace \
    > "$OUT/build.log" 2>&1; echo "build exit $?" >> "$OUT/build.log" ) &
BUILD=$!
# FASTATTN_NO_JIT: no test process may start a JIT build of its own while the real build runs
FASTATTN_NO_JIT=1 timeout 210 $PY -m pytest -q -ra -n 8 --timeout 120 -p no:cacheprovider \
  tests/test_attention.py tests/test_window_fused.py tests/test_cross_attention.py tests/test_spacetime.py \
  -k "cuda or gpu" > "$OUT/tests.log" 2>&1
stamp "triton tests exit $?"; tail -4 "$OUT/tests.log"
wait $BUILD
stamp "$(tail -1 "$OUT/build.log")"
grep -E "error|warning: .*spill" "$OUT/build.log" | head -20
$PY -c "import fastattn._C, torch; print('fastattn._C', fastattn._C.__file__); print('CUDA window kernels:', torch._C._dispatch_has_kernel_for_dispatch_key('fastattn::window_fwd', 'CUDA'))"

stamp "stage 2: CUDA C++ GPU tests"
{ echo "=== CUDA C++ kernels"; } >> "$OUT/tests.log"
FASTATTN_NO_JIT=1 timeout 150 $PY -m pytest -q -ra -n 4 --timeout 120 -p no:cacheprovider \
  tests/test_cuda_backend.py tests/test_cuda_window.py tests/test_api.py tests/test_multihead_attention.py \
  -k "(cuda or gpu) and not emulated" >> "$OUT/tests.log" 2>&1
stamp "cuda tests exit $?"; tail -4 "$OUT/tests.log"
{ echo "=== NaN / inf inputs (Triton and CUDA C++ on the GPU, the CPU kernels)"; } >> "$OUT/tests.log"
FASTATTN_NO_JIT=1 timeout 60 $PY -m pytest -q -ra -n 4 --timeout 50 -p no:cacheprovider tests/test_nan_semantics.py \
  >> "$OUT/tests.log" 2>&1
stamp "nan tests exit $?"; tail -2 "$OUT/tests.log"

stamp "stage 3: bench.run"
FASTATTN_NO_JIT=1 timeout 140 $PY -m bench.run --dtypes bf16 --seqlens 1024,4096,16384 --head-dims 64,128 \
  --backends triton,cuda,torch-flash,torch-cudnn --no-plot --out-dir "$OUT" > "$OUT/bench.log" 2>&1
stamp "bench.run exit $?"
FASTATTN_NO_JIT=1 timeout 90 $PY -m bench.run --dtypes fp32 --seqlens 1024,4096 --head-dims 64,128 \
  --backends triton,cuda --no-plot --out-dir "$OUT" >> "$OUT/bench.log" 2>&1
stamp "bench.run fp32 exit $?"
FASTATTN_NO_JIT=1 timeout 45 $PY -m bench.run --dtypes bf16 --seqlens 4096 --head-dims 256 \
  --backends triton,cuda --no-plot --out-dir "$OUT" >> "$OUT/bench.log" 2>&1  # the d256 backward (NOTES 20)
stamp "bench.run d256 exit $?"

stamp "stage 4: bench.ops"
FASTATTN_NO_JIT=1 timeout 75 $PY -m bench.ops --dtypes bf16 --impls fastattn,fastattn-cuda,eager --out-dir "$OUT" \
  > "$OUT/ops.log" 2>&1
stamp "bench.ops exit $?"

grep -E "passed|failed|error" "$OUT/tests.log" | tail -6
grep -E "^FAILED|^ERROR" "$OUT/tests.log" | head -30
grep -E " fwd " "$OUT/bench.log" | grep -E "triton|cuda|torch-flash|torch-cudnn" | cut -c1-140 | head -70
grep -E "fastattn|composite" "$OUT/ops.log" | cut -c1-140 | head -40
stamp done
