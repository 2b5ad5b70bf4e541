// CUDA-core ("SIMT") attention kernels: the inputs the tensor-core kernels of fa_kernels.cuh do not take --
// float32 (IEEE products and sums, no TF32), head dims up to 256, head dims that are not multiples of 8, and
// Dv != Dqk -- with the same parameters (AttnParams), layouts (dense and the Swin window layout, through
// row_offset), score modifications (modified_score: causal, masks, bias table, region mask), dropout stream,
// LSE convention and atomics-free backward as the tensor-core kernels.
//
// Every tile is converted to float32 in shared memory.  A warp owns R = kSimtRows rows of the CTA (queries in the
// forward and dQ kernels, keys in the dK/dV kernel); the shared tile of the other side has 32 rows, one per lane:
//   scores   lane j computes row r's product with tile row j for its R rows (a dot over the head dim, float4 at a
//            time: tile row j is the lane's own, the R rows are broadcast reads);
//   outputs  P (or dS) goes through a per-warp [R][32] scratch, and lane l accumulates output columns
//            l, l + 32, ... (at most kSimtCols per row) over the tile's 32 rows -- coalesced stores, no atomics.
// Shared rows come in two strides: tiles read "one row per lane" use a stride of an odd number of float4s, so the
// 8 lanes of each quarter-warp phase of a 128-bit read hit 8 distinct 16-byte bank groups; tiles only read by
// broadcast (every lane the same address) are packed to a multiple of 4 floats.  Columns past the head dim are
// zero, so the float4 dots need no tail.
//
// Shared memory, head dims Dqk = Dv = 256: forward 84,480 B, dQ 101,376 B, dK/dV 101,376 B -- within the 99 KiB
// opt-in limit of sm_86 / sm_89 (static_asserts below).  Registers (CUDA 13.0 ptxas, no spills), sm_80 / sm_90:
// forward 168 / 172, dQ 204 / 211, dK/dV 210 / 209 -- two CTAs (8 warps) per SM.  __launch_bounds__(128, 2): without
// a minimum ptxas capped these kernels at 128 registers on sm_90 and spilled.  These kernels are a complete
// fallback, not a fast path (unmeasured on a GPU so far): in float32 the Triton backend (tl.dot in IEEE precision)
// comes first in dispatch.
#pragma once

#include "fa_kernels.cuh"

#ifdef FASTATTN_EMULATE
#define FA_DEVICE_HOST_CONSTEXPR constexpr inline
#else
#define FA_DEVICE_HOST_CONSTEXPR __host__ __device__ constexpr inline
#endif

