// The Hopper forward (sm_90a): the FlashAttention-2 forward of fa_kernels.cuh with both products on warpgroup MMAs
// (wgmma, fa_wgmma.cuh) instead of mma.sync, for float16 / bfloat16 at padded head dims 64 and 128.
//
// CTA = 128 queries of one (b, h) (or of one Swin window group: the same layouts, score modifications, dropout and
// split-KV as attn_fwd_kernel -- only the products differ) on 2 warpgroups x 64 rows.  Per K/V tile of BN keys:
//   S[64 x BN] = Q K^T   wgmma SS: Q and K K-major in shared memory, DT / 16 async MMAs of m64nBNk16;
//   softmax              in registers, the mma.sync kernel's code (score_tile, softmax_probs_tile, rescale_rows,
//                        dropout_tile of fa_kernels.cuh: each warp's 16 rows of S are the C fragments they take);
//   O[64 x DT] += P V    wgmma RS: P from registers (c_to_a), V MN-major in shared memory, BN / 16 MMAs of m64nDTk16.
// Schedule (FASTATTN_WGMMA_OVERLAP, default 1): a warpgroup issues the next tile's S = Q K^T and this tile's P V
// back to back and runs the next softmax while P V is still on the tensor cores (FA3's intra-warpgroup overlap;
// O's rescale waits for P V).  0: one product at a time.  S, P and O are live together in both: 255 / 225 registers
// (DT 128 / 64) with the overlap, 240 / 200 without.
// Q, K and V tiles are stored 128-byte-swizzled (sw128_offset) by cp.async, two K and two V slots.  The output is
// staged through the (then free) K/V buffers with the padded layout of fwd_epilogue.  Shared memory: Q 16 / 32 KiB
// + 2 x (K, V) 2 x BN x DT x 2 B + 1 KiB of alignment slack: 81 KiB (DT 64) and 161 KiB (DT 128) at BN = 128 --
// sm_90's 227 KiB, one CTA (8 warps) per SM at DT 128.
//
// Not done yet (bench/NOTES.md, entry 21): TMA loads and a producer warp (the compute warps issue their own cp.async),
// explicit ping-pong of the two warpgroups (named barriers instead of the per-tile __syncthreads, which keeps them in
// step).
//
// Built only for sm_90a (FASTATTN_CUDA_ARCHS containing "9.0a", the default); elsewhere the kernel body is empty and
// wgmma_fwd_compiled() says no.  Not the default until it has run on a GPU: FASTATTN_CUDA_WGMMA=1 selects it.
#pragma once

#include "fa_kernels.cuh"
#include "fa_wgmma.cuh"

