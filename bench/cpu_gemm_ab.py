"""Paired A/B of env-switched variants of the CPU kernels; by default the block products' AVX-512 register tiles
(csrc/cpu/small_gemm.cpp) vs torch's BLAS.

    PYTHONPATH=. python bench/cpu_gemm_ab.py [--rounds 25] [--threads 2] [--cases tsf,swin,dense]
    PYTHONPATH=. python bench/cpu_gemm_ab.py --variants 'new=;old=FASTATTN_SOMETHING=1' --cases tsf-spatial

The ops read FASTATTN_CPU_GEMM on every call, so both variants run in one process, interleaved round by round
(each round times one call of each, in alternating order); the figure per case is the median over rounds of the
per-round ratio (paired: slow drifts of a shared 2-core VM cancel).  Prints one line per case and mode.
--variants: 'name=ENV=VALUE;name=...' (an empty ENV=VALUE unsets the variables the others set), for a switch a
change reads with getenv on every call while it is being measured (NOTES entry 25: the spatial forward's
prefetches were chosen that way); the first variant is the reference of the ratio column.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastattn  # noqa: E402
from bench import ops  # noqa: E402

DEFAULT_VARIANTS = "tiles=FASTATTN_CPU_GEMM=;blas=FASTATTN_CPU_GEMM=blas"


def parse_variants(spec):
    """'name=ENV=VALUE;...' -> {name: {ENV: VALUE}} ('name=' sets nothing)."""
    out = {}
    for item in filter(None, spec.split(";")):
        name, _, setting = item.partition("=")
        env, _, value = setting.partition("=")
        out[name] = {env: value} if env else {}
    return out


def dense_cases():
    """(name, make_inputs, fn, grad_keys) for the dense op at issue 5's CPU shapes and ViT-B's / BERT's."""
    out = []
    for B, H, L, D, causal in [(1, 12, 197, 64, False), (8, 12, 197, 64, False), (8, 12, 128, 64, False),
                               (1, 8, 1024, 64, False), (1, 8, 1024, 64, True), (1, 4, 4096, 64, False),
                               (1, 4, 4096, 64, True)]:
        def make(B=B, H=H, L=L, D=D):
            g = torch.Generator().manual_seed(0)
            return {k: torch.randn(B, H, L, D, generator=g) for k in "qkv"}

        def fn(x, causal=causal):
            return fastattn.attention(x["q"], x["k"], x["v"], causal=causal)
        out.append((f"dense B{B} H{H} L{L} D{D}{' causal' if causal else ''}", make, fn, ["q", "k", "v"]))
    return out


def layout_cases(prefixes):
    out = []
    for case in ops.cases(torch.device("cpu"), quick=False):
        if not any(case.name.startswith(p) for p in prefixes):
            continue
        fn = case.impls["fastattn"]
        out.append((case.name, lambda c=case: c.make_inputs(torch.float32, torch.device("cpu"),
                                                              torch.Generator().manual_seed(0)), fn, case.grad_keys))
    return out


def time_once(call) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def apply_variant(variants, name):
    """Unset every variable any variant sets, then set this variant's."""
    for setting in variants.values():
        for env in setting:
            os.environ.pop(env, None)
    for env, value in variants[name].items():
        if value:
            os.environ[env] = value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="tsf,swin,dense")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = parse_variants(args.variants)
    names = list(variants)
    if len(names) < 2:
        ap.error("--variants: at least two, 'name=ENV=VALUE;name=ENV=VALUE'")
    prefixes = args.cases.split(",")
    todo = layout_cases([p for p in prefixes if p != "dense"])
    if "dense" in prefixes:
        todo += dense_cases()
    print(f"fastattn {fastattn.__version__}: {' vs '.join(names)}; torch {torch.__version__}, {args.threads} threads, "
          f"{args.rounds} rounds, paired medians")
    print(f"{'case':34s} {'mode':8s} " + " ".join(f"{n + ' ms':>10s}" for n in names) +
          " " + " ".join(f"{n + '/' + names[0]:>12s}" for n in names[1:]))
    for name, make, fn, grad_keys in todo:
        x = make()
        for mode in args.modes.split(","):
            dout = None
            if mode == "fwd+bwd":
                with torch.no_grad():
                    dout = torch.randn_like(fn(x))
            call = ops._call(fn, x, mode, grad_keys, dout)
            times = {v: [] for v in names}
            for r in range(args.rounds + 2):
                for v in (names if r % 2 == 0 else names[::-1]):
                    apply_variant(variants, v)
                    t = time_once(call)
                    if r >= 2:  # two warm-up rounds
                        times[v].append(t)
            apply_variant({**variants, "": {}}, "")
            ratios = [statistics.median(a / b for a, b in zip(times[v], times[names[0]])) for v in names[1:]]
            print(f"{name:34s} {mode:8s} " + " ".join(f"{statistics.median(times[v]) * 1e3:10.2f}" for v in names) +
                  " " + " ".join(f"{r:12.3f}" for r in ratios), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