namespace fastattn_cuda {

constexpr int kSimtMaxDim = 256;               // largest Dqk and Dv
constexpr int kSimtCols = kSimtMaxDim / 32;    // output columns per lane and row: l + 32 i
constexpr int kSimtWarps = 4, kSimtThreads = 32 * kSimtWarps;
constexpr int kSimtRows = 4;                   // rows per warp
constexpr int kSimtBlock = kSimtRows * kSimtWarps;  // rows per CTA (16)
constexpr int kSimtTile = 32;                  // rows of the other side per shared tile: one per lane

// Row strides in floats: broadcast-read tiles packed to float4s; tiles read one row per lane an odd number of float4s.
FA_DEVICE_HOST_CONSTEXPR int simt_packed_stride(int d) { return (d + 3) / 4 * 4; }
FA_DEVICE_HOST_CONSTEXPR int simt_lane_stride(int d) { return ((d + 3) / 4 | 1) * 4; }

// Shared-memory bytes of each kernel for head dims d (q, k) and dv (v, out).
FA_DEVICE_HOST_CONSTEXPR size_t simt_fwd_smem(int d, int dv) {  // Q [16] packed, K [32] lane, V [32] packed, P
  return sizeof(float) * (size_t(kSimtBlock) * simt_packed_stride(d) + size_t(kSimtTile) * simt_lane_stride(d) +
                          size_t(kSimtTile) * simt_packed_stride(dv) + kSimtBlock * kSimtTile);
}
// The backward kernels are mirror images: the CTA's own 16 rows of a (head dim d, head dim dv) pair -- Q and dO for
// dQ, K and V for dK/dV -- packed; the other side's 32-row tiles of the pair -- K and V, or Q and dO -- at lane
// strides; then the per-warp [R][32] scratch (dS, or P then dS).
FA_DEVICE_HOST_CONSTEXPR size_t simt_bwd_smem(int d, int dv) {
  return sizeof(float) * (size_t(kSimtBlock) * (simt_packed_stride(d) + simt_packed_stride(dv)) +
                          size_t(kSimtTile) * (simt_lane_stride(d) + simt_lane_stride(dv)) + kSimtBlock * kSimtTile);
}
static_assert(simt_fwd_smem(kSimtMaxDim, kSimtMaxDim) <= kSmemLimit, "CUDA-core forward, head dim 256");
static_assert(simt_bwd_smem(kSimtMaxDim, kSimtMaxDim) <= kSmemLimit, "CUDA-core dQ and dK/dV, head dim 256");

struct SimtBwdSmem {
  float* own_d;    // [16][own_ds]: the CTA's rows, head dim d (Q or K)
  float* own_dv;   // [16][own_dvs]: head dim dv (dO or V)
  float* tile_d;   // [32][tile_ds]: the other side's tile, head dim d (K or Q)
  float* tile_dv;  // [32][tile_dvs]: head dim dv (V or dO)
  float* scratch;  // [warps][R][32]
  int own_ds, own_dvs, tile_ds, tile_dvs;
};

FA_DEVICE SimtBwdSmem simt_bwd_layout(char* smem, const AttnParams& p) {
  SimtBwdSmem l;
  l.own_ds = simt_packed_stride(p.D), l.own_dvs = simt_packed_stride(p.Dv);
  l.tile_ds = simt_lane_stride(p.D), l.tile_dvs = simt_lane_stride(p.Dv);
  l.own_d = reinterpret_cast<float*>(smem);
  l.own_dv = l.own_d + kSimtBlock * l.own_ds;
  l.tile_d = l.own_dv + kSimtBlock * l.own_dvs;
  l.tile_dv = l.tile_d + kSimtTile * l.tile_ds;
  l.scratch = l.tile_dv + kSimtTile * l.tile_dvs;
  return l;
}

// Copies rows [row0, row0 + ROWS) of a [nrows, d] slice (rows(m): row m's element offset) into the float32 tile
// [ROWS][stride], converting from T; rows >= nrows and columns >= d are zero.
template <int ROWS, typename T, typename RowFn>
FA_DEVICE void simt_load_rows(float* tile, int stride, const T* slice, RowFn rows, int row0, int nrows, int d,
                              int tid) {
  for (int i = tid; i < ROWS * stride; i += kSimtThreads) {
    const int r = i / stride, c = i - r * stride;
    tile[i] = row0 + r < nrows && c < d ? to_float(slice[rows(row0 + r) + c]) : 0.f;
  }
}

// acc[r] += <a_r, b> for the R rows a_r = a + r * a_stride (broadcast reads) and the lane's row b, over d4 float4s.
template <int R>
FA_DEVICE void simt_dots(float (&acc)[R], const float* a, int a_stride, const float* b, int d4) {
  for (int c = 0; c < d4; ++c) {
    const float4 y = reinterpret_cast<const float4*>(b)[c];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float4 x = reinterpret_cast<const float4*>(a + r * a_stride)[c];
      acc[r] = fmaf(x.x, y.x, fmaf(x.y, y.y, fmaf(x.z, y.z, fmaf(x.w, y.w, acc[r]))));
    }
  }
}

// acc[r][i] += sum_j w[r][j] * x[j][l + 32 i] over the 32 rows of the tile x (stride xs) and the columns < d:
// w is the warp's [R][32] scratch (P or dS), lane l owns columns l + 32 i.
template <int R>
FA_DEVICE void simt_accumulate(float (&acc)[R][kSimtCols], const float* w, const float* x, int xs, int d, int lane) {
#pragma unroll 2
  for (int j = 0; j < kSimtTile; ++j) {
    float wj[R];
#pragma unroll
    for (int r = 0; r < R; ++r) wj[r] = w[r * kSimtTile + j];
    const float* xj = x + j * xs;
#pragma unroll
    for (int i = 0; i < kSimtCols; ++i) {
      const int c = lane + 32 * i;
      if (c < d) {
        const float xv = xj[c];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][i] = fmaf(wj[r], xv, acc[r][i]);
      }
    }
  }
}

