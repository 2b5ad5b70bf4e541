"""CPU timings of fastattn.attention with pytest-benchmark.

    pytest bench/test_cpu_benchmarks.py --benchmark-only
    pytest bench/test_cpu_benchmarks.py --benchmark-only --benchmark-autosave    # keep a run in .benchmarks/
    pytest bench/test_cpu_benchmarks.py --benchmark-only --benchmark-compare     # against the last saved run

fp32, B = 1, H = 4, D = 64, L in {128, 256, 512}; fastattn's sdpa and reference backends; causal or not;
forward (under torch.no_grad()) and forward+backward.  Benchmarks are grouped by mode, L and causal, so each
group's table compares the two backends.  extra_info holds the FLOPs of a call (FlashAttention convention, as in
bench/run.py) and the median TFLOP/s.

Performance is measured here, never asserted: the only assertions are that outputs and gradients are finite.
This file lives in bench/, so `pytest tests/` does not collect it.
"""
import pytest
import torch

import fastattn
from bench.run import Shape, attention_flops, make_call, make_inputs

SEQLENS = (128, 256, 512)
BACKENDS = ("sdpa", "reference")
MODES = ("fwd", "fwd+bwd")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_cpu(benchmark, backend, seqlen, causal, mode):
    torch.manual_seed(0)
    shape = Shape(batch=1, heads=4, seqlen=seqlen, head_dim=64)
    x = make_inputs(shape, torch.float32, torch.device("cpu"))
    call = make_call(lambda q, k, v: fastattn.attention(q, k, v, causal=causal, backend=backend), x, mode)

    benchmark.group = f"{mode} L={seqlen} {'causal' if causal else 'full'}"
    flops = attention_flops(shape, causal, mode)
    benchmark.extra_info.update(shape=str(shape), dtype="fp32", flops=flops)
    result = benchmark(call)

    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tflops_median"] = flops / benchmark.stats.stats.median / 1e12
    for name, t in result.items():
        assert torch.isfinite(t).all(), f"{name} has non-finite values"
