#!/usr/bin/env bash
# The first GPU check of the Hopper wgmma forward (csrc/cuda/fa_wgmma_fwd.cuh; bench/NOTES.md entry 21) in one short
# call (~4-6 min on an H100 / H200; run from the repository root, OUT = the device tool's output folder):
#   1. the extension build for sm_90a, and beside it (/tmp/wg-simple) the simpler schedule without the softmax / P V
#      overlap (-DFASTATTN_WGMMA_OVERLAP=0), for the A/B
#   2. the CUDA C++ kernels' GPU tests with FASTATTN_CUDA_WGMMA=1: every float16 / bfloat16 forward with a head dim
#      up to 128 then runs on wgmma (dense, window, split-KV, masks, dropout, GQA) against the references
#   3. the forward at the FA2 shapes: mma.sync vs wgmma vs Triton, back to back in one process (bench/cuda_fwd_ab.py),
#      then the simpler wgmma schedule
#   4. registers / spills of the sm_90a kernels (cuobjdump)
#
#   bash bench/gpu_wgmma.sh "$OUT"          # stages 1-4
#   bash bench/gpu_wgmma.sh "$OUT" swin     # a second call on the warm machine (its build kept): Swin's window
#                                           # forward+backward, bench.ops swin-*, mma.sync vs wgmma forward (~1.5 min)
# If stage 2 passes and stage 3 shows wgmma ahead: make it the default on sm_90 (use_wgmma_fwd in fa_ops.cuh) and
# update the README's backend table and NOTES 21 with the figures (and keep the faster schedule).  Knob for a second
# call: FASTATTN_NVCC_FLAGS=-DFASTATTN_WGMMA_BN=64 (64-key tiles).
set -uo pipefail
OUT=${1:?output folder}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PY=python3 FASTATTN_NO_JIT=1
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
if [ "${2:-}" = swin ]; then  # 49-token windows leave the second warpgroup idle: does wgmma still pay there?
  [ -e fastattn/models ] || ln -s ../models fastattn/models
  for flag in 0 1; do
    FASTATTN_CUDA_WGMMA=$flag timeout 60 $PY -m bench.ops --dtypes bf16 --cases swin --impls fastattn-cuda \
      --out-dir "$OUT" > "$OUT/ops-swin-wgmma$flag.log" 2>&1
    stamp "bench.ops swin, FASTATTN_CUDA_WGMMA=$flag: exit $?"; grep -E "fastattn|composite" "$OUT/ops-swin-wgmma$flag.log"
  done
  exit 0
fi
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2
  git rev-parse HEAD 2>/dev/null; git status --short | head -20
} 2>&1 | tee "$OUT/env.txt"

stamp "stage 1: build (sm_90a), both schedules side by side"
[ -e fastattn/models ] || ln -s ../models fastattn/models
rm -rf /tmp/wg-simple && mkdir -p /tmp/wg-simple && cp -r setup.py csrc fastattn models bench /tmp/wg-simple/
( FASTATTN_CUDA_ARCHS=9.0a MAX_JOBS=8 timeout 270 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  echo "build exit $?" >> "$OUT/build.log" ) &
( cd /tmp/wg-simple && FASTATTN_NVCC_FLAGS=-DFASTATTN_WGMMA_OVERLAP=0 FASTATTN_CUDA_ARCHS=9.0a MAX_JOBS=8 \
  timeout 270 $PY setup.py build_ext --inplace > build.log 2>&1; echo "build exit $?" >> build.log ) &
wait
stamp "$(tail -1 "$OUT/build.log"); simple schedule: $(tail -1 /tmp/wg-simple/build.log)"
grep -E "error" "$OUT/build.log" | head -20

stamp "stage 2: CUDA GPU tests with the wgmma forward"
FASTATTN_CUDA_WGMMA=1 timeout 150 $PY -m pytest -q -ra -n 4 --timeout 120 -p no:cacheprovider \
  tests/test_cuda_backend.py tests/test_cuda_window.py tests/test_nan_semantics.py \
  -k "(cuda or gpu) and not emulated" > "$OUT/tests.log" 2>&1
stamp "wgmma tests exit $?"; tail -4 "$OUT/tests.log"; grep -E "^FAILED|^ERROR" "$OUT/tests.log" | head -20

stamp "stage 3: forward A/B"
timeout 100 $PY bench/cuda_fwd_ab.py overlap --wgmma > "$OUT/fwd_ab.log" 2>&1
stamp "A/B exit $?"
( cd /tmp/wg-simple && PYTHONPATH=/tmp/wg-simple timeout 50 $PY bench/cuda_fwd_ab.py simple --wgmma-only ) \
  >> "$OUT/fwd_ab.log" 2>&1
stamp "simple schedule exit $?"; grep TFLOP "$OUT/fwd_ab.log"

stamp "stage 4: resource usage"
CUOBJ=$(command -v cuobjdump || echo "$CUDA_HOME/bin/cuobjdump")
$CUOBJ --dump-resource-usage fastattn/_C*.so 2>/dev/null | grep -A1 -E "attn_fwd" | grep -E "Function|REG" \
  | paste - - | sed -E 's/.*Function ([^:]*):.*(REG:[0-9]+ STACK:[0-9]+ SHARED:[0-9]+ LOCAL:[0-9]+).*/\2 \1/' \
  | tee "$OUT/resources.txt"
stamp done
