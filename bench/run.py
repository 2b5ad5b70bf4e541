"""Benchmark runner for fastattn.attention: forward and forward+backward, against torch's own kernels.

    python -m bench.run                      # device auto: cuda if available, else cpu
    python -m bench.run --quick              # a few small shapes (a CPU run takes well under 2 minutes)
    python bench/run.py --device cuda --dtypes bf16 --backends triton,flex --no-plot

Writes bench/results/<device-slug>-<YYYYmmdd-HHMMSS>.json (device, date, versions, git commit, all rows) and a
PNG next to it (TFLOP/s vs sequence length, one panel per dtype / head dim / causal / mode).

Columns of the printed table (one row per shape x dtype x causal x mode x backend):
    shape      B x H x L x D  (batch, heads, sequence length of queries = keys, head dim); q, k, v [B, H, L, D]
    dtype      input dtype
    causal     top-left causal mask (query i sees keys j <= i) or none
    mode       "fwd": forward only, under torch.no_grad();
               "fwd+bwd": forward, then out.backward(dout) for dq, dk, dv (grads reset to None each call)
    backend    triton / sdpa / reference:  fastattn.attention(..., backend=<name>);
               torch-sdpa:                  raw F.scaled_dot_product_attention, torch's default kernel choice;
               torch-flash / torch-efficient / torch-cudnn / torch-math:  raw SDPA pinned to one kernel with
                                            torch.nn.attention.sdpa_kernel (GPU only by default);
               flex:                        torch.compile(flex_attention), causal via a block mask (GPU only)
    ms         median time of one call (milliseconds)
    TFLOP/s    FLOPs / median time, with the FlashAttention papers' convention:
                   fwd     = 4 * B * H * Lq * Lk * D     (two matmuls, QK^T and PV; softmax not counted)
                   causal  = half of the above           (the diagonal blocks' extra half is not counted)
                   bwd     = 2.5 * fwd                   (five matmuls), so fwd+bwd = 3.5 * fwd
               The count is the useful work: a backend that recomputes (the FA2 backward recomputes P, and so
               does the reference backend's) is charged time, not FLOPs, for it.
    vs torch-sdpa  speed-up over torch-sdpa (time of torch-sdpa / time of this row) for the same shape and mode
    vs ref     speed-up over fastattn's naive "reference" backend (which materialises the [L, L] scores)
    max err    max abs difference from a float64 reference computed by fastattn's reference backend on
               float64 copies of the same inputs: of the output for fwd rows; the largest over out, dq, dk, dv
               for fwd+bwd rows (the JSON keeps each one).  The float64 reference is computed once per shape,
               dtype and causal, in chunks of (batch, head) slices of at most 2 GiB of float64 scores; "n/a"
               when one slice alone is larger.
    note       why a row has no time: the error it raised (OOM, unsupported kernel, ...), or why it was skipped

Shapes.  GPU: the FlashAttention-2 benchmark convention -- 16k tokens per batch (B = 16384 // L) and a model
width of 2048 (H = 2048 // D): D in {64, 128}, L in {1k, 2k, 4k, 8k, 16k}, bf16 and fp16.  CPU: fp32, D = 64,
B = 2, H = 8, L in {256, 512, 1024}.  --quick: GPU bf16 at L in {1k, 4k}; CPU B = 1, H = 4, L in {128, 256, 512}.
--seqlens / --head-dims pick others (on CPU at B = 1, H = 4).
The naive backends (reference, torch-math) are not timed when a float32 score matrix B*H*L*L*4 bytes exceeds
--naive-max-gib (default 4 GiB; their forward+backward holds several such matrices): those rows say "n/a".

Timing.  GPU: triton.testing.do_bench (warm-up, L2 flushed between calls, median).  CPU: time.perf_counter
around each call, 2 warm-up calls, then the median of at least 5 calls (more, up to 100, until 1 s in all).
CPU timings need an idle machine: with 2+ torch threads, one busy core stalls every parallel region (timings jump
to multiples of the scheduler's time slice).  The run measures how busy the CPUs were just before it starts
(JSON: cpu_busy_percent_before) and warns; --threads 1 is the robust choice on a shared machine.
The first call of every row is the correctness check, so compilation (flex, triton) is never timed.
Each shape x dtype gets fresh random inputs (standard normal, from a CPU generator seeded 0), shared by all its
backends, causal settings and modes.
A row that raises records the error and the run goes on.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # `python bench/run.py`: make the repository importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastattn  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30
REFERENCE_CHUNK_BYTES = 2 * GIB  # float64 scores of one chunk of (batch, head) slices, for the error column
MODES = ("fwd", "fwd+bwd")
BASELINE_SDPA, BASELINE_REFERENCE = "torch-sdpa", "reference"
NAIVE_BACKENDS = ("reference", "torch-math")  # materialise the [B, H, L, L] scores: size-limited

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
          "fp64": torch.float64, "float64": torch.float64}
SHORT_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


# ===========================================================================================================
# Shapes and FLOPs
# ===========================================================================================================
@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    seqlen: int
    head_dim: int

    def __str__(self):
        return f"{self.batch}x{self.heads}x{self.seqlen}x{self.head_dim}"

    def score_elements(self) -> int:
        """Elements of one [B, H, L, L] score matrix."""
        return self.batch * self.heads * self.seqlen * self.seqlen


def gpu_shapes(quick: bool, seqlens: Optional[Sequence[int]] = None,
               head_dims: Optional[Sequence[int]] = None) -> List[Shape]:
    """FlashAttention-2's benchmark convention: 16k tokens (B = max(1, 16384 // L)), width 2048 (H = 2048 // D)."""
    seqlens = seqlens or ((1024, 4096) if quick else (1024, 2048, 4096, 8192, 16384))
    return [Shape(max(1, 16384 // L), max(1, 2048 // D), L, D) for D in (head_dims or (64, 128)) for L in seqlens]


def cpu_shapes(quick: bool, seqlens: Optional[Sequence[int]] = None,
               head_dims: Optional[Sequence[int]] = None) -> List[Shape]:
    """B = 2, H = 8 (B = 1, H = 4 with --quick or for explicit --seqlens, which are usually long ones)."""
    if seqlens:
        return [Shape(1, 4, L, D) for D in (head_dims or (64,)) for L in seqlens]
    if quick:
        return [Shape(1, 4, L, D) for D in (head_dims or (64,)) for L in (128, 256, 512)]
    return [Shape(2, 8, L, D) for D in (head_dims or (64,)) for L in (256, 512, 1024)]


def attention_flops(shape: Shape, causal: bool, mode: str) -> float:
    """FLOPs of one call, FlashAttention convention (see the module docstring)."""
    fwd = 4.0 * shape.batch * shape.heads * shape.seqlen * shape.seqlen * shape.head_dim
    if causal:
        fwd /= 2
    return fwd if mode == "fwd" else 3.5 * fwd


# ===========================================================================================================
# Backends: each is a factory (shape, causal, device) -> fn(q, k, v) -> out
# ===========================================================================================================
AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def fastattn_backend(name: str):
    def make(shape: Shape, causal: bool, device: torch.device) -> AttnFn:
        return lambda q, k, v: fastattn.attention(q, k, v, causal=causal, backend=name)
    return make


def torch_sdpa_backend(kernel_name: Optional[str]):
    """Raw F.scaled_dot_product_attention: torch's own choice (None) or pinned to one SDPBackend."""
    def make(shape: Shape, causal: bool, device: torch.device) -> AttnFn:
        if kernel_name is None:
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kernel = getattr(SDPBackend, kernel_name)

        def fn(q, k, v):
            with sdpa_kernel(kernel):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return fn
    return make


_COMPILED_FLEX = None


def flex_backend(shape: Shape, causal: bool, device: torch.device) -> AttnFn:
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if _COMPILED_FLEX is None:
        # One recompilation per shape, dtype, causal and grad mode: raise dynamo's limit (8 by default),
        # past which it would silently fall back to the slow eager flex_attention.
        for option, limit in (("recompile_limit", 1024), ("accumulated_recompile_limit", 4096)):
            if hasattr(torch._dynamo.config, option):
                setattr(torch._dynamo.config, option, limit)
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None,
                                       shape.seqlen, shape.seqlen, device=device)
    return lambda q, k, v: _COMPILED_FLEX(q, k, v, block_mask=block_mask)


BACKENDS: Dict[str, Callable[[Shape, bool, torch.device], AttnFn]] = {
    "triton": fastattn_backend("triton"),
    "cuda": fastattn_backend("cuda"),
    "cpu": fastattn_backend("cpu"),
    "sdpa": fastattn_backend("sdpa"),
    "reference": fastattn_backend("reference"),
    "torch-sdpa": torch_sdpa_backend(None),
    "torch-flash": torch_sdpa_backend("FLASH_ATTENTION"),
    "torch-efficient": torch_sdpa_backend("EFFICIENT_ATTENTION"),
    "torch-cudnn": torch_sdpa_backend("CUDNN_ATTENTION"),
    "torch-math": torch_sdpa_backend("MATH"),
    "flex": flex_backend,
}
DEFAULT_BACKENDS = {
    "cuda": ["triton", "cuda", "sdpa", "reference", "torch-sdpa", "torch-flash", "torch-efficient", "torch-cudnn",
             "torch-math", "flex"],
    # triton runs on CPU only under the Triton interpreter (far too slow to time); flex and the pinned SDPA
    # kernels are GPU comparisons (pass --backends to time them on CPU anyway).
    "cpu": ["cpu", "sdpa", "reference", "torch-sdpa"],
}


def selected_backends(device: torch.device, requested: Optional[str]) -> List[str]:
    """The requested backends (default: the device's list), plus the two baselines of the speed-up columns."""
    names = DEFAULT_BACKENDS[device.type] if requested is None else [
        n.strip() for n in requested.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise SystemExit(f"--backends: unknown {unknown}; expected names from {list(BACKENDS)}")
    for baseline in (BASELINE_REFERENCE, BASELINE_SDPA):
        if baseline not in names:
            names.append(baseline)
    return names


# ===========================================================================================================
# Timing
# ===========================================================================================================
def cpu_times_ms(fn: Callable[[], object], warmup: int = 2, min_reps: int = 5, min_total_s: float = 1.0,
                 max_reps: int = 100) -> Tuple[float, float]:
    """(median, min) of wall-clock times in ms."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    while len(times) < min_reps or (sum(times) < min_total_s and len(times) < max_reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), 1e3 * min(times)


def interleaved_times_ms(calls: Dict[str, Callable[[], object]], device: torch.device, quick: bool,
                         min_rounds: int = 5, min_total_s: float = 1.0,
                         max_rounds: int = 100) -> Dict[str, Tuple[float, float]]:
    """(median, min) time in ms of each call, for calls that are compared with each other.  On the CPU they run
    in rounds -- one call of each per round, the order rotated from round to round -- so that a slow spell of a
    shared VM (this 2-core machine's run-to-run noise is +-5 % and, for memory-bound ops, far more: NOTES entries
    33-34) lands on every implementation alike instead of on whichever was timed then.  On a GPU each is timed
    on its own by do_bench, as times_ms."""
    if device.type == "cuda" or len(calls) < 2:
        return {name: times_ms(fn, device, quick) for name, fn in calls.items()}
    names = list(calls)
    for name in names:
        for _ in range(2):  # warm-up
            calls[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    rounds = 0
    # at least min_rounds, then until about min_total_s per call has passed (a much slower implementation in
    # the set shortens the run instead of lengthening it: every round runs it once)
    while rounds < min_rounds or (sum(map(sum, times.values())) < min_total_s * len(names) and rounds < max_rounds):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
        rounds += 1
    return {name: (1e3 * statistics.median(t), 1e3 * min(t)) for name, t in times.items()}


def times_ms(fn: Callable[[], object], device: torch.device, quick: bool) -> Tuple[float, float]:
    """(median, min) time of one call in ms."""
    if device.type == "cuda":
        import triton.testing
        warmup, rep = (10, 40) if quick else (25, 100)
        median, fastest = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.0])
        return float(median), float(fastest)
    return cpu_times_ms(fn)


# ===========================================================================================================
# Inputs, calls and the float64 reference
# ===========================================================================================================
@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    size = (shape.batch, shape.heads, shape.seqlen, shape.head_dim)

    def randn():
        return torch.randn(size, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    return Inputs(randn().requires_grad_(), randn().requires_grad_(), randn().requires_grad_(), randn())


def make_call(fn: AttnFn, x: Inputs, mode: str) -> Callable[[], Dict[str, torch.Tensor]]:
    """A no-argument call of one row: returns {"out"} (fwd) or {"out", "dq", "dk", "dv"} (fwd+bwd)."""
    if mode == "fwd":
        q, k, v = (t.detach() for t in (x.q, x.k, x.v))  # no requires_grad: e.g. flex on CPU rejects it

        def call():
            with torch.no_grad():
                return {"out": fn(q, k, v)}
        return call

    def call():
        for t in (x.q, x.k, x.v):
            t.grad = None
        out = fn(x.q, x.k, x.v)
        out.backward(x.dout)
        return {"out": out.detach(), "dq": x.q.grad, "dk": x.k.grad, "dv": x.v.grad}
    return call


def float64_reference(x: Inputs, causal: bool, with_grads: bool) -> Optional[Dict[str, torch.Tensor]]:
    """{"out", and "dq", "dk", "dv" if with_grads} in float64, by fastattn's reference backend, computed over
    chunks of (batch, head) slices so the float64 [L, L] scores stay under REFERENCE_CHUNK_BYTES.
    None when a single slice is already larger."""
    B, H, L, D = x.q.shape
    slice_bytes = L * L * 8
    if slice_bytes > REFERENCE_CHUNK_BYTES:
        return None
    chunk = max(1, REFERENCE_CHUNK_BYTES // slice_bytes)
    q, k, v, dout = (t.detach().to(torch.float64).reshape(B * H, 1, L, D) for t in (x.q, x.k, x.v, x.dout))
    parts: Dict[str, List[torch.Tensor]] = {"out": [], "dq": [], "dk": [], "dv": []}
    for s in range(0, B * H, chunk):
        qc, kc, vc = (t[s:s + chunk].requires_grad_(with_grads) for t in (q, k, v))
        with torch.set_grad_enabled(with_grads):
            out = fastattn.attention(qc, kc, vc, causal=causal, backend="reference")
        parts["out"].append(out.detach())
        if with_grads:
            for name, g in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (qc, kc, vc), dout[s:s + chunk])):
                parts[name].append(g)
    return {name: torch.cat(p).reshape(B, H, L, D) for name, p in parts.items() if p}


def max_abs_errors(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> Dict[str, float]:
    return {name: float((t.to(torch.float64) - ref[name]).abs().max()) for name, t in got.items()}


# ===========================================================================================================
# Rows
# ===========================================================================================================
@dataclass
class Row:
    batch: int
    heads: int
    seqlen: int
    head_dim: int
    dtype: str
    causal: bool
    mode: str
    backend: str
    flops: float
    time_ms: Optional[float] = None      # median
    time_ms_min: Optional[float] = None  # fastest call: compare with the median to spot a noisy machine
    tflops: Optional[float] = None
    speedup_vs_sdpa: Optional[float] = None
    speedup_vs_reference: Optional[float] = None
    max_abs_error: Optional[float] = None
    errors: Dict[str, float] = field(default_factory=dict)  # per tensor: out (and dq, dk, dv)
    note: Optional[str] = None                              # the exception raised, or why it was skipped

    @property
    def shape(self) -> Shape:
        return Shape(self.batch, self.heads, self.seqlen, self.head_dim)


def short_error(e: BaseException) -> str:
    """One line: the exception type, its first line (shortened) and any further lines (where fastattn's
    dispatch errors give each backend's reasons)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [""]
    head = lines[0] if len(lines[0]) <= 100 else lines[0][:97] + "..."
    return f"{type(e).__name__}: " + " | ".join([head] + lines[1:])[:400]


def prepare_row(row: Row, make_fn, x: Inputs, ref: Optional[Dict[str, torch.Tensor]],
                device: torch.device) -> Optional[Callable[[], Dict[str, torch.Tensor]]]:
    """The row's call after one checked run (row.errors filled), or None with row.note saying what it raised."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SDPA's "kernel not used because ..." warnings; the error says it
            call = make_call(make_fn(row.shape, row.causal, device), x, row.mode)
            got = call()  # correctness check, and the compilation of compiled backends
            if ref is not None:
                row.errors = max_abs_errors(got, ref)
                row.max_abs_error = max(row.errors.values())
            del got
        return call
    except Exception as e:  # noqa: BLE001 - one row's failure (OOM, unsupported) must not end the run
        row.note = short_error(e)
        return None
    finally:
        for t in (x.q, x.k, x.v):
            t.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def time_group(rows: Dict[str, object], calls: Dict[str, Callable[[], object]], device: torch.device,
               quick: bool) -> None:
    """Sets time_ms / time_ms_min of rows[name] for each call, timed together by interleaved_times_ms; if the
    timing raises (e.g. out of memory), every row without a note of its own gets the error as its note."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            timed = interleaved_times_ms(calls, device, quick)
    except Exception as e:  # noqa: BLE001 - the rows keep their errors; the run goes on
        timed = {}
        for row in rows.values():
            row.note = row.note or short_error(e)
    for name, (median, fastest) in timed.items():
        rows[name].time_ms, rows[name].time_ms_min = median, fastest
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_rows(rows: Dict[str, Row], calls: Dict[str, Callable[[], object]], x: Inputs, device: torch.device,
              quick: bool) -> None:
    """Fills time_ms / tflops of the rows whose calls are given (time_group: in rounds on the CPU)."""
    time_group(rows, calls, device, quick)
    for t in (x.q, x.k, x.v):
        t.grad = None
    for name in calls:
        row = rows[name]
        if row.time_ms is not None:
            row.tflops = row.flops / (row.time_ms * 1e-3) / 1e12


def fill_speedups(rows: Sequence[Row]) -> None:
    """rows: the backends of one shape x dtype x causal x mode."""
    base = {r.backend: r.time_ms for r in rows}
    for r in rows:
        if r.time_ms is None:
            continue
        if base.get(BASELINE_SDPA):
            r.speedup_vs_sdpa = base[BASELINE_SDPA] / r.time_ms
        if base.get(BASELINE_REFERENCE):
            r.speedup_vs_reference = base[BASELINE_REFERENCE] / r.time_ms


def bench_case(shape: Shape, dtype: torch.dtype, device: torch.device, backends: Sequence[str], quick: bool,
               naive_max_bytes: float, print_row: Callable[[Row], None]) -> List[Row]:
    """Every backend, causal and mode of one shape and dtype, on one set of inputs."""
    x = make_inputs(shape, dtype, device)
    rows: List[Row] = []
    for causal in (False, True):
        try:
            ref = float64_reference(x, causal, with_grads=True)
        except Exception as e:  # noqa: BLE001 - e.g. OOM: the rows still get timed, without errors
            print(f"  float64 reference for {shape} causal={causal} failed: {short_error(e)}")
            ref = None
        for mode in MODES:
            group, calls = [], {}
            for name in backends:
                row = Row(shape.batch, shape.heads, shape.seqlen, shape.head_dim, SHORT_DTYPE[dtype], causal,
                          mode, name, attention_flops(shape, causal, mode))
                if name in NAIVE_BACKENDS and shape.score_elements() * 4 > naive_max_bytes:
                    row.note = (f"skipped: a naive backend would materialise "
                                f"{shape.score_elements() * 4 / GIB:.1f} GiB of float32 scores")
                else:
                    mode_ref = None if ref is None else {k: ref[k] for k in ("out", "dq", "dk", "dv")
                                                         if mode == "fwd+bwd" or k == "out"}
                    call = prepare_row(row, BACKENDS[name], x, mode_ref, device)
                    if call is not None:
                        calls[name] = call
                group.append(row)
            time_rows({r.backend: r for r in group}, calls, x, device, quick)
            del calls
            fill_speedups(group)
            for row in group:
                print_row(row)
            rows.extend(group)
        del ref
    return rows


# ===========================================================================================================
# Output: table, JSON, plot
# ===========================================================================================================
COLUMNS = [("shape", 16), ("dtype", 5), ("causal", 6), ("mode", 7), ("backend", 15), ("ms", 9),
           ("TFLOP/s", 8), ("vs torch-sdpa", 13), ("vs ref", 7), ("max err", 8), ("note", 0)]


def _fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else format(value, spec) + suffix


def format_row(r: Row) -> str:
    cells = [str(r.shape), r.dtype, "yes" if r.causal else "no", r.mode, r.backend,
             _fmt(r.time_ms, ".3f"), _fmt(r.tflops, ".3f" if (r.tflops or 0) < 10 else ".1f"),
             _fmt(r.speedup_vs_sdpa, ".2f", "x"), _fmt(r.speedup_vs_reference, ".2f", "x"),
             _fmt(r.max_abs_error, ".1e"), r.note or ""]
    return "  ".join(c.ljust(w) if w else c for c, (_, w) in zip(cells, COLUMNS)).rstrip()


def table_header() -> str:
    line = "  ".join(name.ljust(w) if w else name for name, w in COLUMNS)
    return line + "\n" + "-" * len(line)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return slug if device.type == "cuda" else f"cpu-{slug}"


def cpu_busy_percent(interval_s: float = 0.5) -> Optional[float]:
    """How busy all CPUs were over the next interval_s seconds (Linux /proc/stat), or None."""
    def snapshot():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait
    try:
        total0, idle0 = snapshot()
        time.sleep(interval_s)
        total1, idle1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    return round(100.0 * (1 - (idle1 - idle0) / max(1, total1 - total0)), 1)


def git_state() -> Dict[str, object]:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except Exception:  # noqa: BLE001 - no git, not a checkout: the JSON just lacks it
        return {}


def environment(device: torch.device) -> Dict[str, object]:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    env = {
        "device": {"type": device.type, "name": device_name(device), "torch_threads": torch.get_num_threads(),
                   "cpu_count": os.cpu_count()},
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
                     "cuda_runtime": torch.version.cuda, "fastattn": fastattn.__version__},
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
        "cpu_busy_percent_before": cpu_busy_percent(),  # other work on the machine skews CPU timings
        "environment_variables": {k: v for k, v in os.environ.items()
                                  if k.startswith(("FASTATTN_", "TRITON_", "CUDA_VISIBLE", "OMP_NUM"))},
        "git": git_state(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"].update(capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / GIB, 1),
                             multiprocessors=props.multi_processor_count)
        env["versions"]["cudnn"] = torch.backends.cudnn.version()
    return env


def plot(rows: Sequence[Row], path: Path) -> Optional[Path]:
    """TFLOP/s vs sequence length, a line per backend, a panel per (dtype, head dim, causal, mode)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    panels = sorted({(r.dtype, r.head_dim, r.causal, r.mode) for r in rows})
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    backends = list(dict.fromkeys(r.backend for r in rows))
    for ax, (dtype, head_dim, causal, mode) in zip(axes.flat, panels):
        for backend in backends:
            points = sorted((r.seqlen, r.tflops) for r in rows if r.tflops is not None and r.backend == backend
                            and (r.dtype, r.head_dim, r.causal, r.mode) == (dtype, head_dim, causal, mode))
            if points:
                ax.plot(*zip(*points), marker="o", label=backend)
        seqlens = sorted({r.seqlen for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqlens, [f"{L // 1024}k" if L % 1024 == 0 else str(L) for L in seqlens])
        ax.set_title(f"{dtype} d{head_dim} {'causal' if causal else 'non-causal'} {mode}", fontsize=10)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=9)
    fig.tight_layout(rect=(0, 0.08 if nrows == 1 else 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ===========================================================================================================
# Main
# ===========================================================================================================
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cuda, cuda:N or cpu")
    ap.add_argument("--quick", action="store_true", help="a few small shapes (CPU: well under 2 minutes)")
    ap.add_argument("--out-dir", default=str(REPO_ROOT / "bench" / "results"), help="where the JSON and PNG go")
    ap.add_argument("--dtypes", default=None, help="comma-separated, e.g. bf16,fp16 (default: bf16,fp16 on "
                                                   "GPU, fp32 on CPU)")
    ap.add_argument("--backends", default=None,
                    help=f"comma-separated subset of {','.join(BACKENDS)} (default: the device's list; "
                         f"{BASELINE_SDPA} and {BASELINE_REFERENCE} are always added, for the speed-ups)")
    ap.add_argument("--naive-max-gib", type=float, default=4.0,
                    help="do not time the naive reference above this size of float32 scores (default 4)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    ap.add_argument("--seqlens", default=None, help="comma-separated sequence lengths (GPU default "
                                                    "1024,2048,4096,8192,16384, --quick 1024,4096; CPU default "
                                                    "256,512,1024 at B=2 H=8; given on CPU: B=1 H=4)")
    ap.add_argument("--head-dims", default=None, help="comma-separated head dims (default 64,128 on GPU, 64 on CPU)")
    return ap.parse_args(argv)


def _int_list(spec: Optional[str], name: str) -> Optional[List[int]]:
    if spec is None:
        return None
    try:
        values = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{name}: expected comma-separated positive integers, got {spec!r}")
    if not values or min(values) < 1:
        raise SystemExit(f"{name}: expected comma-separated positive integers, got {spec!r}")
    return values


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if device.type not in DEFAULT_BACKENDS:
        raise SystemExit(f"--device: expected cpu or cuda, got {name}")
    return device


def parse_dtypes(spec: Optional[str], device: torch.device, quick: bool) -> List[torch.dtype]:
    """Default: bf16 and fp16 on GPU (bf16 only with --quick), fp32 on CPU."""
    if spec is None:
        spec = "fp32" if device.type != "cuda" else "bf16" if quick else "bf16,fp16"
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        raise SystemExit(f"--dtypes: unknown {unknown}; expected some of {sorted(DTYPES)}")
    return list(dict.fromkeys(DTYPES[n] for n in names))


def run_all(args, device: torch.device, env: Dict[str, object]) -> List[Row]:
    dtypes = parse_dtypes(args.dtypes, device, args.quick)
    backends = selected_backends(device, args.backends)
    make_shapes = gpu_shapes if device.type == "cuda" else cpu_shapes
    shapes = make_shapes(args.quick, _int_list(args.seqlens, "--seqlens"), _int_list(args.head_dims, "--head-dims"))
    env["config"] = {"quick": args.quick, "dtypes": [SHORT_DTYPE[d] for d in dtypes], "backends": backends,
                     "shapes": [str(s) for s in shapes], "naive_max_gib": args.naive_max_gib,
                     "timer": "triton.testing.do_bench median" if device.type == "cuda"
                     else "time.perf_counter median (2 warm-up, >= 5 reps, >= 1 s)",
                     "flops": "fwd = 4*B*H*L*L*D (halved when causal); fwd+bwd = 3.5 * fwd"}
    print(f"fastattn {fastattn.__version__} benchmark on {env['device']['name']} ({device}); torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; dtypes "
          f"{','.join(SHORT_DTYPE[d] for d in dtypes)}; backends {','.join(backends)}")
    busy = env["cpu_busy_percent_before"]
    if device.type == "cpu" and busy is not None and busy >= 20:
        print(f"warning: the CPUs were {busy:.0f}% busy just before the run: other processes share them, so the "
              f"timings are noisy (compare time_ms with time_ms_min in the JSON; --threads 1 suffers least)")
    print(table_header())
    rows: List[Row] = []
    for dtype in dtypes:
        for shape in shapes:
            rows += bench_case(shape, dtype, device, backends, args.quick, args.naive_max_gib * GIB,
                               lambda r: print(format_row(r), flush=True))
    return rows


def write_outputs(env: Dict[str, object], rows: Sequence[Row], out_dir: Path, stem: str, draw: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(dict(env, rows=[asdict(r) for r in rows]), indent=1) + "\n")
    print(f"wrote {json_path}")
    if draw:
        png = plot(rows, out_dir / f"{stem}.png")
        if png is not None:
            print(f"wrote {png}")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if os.environ.pop("FASTATTN_POISON_OUTPUTS", "0") == "1":
        print("note: unset FASTATTN_POISON_OUTPUTS for this run (a test setting: it NaN-fills every output)")
    if args.threads:
        torch.set_num_threads(args.threads)
    stem = f"{device_slug(device)}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    env = environment(device)

    start = time.perf_counter()
    rows = run_all(args, device, env)
    env["elapsed_s"] = round(time.perf_counter() - start, 1)
    env["load_average_at_end"] = os.getloadavg()
    print(f"\n{len(rows)} rows in {env['elapsed_s']:.0f} s")
    write_outputs(env, rows, Path(args.out_dir), stem, draw=not args.no_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
