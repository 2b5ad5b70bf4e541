#!/usr/bin/env bash
# Second short lease: the CUDA C++ extension built in place (setup.py build_ext --inplace: pip's editable install
# needs setuptools from the network on the GPU image), its GPU tests, and the triton/cuda benchmark rows.
set -uo pipefail
OUT=${1:?output folder}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PY=python3
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv; } > "$OUT/env.txt" 2>&1
stamp build
FASTATTN_CUDA_ARCHS=9.0 MAX_JOBS=16 timeout 200 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
stamp "build exit $?"; tail -3 "$OUT/build.log"; grep -E " error|Error" "$OUT/build.log" | head
$PY -c "import fastattn._C, torch; print('CUDA window kernels:', torch._C._dispatch_has_kernel_for_dispatch_key('fastattn::window_fwd', 'CUDA'))"
stamp tests
FASTATTN_NO_JIT=1 timeout 120 $PY -m pytest -q -ra -n 6 --timeout 100 -p no:cacheprovider \
  tests/test_cuda_backend.py tests/test_cuda_window.py tests/test_api.py tests/test_multihead_attention.py \
  -k "(cuda or gpu) and not emulated" > "$OUT/tests.log" 2>&1
stamp "tests exit $?"; grep -E "passed|failed" "$OUT/tests.log" | tail -2; grep -E "^FAILED|^ERROR" "$OUT/tests.log" | cut -c1-200 | head -30
stamp bench.run
FASTATTN_NO_JIT=1 timeout 110 $PY -m bench.run --dtypes bf16 --seqlens 1024,4096,16384 --head-dims 64,128 \
  --backends triton,cuda --out-dir "$OUT" > "$OUT/bench.log" 2>&1
stamp "bench.run exit $?"
FASTATTN_NO_JIT=1 timeout 70 $PY -m bench.ops --dtypes bf16 --cases swin,tsf,vivit --impls fastattn,fastattn-cuda \
  --out-dir "$OUT" > "$OUT/ops.log" 2>&1
stamp "bench.ops exit $?"
grep -E "triton|cuda " "$OUT/bench.log" | cut -c1-125 | head -50
grep -E "fastattn" "$OUT/ops.log" | cut -c1-125 | head -30
stamp done
