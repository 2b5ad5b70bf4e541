// The Hopper forward (sm_90a): the FlashAttention-2 forward of fa_kernels.cuh with both products on warpgroup MMAs
// (wgmma, fa_wgmma.cuh) instead of mma.sync, for float16 / bfloat16 at padded head dims 64 and 128.
//
// CTA = 128 queries of one (b, h) (or of one Swin window group: the same layouts, score modifications, dropout and
// split-KV as attn_fwd_kernel -- only the products differ) on 2 warpgroups x 64 rows.  Per K/V tile of BN keys:
//   S[64 x BN] = Q K^T   wgmma SS: Q and K K-major in shared memory, DT / 16 async MMAs of m64nBNk16;
//   softmax              in registers, unchanged (score_tile, online_softmax_tile, dropout_tile of fa_kernels.cuh:
//                        each warp's 16 rows of S are the C fragments those helpers take);
//   O[64 x DT] += P V    wgmma RS: P from registers (c_to_a), V MN-major in shared memory, BN / 16 MMAs of m64nDTk16.
// Q, K and V tiles are stored 128-byte-swizzled (sw128_offset) by cp.async, K/V double-buffered as in the mma.sync
// kernel.  The output is staged through the (then free) K/V buffers with the padded layout of fwd_epilogue.
// Shared memory: Q 16 / 32 KiB + 2 stages x (K, V) 2 x BN x DT x 2 B + 1 KiB of alignment slack: 81 KiB (DT 64) and
// 161 KiB (DT 128) at BN = 128 -- sm_90's 227 KiB, one CTA (8 warps) per SM at DT 128.
//
// What this version does not do yet (bench/NOTES.md, entry 21): overlap a warpgroup's softmax with its own next
// S = Q K^T (FA3's intra-warpgroup pipelining; needs a second S accumulator), TMA loads and a producer warp, explicit
// ping-pong scheduling of the two warpgroups.  The two warpgroups overlap each other only as the scheduler interleaves
// them between the per-tile barriers.
//
// Built only for sm_90a (FASTATTN_CUDA_ARCHS containing "9.0a"); elsewhere the kernel body is empty and
// wgmma_fwd_available() says no.  Not the default until it has run on a GPU: FASTATTN_CUDA_WGMMA=1 selects it.
#pragma once

#include "fa_kernels.cuh"
#include "fa_wgmma.cuh"

namespace fastattn_cuda {

// Keys per K/V tile of the wgmma forward (64 or 128; an A/B knob for the first GPU session).
#ifndef FASTATTN_WGMMA_BN
#define FASTATTN_WGMMA_BN 128
#endif
static_assert(FASTATTN_WGMMA_BN == 64 || FASTATTN_WGMMA_BN == 128, "FASTATTN_WGMMA_BN: 64 or 128");

template <int DT>
struct WgmmaFwdTile {
  static_assert(DT == 64 || DT == 128, "wgmma forward: padded head dim 64 or 128");
  static constexpr int kWarpGroups = 2, kWarps = 4 * kWarpGroups, kThreads = 32 * kWarps;
  static constexpr int kBM = 64 * kWarpGroups;  // queries per CTA (FwdTile<DT>::kBM: split-KV assumes one value)
  static constexpr int kBN = FASTATTN_WGMMA_BN;
  static constexpr int kStages = 2;
  static constexpr int kStageStride = DT + 8;  // the epilogue's padded staging rows
  template <typename T>
  static constexpr size_t smem_bytes() {
    return kSw128AtomBytes + size_t(kBM + 2 * kStages * kBN) * DT * sizeof(T);  // slack, Q, stages x (K, V)
  }
};
static_assert(WgmmaFwdTile<64>::kBM == FwdTile<64>::kBM && WgmmaFwdTile<128>::kBM == FwdTile<128>::kBM,
              "the wgmma forward covers as many queries per CTA as the mma.sync one (choose_splits)");
static_assert(WgmmaFwdTile<128>::kBM * WgmmaFwdTile<128>::kStageStride <= 2 * 2 * WgmmaFwdTile<128>::kBN * 128 &&
                  WgmmaFwdTile<64>::kBM * WgmmaFwdTile<64>::kStageStride <= 2 * 2 * WgmmaFwdTile<64>::kBN * 64,
              "the output staging fits in the K/V buffers");

// Asynchronously copies rows [row0, row0 + ROWS) of a [nrows, d] slice into the 128-byte-swizzled [ROWS][DT] tile
// (zero-filling rows >= nrows and columns >= d), as load_tile_async does for padded tiles.
template <typename T, int ROWS, int DT, int NTHREADS, typename RowFn>
FA_DEVICE void load_tile_sw128_async(T* tile, const T* slice, RowFn rows, int row0, int nrows, int d, int tid) {
  constexpr int kChunks = DT / 8;
#pragma unroll
  for (int i = tid; i < ROWS * kChunks; i += NTHREADS) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    const bool valid = (row0 + r < nrows) && (c < d);
    const T* src = valid ? slice + rows(row0 + r) + c : slice;
    cp_async_16(tile + sw128_offset<ROWS>(r, c), src, valid);
  }
}

