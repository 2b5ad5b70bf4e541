#!/usr/bin/env bash
# One call of a lent GPU machine (see README "GPU sessions"): run from the repository root there.
#
#   bash bench/gpu_session.sh tests   # GPU test suite + kernel resource report      (~5-8 min on an H100)
#   bash bench/gpu_session.sh bench   # the full benchmark (python -m bench.run)       (~5-9 min)
#   bash bench/gpu_session.sh ops     # layout variants vs composites (python -m bench.ops)  (~3-5 min)
#   bash bench/gpu_session.sh models  # model throughput, papers' sizes, bf16 autocast (python -m bench.models)
#   bash bench/gpu_session.sh quick   # bench.run --quick, a smoke test of the runner
#   bash bench/gpu_session.sh lease   # everything that fits one short lease (~6-8 min on an H200): the extension
#                                     # build (sm_90) overlapped with the Triton GPU tests, then the CUDA C++ GPU
#                                     # tests, a bf16 subset of bench.run (triton vs cuda vs torch's kernels) and
#                                     # bench.ops (Triton vs CUDA vs the composites); each stage time-limited
#
# The machine's image has its own torch/triton (2.11 / 3.6 at the time of writing) and no internet, so this
# uses its python3 and installs only fastattn itself (editable, no dependencies).  Logs and JSON go to $OUT
# (the device tool brings that folder back) and the JSON also to bench/results/.
set -uo pipefail
mode=${1:-tests}
OUT=${OUT:-bench/results/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=python3

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null || true
} | tee "$OUT/env.txt"

if [ "$mode" != lease ]; then  # lease builds the extension itself, overlapped with the Triton tests
  # the extension in place (pip's editable install wants setuptools from the network, which the GPU image lacks)
  FASTATTN_CUDA_ARCHS=${FASTATTN_CUDA_ARCHS:-9.0a} $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || echo "extension build failed: see $OUT/build.log"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  # fastattn.models is the top-level models/ (setup.py's package_dir); without an install, a link stands in
  [ -e fastattn/models ] || ln -s ../models fastattn/models
fi

case "$mode" in
  tests)
    $PY -m fastattn.tools.kernel_report --arch 90 --json "$OUT/kernel_report_sm90.json" > "$OUT/kernel_report.txt" 2>&1
    tail -1 "$OUT/kernel_report.txt"
    timeout 480 $PY -m pytest tests -q -ra -x -p no:cacheprovider --ignore=tests/test_kernels_compile.py \
      2>&1 | tee "$OUT/tests.log" | tail -25
    ;;
  bench)
    timeout 560 $PY -m bench.run --out-dir "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60
    cp "$OUT"/*.json "$OUT"/*.png bench/results/ 2>/dev/null || true
    ;;
  ops)
    timeout 560 $PY -m bench.ops --dtypes bf16 --out-dir "$OUT" 2>&1 | tee "$OUT/ops.log" | tail -60
    cp "$OUT"/ops-*.json bench/results/ 2>/dev/null || true
    ;;
  models)
    timeout 560 $PY -m bench.models --out-dir "$OUT" 2>&1 | tee "$OUT/models.log" | tail -60
    cp "$OUT"/models-*.json bench/results/ 2>/dev/null || true
    ;;
  quick)
    timeout 300 $PY -m bench.run --quick --out-dir "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -40
    ;;
  lease)
    bash bench/gpu_lease.sh "$OUT"
    ;;
  *) echo "usage: $0 tests|bench|ops|models|quick|lease"; exit 2 ;;
esac
