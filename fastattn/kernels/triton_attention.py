"""FlashAttention-2 style attention in Triton: forward (online softmax, saves the log-sum-exp) and backward
(recomputes the probabilities tile by tile; dK/dV and dQ in two deterministic kernels, no atomics).

Read top to bottom: helpers -> configurations -> forward kernel -> backward kernels -> launchers.

Notation inside the kernels:
  * scores live in the log2 domain: s2 = (scale * q.k + mask) * log2(e), so softmax uses exp2;
  * a "row" is a query (index m), a "column" a key (index n); one program owns BLOCK_M rows (forward, dQ)
    or BLOCK_N columns (dK/dV) of one (batch, head);
  * head dims are padded to powers of two (BLOCK_DQK, BLOCK_DV >= 16) and masked on load, so any head dim
    1..256 works; lengths that are not block multiples are masked the same way.
  * GQA: query head h reads key/value head h // GROUP.  The dK/dV program of a key/value head loops over its
    GROUP query heads, so the reduction over the group happens in registers, deterministically.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2


# ===========================================================================================================
# Helpers
# ===========================================================================================================
@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    # DOT_PRECISION only matters for fp32 inputs ("ieee" = exact fp32; fp16/bf16 always use tensor cores).
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _dropout_keep(seed, offs_m, offs_n, bh, dropout_threshold):
    """Keep-mask of a [M, N] tile: Philox-4x32-10 keyed by the seed, counter (n, m, b*Hq+h, 0).
    Mirrored exactly by fastattn.backends.reference.dropout_keep_mask."""
    zeros = offs_m[:, None] * 0 + offs_n[None, :] * 0
    c0 = (offs_n[None, :] + zeros).to(tl.uint32)
    c1 = (offs_m[:, None] + zeros).to(tl.uint32)
    c2 = (bh + zeros).to(tl.uint32)
    c3 = zeros.to(tl.uint32)
    r0, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    return (r0 >> 8).to(tl.int32) >= dropout_threshold


@triton.jit
def _token_offsets(offs, w, stride_y, stride_x, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W,
                   LAYOUT: tl.constexpr):
    """Element offsets (int64) of the tokens `offs` of one group.

    LAYOUT 0 (dense): token i of a [batch, head] slice sits at i * stride_y.
    LAYOUT 1 (Swin windows, image layout [B, H, W, heads, d]): token i of window w is at position
    (y', x') = (window row * WIN_H + i // WIN_W, window column * WIN_W + i % WIN_W) of the shifted grid, which
    holds pixel ((y' + SHIFT_H) mod UN_H, (x' + SHIFT_W) mod UN_W) -- torch.roll by (-SHIFT_H, -SHIFT_W) --
    when (y', x') lies in the UN_H x UN_W region the shift wraps in (the whole image unless it is padded), and
    pixel (y', x') otherwise.  Partition, shift and their reverse are this index map: no copies."""
    if LAYOUT == 0:
        return offs.to(tl.int64) * stride_y
    else:
        yp = (w // WINDOWS_W) * WIN_H + offs // WIN_W
        xp = (w % WINDOWS_W) * WIN_W + offs % WIN_W
        inside = (yp < UN_H) & (xp < UN_W)
        y = tl.where(inside, (yp + SHIFT_H) % UN_H, yp)
        x = tl.where(inside, (xp + SHIFT_W) % UN_W, xp)
        return y.to(tl.int64) * stride_y + x.to(tl.int64) * stride_x


@triton.jit
def _swin_region(p, L, WIN, SHIFT):
    """Swin's region id along one axis of the shifted grid: timm's slices (0, -WIN) -> 0, (-WIN, -SHIFT) -> 1,
    (-SHIFT, None) -> 2 with Python slice semantics (a zero shift makes the whole axis region 2)."""
    r = tl.where(p >= L - SHIFT, 2, tl.where(p >= L - WIN, 1, 0))
    return tl.where(SHIFT == 0, 2, r)


@triton.jit
def _modified_scores(s2, offs_m, offs_n, Mask, mask_base, stride_mm, stride_mn,
                     LEN_Q, LEN_K, causal_offset,
                     CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASKED: tl.constexpr,
                     h, w, Table, stride_tn, stride_th, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, IMG_H, IMG_W,
                     REL_BIAS: tl.constexpr, REGION_MASK: tl.constexpr):
    """Score modifications on a [BLOCK_M, BLOCK_N] tile of log2-domain scores:
      * the additive float mask or the bool mask (MASK_KIND 2 / 1), read through broadcast strides;
      * Swin: the relative-position bias Table[(dy + WIN_H - 1) * (2 WIN_W - 1) + dx + WIN_W - 1, h] for the
        in-window offsets (dy, dx) of query and key (REL_BIAS), and -100 between tokens of different shift
        regions of the padded image grid (REGION_MASK);
      * only in MASKED tiles: key bounds and causal masking (key n visible to query m iff
        n <= m + causal_offset).  Interior tiles (MASKED=False) are fully in bounds and visible."""
    in_bounds = (offs_m[:, None] < LEN_Q) & (offs_n[None, :] < LEN_K)
    if MASK_KIND != 0:
        mask_ptrs = Mask + mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        if MASK_KIND == 1:
            attend = tl.load(mask_ptrs, mask=in_bounds, other=0)
            s2 = tl.where(attend != 0, s2, float("-inf"))
        else:
            bias = tl.load(mask_ptrs, mask=in_bounds, other=0.0).to(s2.dtype)
            s2 = s2 + bias * 1.4426950408889634  # the mask is in natural-log units; scores are log2
    if REL_BIAS:
        dy = (offs_m // WIN_W)[:, None] - (offs_n // WIN_W)[None, :] + (WIN_H - 1)
        dx = (offs_m % WIN_W)[:, None] - (offs_n % WIN_W)[None, :] + (WIN_W - 1)
        bias = tl.load(Table + (dy * (2 * WIN_W - 1) + dx) * stride_tn + h * stride_th, mask=in_bounds, other=0.0)
        s2 = s2 + bias.to(s2.dtype) * 1.4426950408889634
    if REGION_MASK:
        yq = (w // WINDOWS_W) * WIN_H + offs_m // WIN_W
        xq = (w % WINDOWS_W) * WIN_W + offs_m % WIN_W
        yk = (w // WINDOWS_W) * WIN_H + offs_n // WIN_W
        xk = (w % WINDOWS_W) * WIN_W + offs_n % WIN_W
        region_q = 3 * _swin_region(yq, IMG_H, WIN_H, SHIFT_H) + _swin_region(xq, IMG_W, WIN_W, SHIFT_W)
        region_k = 3 * _swin_region(yk, IMG_H, WIN_H, SHIFT_H) + _swin_region(xk, IMG_W, WIN_W, SHIFT_W)
        s2 = s2 + tl.where(region_q[:, None] != region_k[None, :], -100.0 * 1.4426950408889634, 0.0)
    if MASKED:
        keep = offs_n[None, :] < LEN_K
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
        s2 = tl.where(keep, s2, float("-inf"))
    return s2


# ===========================================================================================================
# Configurations.  Picked by a fixed table (no autotuning), so every configuration the launcher can use is
# known ahead of time and compiled by the test suite for sm_80 and sm_90 (see all_kernel_specs()).
# Keyed by kernel, dtype class and the padded head dim max(BLOCK_DQK, BLOCK_DV).
# ===========================================================================================================
@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (block_m, block_n, num_warps, num_stages); "half" = fp16/bf16 on tensor cores, "fp32"/"fp64" on FMA units
_CONFIGS: Dict[Tuple[str, str, int], KernelConfig] = {}
HEAD_BUCKETS = (16, 32, 64, 128, 256, 512)  # padded head dims with a configuration
# Head dims 257..512 (Perceiver's 261-channel cross-attention) pad to 512: small tiles, twice the MMA work of the
# true width at 261.  float64 stops at 256: its smallest d512 backward tiles need 259 KiB of shared memory.
MAX_HEAD_DIM_BY_DTYPE_CLASS = {"half": 512, "fp32": 512, "fp64": 256}


def _table(kernel, dtype_class, rows):
    for head_dim, cfg in rows.items():
        _CONFIGS[(kernel, dtype_class, head_dim)] = KernelConfig(*cfg)


_table("fwd", "half", {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3),
                       128: (128, 64, 8, 3), 256: (64, 64, 8, 2), 512: (32, 32, 8, 1)})
_table("fwd", "fp32", {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 32, 4, 2),
                       128: (32, 32, 4, 2), 256: (32, 16, 8, 1), 512: (16, 16, 8, 1)})
_table("fwd", "fp64", {16: (32, 32, 4, 1), 32: (32, 32, 4, 1), 64: (32, 16, 4, 1),
                       128: (16, 16, 4, 1), 256: (16, 16, 8, 1)})
# Few queries (Lq <= 16: decoding with a KV cache, tiny latent arrays): 16-row query tiles, long key tiles.
_table("fwd_small_q", "half", {16: (16, 128, 4, 3), 32: (16, 128, 4, 3), 64: (16, 128, 4, 3),
                               128: (16, 64, 4, 3), 256: (16, 64, 8, 2), 512: (16, 32, 8, 1)})
_table("fwd_small_q", "fp32", {16: (16, 64, 4, 2), 32: (16, 64, 4, 2), 64: (16, 64, 4, 2),
                               128: (16, 32, 4, 2), 256: (16, 16, 8, 1), 512: (16, 16, 8, 1)})
_table("fwd_small_q", "fp64", {16: (16, 32, 4, 1), 32: (16, 32, 4, 1), 64: (16, 16, 4, 1),
                               128: (16, 16, 4, 1), 256: (16, 16, 8, 1)})
# Swin windows (N = 49 tokens for 7x7): 64-row tiles waste 15 rows where 128-row tiles would waste 79.
_table("fwd_window", "half", {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2),
                              128: (64, 64, 8, 2), 256: (64, 32, 8, 1), 512: (32, 32, 8, 1)})
_table("fwd_window", "fp32", {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 32, 4, 2),
                              128: (32, 32, 4, 2), 256: (32, 16, 8, 1), 512: (16, 16, 8, 1)})
_table("fwd_window", "fp64", {16: (32, 32, 4, 1), 32: (32, 32, 4, 1), 64: (32, 16, 4, 1),
                              128: (16, 16, 4, 1), 256: (16, 16, 8, 1)})
# d128 dK/dV: 64 x 64 tiles on one warpgroup.  The earlier (32, 64, 8 warps) gave each warpgroup 32 key rows, below
# wgmma's 64, so on sm_90 Triton lowered most of its dots to mma.sync (SASS: 32 HMMA, 4 HGMMA) -- the d128
# backward measured at half the d64 one on an H200 (bench/NOTES.md, entry 10).  d256 dK/dV would need 137 KiB of
# shared memory for wgmma tiles (over sm_86/89's 99 KiB), so it stays on mma.sync.
_table("bwd_dkdv", "half", {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2),
                            128: (64, 64, 4, 2), 256: (32, 32, 8, 1), 512: (16, 32, 8, 1)})
_table("bwd_dkdv", "fp32", {16: (32, 32, 4, 1), 32: (32, 32, 4, 1), 64: (32, 32, 4, 1),
                            128: (16, 32, 4, 1), 256: (16, 16, 8, 1), 512: (16, 16, 8, 1)})
_table("bwd_dkdv", "fp64", {16: (16, 32, 4, 1), 32: (16, 32, 4, 1), 64: (16, 16, 4, 1),
                            128: (16, 16, 4, 1), 256: (16, 16, 8, 1)})
# d256 dQ: 64-row tiles so that each of the two warpgroups holds 64 rows x 128 columns of dQ (wgmma on sm_90; the
# (32, 32) tiles compiled to mma.sync); 96 KiB of shared memory on sm_80/86/89, 101 KiB on sm_90.
_table("bwd_dq", "half", {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2),
                          128: (64, 32, 8, 2), 256: (64, 32, 8, 1), 512: (32, 16, 8, 1)})
_table("bwd_dq", "fp32", {16: (32, 32, 4, 1), 32: (32, 32, 4, 1), 64: (32, 32, 4, 1),
                          128: (32, 16, 4, 1), 256: (16, 16, 8, 1), 512: (16, 16, 8, 1)})
_table("bwd_dq", "fp64", {16: (32, 16, 4, 1), 32: (32, 16, 4, 1), 64: (16, 16, 4, 1),
                          128: (16, 16, 4, 1), 256: (16, 16, 8, 1)})

def preprocess_block_m(block_dv: int) -> int:
    # rows per program of the Delta kernel: 2 x [BLOCK_M, BLOCK_DV] fp32 tiles in registers, so shrink with D
    return max(16, min(64, 4096 // block_dv))


merge_block_m = preprocess_block_m  # the split-KV merge holds the same two tiles per row block


def dtype_class(dtype: torch.dtype) -> str:
    return {torch.float16: "half", torch.bfloat16: "half", torch.float32: "fp32", torch.float64: "fp64"}[dtype]


def padded_head_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def pick_config(kernel: str, dtype: torch.dtype, dim_qk: int, dim_v: int) -> KernelConfig:
    head = max(padded_head_dim(dim_qk), padded_head_dim(dim_v))
    return _CONFIGS[(kernel, dtype_class(dtype), head)]


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


# ===========================================================================================================
# Forward
# ===========================================================================================================
@triton.jit
def _fwd_key_blocks(
    acc, l_i, m_i, q, k_base, v_base, Mask, mask_base, seed, pid_bh, offs_m,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    LEN_Q, LEN_K, DIM_QK, DIM_V, scale_log2, causal_offset, dropout_threshold, dropout_scale, lo, hi,
    h, w, stride_kx, stride_vx, Table, stride_tn, stride_th,
    WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W, IMG_H, IMG_W,
    BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MASKED: tl.constexpr, LAYOUT: tl.constexpr, REL_BIAS: tl.constexpr, REGION_MASK: tl.constexpr,
):
    """Online softmax over the key blocks starting in [lo, hi).  MASKED=False: interior blocks, every key in
    bounds and visible to every row of the program, so loads and scores need no key masking."""
    ACC: tl.constexpr = acc.dtype
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k_rows = _token_offsets(offs_n, w, stride_kn, stride_kx, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W,
                                UN_H, UN_W, LAYOUT)
        v_rows = _token_offsets(offs_n, w, stride_vn, stride_vx, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W,
                                UN_H, UN_W, LAYOUT)
        kT_ptrs = k_base + k_rows[None, :] + offs_dqk[:, None] * stride_kd
        v_ptrs = v_base + v_rows[:, None] + offs_dv[None, :] * stride_vd
        if MASKED:
            kT = tl.load(kT_ptrs, mask=(offs_n[None, :] < LEN_K) & (offs_dqk[:, None] < DIM_QK), other=0.0)
        else:
            kT = tl.load(kT_ptrs, mask=offs_dqk[:, None] < DIM_QK, other=0.0)
        s2 = _dot(q, kT, DOT_PRECISION).to(ACC) * scale_log2
        s2 = _modified_scores(s2, offs_m, offs_n, Mask, mask_base, stride_mm, stride_mn,
                              LEN_Q, LEN_K, causal_offset, CAUSAL, MASK_KIND, MASKED,
                              h, w, Table, stride_tn, stride_th, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W,
                              IMG_H, IMG_W, REL_BIAS, REGION_MASK)

        # Online softmax.  m_new is the new running max; a row that has seen only -inf scores so far keeps
        # m_new = -inf, and we subtract 0 instead so exp2 never sees (-inf) - (-inf).
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)          # rescales what was accumulated under the old max
        p = tl.exp2(s2 - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)      # the normaliser uses the probabilities before dropout
        if DROPOUT:
            keep = _dropout_keep(seed, offs_m, offs_n, pid_bh, dropout_threshold)
            p = tl.where(keep, p * dropout_scale, 0.0)
        if MASKED:
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < LEN_K) & (offs_dv[None, :] < DIM_V), other=0.0)
        else:
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < DIM_V, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION).to(ACC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _key_ranges(pid_m, LEN_K, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key range of the query block pid_m: [0, interior_end) needs no masking, [interior_end, end) does.
    Causal: query m sees keys n <= m + causal_offset, so the block's first row bounds the keys that all its
    rows see, and its last row the keys that any row sees."""
    if CAUSAL:
        interior_end = tl.minimum(LEN_K, tl.maximum(0, pid_m * BLOCK_M + causal_offset + 1))
        end = tl.minimum(LEN_K, tl.maximum(0, (pid_m + 1) * BLOCK_M + causal_offset))
    else:
        interior_end = LEN_K
        end = LEN_K
    interior_end = interior_end // BLOCK_N * BLOCK_N
    return interior_end, end


@triton.jit
def _attn_fwd(
    Q, K, V, Mask, Out, Lse, seed,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od, stride_os, stride_lse_s,
    H_Q, GROUP, LEN_Q, LEN_K, DIM_QK, DIM_V, KEYS_PER_SPLIT,
    scale_log2_hi, scale_log2_lo, causal_offset, dropout_threshold, dropout_scale_hi, dropout_scale_lo,
    NUM_WINDOWS, stride_qx, stride_kx, stride_vx, stride_ox, Table, stride_tn, stride_th,
    WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W, IMG_H, IMG_W,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    LAYOUT: tl.constexpr, REL_BIAS: tl.constexpr, REGION_MASK: tl.constexpr,
):
    """One program: BLOCK_M queries of one group against the keys of one split
    [split * KEYS_PER_SPLIT, (split + 1) * KEYS_PER_SPLIT) (one split = all keys, unless split-KV).
    A group is a (batch, head) slice (LAYOUT 0) or a (batch, window, head) window of an image (LAYOUT 1:
    program axis 1 enumerates (b * NUM_WINDOWS + w) * H_Q + h; rows are addressed by _token_offsets).
    Writes the output normalised over its own keys and the matching LSE; with several splits these are
    partial results in a float32 workspace (stride_os, stride_lse_s), merged by _attn_fwd_merge."""
    ACC: tl.constexpr = Lse.dtype.element_ty  # float32, or float64 for float64 inputs
    # Float arguments arrive as float32; each comes as a (hi, lo) float32 pair so float64 kernels get ~48 bits.
    scale_log2 = tl.cast(scale_log2_hi, ACC) + tl.cast(scale_log2_lo, ACC)
    dropout_scale = tl.cast(dropout_scale_hi, ACC) + tl.cast(dropout_scale_lo, ACC)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    group = pid_bh // H_Q
    b = (group // NUM_WINDOWS).to(tl.int64)
    w = group % NUM_WINDOWS
    h = (pid_bh % H_Q).to(tl.int64)
    h_kv = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < LEN_Q
    q_rows = _token_offsets(offs_m, w, stride_qm, stride_qx, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W,
                            LAYOUT)

    q = tl.load(Q + b * stride_qb + h * stride_qh + q_rows[:, None] + offs_dqk[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_dqk[None, :] < DIM_QK), other=0.0)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    mask_base = b * stride_mb + h * stride_mh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)  # running row max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)                 # running row sum of exp2(s2 - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)

    # This split's keys, intersected with the interior (unmasked) and visible (causal) ranges of the block.
    # KEYS_PER_SPLIT is a multiple of BLOCK_N, so every range starts on a key-block boundary.
    split_lo = split * KEYS_PER_SPLIT
    split_hi = tl.minimum(LEN_K, split_lo + KEYS_PER_SPLIT)
    interior_end, end = _key_ranges(pid_m, LEN_K, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_key_blocks(
        acc, l_i, m_i, q, k_base, v_base, Mask, mask_base, seed, pid_bh, offs_m,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        LEN_Q, LEN_K, DIM_QK, DIM_V, scale_log2, causal_offset, dropout_threshold, dropout_scale,
        split_lo, tl.minimum(interior_end, split_hi),
        h, w, stride_kx, stride_vx, Table, stride_tn, stride_th,
        WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W, IMG_H, IMG_W,
        BLOCK_N, BLOCK_DQK, BLOCK_DV, CAUSAL, MASK_KIND, DROPOUT, DOT_PRECISION, False,
        LAYOUT, REL_BIAS, REGION_MASK)
    acc, l_i, m_i = _fwd_key_blocks(
        acc, l_i, m_i, q, k_base, v_base, Mask, mask_base, seed, pid_bh, offs_m,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        LEN_Q, LEN_K, DIM_QK, DIM_V, scale_log2, causal_offset, dropout_threshold, dropout_scale,
        tl.maximum(interior_end, split_lo), tl.minimum(end, split_hi),
        h, w, stride_kx, stride_vx, Table, stride_tn, stride_th,
        WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W, IMG_H, IMG_W,
        BLOCK_N, BLOCK_DQK, BLOCK_DV, CAUSAL, MASK_KIND, DROPOUT, DOT_PRECISION, True,
        LAYOUT, REL_BIAS, REGION_MASK)

    # A row with no visible key (l_i == 0) outputs 0 and lse = -inf.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_rows = _token_offsets(offs_m, w, stride_om, stride_ox, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W,
                            LAYOUT)
    split64 = split.to(tl.int64)
    tl.store(Out + split64 * stride_os + b * stride_ob + h * stride_oh + o_rows[:, None]
             + offs_dv[None, :] * stride_od, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DIM_V))
    tl.store(Lse + split64 * stride_lse_s + pid_bh.to(tl.int64) * LEN_Q + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_fwd_merge(
    OutSplit, LseSplit, Out, Lse,
    stride_os, stride_lse_s, stride_ob, stride_oh, stride_om, stride_od,
    H_Q, LEN_Q, DIM_V, NUM_SPLITS,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Split-KV merge (flash-decoding): with O_s, LSE_s each split's output (normalised over its keys) and
    log-sum-exp, the full result is  LSE = log sum_s exp(LSE_s)  and  O = sum_s exp(LSE_s - LSE) O_s.
    Computed online over the splits with the running-max rescale of the forward; splits that saw no key
    have LSE_s = -inf and weigh 0; a row no split could see gets O = 0, LSE = -inf."""
    ACC: tl.constexpr = Lse.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_Q).to(tl.int64)
    h = (pid_bh % H_Q).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    ok = (offs_m[:, None] < LEN_Q) & (offs_d[None, :] < DIM_V)
    row = pid_bh.to(tl.int64) * LEN_Q + offs_m
    # the workspace is contiguous [S, B, Hq, Lq, Dv]: (bh, m, d) offsets are the same in every split
    part = row[:, None] * DIM_V + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    for s in range(0, NUM_SPLITS):
        s64 = tl.cast(s, tl.int64)
        lse_s = tl.load(LseSplit + s64 * stride_lse_s + row, mask=offs_m < LEN_Q, other=float("-inf")).to(ACC)
        o_s = tl.load(OutSplit + s64 * stride_os + part, mask=ok, other=0.0).to(ACC)
        m_new = tl.maximum(m_i, lse_s)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_sub)
        w = tl.exp(lse_s - m_sub)
        acc = acc * alpha[:, None] + w[:, None] * o_s
        l_i = l_i * alpha + w
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=ok)
    tl.store(Lse + row, lse, mask=offs_m < LEN_Q)


# ===========================================================================================================
# Backward
# ===========================================================================================================
@triton.jit
def _attn_bwd_preprocess(
    Out, dOut, dLse, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H_Q, LEN_Q, DIM_V,
    NUM_WINDOWS, stride_ox, stride_dox, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_DLSE: tl.constexpr, LAYOUT: tl.constexpr,
):
    """Delta = rowsum(dO * O) - dLse.  dS = P * (dP - Delta): the dLse term is the gradient flowing into the
    returned log-sum-exp (d lse / d s = P), folded into the same row constant."""
    ACC: tl.constexpr = Delta.dtype.element_ty  # float32, or float64 for float64 inputs
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    group = pid_bh // H_Q
    b = (group // NUM_WINDOWS).to(tl.int64)
    w = group % NUM_WINDOWS
    h = (pid_bh % H_Q).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    ok = (offs_m[:, None] < LEN_Q) & (offs_d[None, :] < DIM_V)
    o_rows = _token_offsets(offs_m, w, stride_om, stride_ox, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W,
                            LAYOUT)
    do_rows = _token_offsets(offs_m, w, stride_dom, stride_dox, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H,
                             UN_W, LAYOUT)
    o = tl.load(Out + b * stride_ob + h * stride_oh + o_rows[:, None] + offs_d[None, :] * stride_od,
                mask=ok, other=0.0).to(ACC)
    do = tl.load(dOut + b * stride_dob + h * stride_doh + do_rows[:, None] + offs_d[None, :] * stride_dod,
                 mask=ok, other=0.0).to(ACC)
    delta = tl.sum(o * do, 1)
    row = pid_bh.to(tl.int64) * LEN_Q + offs_m
    if HAS_DLSE:
        delta -= tl.load(dLse + row, mask=offs_m < LEN_Q, other=0.0)
    tl.store(Delta + row, delta, mask=offs_m < LEN_Q)


@triton.jit
def _load_row_stats(Lse, Delta, row, row_ok):
    # lse in log2 units; a fully masked row (lse = -inf) becomes +inf so that exp2(s2 - lse2) = 0 there.
    lse2 = tl.load(Lse + row, mask=row_ok, other=float("-inf")) * 1.4426950408889634
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    delta = tl.load(Delta + row, mask=row_ok, other=0.0)
    return lse2, delta


@triton.jit
def _dkdv_query_blocks(
    dk, dv, k, v, q_base, do_base, Mask, mask_base, Lse, Delta, seed, bh, offs_n,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
    LEN_Q, LEN_K, DIM_QK, DIM_V, scale_log2, causal_offset, dropout_threshold, dropout_scale, lo, hi,
    h, w, stride_qx, stride_dox, Table, stride_tn, stride_th,
    WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W, IMG_H, IMG_W,
    BLOCK_M: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MASKED: tl.constexpr, LAYOUT: tl.constexpr, REL_BIAS: tl.constexpr, REGION_MASK: tl.constexpr,
):
    """Accumulates dK, dV of one key block over the query blocks starting in [lo, hi) of one query head.
    MASKED=False skips causal and key-bounds masking: keys past LEN_K then carry garbage, but the rows of dK
    and dV they produce depend on their own column only and are never stored."""
    ACC: tl.constexpr = dk.dtype
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        row_ok = offs_m < LEN_Q
        q_rows = _token_offsets(offs_m, w, stride_qm, stride_qx, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H,
                                UN_W, LAYOUT)
        do_rows = _token_offsets(offs_m, w, stride_dom, stride_dox, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H,
                                 UN_W, LAYOUT)
        q = tl.load(q_base + q_rows[:, None] + offs_dqk[None, :] * stride_qd,
                    mask=row_ok[:, None] & (offs_dqk[None, :] < DIM_QK), other=0.0)
        do = tl.load(do_base + do_rows[:, None] + offs_dv[None, :] * stride_dod,
                     mask=row_ok[:, None] & (offs_dv[None, :] < DIM_V), other=0.0)
        lse2, delta = _load_row_stats(Lse, Delta, bh * LEN_Q + offs_m, row_ok)

        s2 = _dot(q, tl.trans(k), DOT_PRECISION).to(ACC) * scale_log2
        s2 = _modified_scores(s2, offs_m, offs_n, Mask, mask_base, stride_mm, stride_mn,
                              LEN_Q, LEN_K, causal_offset, CAUSAL, MASK_KIND, MASKED,
                              h, w, Table, stride_tn, stride_th, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W,
                              IMG_H, IMG_W, REL_BIAS, REGION_MASK)
        p = tl.exp2(s2 - lse2[:, None])                         # P, recomputed [M, N]
        dp = _dot(do, tl.trans(v), DOT_PRECISION).to(ACC)       # dO V^T
        if DROPOUT:
            keep = _dropout_keep(seed, offs_m, offs_n, bh.to(tl.int32), dropout_threshold)
            p_dropped = tl.where(keep, p * dropout_scale, 0.0)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        else:
            p_dropped = p
        dv += _dot(tl.trans(p_dropped.to(do.dtype)), do, DOT_PRECISION).to(ACC)
        ds = p * (dp - delta[:, None])                          # dL/d(scaled score)
        dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_PRECISION).to(ACC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, Mask, dOut, Lse, Delta, dK, dV, seed,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H_Q, H_KV, GROUP, LEN_Q, LEN_K, DIM_QK, DIM_V,
    scale_hi, scale_lo, scale_log2_hi, scale_log2_lo, causal_offset, dropout_threshold,
    dropout_scale_hi, dropout_scale_lo,
    NUM_WINDOWS, stride_qx, stride_kx, stride_vx, stride_dox, stride_dkx, stride_dvx, Table, stride_tn, stride_th,
    WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W, IMG_H, IMG_W,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    LAYOUT: tl.constexpr, REL_BIAS: tl.constexpr, REGION_MASK: tl.constexpr,
):
    """One program: BLOCK_N keys of one group's kv head (program axis 1: group * H_KV + kv head); loops over
    the GROUP query heads and all query blocks that can see these keys, accumulating dK and dV in registers."""
    ACC: tl.constexpr = Delta.dtype.element_ty  # float32, or float64 for float64 inputs
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)  # (hi, lo) float32 pairs: see _attn_fwd
    scale_log2 = tl.cast(scale_log2_hi, ACC) + tl.cast(scale_log2_lo, ACC)
    dropout_scale = tl.cast(dropout_scale_hi, ACC) + tl.cast(dropout_scale_lo, ACC)
    pid_n = tl.program_id(0)
    pid_bhkv = tl.program_id(1)
    group_id = pid_bhkv // H_KV
    b = (group_id // NUM_WINDOWS).to(tl.int64)
    w = group_id % NUM_WINDOWS
    h_kv = (pid_bhkv % H_KV).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < LEN_K
    k_rows = _token_offsets(offs_n, w, stride_kn, stride_kx, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W,
                            LAYOUT)
    v_rows = _token_offsets(offs_n, w, stride_vn, stride_vx, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W,
                            LAYOUT)

    k = tl.load(K + b * stride_kb + h_kv * stride_kh + k_rows[:, None] + offs_dqk[None, :] * stride_kd,
                mask=col_ok[:, None] & (offs_dqk[None, :] < DIM_QK), other=0.0)
    v = tl.load(V + b * stride_vb + h_kv * stride_vh + v_rows[:, None] + offs_dv[None, :] * stride_vd,
                mask=col_ok[:, None] & (offs_dv[None, :] < DIM_V), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)

    # Query blocks [lo, interior_start) straddle the causal diagonal of this key block (masked);
    # [interior_start, LEN_Q) see all of its keys.  Query m sees key n iff n <= m + causal_offset, so the
    # first block that sees any key here starts at (first key - causal_offset), and every row sees every key
    # from (last key - causal_offset) on; both rounded to query-block boundaries.
    lo = 0
    interior_start = 0
    if CAUSAL:
        n_first = pid_n * BLOCK_N
        lo = tl.maximum(0, n_first - causal_offset) // BLOCK_M * BLOCK_M
        interior_start = tl.cdiv(tl.maximum(0, n_first + BLOCK_N - 1 - causal_offset), BLOCK_M) * BLOCK_M
    masked_end = tl.minimum(interior_start, LEN_Q)
    for g in range(0, GROUP):
        h = h_kv * GROUP + g
        bh = group_id.to(tl.int64) * H_Q + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = dOut + b * stride_dob + h * stride_doh
        mask_base = b * stride_mb + h * stride_mh
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v, q_base, do_base, Mask, mask_base, Lse, Delta, seed, bh, offs_n,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
            LEN_Q, LEN_K, DIM_QK, DIM_V, scale_log2, causal_offset, dropout_threshold, dropout_scale,
            lo, masked_end, h, w, stride_qx, stride_dox, Table, stride_tn, stride_th,
            WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W, IMG_H, IMG_W,
            BLOCK_M, BLOCK_DQK, BLOCK_DV, CAUSAL, MASK_KIND, DROPOUT, DOT_PRECISION, True,
            LAYOUT, REL_BIAS, REGION_MASK)
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v, q_base, do_base, Mask, mask_base, Lse, Delta, seed, bh, offs_n,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
            LEN_Q, LEN_K, DIM_QK, DIM_V, scale_log2, causal_offset, dropout_threshold, dropout_scale,
            interior_start, LEN_Q, h, w, stride_qx, stride_dox, Table, stride_tn, stride_th,
            WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W, IMG_H, IMG_W,
            BLOCK_M, BLOCK_DQK, BLOCK_DV, CAUSAL, MASK_KIND, DROPOUT, DOT_PRECISION, False,
            LAYOUT, REL_BIAS, REGION_MASK)

    dk *= scale
    dk_rows = _token_offsets(offs_n, w, stride_dkn, stride_dkx, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H,
                             UN_W, LAYOUT)
    dv_rows = _token_offsets(offs_n, w, stride_dvn, stride_dvx, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H,
                             UN_W, LAYOUT)
    tl.store(dK + b * stride_dkb + h_kv * stride_dkh + dk_rows[:, None] + offs_dqk[None, :] * stride_dkd,
             dk.to(dK.dtype.element_ty), mask=col_ok[:, None] & (offs_dqk[None, :] < DIM_QK))
    tl.store(dV + b * stride_dvb + h_kv * stride_dvh + dv_rows[:, None] + offs_dv[None, :] * stride_dvd,
             dv.to(dV.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < DIM_V))


@triton.jit
def _dq_key_blocks(
    dq, q, do, lse2, delta, k_base, v_base, Mask, mask_base, dMask, seed, pid_bh, offs_m,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    LEN_Q, LEN_K, DIM_QK, DIM_V, scale_log2, causal_offset, dropout_threshold, dropout_scale, lo, hi,
    h, w, stride_kx, stride_vx, Table, stride_tn, stride_th,
    WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W, IMG_H, IMG_W,
    BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MASK_GRAD: tl.constexpr, MASKED: tl.constexpr, LAYOUT: tl.constexpr, REL_BIAS: tl.constexpr,
    REGION_MASK: tl.constexpr,
):
    """Accumulates dQ of one query block over the key blocks starting in [lo, hi) (MASKED as in the forward)."""
    ACC: tl.constexpr = dq.dtype
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k_rows = _token_offsets(offs_n, w, stride_kn, stride_kx, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W,
                                UN_H, UN_W, LAYOUT)
        v_rows = _token_offsets(offs_n, w, stride_vn, stride_vx, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W,
                                UN_H, UN_W, LAYOUT)
        k_ptrs = k_base + k_rows[:, None] + offs_dqk[None, :] * stride_kd
        v_ptrs = v_base + v_rows[:, None] + offs_dv[None, :] * stride_vd
        if MASKED:
            k = tl.load(k_ptrs, mask=(offs_n[:, None] < LEN_K) & (offs_dqk[None, :] < DIM_QK), other=0.0)
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < LEN_K) & (offs_dv[None, :] < DIM_V), other=0.0)
        else:
            k = tl.load(k_ptrs, mask=offs_dqk[None, :] < DIM_QK, other=0.0)
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < DIM_V, other=0.0)
        s2 = _dot(q, tl.trans(k), DOT_PRECISION).to(ACC) * scale_log2
        s2 = _modified_scores(s2, offs_m, offs_n, Mask, mask_base, stride_mm, stride_mn,
                              LEN_Q, LEN_K, causal_offset, CAUSAL, MASK_KIND, MASKED,
                              h, w, Table, stride_tn, stride_th, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W,
                              IMG_H, IMG_W, REL_BIAS, REGION_MASK)
        p = tl.exp2(s2 - lse2[:, None])
        dp = _dot(do, tl.trans(v), DOT_PRECISION).to(ACC)
        if DROPOUT:
            keep = _dropout_keep(seed, offs_m, offs_n, pid_bh, dropout_threshold)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_PRECISION).to(ACC)
        if MASK_GRAD:
            tl.store(dMask + (pid_bh.to(tl.int64) * LEN_Q + offs_m[:, None]) * LEN_K + offs_n[None, :], ds,
                     mask=(offs_m[:, None] < LEN_Q) & (offs_n[None, :] < LEN_K))
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, Mask, dOut, Lse, Delta, dQ, dMask, seed,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H_Q, GROUP, LEN_Q, LEN_K, DIM_QK, DIM_V,
    scale_hi, scale_lo, scale_log2_hi, scale_log2_lo, causal_offset, dropout_threshold,
    dropout_scale_hi, dropout_scale_lo,
    NUM_WINDOWS, stride_qx, stride_kx, stride_vx, stride_dox, stride_dqx, Table, stride_tn, stride_th,
    WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W, IMG_H, IMG_W,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MASK_GRAD: tl.constexpr, LAYOUT: tl.constexpr, REL_BIAS: tl.constexpr, REGION_MASK: tl.constexpr,
):
    """One program: BLOCK_M queries of one group; loops over the visible key blocks accumulating dQ.
    With MASK_GRAD it also writes dS (the gradient of every additive score term: a float mask, or Swin's
    relative-position bias) into the dense [groups * H_Q, Lq, Lk] buffer dMask (zero-initialised: blocks no
    query here can see stay 0); the launcher reduces it to the mask's or the bias table's shape."""
    ACC: tl.constexpr = Delta.dtype.element_ty  # float32, or float64 for float64 inputs
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)  # (hi, lo) float32 pairs: see _attn_fwd
    scale_log2 = tl.cast(scale_log2_hi, ACC) + tl.cast(scale_log2_lo, ACC)
    dropout_scale = tl.cast(dropout_scale_hi, ACC) + tl.cast(dropout_scale_lo, ACC)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    group = pid_bh // H_Q
    b = (group // NUM_WINDOWS).to(tl.int64)
    w = group % NUM_WINDOWS
    h = (pid_bh % H_Q).to(tl.int64)
    h_kv = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < LEN_Q
    q_rows = _token_offsets(offs_m, w, stride_qm, stride_qx, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W,
                            LAYOUT)
    do_rows = _token_offsets(offs_m, w, stride_dom, stride_dox, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H,
                             UN_W, LAYOUT)

    q = tl.load(Q + b * stride_qb + h * stride_qh + q_rows[:, None] + offs_dqk[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_dqk[None, :] < DIM_QK), other=0.0)
    do = tl.load(dOut + b * stride_dob + h * stride_doh + do_rows[:, None] + offs_dv[None, :] * stride_dod,
                 mask=row_ok[:, None] & (offs_dv[None, :] < DIM_V), other=0.0)
    lse2, delta = _load_row_stats(Lse, Delta, pid_bh.to(tl.int64) * LEN_Q + offs_m, row_ok)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    mask_base = b * stride_mb + h * stride_mh
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=ACC)

    interior_end, end = _key_ranges(pid_m, LEN_K, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_key_blocks(
        dq, q, do, lse2, delta, k_base, v_base, Mask, mask_base, dMask, seed, pid_bh, offs_m,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        LEN_Q, LEN_K, DIM_QK, DIM_V, scale_log2, causal_offset, dropout_threshold, dropout_scale, 0, interior_end,
        h, w, stride_kx, stride_vx, Table, stride_tn, stride_th,
        WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W, IMG_H, IMG_W,
        BLOCK_N, BLOCK_DQK, BLOCK_DV, CAUSAL, MASK_KIND, DROPOUT, DOT_PRECISION, MASK_GRAD, False,
        LAYOUT, REL_BIAS, REGION_MASK)
    dq = _dq_key_blocks(
        dq, q, do, lse2, delta, k_base, v_base, Mask, mask_base, dMask, seed, pid_bh, offs_m,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        LEN_Q, LEN_K, DIM_QK, DIM_V, scale_log2, causal_offset, dropout_threshold, dropout_scale, interior_end, end,
        h, w, stride_kx, stride_vx, Table, stride_tn, stride_th,
        WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W, IMG_H, IMG_W,
        BLOCK_N, BLOCK_DQK, BLOCK_DV, CAUSAL, MASK_KIND, DROPOUT, DOT_PRECISION, MASK_GRAD, True,
        LAYOUT, REL_BIAS, REGION_MASK)

    dq *= scale
    dq_rows = _token_offsets(offs_m, w, stride_dqm, stride_dqx, WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H,
                             UN_W, LAYOUT)
    tl.store(dQ + b * stride_dqb + h * stride_dqh + dq_rows[:, None] + offs_dqk[None, :] * stride_dqd,
             dq.to(dQ.dtype.element_ty), mask=row_ok[:, None] & (offs_dqk[None, :] < DIM_QK))


# ===========================================================================================================
# Launchers
# ===========================================================================================================
def _mask_args(mask: Optional[torch.Tensor], shape, dtype: torch.dtype):
    """(tensor, 4 strides, kind) for the kernels.  The mask is expanded to [B, Hq, Lq, Lk] as a view (stride 0
    on broadcast dimensions: nothing is materialised); a bool mask is read as bytes.

    Except for float64 inputs: Triton (3.6, sm_80/sm_90) sizes a dot operand's register layout by the narrowest
    load the operand depends on, and P depends on the mask's 8-bit load -- a layout its fp64 MMA lowering rejects
    ("fp64 don't support largeK MMA", a compiler assertion).  So a bool mask becomes the equivalent additive
    float64 mask (0 / -inf) at its own, unexpanded shape."""
    if mask is None:
        return None, (0, 0, 0, 0), MASK_NONE
    if mask.dtype == torch.bool and dtype == torch.float64:
        mask = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device).masked_fill_(~mask, float("-inf"))
    m = mask.expand(shape)
    if m.dtype == torch.bool:
        return m.view(torch.uint8), m.stride(), MASK_BOOL
    return m, m.stride(), MASK_FLOAT


def _poison_outputs() -> bool:
    # Tests set FASTATTN_POISON_OUTPUTS=1: outputs start as NaN, so an element a kernel forgets to write fails.
    return os.environ.get("FASTATTN_POISON_OUTPUTS", "0") == "1"


def _empty_like_layout(ref: torch.Tensor, last_dim: int, dtype) -> torch.Tensor:
    """A new [B, H, L, last_dim] tensor in the same memory order as `ref` ([B, H, L, D] or [B, L, H, D]), so an
    output for a [B, L, H, D]-strided input is itself a free transpose of a [B, L, H, D] buffer."""
    B, H, L, _ = ref.shape
    if ref.stride(1) < ref.stride(2):  # heads inside sequence: the [B, L, H, D] layout
        out = torch.empty((B, L, H, last_dim), dtype=dtype, device=ref.device).transpose(1, 2)
    else:
        out = torch.empty((B, H, L, last_dim), dtype=dtype, device=ref.device)
    if _poison_outputs() and not isinstance(out, torch._subclasses.FakeTensor):
        out.fill_(float("nan"))
    return out


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator / row-statistics dtype: float32, float64 for float64 inputs (so gradcheck is meaningful)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _causal_offset(causal: str, len_q: int, len_k: int) -> int:
    return {"none": 0, "top_left": 0, "bottom_right": len_k - len_q}[causal]


def _split(x: float):
    """x as a (hi, lo) pair of float32-representable floats with hi + lo == x to ~48 bits (kernels receive
    Python floats as float32; the float64 kernels add the pair back up in float64)."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


def _dropout_args(dropout_p: float, seed: Optional[torch.Tensor]):
    if dropout_p == 0.0:
        return 0, 0, 1.0
    from ..backends.reference import dropout_threshold
    return int(seed.item()), dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device (132 on an H100 SXM; the interpreter pretends to be one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def choose_num_splits(programs: int, len_k: int, block_n: int, sms: int) -> int:
    """Split-KV: when the (query block, batch, head) programs cannot fill the GPU -- Perceiver's few latents
    against 50k pixels, decoding with Lq = 1 -- split the keys so that about two waves of programs run.
    Each split keeps at least 4 key blocks, so the merge stays cheap next to the attention."""
    forced = os.environ.get("FASTATTN_NUM_SPLITS")  # for tests and experiments
    if forced:
        return max(1, min(int(forced), triton.cdiv(len_k, block_n)))
    if programs >= sms:
        return 1
    max_splits = max(1, triton.cdiv(len_k, 4 * block_n))
    return max(1, min(max_splits, triton.cdiv(2 * sms, programs), 128))


def forward_plan(q, k, v, window=None):
    """(kernel name, config, number of key splits) that attention_forward will launch for these inputs."""
    B, Hq, _, Lq, Lk, Dqk, Dv, groups = _problem_dims(q, k, v, window)
    kernel = "fwd_small_q" if Lq <= 16 else ("fwd" if window is None else "fwd_window")
    cfg = pick_config(kernel, q.dtype, Dqk, Dv)
    if window is not None:  # windows are short: one split
        return kernel, cfg, 1
    splits = choose_num_splits(triton.cdiv(Lq, cfg.block_m) * B * Hq, Lk, cfg.block_n, num_sms(q.device))
    return kernel, cfg, splits


@dataclass(frozen=True)
class WindowGeometry:
    """Swin's window layout for the kernels (LAYOUT 1): inputs in image layout [B, H, W, heads, d]."""
    img_h: int
    img_w: int
    win_h: int
    win_w: int
    shift_h: int = 0
    shift_w: int = 0
    unpadded_h: Optional[int] = None   # the region the cyclic shift wraps in (default: the whole image)
    unpadded_w: Optional[int] = None

    @property
    def windows_w(self) -> int:
        return self.img_w // self.win_w

    @property
    def num_windows(self) -> int:
        return (self.img_h // self.win_h) * self.windows_w

    @property
    def tokens(self) -> int:
        return self.win_h * self.win_w

    def kernel_args(self):
        """(WINDOWS_W, WIN_H, WIN_W, SHIFT_H, SHIFT_W, UN_H, UN_W, IMG_H, IMG_W)"""
        return (self.windows_w, self.win_h, self.win_w, self.shift_h, self.shift_w,
                self.unpadded_h or self.img_h, self.unpadded_w or self.img_w, self.img_h, self.img_w)


DENSE_GEOMETRY_ARGS = (1, 1, 1, 0, 0, 1, 1, 1, 1)


def _strides(t: torch.Tensor, window: Optional[WindowGeometry]):
    """((batch, head, row, dim) strides, the second row stride).  Dense [B, H, L, D]: rows are L and the
    second stride is unused; window [B, H, W, heads, d]: rows are image rows (y) and columns (x)."""
    if window is None:
        return t.stride(), 0
    sb, sy, sx, sh, sd = t.stride()
    return (sb, sh, sy, sd), sx


def _problem_dims(q, k, v, window):
    """(B, Hq, Hkv, Lq, Lk, Dqk, Dv, groups per batch element)."""
    if window is None:
        return q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3], 1
    N = window.tokens
    return q.shape[0], q.shape[3], k.shape[3], N, N, q.shape[4], v.shape[4], window.num_windows


def _window_kernel_args(window: Optional[WindowGeometry], table: Optional[torch.Tensor], strides_x):
    """The arguments after the dropout scale: NUM_WINDOWS, the x strides, Table and its strides, geometry."""
    if window is None:
        return (1, *([0] * len(strides_x)), None, 0, 0, *DENSE_GEOMETRY_ARGS)
    table_strides = table.stride() if table is not None else (0, 0)
    return (window.num_windows, *strides_x, table, *table_strides, *window.kernel_args())


def _window_constexprs(window: Optional[WindowGeometry], table):
    if window is None:
        return dict(LAYOUT=0, REL_BIAS=False, REGION_MASK=False)
    return dict(LAYOUT=1, REL_BIAS=table is not None, REGION_MASK=window.shift_h > 0 or window.shift_w > 0)


def attention_forward(q, k, v, mask, causal: str, scale: float, dropout_p: float, seed,
                      window: Optional[WindowGeometry] = None, table: Optional[torch.Tensor] = None):
    """Returns (out, lse): dense: out [B, Hq, Lq, Dv] in q's dtype; window: out [B, H, W, heads, Dv].
    lse is [B * windows, Hq, Lq] float32 (float64 for float64 inputs)."""
    B, Hq, Hkv, Lq, Lk, Dqk, Dv, groups = _problem_dims(q, k, v, window)
    if window is None:
        out = _empty_like_layout(q, Dv, q.dtype)
    else:
        out = torch.empty(q.shape[:4] + (Dv,), dtype=q.dtype, device=q.device)
        if _poison_outputs():
            out.fill_(float("nan"))
    lse = torch.empty((B * groups, Hq, Lq), dtype=_stats_dtype(q.dtype), device=q.device)
    if _poison_outputs():
        lse.fill_(float("nan"))
    mask_t, mask_strides, mask_kind = _mask_args(mask, (B, Hq, Lq, Lk), q.dtype)
    seed_i, threshold, drop_scale = _dropout_args(dropout_p, seed)
    _, cfg, splits = forward_plan(q, k, v, window)
    keys_per_split = triton.cdiv(triton.cdiv(Lk, splits), cfg.block_n) * cfg.block_n
    splits = max(1, triton.cdiv(Lk, keys_per_split))
    (q_st, q_x), (k_st, k_x), (v_st, v_x), (o_st, o_x) = (_strides(t, window) for t in (q, k, v, out))
    if splits > 1:  # partial results, merged below (dense layout only)
        out_k = torch.empty((splits, B, Hq, Lq, Dv), dtype=_stats_dtype(q.dtype), device=q.device)
        lse_k = torch.empty((splits, B, Hq, Lq), dtype=_stats_dtype(q.dtype), device=q.device)
        split_strides = (out_k.stride(0), lse_k.stride(0))
        out_k_strides = out_k.stride()[1:]
    else:
        out_k, lse_k, split_strides, out_k_strides = out, lse, (0, 0), o_st
    _attn_fwd[(triton.cdiv(Lq, cfg.block_m), B * groups * Hq, splits)](
        q, k, v, mask_t, out_k, lse_k, seed_i,
        *q_st, *k_st, *v_st, *mask_strides, *out_k_strides, *split_strides,
        Hq, Hq // Hkv, Lq, Lk, Dqk, Dv, keys_per_split,
        *_split(scale * LOG2E), _causal_offset(causal, Lq, Lk), threshold, *_split(drop_scale),
        *_window_kernel_args(window, table, (q_x, k_x, v_x, o_x)),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_DQK=padded_head_dim(Dqk), BLOCK_DV=padded_head_dim(Dv),
        CAUSAL=causal != "none", MASK_KIND=mask_kind, DROPOUT=dropout_p > 0.0,
        DOT_PRECISION=dot_precision(q.dtype), **_window_constexprs(window, table),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        block_dv = padded_head_dim(Dv)
        merge_m = merge_block_m(block_dv)
        _attn_fwd_merge[(triton.cdiv(Lq, merge_m), B * Hq)](
            out_k, lse_k, out, lse, *split_strides, *out.stride(), Hq, Lq, Dv, splits,
            BLOCK_M=merge_m, BLOCK_DV=block_dv, num_warps=4)
    return out, lse


def attention_backward(q, k, v, mask, causal: str, scale: float, dropout_p: float, seed, out, lse, dout,
                       dlse=None, mask_needs_grad: bool = False,
                       window: Optional[WindowGeometry] = None, table: Optional[torch.Tensor] = None):
    """Returns (dq, dk, dv, dscores) -- dscores is the dense [B * windows, Hq, Lq, Lk] gradient of the additive
    score terms (float32; float64 for float64 inputs) when mask_needs_grad, else None; the caller reduces it
    to the float mask's shape or to the bias table."""
    B, Hq, Hkv, Lq, Lk, Dqk, Dv, groups = _problem_dims(q, k, v, window)
    group = Hq // Hkv
    mask_t, mask_strides, mask_kind = _mask_args(mask, (B, Hq, Lq, Lk), q.dtype)
    seed_i, threshold, drop_scale = _dropout_args(dropout_p, seed)
    causal_offset = _causal_offset(causal, Lq, Lk)
    block_dqk, block_dv = padded_head_dim(Dqk), padded_head_dim(Dv)
    common = dict(BLOCK_DQK=block_dqk, BLOCK_DV=block_dv, CAUSAL=causal != "none", MASK_KIND=mask_kind,
                  DROPOUT=dropout_p > 0.0, DOT_PRECISION=dot_precision(q.dtype), **_window_constexprs(window, table))
    geometry = window.kernel_args() if window is not None else DENSE_GEOMETRY_ARGS
    num_windows = window.num_windows if window is not None else 1

    if window is None:
        dq = _empty_like_layout(q, Dqk, q.dtype)
        dk = _empty_like_layout(k, Dqk, k.dtype)
        dv = _empty_like_layout(v, Dv, v.dtype)
    else:
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        if _poison_outputs():
            for t in (dq, dk, dv):
                t.fill_(float("nan"))
    (q_st, q_x), (k_st, k_x), (v_st, v_x) = (_strides(t, window) for t in (q, k, v))
    (o_st, o_x), (do_st, do_x) = _strides(out, window), _strides(dout, window)
    (dq_st, dq_x), (dk_st, dk_x), (dv_st, dv_x) = (_strides(t, window) for t in (dq, dk, dv))

    delta = torch.empty((B * groups, Hq, Lq), dtype=_stats_dtype(q.dtype), device=q.device)
    dlse_t = dlse.contiguous().to(delta.dtype) if dlse is not None else None
    pre_block_m = preprocess_block_m(block_dv)
    _attn_bwd_preprocess[(triton.cdiv(Lq, pre_block_m), B * groups * Hq)](
        out, dout, dlse_t, delta, *o_st, *do_st, Hq, Lq, Dv,
        num_windows, o_x, do_x, *geometry[:7],
        BLOCK_M=pre_block_m, BLOCK_DV=block_dv, HAS_DLSE=dlse is not None, LAYOUT=common["LAYOUT"], num_warps=4)

    dmask = (torch.zeros((B * groups, Hq, Lq, Lk), dtype=_stats_dtype(q.dtype), device=q.device)
             if mask_needs_grad else None)
    table_args = (table, *table.stride()) if table is not None else (None, 0, 0)

    cfg = pick_config("bwd_dkdv", q.dtype, Dqk, Dv)
    _attn_bwd_dkdv[(triton.cdiv(Lk, cfg.block_n), B * groups * Hkv)](
        q, k, v, mask_t, dout, lse, delta, dk, dv, seed_i,
        *q_st, *k_st, *v_st, *mask_strides, *do_st, *dk_st, *dv_st,
        Hq, Hkv, group, Lq, Lk, Dqk, Dv,
        *_split(scale), *_split(scale * LOG2E), causal_offset, threshold, *_split(drop_scale),
        num_windows, q_x, k_x, v_x, do_x, dk_x, dv_x, *table_args, *geometry,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    cfg = pick_config("bwd_dq", q.dtype, Dqk, Dv)
    _attn_bwd_dq[(triton.cdiv(Lq, cfg.block_m), B * groups * Hq)](
        q, k, v, mask_t, dout, lse, delta, dq, dmask, seed_i,
        *q_st, *k_st, *v_st, *mask_strides, *do_st, *dq_st,
        Hq, group, Lq, Lk, Dqk, Dv,
        *_split(scale), *_split(scale * LOG2E), causal_offset, threshold, *_split(drop_scale),
        num_windows, q_x, k_x, v_x, do_x, dq_x, *table_args, *geometry,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, MASK_GRAD=mask_needs_grad, **common,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv, dmask


# ===========================================================================================================
# Ahead-of-time compilation specs: every (kernel, configuration) the launchers above can pick, for
# fastattn.tools.kernel_report and the test suite (compiled with triton.compile for a GPUTarget; no GPU
# needed).  Each configuration is compiled twice: "plain" (no mask, causal, dropout) and "full" (float
# mask, causal and dropout on; mask gradient on for dQ) -- the register-hungriest variant -- at the largest
# head dims of its bucket (BLOCK_DQK = BLOCK_DV = bucket), with head-dim strides specialised to 1 as Triton
# does at run time for contiguous head dims.
# ===========================================================================================================
@dataclass(frozen=True)
class KernelSpec:
    label: str
    fn: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int


_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
SPEC_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _signature(fn, pointer_types: Dict[str, str], constexprs: Dict[str, object]) -> Dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = pointer_types[name]
        elif name == "seed":
            sig[name] = "i64"
        elif name.endswith(("_hi", "_lo")):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def kernel_specs(dtypes=SPEC_DTYPES) -> List[KernelSpec]:
    """Variants: "plain" (dense, no score modification), "full" (dense; float mask, causal, dropout, mask
    gradient), "swin" (window layout; relative-position bias with its gradient, region mask, dropout)."""
    specs = []
    for dtype in dtypes:
        t = _TL_DTYPE[dtype]
        acc = "fp64" if dtype == torch.float64 else "fp32"
        name = str(dtype).replace("torch.", "")
        for head in HEAD_BUCKETS:
            if head > MAX_HEAD_DIM_BY_DTYPE_CLASS[dtype_class(dtype)]:
                continue
            for variant in ("plain", "full", "swin"):
                full, swin = variant == "full", variant == "swin"
                features = dict(BLOCK_DQK=head, BLOCK_DV=head, CAUSAL=full, MASK_KIND=MASK_FLOAT if full else MASK_NONE,
                                DROPOUT=full or swin, DOT_PRECISION=dot_precision(dtype),
                                LAYOUT=1 if swin else 0, REL_BIAS=swin, REGION_MASK=swin)
                for kernel, fn, tensors in (
                        ("fwd", _attn_fwd, "q k v o"),
                        ("fwd_small_q", _attn_fwd, "q k v o"),
                        ("fwd_window", _attn_fwd, "q k v o"),
                        ("bwd_dkdv", _attn_bwd_dkdv, "q k v do dk dv"),
                        ("bwd_dq", _attn_bwd_dq, "q k v do dq")):
                    if (kernel == "fwd_window") != swin and kernel in ("fwd", "fwd_window"):
                        continue  # the window layout's forward uses its own tiles, the dense one never does
                    cfg = _CONFIGS[(kernel, dtype_class(dtype), head)]
                    constexprs = dict(features, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
                    if kernel == "bwd_dq":
                        constexprs["MASK_GRAD"] = full or swin
                    for tensor in tensors.split():
                        constexprs[f"stride_{tensor}d"] = 1
                    if not full:
                        constexprs["Mask"] = None
                    if not swin:
                        constexprs["Table"] = None
                    if variant == "plain":
                        constexprs["seed"] = 0
                        if kernel == "bwd_dq":
                            constexprs["dMask"] = None
                    pointers = {n: f"*{t}" for n in ("Q", "K", "V", "Out", "dOut", "dK", "dV", "dQ", "Mask", "Table")}
                    pointers.update(Lse=f"*{acc}", Delta=f"*{acc}", dMask=f"*{acc}")
                    specs.append(KernelSpec(
                        label=f"{kernel:<11} {name:<8} d{head:<3} {variant:<5} "
                              f"M{cfg.block_m} N{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}",
                        fn=fn, signature=_signature(fn, pointers, constexprs), constexprs=constexprs,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            # The split-KV merge and the backward preprocessing have one configuration per head dim.
            constexprs = dict(BLOCK_M=merge_block_m(head), BLOCK_DV=head, stride_od=1)
            pointers = {"OutSplit": f"*{acc}", "LseSplit": f"*{acc}", "Out": f"*{t}", "Lse": f"*{acc}"}
            specs.append(KernelSpec(
                label=f"{'fwd_merge':<11} {name:<8} d{head:<3} {'full':<5} M{merge_block_m(head)} w4",
                fn=_attn_fwd_merge, signature=_signature(_attn_fwd_merge, pointers, constexprs),
                constexprs=constexprs, num_warps=4, num_stages=1))
            for layout, variant in ((0, "full"), (1, "swin")):
                constexprs = dict(BLOCK_M=preprocess_block_m(head), BLOCK_DV=head, HAS_DLSE=layout == 0,
                                  LAYOUT=layout, stride_od=1, stride_dod=1)
                if layout == 1:
                    constexprs["dLse"] = None
                pointers = {"Out": f"*{t}", "dOut": f"*{t}", "dLse": f"*{acc}", "Delta": f"*{acc}"}
                specs.append(KernelSpec(
                    label=f"{'bwd_pre':<11} {name:<8} d{head:<3} {variant:<5} M{preprocess_block_m(head)} w4",
                    fn=_attn_bwd_preprocess, signature=_signature(_attn_bwd_preprocess, pointers, constexprs),
                    constexprs=constexprs, num_warps=4, num_stages=1))
    return specs