template <typename T, int DT>
__global__ void __launch_bounds__(WgmmaFwdTile<DT>::kThreads) attn_fwd_wgmma_kernel(const AttnParams p) {
#if FA_HAS_WGMMA
  using Tile = WgmmaFwdTile<DT>;
  constexpr int BM = Tile::kBM, BN = Tile::kBN, NT = Tile::kThreads, STAGES = Tile::kStages;
  FA_SHARED_MEMORY(smem_raw);
  // The swizzle needs 1024-byte aligned tiles: round the dynamic shared memory up (the 1 KiB of slack).
  const uint32_t misalign = smem_addr(smem_raw) % kSw128AtomBytes;
  T* const sQ = reinterpret_cast<T*>(smem_raw + (misalign ? kSw128AtomBytes - misalign : 0));
  T* const sKV = sQ + BM * DT;  // [STAGES][K, V][BN x DT]: every tile a multiple of 1024 bytes
  auto sK = [&](int stage) { return sKV + stage * 2 * BN * DT; };
  auto sV = [&](int stage) { return sKV + stage * 2 * BN * DT + BN * DT; };

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int wg = warp / 4;  // warpgroup: rows [64 wg, 64 wg + 64) of the block; this warp's 16 are warp_row0 + ...
  const Group grp = cta_group(p);
  const int m_block = blockIdx.x / p.num_splits, split = blockIdx.x % p.num_splits, h = blockIdx.y, b = grp.b;
  const int bh = grp.z * p.Hq + h, hk = h / p.group;
  const int m0 = m_block * BM;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const char* mask = mask_slice(p, grp, h);
  auto q_rows = [&](int m) { return row_offset(p, grp, p.q_sm, p.q_sx, m); };
  auto k_rows = [&](int n) { return row_offset(p, grp, p.k_sm, p.k_sx, n); };
  auto v_rows = [&](int n) { return row_offset(p, grp, p.v_sm, p.v_sx, n); };

  // Keys this block sees, as in attn_fwd_kernel.
  const int n_begin = split * p.keys_per_split;
  int n_end = imin(p.Lk, n_begin + p.keys_per_split);
  if (p.causal) n_end = imin(n_end, imax(0, imin(m0 + BM, p.Lq) + p.causal_offset));
  const int n_tiles = n_end > n_begin ? ceil_div(n_end - n_begin, BN) : 0;

  // Prologue: Q and K/V tile 0 (one group); every iteration commits one group (empty past the last tile).
  load_tile_sw128_async<T, BM, DT, NT>(sQ, qg, q_rows, m0, p.Lq, p.D, tid);
  if (n_tiles > 0) {
    load_tile_sw128_async<T, BN, DT, NT>(sK(0), kg, k_rows, n_begin, p.Lk, p.D, tid);
    load_tile_sw128_async<T, BN, DT, NT>(sV(0), vg, v_rows, n_begin, p.Lk, p.D, tid);
  }
  cp_async_commit();

  const int warp_row0 = 16 * warp;
  const bool wg_active = m0 + 64 * wg < p.Lq;  // wgmma is warpgroup-wide: skip per warpgroup, not per warp
  float acc[1][DT / 8][4];
  float row_max[1][2] = {{-INFINITY, -INFINITY}}, row_sum[1][2] = {{0.f, 0.f}};
#pragma unroll
  for (int i = 0; i < DT / 8; ++i) acc[0][i][0] = acc[0][i][1] = acc[0][i][2] = acc[0][i][3] = 0.f;

  // Descriptors.  Q (this warpgroup's 64 rows) and K: K-major, column block kb = ks / 4 of the tile, +32 bytes per
  // k16 step inside it.  V: MN-major, k16 step ks = keys 16 ks.. = +16 rows of 128 bytes; the head dim's column
  // blocks are BN * 128 bytes apart.
  const uint32_t q_addr = smem_addr(sQ) + wg * 64 * 128;
  auto q_desc = [&](int ks) { return sw128_kmajor_desc(q_addr + sw128_k_kstep_bytes<BM>(ks)); };
  auto k_desc = [&](uint32_t k_addr, int ks) { return sw128_kmajor_desc(k_addr + sw128_k_kstep_bytes<BN>(ks)); };
  auto v_desc = [&](uint32_t v_addr, int ks) {
    return sw128_mnmajor_desc(v_addr + sw128_mn_kstep_bytes(ks), sw128_mn_block_bytes<BN, DT>());
  };

  for (int j = 0; j < n_tiles; ++j) {
    const int st = j % STAGES;
    if (j + 1 < n_tiles) {  // prefetch tile j + 1 into the buffer tile j - 1 used (freed by the last barrier)
      const int sa = (j + 1) % STAGES;
      load_tile_sw128_async<T, BN, DT, NT>(sK(sa), kg, k_rows, n_begin + (j + 1) * BN, p.Lk, p.D, tid);
      load_tile_sw128_async<T, BN, DT, NT>(sV(sa), vg, v_rows, n_begin + (j + 1) * BN, p.Lk, p.D, tid);
    }
    cp_async_commit();
    cp_async_wait<STAGES - 1>();
    fence_proxy_async();  // this thread's cp.async writes -> visible to the wgmma (async proxy) after the barrier
    __syncthreads();
    if (wg_active) {
      const int n0 = n_begin + j * BN;
      const uint32_t k_addr = smem_addr(sK(st)), v_addr = smem_addr(sV(st));

      // S = Q K^T (the first MMA overwrites the accumulator: scale_d = 0).
      float s[1][BN / 8][4];
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < DT / 16; ++ks) wgmma_ss<T, BN>(&s[0][0][0], q_desc(ks), k_desc(k_addr, ks), ks > 0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(s[0]);

      const int row0 = m0 + warp_row0;
      score_tile(p, grp, mask, s, tile_needs_mods(p, m0, m0 + BM, n0, n0 + BN), row0, n0, g, t);
      if (n0 + BN > n_end) {  // a 128-key tile can reach past a split's keys (splits are multiples of 64 keys)
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
          for (int i = 0; i < 4; ++i)
            if (n0 + 8 * nb + 2 * t + (i % 2) >= n_end) s[0][nb][i] = -INFINITY;
      }
      online_softmax_tile(s, acc, row_max, row_sum);
      if (p.dropout) dropout_tile(p, bh, s, row0, n0, g, t);

      // O += P V, P rounded to T in the A-fragment layout.
      uint32_t pf[BN / 16][4];
      c_to_a<T, BN / 8>(pf, s[0]);
      fence_operands(acc[0]);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < BN / 16; ++ks) wgmma_rs<T, DT>(&acc[0][0][0], pf[ks], v_desc(v_addr, ks), 1);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(acc[0]);
    }
    __syncthreads();  // both warpgroups are done with buffer st before iteration j + 1 prefetches into it
  }
  cp_async_wait<0>();
  __syncthreads();  // the K/V buffers are free for the output staging

  fwd_epilogue<T, 1, DT, BM, NT, Tile::kStageStride>(p, grp, bh, split, m0, warp_row0, acc, row_max, row_sum, sKV,
                                                       tid, lane);
#else
  (void)p;  // compiled for an architecture without wgmma: never launched (wgmma_fwd_available)
#endif
}

// Was the wgmma forward compiled for the device's architecture?  Only sm_90a code has it; the build defines
// FASTATTN_HAS_SM90A when FASTATTN_CUDA_ARCHS names 9.0a, and the device must be compute capability 9.0.
inline bool wgmma_fwd_compiled() {
#if defined(FASTATTN_EMULATE) || defined(FASTATTN_HAS_SM90A)
  return true;
#else
  return false;
#endif
}

template <typename T, int DT>
void launch_fwd_wgmma(const AttnParams& p, Stream stream) {
  using Tile = WgmmaFwdTile<DT>;
  if (p.B == 0 || p.Hq == 0 || p.Lq == 0) return;
  launch_over_z(attn_fwd_wgmma_kernel<T, DT>, ceil_div(p.Lq, Tile::kBM) * p.num_splits, p.Hq, Tile::kThreads,
                Tile::template smem_bytes<T>(), p, stream);
  launch_fwd_merge<T>(p, stream);
}

}  // namespace fastattn_cuda