namespace fastattn_cuda {

// Keys per K/V tile of the wgmma forward (64 or 128; an A/B knob for the first GPU session).
#ifndef FASTATTN_WGMMA_BN
#define FASTATTN_WGMMA_BN 128
#endif
static_assert(FASTATTN_WGMMA_BN == 64 || FASTATTN_WGMMA_BN == 128, "FASTATTN_WGMMA_BN: 64 or 128");
// 1: each warpgroup runs a tile's softmax while its previous P V product is on the tensor cores (FA3's
// intra-warpgroup overlap); 0: one product at a time (the simpler schedule, an A/B knob and fallback).
#ifndef FASTATTN_WGMMA_OVERLAP
#define FASTATTN_WGMMA_OVERLAP 1
#endif
constexpr bool kWgmmaOverlap = FASTATTN_WGMMA_OVERLAP != 0;

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
  const FwdBlock<T> blk = fwd_block<T>(p, BM);
  const Group& grp = blk.grp;
  const int split = blk.split, bh = blk.bh, m0 = blk.m0, n_begin = blk.n_begin, n_end = blk.n_end;
  const auto q_rows = blk.rows(p, p.q_sm, p.q_sx), k_rows = blk.rows(p, p.k_sm, p.k_sx),
             v_rows = blk.rows(p, p.v_sm, p.v_sx);
  const int n_tiles = n_end > n_begin ? ceil_div(n_end - n_begin, BN) : 0;  // tile j: keys n_begin + j BN ..

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
  // Tile `tile` (keys n_begin + tile BN ..) lives in K slot and V slot tile % 2.
  auto load_k = [&](int tile) {
    load_tile_sw128_async<T, BN, DT, NT>(sK(tile % STAGES), blk.kg, k_rows, n_begin + tile * BN, p.Lk, p.D, tid);
  };
  auto load_v = [&](int tile) {
    load_tile_sw128_async<T, BN, DT, NT>(sV(tile % STAGES), blk.vg, v_rows, n_begin + tile * BN, p.Lk, p.D, tid);
  };
  // S = Q K^T of tile `tile` (the first MMA overwrites the accumulator: scale_d = 0), one commit group.
  auto issue_s = [&](float (&sc)[1][BN / 8][4], int tile) {
    const uint32_t k_addr = smem_addr(sK(tile % STAGES));
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < DT / 16; ++ks) wgmma_ss<T, BN>(&sc[0][0][0], q_desc(ks), k_desc(k_addr, ks), ks > 0);
    wgmma_commit();
  };
  // O += P V of tile `tile`, P in the A-fragment layout, one commit group.  (The caller pins O with fence_operands
  // before the first MMA of the stage: ptxas serialises the MMAs if O's registers are touched while one is in flight.)
  auto issue_pv = [&](const uint32_t (&pf)[BN / 16][4], int tile) {
    const uint32_t v_addr = smem_addr(sV(tile % STAGES));
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks) wgmma_rs<T, DT>(&acc[0][0][0], pf[ks], v_desc(v_addr, ks), 1);
    wgmma_commit();
  };
  // Raw S of tile `tile` -> probabilities (rounded later), the running max / sum, and O's rescale factor.
  auto scores_to_probs = [&](float (&sc)[1][BN / 8][4], int tile, float (&alpha)[1][2]) {
    const int n0 = n_begin + tile * BN, row0 = m0 + warp_row0;
    score_tile(p, grp, blk.mask, sc, tile_needs_mods(p, m0, m0 + BM, n0, n0 + BN), row0, n0, g, t);
    if (n0 + BN > n_end) {  // a 128-key tile can reach past a split's keys (splits are multiples of 64 keys)
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (n0 + 8 * nb + 2 * t + (i % 2) >= n_end) sc[0][nb][i] = -INFINITY;
    }
    softmax_probs_tile(sc, row_max, row_sum, alpha);
    if (p.dropout) dropout_tile(p, bh, sc, row0, n0, g, t);
  };

  if constexpr (kWgmmaOverlap) {
    // FA3's intra-warpgroup overlap: in iteration j the warpgroup issues S_{j+1} = Q K_{j+1}^T, then O += P_j V_j,
    // waits for S_{j+1} only (wait_group 1: groups complete in order) and runs its softmax while P_j V_j is still
    // on the tensor cores; O's rescale and the new P wait for it (wait_group 0).  So iteration j needs K_{j+1} and
    // V_j.  cp.async groups: {Q, K_0}, {K_1, V_0, V_1}, {K_2} (after S_0 has read K slot 0), then at the end of
    // iteration j {K_{j+3}, V_{j+2}} into the slots K_{j+1} and V_j just freed -- two iterations ahead of use, so
    // "at most 1 group pending" at the top of iteration j means K_{j+1} and V_j have landed.
    load_tile_sw128_async<T, BM, DT, NT>(sQ, blk.qg, q_rows, m0, p.Lq, p.D, tid);
    if (n_tiles > 0) load_k(0);
    cp_async_commit();
    if (n_tiles > 1) load_k(1);
    if (n_tiles > 0) load_v(0);
    if (n_tiles > 1) load_v(1);
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();  // this thread's cp.async writes -> visible to the wgmma (async proxy) after the barrier
    __syncthreads();
    uint32_t pf[BN / 16][4];  // P_j, the A operand of the P V product in flight
    if (wg_active && n_tiles > 0) {
      float sc[1][BN / 8][4], alpha[1][2];
      issue_s(sc, 0);
      wgmma_wait<0>();
      fence_operands(sc[0]);
      scores_to_probs(sc, 0, alpha);  // O is still 0: nothing to rescale
      c_to_a<T, BN / 8>(pf, sc[0]);
    }
    __syncthreads();  // K slot 0 is free
    if (n_tiles > 2) load_k(2);
    cp_async_commit();

    for (int j = 0; j < n_tiles; ++j) {
      cp_async_wait<1>();
      fence_proxy_async();
      __syncthreads();
      // (Two straight-line branches: with the next tile's MMA issued under a condition and waited for under the same
      // condition, ptxas cannot prove which group a wait retires and serialises every wgmma of the kernel.)
      if (wg_active && j + 1 < n_tiles) {
        float sc[1][BN / 8][4], alpha[1][2];
        fence_operands(acc[0]);
        issue_s(sc, j + 1);
        issue_pv(pf, j);
        wgmma_wait<1>();  // S_{j+1} has landed; P_j V_j may still run
        fence_operands(sc[0]);
        scores_to_probs(sc, j + 1, alpha);
        wgmma_wait<0>();
        fence_operands(acc[0]);
        fence_operands(pf);  // the P V product read pf until here: the next P may not take its registers earlier
        rescale_rows(acc, alpha);
        c_to_a<T, BN / 8>(pf, sc[0]);
      } else if (wg_active) {  // the last tile
        fence_operands(acc[0]);
        issue_pv(pf, j);
        wgmma_wait<0>();
        fence_operands(acc[0]);
      }
      __syncthreads();  // every warpgroup is done with K slot (j + 1) % 2 and V slot j % 2
      if (j + 3 < n_tiles) load_k(j + 3);
      if (j + 2 < n_tiles) load_v(j + 2);
      cp_async_commit();
    }
  } else {
    // One product at a time: S, softmax, P V, each waited for before the next.  Q and K/V tile 0 are one group;
    // every iteration commits one group (empty past the last tile): tile j + 1 loads while tile j is used.
    load_tile_sw128_async<T, BM, DT, NT>(sQ, blk.qg, q_rows, m0, p.Lq, p.D, tid);
    if (n_tiles > 0) {
      load_k(0);
      load_v(0);
    }
    cp_async_commit();
    for (int j = 0; j < n_tiles; ++j) {
      if (j + 1 < n_tiles) {  // into the slots tile j - 1 used (freed by the last barrier)
        load_k(j + 1);
        load_v(j + 1);
      }
      cp_async_commit();
      cp_async_wait<1>();
      fence_proxy_async();
      __syncthreads();
      if (wg_active) {
        float sc[1][BN / 8][4], alpha[1][2];
        issue_s(sc, j);
        wgmma_wait<0>();
        fence_operands(sc[0]);
        scores_to_probs(sc, j, alpha);
        rescale_rows(acc, alpha);
        uint32_t pf[BN / 16][4];
        c_to_a<T, BN / 8>(pf, sc[0]);
        fence_operands(acc[0]);
        issue_pv(pf, j);
        wgmma_wait<0>();
        fence_operands(acc[0]);
      }
      __syncthreads();  // both warpgroups are done with slot j % 2 before iteration j + 1 loads into it
    }
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
  launch_fwd_kernel<T, WgmmaFwdTile<DT>>(attn_fwd_wgmma_kernel<T, DT>, p, stream);
}

}  // namespace fastattn_cuda