FA_DEVICE float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v = fmaxf(v, shfl_xor(v, off));
  return v;
}

FA_DEVICE float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += shfl_xor(v, off);
  return v;
}

// Writes row m's columns l + 32 i < d of acc * mul to the T row at `dst` (lane l).
template <typename T>
FA_DEVICE void simt_store_row(T* dst, const float (&acc)[kSimtCols], float mul, int d, int lane) {
#pragma unroll
  for (int i = 0; i < kSimtCols; ++i) {
    const int c = lane + 32 * i;
    if (c < d) dst[c] = from_float<T>(acc[i] * mul);
  }
}

// ==========================================================================================================
// Forward: CTA = 16 queries of one (group, head); K/V tiles of 32 keys; the online softmax per row, warp-uniform.
// ==========================================================================================================
template <typename T>
__global__ void __launch_bounds__(kSimtThreads, 2) attn_fwd_simt_kernel(const AttnParams p) {
  constexpr int R = kSimtRows;
  FA_SHARED_MEMORY(smem);
  const int qs = simt_packed_stride(p.D), ks = simt_lane_stride(p.D), vs = simt_packed_stride(p.Dv);
  float* const sQ = reinterpret_cast<float*>(smem);       // [16][qs]
  float* const sK = sQ + kSimtBlock * qs;                  // [32][ks]
  float* const sV = sK + kSimtTile * ks;                   // [32][vs]
  float* const sP = sV + kSimtTile * vs;                   // [warps][R][32]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const Group grp = cta_group(p);
  const int h = blockIdx.y, b = grp.b, bh = grp.z * p.Hq + h, hk = h / p.group;
  const int split = blockIdx.x % p.num_splits;  // split-KV: see AttnParams
  const int m0 = blockIdx.x / p.num_splits * kSimtBlock, mw = m0 + warp * R;  // the warp's rows mw .. mw + R - 1
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const char* mask = mask_slice(p, grp, h);
  float* const pw = sP + warp * R * kSimtTile;

  simt_load_rows<kSimtBlock>(sQ, qs, qg, [&](int m) { return row_offset(p, grp, p.q_sm, p.q_sx, m); }, m0, p.Lq,
                             p.D, tid);
  // keys any row of the CTA sees, within this split's range
  const int n_begin = split * p.keys_per_split;
  int n_end = imin(p.Lk, n_begin + p.keys_per_split);
  if (p.causal) n_end = imin(n_end, imax(0, imin(m0 + kSimtBlock, p.Lq) + p.causal_offset));

  float acc[R][kSimtCols], row_max[R], row_sum[R];  // row_max, row_sum: log2 domain, warp-uniform
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int i = 0; i < kSimtCols; ++i) acc[r][i] = 0.f;
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }

  for (int n0 = n_begin; n0 < n_end; n0 += kSimtTile) {
    __syncthreads();  // the previous tile's readers are done
    simt_load_rows<kSimtTile>(sK, ks, kg, [&](int n) { return row_offset(p, grp, p.k_sm, p.k_sx, n); }, n0, p.Lk,
                              p.D, tid);
    simt_load_rows<kSimtTile>(sV, vs, vg, [&](int n) { return row_offset(p, grp, p.v_sm, p.v_sx, n); }, n0, p.Lk,
                              p.Dv, tid);
    __syncthreads();
    if (mw >= p.Lq) continue;  // a warp whose rows all lie past Lq only helps load and meets the barriers
    const int n = n0 + lane;
    float s[R];
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] = 0.f;
    simt_dots<R>(s, sQ + warp * R * qs, qs, sK + lane * ks, (p.D + 3) / 4);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float s2 = modified_score(p, grp, mask, s[r], mw + r, n);
      // Online softmax: the new running max; until a row has seen a visible key it stays -inf, and 0 stands in
      // as the exponent's reference so that exp2(-inf - ref) = 0 instead of NaN.  alpha rescales what was summed
      // under the old max.
      const float new_max = fmaxf(row_max[r], warp_max(s2));
      const float ref = new_max == -INFINITY ? 0.f : new_max;
      const float alpha = exp2f(row_max[r] - ref);
      const float pr = exp2f(s2 - ref);
      row_sum[r] = row_sum[r] * alpha + warp_sum(pr);  // the normaliser counts dropped elements too
      row_max[r] = new_max;
