#!/usr/bin/env bash
# A/B of CUDA kernel variants in one GPU call: each variant is the extension built (sm_90) with its own nvcc
# defines in a copy of the tree, side by side, then timed by bench/cuda_fwd_ab.py in the same call.
#
#   bash bench/gpu_cuda_ab.sh OUT "bn32:-DFASTATTN_FWD_BN_D128=32" "bn64:-DFASTATTN_FWD_BN_D128=64"
#
# Then the GPU tests of the CUDA kernels on each variant (correctness first: a fast wrong variant is a bug).
# The first variant is built in the tree itself; the others in /tmp/ab-<label>.
set -uo pipefail
OUT=${1:?output folder}; shift
[ $# -ge 1 ] || { echo "usage: $0 OUT label:flags [label:flags ...]"; exit 2; }
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PY=python3 FASTATTN_CUDA_ARCHS=9.0a MAX_JOBS=8 FASTATTN_NO_JIT=1
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv; } > "$OUT/env.txt" 2>&1
dirs=()
for spec in "$@"; do
  label=${spec%%:*}; flags=${spec#*:}
  if [ ${#dirs[@]} -eq 0 ]; then dir=$PWD; else
    dir=/tmp/ab-$label; rm -rf "$dir"; mkdir -p "$dir"; cp -r setup.py csrc fastattn bench tests "$dir"/; fi
  dirs+=("$label:$dir")
  (cd "$dir" && FASTATTN_NVCC_FLAGS="$flags" timeout 240 $PY setup.py build_ext --inplace > build-ab.log 2>&1
   echo "$label build exit $?" >> build-ab.log) &
done
wait
for d in "${dirs[@]}"; do tail -n1 "${d#*:}/build-ab.log"; done | tee "$OUT/builds.txt"
for d in "${dirs[@]}"; do
  (cd "${d#*:}" && PYTHONPATH=$PWD timeout 90 $PY bench/cuda_fwd_ab.py "${d%%:*}") >> "$OUT/ab.log" 2>&1
done
stamp "timing done"
for d in "${dirs[@]}"; do
  (cd "${d#*:}" && PYTHONPATH=$PWD timeout 90 $PY -m pytest -q -n 8 -p no:cacheprovider tests/test_cuda_backend.py \
     tests/test_cuda_window.py -k "(cuda or gpu) and not emulated" 2>&1 | tail -3 | sed "s/^/${d%%:*}: /") >> "$OUT/tests.txt"
done
stamp "tests done"; cat "$OUT/tests.txt"
sort -t']' -k2 "$OUT/ab.log" | grep TFLOP
