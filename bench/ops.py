"""Benchmark of the layout variants (issue 3) against the composites users write today, on real models' shapes.

    python -m bench.ops                 # device auto (cuda if available); the real shapes on a GPU
    python -m bench.ops --quick         # scaled-down shapes (the CPU default: batch and frames cut)
    python -m bench.ops --cases swin,perceiver --dtypes bf16

Writes bench/results/ops-<device-slug>-<YYYYmmdd-HHMMSS>.json (device, date, versions, git commit, all rows).

Cases (GPU shapes; --quick and CPU runs shrink the batch / frames, the per-window and per-frame sizes stay):
    swin-t-s1     Swin-T stage 1: 56x56 tokens, window 7, 3 heads of 32, batch 64; shift 0 (W-MSA) and 3 (SW-MSA)
    swin-t-s3     Swin-T stage 3: 14x14 tokens, window 7, 12 heads of 32, batch 64; shift 0 and 3
    tsf-temporal  TimeSformer-B divided, temporal half: T=8 frames x 196 patches, 12 heads of 64, batch 8
    tsf-spatial   TimeSformer-B divided, spatial half (with the cls token, its output averaged over frames)
    vivit-fdp     ViViT-B model 4 (factorised dot-product): 16x14x14 tokens (32 frames, tubelets of 2), 12 heads of
                  64 (6 over space, 6 over time), batch 4
    perceiver     Perceiver ImageNet cross-attention: 512 latents vs 50,176 pixels (224^2), 1 head, qk 261, v 261,
                  batch 8
    cross-d64     multi-head cross-attention with few queries: 256 latents vs 16,384 inputs, 4 heads of 64, batch 2
                  (16 query blocks of 128: both GPU backends split the keys, split-KV)
Implementations (rows):
    fastattn      the fused op (fastattn.window_attention / temporal_attention / spatial_attention /
                  factorised_dot_product_attention / attention), default dispatch (the Triton kernels on a GPU)
    fastattn-cuda the same op on the CUDA C++ kernels (backend="cuda"; GPU only; Perceiver's head dim 261 is
                  beyond them (at most 256), so that case has no such row)
    composite     what a user writes today with torch's fused SDPA: Swin = timm's block (roll, window partition,
                  SDPA with the bias + shift-mask tensor, window reverse, roll back); space-time = TimeSformer's
                  rearrange + SDPA + rearrange (with cls repeat + cat + mean for the spatial half); ViViT model 4 =
                  head split + permutes + two SDPA + concat; Perceiver = SDPA with Lq << Lk
    eager         timm's non-fused path for Swin (q @ k^T + bias + mask, softmax, @ v) -- the "eager composite"
    flex          torch.compile(flex_attention) where it expresses the variant (Swin: rolled tokens, a block mask
                  of same-window pairs, the bias and the -100 region mask as a score_mod; GPU only)
Modes: fwd (no grad) and fwd+bwd (gradients of q, k, v -- and of the bias table for Swin).
Columns: ms (median), TFLOP/s (useful attention FLOPs: 4 * Lq * Lk * d per head and group, fwd+bwd = 3.5x),
GB/s (fwd: bytes of q, k, v read and the output written, once -- the HBM floor), speed-up over the composite,
and the max abs error against the composite computed in float64.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastattn  # noqa: E402
from bench.run import DTYPES, SHORT_DTYPE, device_slug, environment, resolve_device, short_error, time_group  # noqa: E402
from fastattn.window import region_ids, relative_position_index  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
MODES = ("fwd", "fwd+bwd")


# ===========================================================================================================
# Swin: window attention
# ===========================================================================================================
def swin_inputs(B, H, W, heads, d, window, dtype, device, gen):
    qkv = torch.randn(B, H, W, 3, heads, d, generator=gen).to(device, dtype)
    table = (0.02 * torch.randn((2 * window - 1) ** 2, heads, generator=gen)).to(device, dtype)
    return dict(qkv=qkv, table=table)


def swin_fastattn(x, window, shift, backend=None):
    q, k, v = x["qkv"].unbind(3)
    return fastattn.window_attention(q, k, v, window_size=window, shift_size=shift, rel_pos_bias_table=x["table"],
                                     backend=backend)


def _swin_bias_and_mask(table, window, shift, H, W):
    """timm's tensors: bias [heads, N, N] gathered from the table; region mask [nW, N, N] (0 / -100)."""
    N = window * window
    idx = relative_position_index((window, window), device=table.device)
    bias = table[idx.view(-1)].view(N, N, -1).permute(2, 0, 1)
    if shift == 0:
        return bias, None
    rows = region_ids(H, window, shift, device=table.device)
    cols = region_ids(W, window, shift, device=table.device)
    ids = (rows[:, None] * 3 + cols[None, :])  # [H, W]
    ids = ids.view(H // window, window, W // window, window).permute(0, 2, 1, 3).reshape(-1, N)
    mask = torch.zeros(ids.shape[0], N, N, dtype=table.dtype, device=table.device)
    mask.masked_fill_(ids[:, :, None] != ids[:, None, :], -100.0)
    return bias, mask


def _partition(t, window):
    """[B, H, W, heads, d] -> [B, nW, heads, N, d] (copy), timm's window_partition plus the head transpose."""
    B, H, W, h, d = t.shape
    t = t.view(B, H // window, window, W // window, window, h, d).permute(0, 1, 3, 5, 2, 4, 6)
    return t.reshape(B, (H // window) * (W // window), h, window * window, d)


def _reverse(t, window, H, W):
    B, nW, h, N, d = t.shape
    t = t.view(B, H // window, W // window, h, window, window, d).permute(0, 1, 4, 2, 5, 3, 6)
    return t.reshape(B, H, W, h, d)


def swin_composite(x, window, shift, eager=False):
    qkv = x["qkv"]
    B, H, W, _, heads, d = qkv.shape
    if shift:
        qkv = torch.roll(qkv, shifts=(-shift, -shift), dims=(1, 2))
    q, k, v = (_partition(t, window) for t in qkv.unbind(3))
    bias, mask = _swin_bias_and_mask(x["table"], window, shift, H, W)
    full = bias[None] if mask is None else bias[None] + mask[:, None]  # [nW or 1, heads, N, N]
    if eager:
        attn = (q * d ** -0.5) @ k.transpose(-1, -2) + full
        out = attn.softmax(-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=full.to(q.dtype))
    out = _reverse(out, window, H, W)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    return out


def swin_flex(window, shift, H, W, heads, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)
    wins = torch.arange(H * W, device=device)
    r, c = wins // W, wins % W
    win_id = (r // window) * (W // window) + c // window
    rows = region_ids(H, window, shift, device=device) if shift else torch.zeros(H, dtype=torch.long, device=device)
    cols = region_ids(W, window, shift, device=device) if shift else torch.zeros(W, dtype=torch.long, device=device)
    region = rows[r] * 3 + cols[c]
    inwin = (r % window) * window + c % window
    idx = relative_position_index((window, window), device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        return win_id[q_idx] == win_id[kv_idx]
    block_mask = create_block_mask(mask_mod, None, None, H * W, H * W, device=device)

    def call(x):
        qkv, table = x["qkv"], x["table"]
        B = qkv.shape[0]
        if shift:
            qkv = torch.roll(qkv, shifts=(-shift, -shift), dims=(1, 2))
        q, k, v = (t.reshape(B, H * W, heads, -1).transpose(1, 2) for t in qkv.unbind(3))

        def score_mod(score, b, h, q_idx, kv_idx):
            bias = table[idx[inwin[q_idx], inwin[kv_idx]], h]
            penalty = torch.where(region[q_idx] == region[kv_idx], 0.0, -100.0)
            return score + bias + penalty
        out = compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)
        out = out.transpose(1, 2).reshape(B, H, W, heads, -1)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return out
    return call


# ===========================================================================================================
# TimeSformer divided space-time, ViViT model 4
# ===========================================================================================================
def tsf_inputs(B, T, N, heads, d, dtype, device, gen, with_cls):
    L = T * N + (1 if with_cls else 0)
    return dict(qkv=torch.randn(B, L, 3, heads, d, generator=gen).to(device, dtype))


def tsf_temporal_fastattn(x, T, backend=None):
    q, k, v = x["qkv"].unbind(2)
    return fastattn.temporal_attention(q, k, v, num_frames=T, backend=backend)


def tsf_temporal_composite(x, T):
    """TimeSformer's 'b (n t) m -> (b n) t m' + attention + back, in the heads layout."""
    q, k, v = x["qkv"].unbind(2)
    B, L, h, d = q.shape
    N = L // T
    to = lambda t: t.reshape(B, N, T, h, d).permute(0, 1, 3, 2, 4).reshape(B * N, h, T, d)  # noqa: E731
    out = F.scaled_dot_product_attention(to(q), to(k), to(v))
    return out.view(B, N, h, T, d).permute(0, 1, 3, 2, 4).reshape(B, L, h, d)


def tsf_spatial_fastattn(x, T, backend=None):
    q, k, v = x["qkv"].unbind(2)
    return fastattn.spatial_attention(q, k, v, num_frames=T, backend=backend)


def tsf_spatial_composite(x, T):
    """TimeSformer: cls repeated per frame, 'b (n t) m -> (b t) n m', cat, attention, cls averaged over frames."""
    q, k, v = x["qkv"].unbind(2)
    B, L, h, d = q.shape
    N = (L - 1) // T

    def to(t):
        cls = t[:, :1].expand(B, T, h, d).reshape(B * T, 1, h, d)
        patches = t[:, 1:].reshape(B, N, T, h, d).permute(0, 2, 1, 3, 4).reshape(B * T, N, h, d)
        return torch.cat([cls, patches], dim=1).transpose(1, 2)  # [(B T), h, 1+N, d]
    out = F.scaled_dot_product_attention(to(q), to(k), to(v)).transpose(1, 2)  # [(B T), 1+N, h, d]
    cls = out[:, 0].reshape(B, T, h, d).mean(1, keepdim=True)
    patches = out[:, 1:].reshape(B, T, N, h, d).permute(0, 2, 1, 3, 4).reshape(B, N * T, h, d)
    return torch.cat([cls, patches], dim=1)


def vivit_fastattn(x, grid, backend=None):
    q, k, v = x["qkv"].unbind(2)
    return fastattn.factorised_dot_product_attention(q, k, v, grid=grid, backend=backend)


def vivit_composite(x, grid):
    """Scenic's factorised dot-product attention: first half of the heads over time, second half over space."""
    q, k, v = x["qkv"].unbind(2)
    B, L, h, d = q.shape
    T, Hs, Ws = grid
    S = Hs * Ws
    half = h // 2

    def time(t):  # [B, T, S, half, d] -> [B*S, half, T, d]
        return t[:, :, :half].reshape(B, T, S, half, d).permute(0, 2, 3, 1, 4).reshape(B * S, half, T, d)

    def space(t):  # -> [B*T, h-half, S, d]
        return t[:, :, half:].reshape(B, T, S, h - half, d).permute(0, 1, 3, 2, 4).reshape(B * T, h - half, S, d)
    ot = F.scaled_dot_product_attention(time(q), time(k), time(v))
    os_ = F.scaled_dot_product_attention(space(q), space(k), space(v))
    ot = ot.view(B, S, half, T, d).permute(0, 3, 1, 2, 4).reshape(B, L, half, d)
    os_ = os_.view(B, T, h - half, S, d).permute(0, 1, 3, 2, 4).reshape(B, L, h - half, d)
    return torch.cat([ot, os_], dim=2)


# ===========================================================================================================
# Perceiver cross-attention
# ===========================================================================================================
def perceiver_inputs(B, N, M, dqk, dv, dtype, device, gen):
    return dict(q=torch.randn(B, 1, N, dqk, generator=gen).to(device, dtype),
                k=torch.randn(B, 1, M, dqk, generator=gen).to(device, dtype),
                v=torch.randn(B, 1, M, dv, generator=gen).to(device, dtype))


def cross_inputs(B, H, N, M, d, dtype, device, gen):
    return dict(q=torch.randn(B, H, N, d, generator=gen).to(device, dtype),
                k=torch.randn(B, H, M, d, generator=gen).to(device, dtype),
                v=torch.randn(B, H, M, d, generator=gen).to(device, dtype))


def perceiver_fastattn(x, backend=None):
    return fastattn.attention(x["q"], x["k"], x["v"], backend=backend)


def perceiver_composite(x):
    return F.scaled_dot_product_attention(x["q"], x["k"], x["v"])


# ===========================================================================================================
# Cases
# ===========================================================================================================
@dataclass
class Case:
    name: str
    description: str
    make_inputs: Callable          # (dtype, device, gen) -> dict of tensors
    impls: Dict[str, Callable]     # name -> (inputs) -> output
    flops_fwd: float
    bytes_fwd: float               # q, k, v read + out written, once (elements * itemsize, at dtype)
    grad_keys: List[str]           # which input tensors get gradients in fwd+bwd


def cases(device: torch.device, quick: bool) -> List[Case]:
    small = quick or device.type == "cpu"
    out: List[Case] = []
    gpu = device.type == "cuda"

    def with_cuda(impls, cuda_impl):
        """On a GPU, also the CUDA C++ kernels (backend="cuda"); "fastattn" is the default dispatch (Triton)."""
        if gpu:
            impls["fastattn-cuda"] = cuda_impl
        return impls

    for name, (B, HW, heads) in {"swin-t-s1": (1 if quick else 4 if small else 64, 56, 3),
                                 "swin-t-s3": (2 if quick else 8 if small else 64, 14, 12)}.items():
        window, d = 7, 32
        for shift in (0, 3):
            nW, N = (HW // window) ** 2, window * window
            impls = {"fastattn": lambda x, s=shift, w=window: swin_fastattn(x, w, s),
                     "composite": lambda x, s=shift, w=window: swin_composite(x, w, s),
                     "eager": lambda x, s=shift, w=window: swin_composite(x, w, s, eager=True)}
            if gpu:
                impls["fastattn-cuda"] = lambda x, s=shift, w=window: swin_fastattn(x, w, s, backend="cuda")
                impls["flex"] = swin_flex(window, shift, HW, HW, heads, device)
            out.append(Case(
                f"{name} shift{shift}", f"B={B} {HW}x{HW} window {window} shift {shift} heads {heads}x{d}",
                lambda dt, dev, g, B=B, HW=HW, heads=heads, d=d, w=window: swin_inputs(B, HW, HW, heads, d, w, dt, dev, g),
                impls, 4.0 * B * nW * heads * N * N * d, 4.0 * B * HW * HW * heads * d, ["qkv", "table"]))

    # Every lambda binds its sizes as default arguments: a closure would read the variables at call time, after
    # the later cases have reassigned them (an earlier version of this file ran the TimeSformer cases with the
    # Perceiver case's N).
    B, T, N, heads, d = (1 if small else 8), 8, 196, 12, 64
    out.append(Case("tsf-temporal", f"B={B} T={T} N={N} heads {heads}x{d} (patches only)",
                    lambda dt, dev, g, B=B, T=T, N=N, h=heads, d=d: tsf_inputs(B, T, N, h, d, dt, dev, g, with_cls=False),
                    with_cuda({"fastattn": lambda x, T=T: tsf_temporal_fastattn(x, T),
                               "composite": lambda x, T=T: tsf_temporal_composite(x, T)},
                              lambda x, T=T: tsf_temporal_fastattn(x, T, backend="cuda")),
                    4.0 * B * N * heads * T * T * d, 4.0 * B * T * N * heads * d, ["qkv"]))
    out.append(Case("tsf-spatial", f"B={B} T={T} N={N}+cls heads {heads}x{d}",
                    lambda dt, dev, g, B=B, T=T, N=N, h=heads, d=d: tsf_inputs(B, T, N, h, d, dt, dev, g, with_cls=True),
                    with_cuda({"fastattn": lambda x, T=T: tsf_spatial_fastattn(x, T),
                               "composite": lambda x, T=T: tsf_spatial_composite(x, T)},
                              lambda x, T=T: tsf_spatial_fastattn(x, T, backend="cuda")),
                    4.0 * B * T * heads * (N + 1) ** 2 * d, 4.0 * B * (T * N + 1) * heads * d, ["qkv"]))

    B, grid, heads, d = (1 if small else 4), ((4 if small else 16), 14, 14), 12, 64
    T, S = grid[0], grid[1] * grid[2]
    out.append(Case("vivit-fdp", f"B={B} grid {grid} heads {heads}x{d} (half time, half space)",
                    lambda dt, dev, g, B=B, T=T, S=S, h=heads, d=d: tsf_inputs(B, T, S, h, d, dt, dev, g, with_cls=False),
                    with_cuda({"fastattn": lambda x, grid=grid: vivit_fastattn(x, grid),
                               "composite": lambda x, grid=grid: vivit_composite(x, grid)},
                              lambda x, grid=grid: vivit_fastattn(x, grid, backend="cuda")),
                    4.0 * B * (heads // 2) * (S * T * T + T * S * S) * d, 4.0 * B * T * S * heads * d, ["qkv"]))

    B, N, M, dqk, dv = (1 if small else 8), (64 if small else 512), (4096 if small else 50176), 261, 261
    out.append(Case("perceiver", f"B={B} latents {N} inputs {M} 1 head qk {dqk} v {dv}",
                    lambda dt, dev, g, B=B, N=N, M=M, dqk=dqk, dv=dv: perceiver_inputs(B, N, M, dqk, dv, dt, dev, g),
                    {"fastattn": perceiver_fastattn, "composite": perceiver_composite},
                    2.0 * B * N * M * (dqk + dv), 1.0 * B * (N * dqk + M * (dqk + dv) + N * dv), ["q", "k", "v"]))

    B, H, N, M, d = (1 if small else 2), 4, (64 if small else 256), (2048 if small else 16384), 64
    out.append(Case("cross-d64", f"B={B} latents {N} inputs {M} heads {H}x{d}",
                    lambda dt, dev, g, B=B, H=H, N=N, M=M, d=d: cross_inputs(B, H, N, M, d, dt, dev, g),
                    with_cuda({"fastattn": perceiver_fastattn, "composite": perceiver_composite},
                              lambda x: perceiver_fastattn(x, backend="cuda")),
                    4.0 * B * H * N * M * d, 1.0 * B * H * (2 * N * d + 2 * M * d), ["q", "k", "v"]))
    return out


# ===========================================================================================================
# Running
# ===========================================================================================================
@dataclass
class Row:
    case: str
    description: str
    dtype: str
    mode: str
    impl: str
    flops: float
    bytes: float
    time_ms: Optional[float] = None
    time_ms_min: Optional[float] = None
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    speedup_vs_composite: Optional[float] = None
    max_abs_error: Optional[float] = None
    errors: Dict[str, float] = field(default_factory=dict)
    note: Optional[str] = None


def _call(fn, x: Dict[str, torch.Tensor], mode: str, grad_keys, dout):
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return {"out": fn(x)}
        return call

    leaves = {k: (t.detach().requires_grad_(True) if k in grad_keys else t) for k, t in x.items()}

    def call():
        for k in grad_keys:
            leaves[k].grad = None
        out = fn(leaves)
        out.backward(dout)
        return dict({"out": out.detach()}, **{f"d{k}": leaves[k].grad for k in grad_keys})
    return call


def run_case(case: Case, dtype, device, quick: bool, impls: Optional[List[str]], print_row) -> List[Row]:
    gen = torch.Generator().manual_seed(0)
    x = case.make_inputs(dtype, device, gen)
    rows: List[Row] = []
    # The oracle: the composite in float64 (on the device), output and gradients.
    x64 = {k: t.double() for k, t in x.items()}
    ref_out = case.impls["composite"](x64)
    dout64 = torch.randn(ref_out.shape, generator=gen, dtype=torch.float64).to(device)
    ref = {}
    try:
        ref = _call(case.impls["composite"], x64, "fwd+bwd", case.grad_keys, dout64)()
    except Exception as e:  # noqa: BLE001
        print(f"  float64 oracle for {case.name} failed: {short_error(e)}")
    del x64
    dout = dout64.to(dtype)
    for mode in MODES:
        group, calls = [], {}
        for impl, fn in case.impls.items():
            if impls and impl not in impls and impl != "composite":
                continue
            flops = case.flops_fwd * (3.5 if mode == "fwd+bwd" else 1.0)
            row = Row(case.name, case.description, SHORT_DTYPE[dtype], mode, impl, flops,
                      case.bytes_fwd * dtype.itemsize)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    call = _call(fn, x, mode, case.grad_keys, dout)
                    got = call()
                    if ref:
                        row.errors = {k: (got[k].double() - ref[k]).abs().max().item() for k in got if k in ref}
                        row.max_abs_error = max(row.errors.values())
                    del got
                calls[impl] = call
            except Exception as e:  # noqa: BLE001 - one implementation's failure must not end the run
                row.note = short_error(e)
            group.append(row)
        time_group({r.impl: r for r in group}, calls, device, quick)  # the implementations timed in rounds
        del calls
        for row in group:
            if row.time_ms is not None:
                row.tflops = row.flops / (row.time_ms * 1e-3) / 1e12
                if mode == "fwd":
                    row.gbps = row.bytes / (row.time_ms * 1e-3) / 1e9
        base = next((r.time_ms for r in group if r.impl == "composite"), None)
        for r in group:
            if base and r.time_ms:
                r.speedup_vs_composite = base / r.time_ms
            print_row(r)
        rows += group
    return rows


def format_row(r: Row) -> str:
    f = lambda v, s: "n/a" if v is None else format(v, s)  # noqa: E731
    return (f"{r.case:<16} {r.dtype:<5} {r.mode:<8} {r.impl:<10} {f(r.time_ms, '9.3f')} {f(r.tflops, '8.3g')} "
            f"{f(r.gbps, '8.3g')} {f(r.speedup_vs_composite, '6.2f')}x {f(r.max_abs_error, '8.1e')}  {r.note or ''}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="scaled-down shapes (always on CPU)")
    ap.add_argument("--dtypes", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--cases", default=None,
                    help="comma-separated prefixes of case names (swin,tsf,vivit,perceiver,cross)")
    ap.add_argument("--impls", default=None, help="comma-separated implementations (composite is always run)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out-dir", default=str(REPO_ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    os.environ.pop("FASTATTN_POISON_OUTPUTS", None)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [DTYPES[n] for n in (args.dtypes.split(",") if args.dtypes else
                                  (["bf16"] if device.type == "cuda" else ["fp32"]))]
    selected = [c for c in cases(device, args.quick)
                if not args.cases or any(c.name.startswith(p) for p in args.cases.split(","))]
    impls = args.impls.split(",") if args.impls else None
    env = environment(device)
    env["config"] = {"quick": args.quick or device.type == "cpu", "dtypes": [SHORT_DTYPE[d] for d in dtypes],
                     "cases": [f"{c.name}: {c.description}" for c in selected]}
    print(f"fastattn {fastattn.__version__} layout-variant benchmark on {env['device']['name']}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'case':<16} {'dtype':<5} {'mode':<8} {'impl':<10} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} "
          f"{'vs comp':>7} {'max err':>8}  note")
    start = time.perf_counter()
    rows: List[Row] = []
    for dtype in dtypes:
        for case in selected:
            rows += run_case(case, dtype, device, args.quick, impls, lambda r: print(format_row(r), flush=True))
    env["elapsed_s"] = round(time.perf_counter() - start, 1)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"ops-{device_slug(device)}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(dict(env, rows=[asdict(r) for r in rows]), indent=1) + "\n")
    print(f"\n{len(rows)} rows in {env['elapsed_s']:.0f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
