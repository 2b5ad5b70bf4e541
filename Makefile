# Two commands do all set-up on a fresh clone:
#   make bench   the benchmark-and-verification report on this machine's device (GPU if present, else CPU)
#   make test    the test suite
# Both create .venv and install the pinned requirements plus fastattn (editable) on first use.
# SYSTEM_TORCH=1 builds the venv on top of an already installed torch/triton (GPU machines without internet).

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastattn-installed
export CUDA_HOME ?= /usr/local/cuda
PYTEST_ARGS ?=

.PHONY: setup test bench kernel-report bench-cpu clean

# The C++/CUDA sources: the editable install compiles them into fastattn/_C*.so (setup.py), so edits reinstall.
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)

# nvidia-cutlass: the CUTLASS/CuTe headers, the oracle of tests/test_wgmma_layouts.py (headers only, so --no-deps:
# the wheel's Python dependencies are not needed).
$(STAMP): requirements.txt setup.py $(CSRC)
ifeq ($(SYSTEM_TORCH),1)
	python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q pytest pytest-benchmark numpy matplotlib ninja || true
else
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps nvidia-cutlass==4.2.0.0
endif
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest tests -q -ra $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench.run
	$(PY) -m bench.ops
	$(PY) -m bench.models

# registers / shared memory / spills of every Triton kernel configuration, compiled for sm_80 and sm_90
kernel-report: setup
	env -u TRITON_INTERPRET $(PY) -m fastattn.tools.kernel_report

# CPU timings with pytest-benchmark
bench-cpu: setup
	$(PY) -m pytest bench/test_cpu_benchmarks.py --benchmark-only -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache fastattn/_C*.so