#pragma unroll
      for (int i = 0; i < kSimtCols; ++i) acc[r][i] *= alpha;
      float kept = pr;
      if (p.dropout)
        kept = dropout_keep(p.seed, p.drop_threshold, mw + r, n, bh) ? pr * p.drop_scale : 0.f;
      pw[r * kSimtTile + lane] = kept;
    }
    syncwarp();
    simt_accumulate<R>(acc, pw, sV, vs, p.Dv, lane);
  }

  // Split-KV: this split's float32 output and LSE go to the workspaces (rows [split][bh][m]) for the merge.
  const bool partial = p.num_splits > 1;
  const int64_t row0 = (partial ? static_cast<int64_t>(split) * p.B * p.Hq + bh : bh) * p.Lq;
  float* const lse_out = partial ? p.lse_split : p.lse;
  T* og = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int m = mw + r;
    if (m >= p.Lq) break;  // uniform across the warp
    const bool seen = row_sum[r] != 0.f;  // 0: a row that sees no key (output 0, lse -inf); NaN: NaN out
    const float inv = seen ? 1.f / row_sum[r] : 0.f;
    if (partial)
      simt_store_row<float>(p.out_split + (row0 + m) * p.Dv, acc[r], inv, p.Dv, lane);
    else
      simt_store_row<T>(og + row_offset(p, grp, p.o_sm, p.o_sx, m), acc[r], inv, p.Dv, lane);
    if (lane == 0) lse_out[row0 + m] = seen ? (row_max[r] + log2f(row_sum[r])) * kLn2 : -INFINITY;
  }
}

// P (dropped, for dV) and dS of (query m, key n) from the raw products s = q.k and dp = dO.v:
//   P = exp2(s2 - lse2);  dS = P * (keep(m, n) ? dp / (1 - p_drop) : 0) - P * Delta.
struct SimtGrad {
  float p_kept, ds;
};

FA_DEVICE SimtGrad simt_grad(const AttnParams& p, const Group& grp, const char* mask, float s, float dp, float lse2,
                             float delta, int m, int n, int bh) {
  const float pr = exp2f(modified_score(p, grp, mask, s, m, n) - lse2);  // 0 when masked or out of range
  bool keep = true;
  if (p.dropout) keep = dropout_keep(p.seed, p.drop_threshold, m, n, bh);
  const float scale = p.dropout ? p.drop_scale : 1.f;
  return {keep ? pr * scale : 0.f, pr * ((keep ? dp * scale : 0.f) - delta)};
}

