#!/usr/bin/env bash
# Third short lease: the CUDA forward's pipeline depth A/B (FASTATTN_FWD_STAGES 2 / 3 / 4, built side by side),
# the CUDA and the fp64 bool-mask Triton tests on the default (3-stage) build, and bench.run / bench.ops again.
set -uo pipefail
OUT=${1:?output folder}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PY=python3 FASTATTN_CUDA_ARCHS=9.0 MAX_JOBS=8
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv; } > "$OUT/env.txt" 2>&1
for s in 2 4; do
  rm -rf /tmp/v$s; mkdir -p /tmp/v$s; cp -r setup.py csrc fastattn bench /tmp/v$s/
  sed -i "s/#define FASTATTN_FWD_STAGES 3/#define FASTATTN_FWD_STAGES $s/" /tmp/v$s/csrc/cuda/fa_kernels.cuh
  (cd /tmp/v$s && timeout 200 $PY setup.py build_ext --inplace > build.log 2>&1; echo "v$s build exit $?" >> build.log) &
done
timeout 200 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; echo "v3 build exit $?" >> "$OUT/build.log"
wait
stamp "builds: $(tail -qn1 "$OUT/build.log" /tmp/v2/build.log /tmp/v4/build.log | tr '\n' ' ')"
{ for s in 2 4; do (cd /tmp/v$s && PYTHONPATH=/tmp/v$s timeout 60 $PY bench/cuda_fwd_ab.py stages$s); done
  PYTHONPATH=$PWD timeout 60 $PY bench/cuda_fwd_ab.py stages3; } > "$OUT/ab.log" 2>&1
stamp "A/B done"
export PYTHONPATH="$PWD"
FASTATTN_NO_JIT=1 timeout 60 $PY -m pytest -q -ra -n 8 --timeout 100 -p no:cacheprovider \
  tests/test_cuda_backend.py tests/test_cuda_window.py -k "(cuda or gpu) and not emulated" > "$OUT/tests.log" 2>&1
echo "=== Triton fp64 bool mask" >> "$OUT/tests.log"
FASTATTN_NO_JIT=1 timeout 90 $PY -m pytest -q -ra -n 8 --timeout 100 -p no:cacheprovider \
  tests/test_attention.py tests/test_cross_attention.py -k "cuda-triton and (gradcheck or cross)" >> "$OUT/tests.log" 2>&1
stamp "tests exit $?"; grep -E "passed|failed" "$OUT/tests.log" | tail -2; grep -E "^FAILED|^ERROR" "$OUT/tests.log" | cut -c1-200 | head
FASTATTN_NO_JIT=1 timeout 70 $PY -m bench.run --dtypes bf16 --seqlens 1024,4096,16384 --head-dims 64,128 \
  --backends triton,cuda --out-dir "$OUT" > "$OUT/bench.log" 2>&1
stamp "bench.run exit $?"
FASTATTN_NO_JIT=1 timeout 60 $PY -m bench.ops --dtypes bf16 --cases swin,tsf,vivit --impls fastattn,fastattn-cuda \
  --out-dir "$OUT" > "$OUT/ops.log" 2>&1
stamp "bench.ops exit $?"
sort -t']' -k2 "$OUT/ab.log" | grep TFLOP | cut -c1-100
grep -E " cuda " "$OUT/bench.log" | grep " fwd " | cut -c1-110
grep -E "fastattn-cuda" "$OUT/ops.log" | cut -c1-110
stamp done