// ==========================================================================================================
// dQ: CTA = 16 queries of one (group, head); dQ = scale * dS K over K/V tiles of 32 keys; writes dS when asked.
// ==========================================================================================================
template <typename T>
__global__ void __launch_bounds__(kSimtThreads, 2) attn_bwd_dq_simt_kernel(const AttnParams p) {
  constexpr int R = kSimtRows;
  FA_SHARED_MEMORY(smem);
  const SimtBwdSmem l = simt_bwd_layout(smem, p);
  float *const sQ = l.own_d, *const sdO = l.own_dv, *const sK = l.tile_d, *const sV = l.tile_dv, *const sdS = l.scratch;
  const int qs = l.own_ds, os = l.own_dvs, ks = l.tile_ds, vs = l.tile_dvs;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const Group grp = cta_group(p);
  const int h = blockIdx.y, b = grp.b, bh = grp.z * p.Hq + h, hk = h / p.group;
  const int m0 = blockIdx.x * kSimtBlock, mw = m0 + warp * R;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const char* mask = mask_slice(p, grp, h);
  float* const dsw = sdS + warp * R * kSimtTile;

  simt_load_rows<kSimtBlock>(sQ, qs, static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh,
                             [&](int m) { return row_offset(p, grp, p.q_sm, p.q_sx, m); }, m0, p.Lq, p.D, tid);
  simt_load_rows<kSimtBlock>(sdO, os, static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh,
                             [&](int m) { return row_offset(p, grp, p.do_sm, p.do_sx, m); }, m0, p.Lq, p.Dv, tid);
  float lse2[R], delta[R], dq[R][kSimtCols];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int m = mw + r;
    const int64_t row = static_cast<int64_t>(bh) * p.Lq + m;
    lse2[r] = m < p.Lq ? lse_log2(p.lse[row]) : INFINITY;
    delta[r] = m < p.Lq ? p.delta[row] : 0.f;
#pragma unroll
    for (int i = 0; i < kSimtCols; ++i) dq[r][i] = 0.f;
  }
  int n_end = p.Lk;
  if (p.causal) n_end = imin(p.Lk, imax(0, imin(m0 + kSimtBlock, p.Lq) + p.causal_offset));

  for (int n0 = 0; n0 < n_end; n0 += kSimtTile) {
    __syncthreads();
    simt_load_rows<kSimtTile>(sK, ks, kg, [&](int n) { return row_offset(p, grp, p.k_sm, p.k_sx, n); }, n0, p.Lk,
                              p.D, tid);
    simt_load_rows<kSimtTile>(sV, vs, vg, [&](int n) { return row_offset(p, grp, p.v_sm, p.v_sx, n); }, n0, p.Lk,
                              p.Dv, tid);
    __syncthreads();
    const int n = n0 + lane;
    float s[R], dp[R];
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] = dp[r] = 0.f;
    simt_dots<R>(s, sQ + warp * R * qs, qs, sK + lane * ks, (p.D + 3) / 4);
    simt_dots<R>(dp, sdO + warp * R * os, os, sV + lane * vs, (p.Dv + 3) / 4);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int m = mw + r;
      const float ds = simt_grad(p, grp, mask, s[r], dp[r], lse2[r], delta[r], m, n, bh).ds;
      // dS is also the gradient of the additive mask or bias table (scores past n_end stay as the op set them)
      if (p.dmask != nullptr && m < p.Lq && n < p.Lk) p.dmask[(static_cast<int64_t>(bh) * p.Lq + m) * p.Lk + n] = ds;
      dsw[r * kSimtTile + lane] = ds;
    }
    syncwarp();
    simt_accumulate<R>(dq, dsw, sK, ks, p.D, lane);
  }

  T* dqg = static_cast<T*>(p.dq) + b * p.dq_sb + h * p.dq_sh;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int m = mw + r;
    if (m >= p.Lq) break;
    simt_store_row<T>(dqg + row_offset(p, grp, p.dq_sm, p.dq_sx, m), dq[r], p.scale, p.D, lane);
  }
}

// ==========================================================================================================
// dK/dV: CTA = 16 keys of one (group, key/value head); loops over the query tiles (32 rows) of every query head of
// its GQA group: dV += P^T dO, dK += scale * dS^T Q, summed in registers (no atomics).
// ==========================================================================================================
template <typename T>
__global__ void __launch_bounds__(kSimtThreads, 2) attn_bwd_dkdv_simt_kernel(const AttnParams p) {
  constexpr int R = kSimtRows;
  FA_SHARED_MEMORY(smem);
  const SimtBwdSmem l = simt_bwd_layout(smem, p);
  float *const sK = l.own_d, *const sV = l.own_dv, *const sQ = l.tile_d, *const sdO = l.tile_dv, *const sW = l.scratch;
  const int kps = l.own_ds, vps = l.own_dvs, qs = l.tile_ds, os = l.tile_dvs;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const Group grp = cta_group(p);
  const int hk = blockIdx.y, b = grp.b;
  const int n0 = blockIdx.x * kSimtBlock, nw = n0 + warp * R;  // the warp's keys nw .. nw + R - 1
  float* const w = sW + warp * R * kSimtTile;

  simt_load_rows<kSimtBlock>(sK, kps, static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh,
                             [&](int n) { return row_offset(p, grp, p.k_sm, p.k_sx, n); }, n0, p.Lk, p.D, tid);
  simt_load_rows<kSimtBlock>(sV, vps, static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh,
                             [&](int n) { return row_offset(p, grp, p.v_sm, p.v_sx, n); }, n0, p.Lk, p.Dv, tid);
  float dk[R][kSimtCols], dv[R][kSimtCols];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int i = 0; i < kSimtCols; ++i) dk[r][i] = dv[r][i] = 0.f;

  // Query m sees key n iff n <= m + causal_offset: the CTA's first key needs m >= n0 - causal_offset.
  const int m_start = p.causal ? imax(0, n0 - p.causal_offset) / kSimtTile * kSimtTile : 0;
  for (int hq = 0; hq < p.group; ++hq) {
    const int h = hk * p.group + hq, bh = grp.z * p.Hq + h;
    const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
    const T* dog = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
    const char* mask = mask_slice(p, grp, h);
    for (int m0 = m_start; m0 < p.Lq; m0 += kSimtTile) {
      __syncthreads();
      simt_load_rows<kSimtTile>(sQ, qs, qg, [&](int m) { return row_offset(p, grp, p.q_sm, p.q_sx, m); }, m0, p.Lq,
                                p.D, tid);
      simt_load_rows<kSimtTile>(sdO, os, dog, [&](int m) { return row_offset(p, grp, p.do_sm, p.do_sx, m); }, m0,
                                p.Lq, p.Dv, tid);
      __syncthreads();
      const int m = m0 + lane;  // this lane's query
      const int64_t row = static_cast<int64_t>(bh) * p.Lq + m;
      const float lse2 = m < p.Lq ? lse_log2(p.lse[row]) : INFINITY;
      const float delta = m < p.Lq ? p.delta[row] : 0.f;
      float s[R], dp[R];
#pragma unroll
      for (int r = 0; r < R; ++r) s[r] = dp[r] = 0.f;
      simt_dots<R>(s, sK + warp * R * kps, kps, sQ + lane * qs, (p.D + 3) / 4);
      simt_dots<R>(dp, sV + warp * R * vps, vps, sdO + lane * os, (p.Dv + 3) / 4);
      float ds[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const SimtGrad gr = simt_grad(p, grp, mask, s[r], dp[r], lse2, delta, m, nw + r, bh);
        w[r * kSimtTile + lane] = gr.p_kept;
        ds[r] = gr.ds;
      }
      syncwarp();
      simt_accumulate<R>(dv, w, sdO, os, p.Dv, lane);
      syncwarp();  // every lane has read P before the scratch takes dS
#pragma unroll
      for (int r = 0; r < R; ++r) w[r * kSimtTile + lane] = ds[r];
      syncwarp();
      simt_accumulate<R>(dk, w, sQ, qs, p.D, lane);
    }
  }

  T* dkg = static_cast<T*>(p.dk) + b * p.dk_sb + hk * p.dk_sh;
  T* dvg = static_cast<T*>(p.dv) + b * p.dv_sb + hk * p.dv_sh;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int n = nw + r;
    if (n >= p.Lk) break;
    simt_store_row<T>(dkg + row_offset(p, grp, p.dk_sm, p.dk_sx, n), dk[r], p.scale, p.D, lane);
    simt_store_row<T>(dvg + row_offset(p, grp, p.dv_sm, p.dv_sx, n), dv[r], 1.f, p.Dv, lane);
  }
}

// ==========================================================================================================
// Launchers
// ==========================================================================================================
template <typename T>
void launch_simt_fwd(const AttnParams& p, Stream stream) {
  if (p.B == 0 || p.Hq == 0 || p.Lq == 0) return;
  launch_over_z(attn_fwd_simt_kernel<T>, ceil_div(p.Lq, kSimtBlock) * p.num_splits, p.Hq, kSimtThreads,
                simt_fwd_smem(p.D, p.Dv), p, stream);
  launch_fwd_merge<T>(p, stream);
}

template <typename T>
void launch_simt_bwd(const AttnParams& p, Stream stream) {
  if (p.B == 0 || p.Hq == 0) return;
  if (p.Lq > 0) launch_over_z(attn_bwd_delta_kernel<T>, ceil_div(p.Lq, kDeltaRows), p.Hq, 128, 0, p, stream);
  if (p.Lk > 0)
    launch_over_z(attn_bwd_dkdv_simt_kernel<T>, ceil_div(p.Lk, kSimtBlock), p.Hkv, kSimtThreads,
                  simt_bwd_smem(p.D, p.Dv), p, stream);
  if (p.Lq > 0)
    launch_over_z(attn_bwd_dq_simt_kernel<T>, ceil_div(p.Lq, kSimtBlock), p.Hq, kSimtThreads,
                  simt_bwd_smem(p.D, p.Dv), p, stream);
}

}  // namespace fastattn_cuda
