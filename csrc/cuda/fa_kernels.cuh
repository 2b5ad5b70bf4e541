// FlashAttention-2 forward and backward for fp16/bf16 on tensor cores (mma.sync m16n8k16, sm_80+).
//
// Read top to bottom: parameters -> tile helpers (cp.async loads, warp GEMMs on fragments) -> score
// modifications -> forward kernel -> backward kernels (Delta, dK/dV, dQ) -> launchers.
//
// Conventions, the same as the Triton kernels (fastattn/kernels/triton_attention.py):
//   * scores live in the log2 domain: s2 = (scale * q.k + mask) * log2(e), so the softmax uses exp2;
//   * a fully masked row (no visible key) outputs 0 and lse = -inf; its gradients are 0;
//   * key n is visible to query m iff n <= m + causal_offset (0 for top-left, Lk - Lq for bottom-right);
//   * dropout keeps (query m, key n) of head b*Hq + h iff Philox-4x32-10(seed; n, m, b*Hq + h, 0) says so
//     (fa_primitives.cuh); the backward regenerates the same bits;
//   * GQA: query head h reads key/value head h / group; the dK/dV program of a key/value head loops over its
//     group's query heads and sums in registers (deterministic, no atomics); dQ is a second kernel, also
//     atomics-free, so the whole backward is bitwise reproducible.
//
// Two layouts, a runtime switch (AttnParams.window; no extra instantiations), as the Triton kernels' LAYOUT 0/1:
//   dense:  grid z = batch b; a CTA's rows are row m of the (b, h) slice of [B, H, L, D] tensors;
//   window (Swin W-MSA / SW-MSA, ops window_fwd / window_bwd): grid z = the (batch, window) group b * windows + w,
//           so lse, Delta and dS are [B * windows, heads, N] (N = win_h * win_w tokens, e.g. 49: rows past N are
//           masked like any partial tile) and dropout's head index is z * heads + h; q/k/v/out and their gradients
//           stay images [B, H, W, heads, d], token m read and written at its pixel through the shift + partition
//           map (row_offset); the score modification adds the relative-position bias, read from the float32 table
//           by the in-window offset, and Swin's -100 region mask, computed from coordinates.
//
// Tiles.  A warp computes products 16 rows (one m-tile) at a time, with the C fragment layout of
// fa_primitives.cuh: lane (g, t) holds rows g and g + 8, columns 2t, 2t + 1 of each 8-column block.
// Shared-memory tiles are row-major [rows][DT + 8] (DT = 64 or 128, the padded head dim): the 16-byte pad
// shifts consecutive rows by 4 banks, so the 8 row addresses of every ldmatrix phase hit 8 distinct 16-byte
// bank groups (conflict-free) without a swizzle.  Head dims below DT are zero-filled on load.
//   forward:  CTA = 128 queries of one (b, h): 4 warps x 32 rows (DT 64) or 8 warps x 16 rows (DT 128); K/V
//             tiles of 32 keys, double-buffered through cp.async; Q fragments stay in registers; online
//             softmax in registers.
//   dK/dV:    CTA = 64 keys of one (b, kv head), 4 warps x 16 keys; loops over the query tiles (64 rows for
//             DT 64, 32 for DT 128) of every query head of the group, Q/dO/LSE/Delta double-buffered;
//             computes the transposed products S^T = K Q^T and dP^T = V dO^T so that P^T and dS^T are
//             already in the A-operand layout for dV += P^T dO and dK += dS^T Q.
//   dQ:       CTA = 64 queries of one (b, h), 4 warps x 16 rows; K/V tiles (64 keys, 32 for DT 128)
//             double-buffered; also writes dS (the float mask's or the bias table's gradient) when asked.
// Shared memory per CTA stays under 99 KiB (the opt-in limit of sm_86/sm_89; sm_80 and sm_90 allow more):
// forward 36 KiB (DT 64) / 68 KiB (DT 128) with 2 K/V stages, dK/dV 55 / 68.5 KiB, dQ 54 / 68 KiB (static_asserts
// below; the window layout adds none; DT 256 forward 66 KiB).  Registers, no spills (sm_80 / sm_90a, nvcc 13.0):
// forward 214 / 212 (DT 64), 169 / 172 (DT 128; FASTATTN_FWD_D128_WARPS=4: 244 / 245 before fwd_block), 254 / 253
// (DT 256: at the limit, 2 CTAs of 4 warps per SM); dK/dV 227-235 (DT 64), 236-238 (DT 128); dQ 166 / 166,
// 157 / 158; Delta 38-39 -- as many CTAs per SM as before the window layout.  dQ DT 64 sits just under 168, the most
// for 3 CTAs of 128 threads: a version needing more made ptxas spill instead.  (The sm_90a wgmma forward,
// fa_wgmma_fwd.cuh: 225 / 255.)
#pragma once

#include <cmath>
#include <cstdint>

#include "fa_primitives.cuh"

#ifdef FASTATTN_EMULATE
#define FA_SHARED_MEMORY(name) char* name = fa_emu::tls.cta->smem_base()
#define FA_LAUNCH(kernel, grid, threads, smem_bytes, stream, params) \
  fa_emu::launch(grid, dim3(threads), smem_bytes, [&] { kernel(params); })
#else
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#define FA_SHARED_MEMORY(name) extern __shared__ __align__(16) char name[]
#define FA_LAUNCH(kernel, grid, threads, smem_bytes, stream, params)                                     \
  do {                                                                                                    \
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,              \
                                        static_cast<int>(smem_bytes)));                                  \
    kernel<<<grid, threads, smem_bytes, stream>>>(params);                                                \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                       \
  } while (0)
#endif

namespace fastattn_cuda {

// ==========================================================================================================
// Parameters (one struct for all kernels; strides in elements, head dims contiguous)
// ==========================================================================================================
enum MaskKind : int { kMaskNone = 0, kMaskBool = 1, kMaskFloat = 2 };

struct AttnParams {
  // q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, D]: (batch, head, row) strides
  const void* q;
  const void* k;
  const void* v;
  int64_t q_sb, q_sh, q_sm;
  int64_t k_sb, k_sh, k_sm;
  int64_t v_sb, v_sh, v_sm;
  // mask viewed as [B, Hq, Lq, Lk] (stride 0 along broadcast dims): uint8 (bool, nonzero = attend) or float32
  const void* mask;
  int64_t mk_sb, mk_sh, mk_sm, mk_sn;
  int mask_kind;
  // forward outputs: out [B, Hq, Lq, D] (strided), lse [B, Hq, Lq] contiguous float32 (natural log)
  void* out;
  int64_t o_sb, o_sh, o_sm;
  float* lse;
  // backward: dout like out; dlse [B, Hq, Lq] contiguous or null; delta workspace [B, Hq, Lq];
  // dq/dk/dv like q/k/v; dmask dense [B, Hq, Lq, Lk] float32 or null (every element the kernels visit is written:
  // the dense op zero-initialises it for the tiles causal masking skips)
  const void* dout;
  int64_t do_sb, do_sh, do_sm;
  const float* dlse;
  float* delta;
  void* dq;
  int64_t dq_sb, dq_sh, dq_sm;
  void* dk;
  int64_t dk_sb, dk_sh, dk_sm;
  void* dv;
  int64_t dv_sb, dv_sh, dv_sm;
  float* dmask;
  // sizes (Dv, the head dim of v, out and dout, is the last member: see there)
  int B, Hq, Hkv, group, Lq, Lk, D;
  // score: s2 = q.k * scale_log2 (+ mask * log2 e); visible iff n <= m + causal_offset when causal
  int causal;
  int causal_offset;
  float scale;
  float scale_log2;
  // dropout
  int dropout;
  uint32_t drop_threshold;
  float drop_scale;
  uint64_t seed;
  // grids: z = the batch index b (dense) or the group b * windows + w (window layout); a launch covers at most
  // 65535 of them, z = z0 + blockIdx.z
  int z0;
  // Swin window layout (window != 0, the ops window_fwd / window_bwd): B counts groups (batch, window), Hq = Hkv =
  // heads, Lq = Lk = win_h * win_w tokens.  The tensors are images [batch, img_h, img_w, heads, d]: *_sb, *_sh are
  // the batch and head strides, *_sm the image-row stride and *_sx the column stride (row_offset maps tokens to
  // pixels).  Scores get table[relative position, h] (float32 [(2 win_h - 1)(2 win_w - 1), Hq], contiguous; null
  // without a bias) and, when shifted, Swin's region mask.
  int window;
  int windows, windows_w;   // windows per image, per image row
  int win_h, win_w;
  int shift_h, shift_w;     // the cyclic shift (the region mask's slices)
  int roll_h, roll_w;       // shift mod unpadded size (the index map)
  int un_h, un_w;           // the top-left region the shift wraps in
  int img_h, img_w;
  int shifted;              // shift_h > 0 || shift_w > 0: the region mask applies
  const float* table;
  int64_t q_sx, k_sx, v_sx, o_sx, do_sx, dq_sx, dk_sx, dv_sx;
  // The head dim of v, out and dout: the tensor-core kernels need Dv == D, the CUDA-core ones (fa_simt.cuh) do not.
  // Last, so that the members above keep their offsets: inserted after D it made the DT 64 dQ kernel on sm_90 need
  // 2 more registers and spill (ptxas caps it at 168, 3 CTAs of 128 threads; it uses 166).
  int Dv;
  // Split-KV forward (flash-decoding; dense layout only): grid x = query blocks x num_splits, split s sees keys
  // [s * keys_per_split, (s + 1) * keys_per_split) -- a multiple of kSplitKeyQuantum, so no K/V tile straddles two
  // splits -- and writes its output normalised over those keys (float32) to out_split [num_splits, B, Hq, Lq, Dv]
  // and its LSE (-inf: no key) to lse_split [num_splits, B, Hq, Lq]; attn_fwd_merge_kernel combines them.
  // num_splits = 1: keys_per_split >= Lk and the forward writes out / lse itself.
  int num_splits, keys_per_split;
  float* out_split;
  float* lse_split;
};

constexpr int kSplitKeyQuantum = 64;  // keys_per_split: a multiple of the mma.sync forward's K/V tiles (32 or 64 keys;
                                      // the wgmma forward's 128-key tiles mask keys past the split's end)

FA_DEVICE int imin(int a, int b) { return a < b ? a : b; }
FA_DEVICE int imax(int a, int b) { return a > b ? a : b; }
constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// The group of a CTA: z (rows of lse / Delta / dmask and the dropout head index bh = z * Hq + h), the tensors'
// batch b, and in the window layout the origin of window w = z % windows in the shifted grid.
struct Group {
  int z, b;
  int y0, x0;
};

FA_DEVICE Group cta_group(const AttnParams& p) {
  Group grp;
  grp.z = p.z0 + static_cast<int>(blockIdx.z);
  if (!p.window) {
    grp.b = grp.z;
    grp.y0 = grp.x0 = 0;
  } else {
    const int w = grp.z % p.windows;
    grp.b = grp.z / p.windows;
    grp.y0 = (w / p.windows_w) * p.win_h;
    grp.x0 = (w % p.windows_w) * p.win_w;
  }
  return grp;
}

// Element offset of row m of the group's slice, for a tensor with row stride sm (window layout: image-row stride sm,
// column stride sx).  Window layout: token m sits at (y, x) = (y0 + m / win_w, x0 + m % win_w) of the shifted grid,
// which holds pixel ((y + shift_h) mod un_h, (x + shift_w) mod un_w) -- torch.roll by (-shift_h, -shift_w) -- inside
// the un_h x un_w region the shift wraps in, and pixel (y, x) outside it (padding stays in place).  The partition,
// the shift and their reverse are this map: no copies.
FA_DEVICE int64_t row_offset(const AttnParams& p, const Group& grp, int64_t sm, int64_t sx, int m) {
  if (!p.window) return static_cast<int64_t>(m) * sm;
  const int ty = m / p.win_w;
  int y = grp.y0 + ty, x = grp.x0 + (m - ty * p.win_w);
  if (y < p.un_h && x < p.un_w) {  // roll_h < un_h, y < un_h: one subtraction is the mod
    y += p.roll_h;
    x += p.roll_w;
    if (y >= p.un_h) y -= p.un_h;
    if (x >= p.un_w) x -= p.un_w;
  }
  return static_cast<int64_t>(y) * sm + static_cast<int64_t>(x) * sx;
}

// ==========================================================================================================
// Tile helpers
// ==========================================================================================================

// 16-byte vector copy (global <-> shared; both addresses 16-byte aligned).
FA_DEVICE void copy16(void* dst, const void* src) {
#ifdef FASTATTN_EMULATE
  memcpy(dst, src, 16);
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

FA_DEVICE void store_b32(void* dst, uint32_t v) {
#ifdef FASTATTN_EMULATE
  memcpy(dst, &v, 4);
#else
  *reinterpret_cast<uint32_t*>(dst) = v;
#endif
}

// Asynchronously copies rows [row0, row0 + ROWS) of a [nrows, d] slice (rows(m): row m's element offset, see
// row_offset; d contiguous, d % 8 == 0) into the shared tile [ROWS][DT + 8]; rows >= nrows and columns >= d are
// zero-filled.
template <typename T, int ROWS, int DT, int NTHREADS, typename RowFn>
FA_DEVICE void load_tile_async(T* tile, const T* slice, RowFn rows, int row0, int nrows, int d, int tid) {
  constexpr int kChunks = DT / 8;  // 16-byte chunks per row
  constexpr int kStride = DT + 8;
#pragma unroll
  for (int i = tid; i < ROWS * kChunks; i += NTHREADS) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    const bool valid = (row0 + r < nrows) && (c < d);
    const T* src = valid ? slice + rows(row0 + r) + c : slice;
    cp_async_16(tile + r * kStride + c, src, valid);
  }
}

// Copies the shared tile [ROWS][DT + 8] to rows [row0, row0 + ROWS) of a [nrows, d] slice (rows(m) as above),
// 16 bytes at a time, skipping rows >= nrows and columns >= d.
template <typename T, int ROWS, int DT, int NTHREADS, typename RowFn>
FA_DEVICE void store_tile(T* slice, RowFn rows, const T* tile, int row0, int nrows, int d, int tid) {
  constexpr int kChunks = DT / 8;
  constexpr int kStride = DT + 8;
#pragma unroll
  for (int i = tid; i < ROWS * kChunks; i += NTHREADS) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    if (row0 + r < nrows && c < d) copy16(slice + rows(row0 + r) + c, tile + r * kStride + c);
  }
}

// Writes a warp's 16 x (8 NB) fp32 accumulator fragment, times a per-row factor, into the shared tile rows
// [0, 16) of `tile` (row stride STRIDE) as T.  Lane (g, t) writes rows g, g + 8, columns 8 nb + 2t, +1.
template <typename T, int NB, int STRIDE>
FA_DEVICE void frag_to_smem(T* tile, const float (&c)[NB][4], float mul_row_g, float mul_row_g8, int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
    store_b32(tile + g * STRIDE + nb * 8 + 2 * t, pack2<T>(c[nb][0] * mul_row_g, c[nb][1] * mul_row_g));
    store_b32(tile + (g + 8) * STRIDE + nb * 8 + 2 * t, pack2<T>(c[nb][2] * mul_row_g8, c[nb][3] * mul_row_g8));
  }
}

// A-operand fragments of the 16 x (16 KS) block whose first row is `a` (row-major shared tile).
// ldmatrix.x4: lane l addresses row (l & 7) + 8 ((l >> 3) & 1), column 8 (l >> 4) of the 16 x 16 block, so the
// four 8 x 8 matrices are (rows 0-7, cols 0-7) -> a0, (rows 8-15, cols 0-7) -> a1, (rows 0-7, cols 8-15) -> a2,
// (rows 8-15, cols 8-15) -> a3.
template <int KS, typename T>
FA_DEVICE void load_a_frags(uint32_t (&af)[KS][4], const T* a, int stride, int lane) {
  const int row = (lane & 7) + ((lane >> 3) & 1) * 8, col = (lane >> 4) * 8;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) ldmatrix_x4(af[ks], a + row * stride + ks * 16 + col);
}

// B-operand fragments of k-step [k0, k0 + 16) for the two 8-column blocks [n0, n0 + 16):
//   b[0], b[1] = (b0, b1) of columns n0..n0+7;  b[2], b[3] = (b0, b1) of columns n0+8..n0+15.
// KMAJOR = false: B[k][n] = X[n][k] with X a row-major shared tile whose rows are n (e.g. K for S = Q K^T).
//   b0 = B[2t, 2t+1][g] = X[g][2t, 2t+1]: plain ldmatrix of the 8 x 8 blocks of X; lane l addresses row
//   n0 + (l & 7) + 8 (l >> 4), column k0 + 8 ((l >> 3) & 1): matrices (n 0-7, k 0-7), (n 0-7, k 8-15),
//   (n 8-15, k 0-7), (n 8-15, k 8-15).
// KMAJOR = true: B[k][n] = Y[k][n] with Y row-major, rows k (e.g. V for O = P V).  b0 = Y[2t, 2t+1][g]:
//   ldmatrix.trans; lane l addresses row k0 + (l & 7) + 8 ((l >> 3) & 1), column n0 + 8 (l >> 4): matrices
//   (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
template <bool KMAJOR, typename T>
FA_DEVICE void load_b_pair(uint32_t (&b)[4], const T* x, int stride, int n0, int k0, int lane) {
  const int r = lane & 7, hi8 = (lane >> 4) * 8, mid8 = ((lane >> 3) & 1) * 8;
  if (!KMAJOR)
    ldmatrix_x4(b, x + (n0 + r + hi8) * stride + k0 + mid8);
  else
    ldmatrix_x4_trans(b, x + (k0 + r + mid8) * stride + n0 + hi8);
}

// c[16 x 8 NB] += A[16 x 16 KS] * B, A from registers.
template <typename T, int KS, int NB, bool KMAJOR>
FA_DEVICE void gemm_rs(float (&c)[NB][4], const uint32_t (&af)[KS][4], const T* bs, int stride, int lane) {
  static_assert(NB % 2 == 0, "n-blocks come in pairs");
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
    for (int np = 0; np < NB / 2; ++np) {
      uint32_t b[4];
      load_b_pair<KMAJOR>(b, bs, stride, np * 16, ks * 16, lane);
      mma_16816<T>(c[2 * np], af[ks], b[0], b[1]);
      mma_16816<T>(c[2 * np + 1], af[ks], b[2], b[3]);
    }
  }
}

// c[16 x 8 NB] += A[16 x 16 KS] * B, A read k-step by k-step from the row-major shared tile rows at `as`.
template <typename T, int KS, int NB, bool KMAJOR>
FA_DEVICE void gemm_ss(float (&c)[NB][4], const T* as, int a_stride, const T* bs, int b_stride, int lane) {
  static_assert(NB % 2 == 0, "n-blocks come in pairs");
  const int row = (lane & 7) + ((lane >> 3) & 1) * 8, col = (lane >> 4) * 8;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    uint32_t a[4];
    ldmatrix_x4(a, as + row * a_stride + ks * 16 + col);
#pragma unroll
    for (int np = 0; np < NB / 2; ++np) {
      uint32_t b[4];
      load_b_pair<KMAJOR>(b, bs, b_stride, np * 16, ks * 16, lane);
      mma_16816<T>(c[2 * np], a, b[0], b[1]);
      mma_16816<T>(c[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// The C fragment of a 16 x 16j block is the A fragment of the same block once rounded to T: columns
// 16j + 2t, +1 of n-block 2j are a0 (row g) and a1 (row g + 8); n-block 2j + 1 gives a2 and a3.  This is how
// P (and dS) go from one MMA's output to the next one's input without leaving registers.
template <typename T, int NB>
FA_DEVICE void c_to_a(uint32_t (&af)[NB / 2][4], const float (&c)[NB][4]) {
#pragma unroll
  for (int j = 0; j < NB / 2; ++j) {
    af[j][0] = pack2<T>(c[2 * j][0], c[2 * j][1]);
    af[j][1] = pack2<T>(c[2 * j][2], c[2 * j][3]);
    af[j][2] = pack2<T>(c[2 * j + 1][0], c[2 * j + 1][1]);
    af[j][3] = pack2<T>(c[2 * j + 1][2], c[2 * j + 1][3]);
  }
}

// ==========================================================================================================
// Score modifications
// ==========================================================================================================

constexpr float kRegionMaskLog2 = -100.f * kLog2e;  // Swin's -100 between shift regions, in log2 units

// Swin's shift regions along one axis of the shifted grid are timm's slices [0, len - win), [len - win, len - shift),
// [len - shift, len) (a zero shift: one region).  The windows tile the axis, so all of them lie in the first region
// except the last one, whose tokens split at in-window position win - shift.  Returns that split for the window at
// `origin` (win, i.e. no split, for the others).
FA_DEVICE int region_split(int origin, int len, int win, int shift) {
  return origin + win == len && shift > 0 ? win - shift : win;
}

// Log2-domain score of (query m, key n) from the raw product x = q.k: -inf outside [0, Lq) x [0, Lk), above
// the causal diagonal or where the bool mask is false; plus the float mask (natural-log units) otherwise.
// `mask` is what mask_slice returns for the (group, head).  Window layout: plus the relative-position bias
// table[(dy + win_h - 1)(2 win_w - 1) + dx + win_w - 1, h] for the in-window offset (dy, dx) of query m from key n
// (timm's relative_position_index), and -100 between tokens of different shift regions when shifted.
FA_DEVICE float modified_score(const AttnParams& p, const Group& grp, const char* mask, float x, int m, int n) {
  const bool visible = m < p.Lq && n < p.Lk && (!p.causal || n <= m + p.causal_offset);
  if (!visible) return -INFINITY;
  float s = x * p.scale_log2;
  if (p.window) {
    const int qy = m / p.win_w, qx = m - qy * p.win_w, ky = n / p.win_w, kx = n - ky * p.win_w;
    if (mask != nullptr) {
      const int row = (qy - ky + p.win_h - 1) * (2 * p.win_w - 1) + (qx - kx + p.win_w - 1);
      s += reinterpret_cast<const float*>(mask)[row * p.Hq] * kLog2e;
    }
    if (p.shifted) {  // the regions of the window's tokens split at the in-window row y_split and column x_split
      const int y_split = region_split(grp.y0, p.img_h, p.win_h, p.shift_h);
      const int x_split = region_split(grp.x0, p.img_w, p.win_w, p.shift_w);
      if ((qy >= y_split) != (ky >= y_split) || (qx >= x_split) != (kx >= x_split)) s += kRegionMaskLog2;
    }
  } else if (p.mask_kind != kMaskNone) {
    const int64_t off = static_cast<int64_t>(m) * p.mk_sm + static_cast<int64_t>(n) * p.mk_sn;
    if (p.mask_kind == kMaskBool) {
      if (reinterpret_cast<const uint8_t*>(mask)[off] == 0) s = -INFINITY;
    } else {
      s += reinterpret_cast<const float*>(mask)[off] * kLog2e;
    }
  }
  return s;
}

// Does the tile [m_lo, m_hi) x [n_lo, n_hi) need per-element work (bounds, causal diagonal, mask, bias table,
// region mask)?
FA_DEVICE bool tile_needs_mods(const AttnParams& p, int m_lo, int m_hi, int n_lo, int n_hi) {
  (void)n_lo;
  return p.mask_kind != kMaskNone || p.table != nullptr || p.shifted || m_hi > p.Lq || n_hi > p.Lk ||
         (p.causal && n_hi - 1 > m_lo + p.causal_offset);
}

// The (group, head) slice of the mask, or in the window layout the bias table's column of head h (elements
// Hq apart); null without either.
FA_DEVICE const char* mask_slice(const AttnParams& p, const Group& grp, int h) {
  if (p.window) return p.table == nullptr ? nullptr : reinterpret_cast<const char*>(p.table + h);
  if (p.mask_kind == kMaskNone) return nullptr;
  const int elem = p.mask_kind == kMaskBool ? 1 : 4;
  const int64_t offset = static_cast<int64_t>(grp.b) * p.mk_sb + static_cast<int64_t>(h) * p.mk_sh;
  return static_cast<const char*>(p.mask) + offset * elem;
}

// LSE in log2 units for P = exp2(s2 - lse2); a fully masked row (lse = -inf) becomes +inf so that P = 0.
FA_DEVICE float lse_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// Dropout keep-bits of the N <= 32 score elements a lane holds (bit e for element e; row(e), col(e) give its
// query and key).  A rolled loop: the Philox rounds of one element at a time, instead of N interleaved copies
// competing for registers with the accumulators; the callers then test constant bit positions.
template <int N, typename RowFn, typename ColFn>
FA_DEVICE uint32_t dropout_keep_bits(const AttnParams& p, int bh, RowFn row, ColFn col) {
  static_assert(N <= 32, "one bit per element");
  uint32_t bits = 0;
#pragma unroll 1
  for (int e = 0; e < N; ++e)
    bits |= static_cast<uint32_t>(dropout_keep(p.seed, p.drop_threshold, row(e), col(e), bh)) << e;
  return bits;
}

// ==========================================================================================================
// Forward
// ==========================================================================================================
#ifndef FASTATTN_FWD_STAGES
#define FASTATTN_FWD_STAGES 2
#endif
static_assert(FASTATTN_FWD_STAGES >= 2, "FASTATTN_FWD_STAGES: at least double buffering");
// Keys per K/V tile of the DT 128 forward (32 or 64).  64 halves the per-tile fixed costs (two barriers, the O
// rescale, the row-max shuffles) per key; unmeasured so far (bench/NOTES.md, entry 8).  DT 64 stays at 32: its two
// m-tiles per warp would need 48 more registers for S and P and spill.
#ifndef FASTATTN_FWD_BN_D128
#define FASTATTN_FWD_BN_D128 32
#endif
static_assert(FASTATTN_FWD_BN_D128 == 32 || FASTATTN_FWD_BN_D128 == 64, "FASTATTN_FWD_BN_D128: 32 or 64");
// Warps of the DT 128 forward CTA (8 or 4; bench/NOTES.md entry 14).  8: 16 rows per warp, Q fragments in registers.
// 4: 32 rows per warp (two m-tiles), as DT 64 -- each K/V fragment loaded from shared memory serves twice the MMAs,
// which halves the ldmatrix traffic of K and V (the d128 forward's shared-memory reads exceed its MMA time by an
// estimated 30 % with 8 warps) -- and Q re-read from shared memory at every k-step, since two m-tiles of Q fragments
// (64 registers) next to their O accumulators (128) would not fit.  Unmeasured; 8 stays the default until then.
#ifndef FASTATTN_FWD_D128_WARPS
#define FASTATTN_FWD_D128_WARPS 8
#endif
static_assert(FASTATTN_FWD_D128_WARPS == 8 || FASTATTN_FWD_D128_WARPS == 4, "FASTATTN_FWD_D128_WARPS: 8 or 4");

template <int DT>
struct FwdTile {
  // DT 64: 4 warps x 32 rows (two 16-row m-tiles share every K/V fragment: half the ldmatrix traffic per MMA);
  // DT 128: 8 warps x 16 rows (two m-tiles with Q fragments in registers would need ~290 registers for O, S and Q),
  // or with FASTATTN_FWD_D128_WARPS=4 4 warps x 32 rows with Q read from shared memory (kQInSmem).
  // DT 256 (head dims 136..256, the forward only; their backward runs on the CUDA-core kernels): 4 warps x 16 rows,
  // Q fragments (64 registers) and O (128) in registers, 32-key tiles with Q aliased into the last stage: 66 KiB.
  static constexpr bool kQInSmem = DT == 128 && FASTATTN_FWD_D128_WARPS == 4;
  static constexpr int kMT = DT <= 64 || kQInSmem ? 2 : 1;  // 16-row m-tiles per warp
  static constexpr int kWarps = DT <= 64 || kQInSmem || DT > 128 ? 4 : 8, kThreads = 32 * kWarps;
  static constexpr int kBM = 16 * kMT * kWarps;   // queries per CTA (128; 64 for DT 256)
  static constexpr int kBN = DT <= 64 || DT > 128 ? 32 : FASTATTN_FWD_BN_D128;  // keys per K/V tile
  // K/V tiles in shared memory: tile j + kStages - 1 is fetched while tile j is used.  Measured on an H200
  // (bench/NOTES.md, entry 8): 3 stages ran 2-3 % slower than 2 at every shape -- the forward is not waiting on
  // its loads -- so the default stays double buffering (4 stages exceed the 99 KiB limit at DT 128).
  static constexpr int kStages = FASTATTN_FWD_STAGES;
  static constexpr int kStride = DT + 8;
  // Q is read into registers once, in the first iteration; when one stage's K + V tiles are at least as large as
  // the Q tile (64-key tiles), Q lives in the last stage's buffers -- which the first iteration fills only after
  // reading Q -- and the CTA needs no separate Q tile (DT 128, 64 keys: 68 KiB instead of 102).
  static constexpr bool kAliasQ = 2 * kBN >= kBM && !kQInSmem;
  template <typename T>
  static constexpr size_t smem_bytes() {
    return size_t((kAliasQ ? 0 : kBM) + 2 * kStages * kBN) * kStride * sizeof(T);  // [Q], stages x (K, V)
  }
};

// c[mt] += A[mt] * B for MT 16-row A tiles read k-step by k-step from the row-major shared tile rows at `as` (tile mt
// starts at row 16 mt): each B fragment pair is loaded once for all of them.
template <typename T, int MT, int KS, int NB, bool KMAJOR>
FA_DEVICE void gemm_ss_mt(float (&c)[MT][NB][4], const T* as, int a_stride, const T* bs, int stride, int lane) {
  static_assert(NB % 2 == 0, "n-blocks come in pairs");
  const int row = (lane & 7) + ((lane >> 3) & 1) * 8, col = (lane >> 4) * 8;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], as + (16 * mt + row) * a_stride + ks * 16 + col);
#pragma unroll
    for (int np = 0; np < NB / 2; ++np) {
      uint32_t b[4];
      load_b_pair<KMAJOR>(b, bs, stride, np * 16, ks * 16, lane);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(c[mt][2 * np], a[mt], b[0], b[1]);
        mma_16816<T>(c[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// c[mt] += A[mt] * B for MT 16-row A tiles held in registers: each B fragment pair is loaded once for all of them.
template <typename T, int MT, int KS, int NB, bool KMAJOR>
FA_DEVICE void gemm_rs_mt(float (&c)[MT][NB][4], const uint32_t (&af)[MT][KS][4], const T* bs, int stride, int lane) {
  static_assert(NB % 2 == 0, "n-blocks come in pairs");
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
    for (int np = 0; np < NB / 2; ++np) {
      uint32_t b[4];
      load_b_pair<KMAJOR>(b, bs, stride, np * 16, ks * 16, lane);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(c[mt][2 * np], af[mt][ks], b[0], b[1]);
        mma_16816<T>(c[mt][2 * np + 1], af[mt][ks], b[2], b[3]);
      }
    }
  }
}

// Where a forward CTA works (both forward kernels): its group, split and head, its first query m0 (query block
// blockIdx.x / num_splits of BM rows), the (b, h) slices of q, k and v (k and v of the head's key/value head), the
// mask slice, and the keys any of its rows can see -- this split's range [n_begin, n_begin + keys_per_split) cut
// at the last valid row's causal limit (row m sees n <= m + causal_offset): [n_begin, n_end).
template <typename T>
struct FwdBlock {
  Group grp;
  int split, h, bh, m0;
  const T* qg;
  const T* kg;
  const T* vg;
  const char* mask;
  int n_begin, n_end;
  // rows(p, sm, sx)(m): element offset of row m of the group's slice of a tensor with those strides (row_offset)
  FA_DEVICE auto rows(const AttnParams& p, int64_t sm, int64_t sx) const {
    return [&p, this, sm, sx](int m) { return row_offset(p, grp, sm, sx, m); };
  }
};

template <typename T>
FA_DEVICE FwdBlock<T> fwd_block(const AttnParams& p, int BM) {
  FwdBlock<T> blk;
  blk.grp = cta_group(p);
  blk.split = blockIdx.x % p.num_splits;
  blk.h = blockIdx.y;
  blk.bh = blk.grp.z * p.Hq + blk.h;
  blk.m0 = (blockIdx.x / p.num_splits) * BM;
  const int b = blk.grp.b, hk = blk.h / p.group;
  blk.qg = static_cast<const T*>(p.q) + b * p.q_sb + blk.h * p.q_sh;
  blk.kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  blk.vg = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  blk.mask = mask_slice(p, blk.grp, blk.h);
  blk.n_begin = blk.split * p.keys_per_split;
  blk.n_end = imin(p.Lk, blk.n_begin + p.keys_per_split);
  if (p.causal) blk.n_end = imin(blk.n_end, imax(0, imin(blk.m0 + BM, p.Lq) + p.causal_offset));
  return blk;
}

// The per-tile steps of the forward that do not depend on how S and O are multiplied (mma.sync here, wgmma in
// fa_wgmma_fwd.cuh).  A warp holds MT 16-row m-tiles of S [MT][NB][4] (NB = keys / 8) and of O [MT][NO][4]
// (NO = head dim / 8) as C fragments: element (mt, nb, i) is query row0 + 16 mt + g + 8 (i / 2), key
// n0 + 8 nb + 2t + i % 2.

// Raw products -> log2-domain scores: the score modifications where the tile needs them, else only the scale.
template <int MT, int NB>
FA_DEVICE void score_tile(const AttnParams& p, const Group& grp, const char* mask, float (&s)[MT][NB][4], bool mods,
                          int row0, int n0, int g, int t) {
  if (mods) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          s[mt][nb][i] = modified_score(p, grp, mask, s[mt][nb][i], row0 + 16 * mt + g + 8 * (i / 2),
                                        n0 + 8 * nb + 2 * t + (i % 2));
  } else {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int i = 0; i < 4; ++i) s[mt][nb][i] *= p.scale_log2;
  }
}

// Online softmax: scores -> unnormalised probabilities exp2(s2 - running max), and the factor alpha by which O (and the
// partial sums, done here) must be rescaled.  Row r of an m-tile is spread over the 4 lanes of its quad (same g):
// reduce the tile max with two xor-shuffles.  With the new max m_new, everything accumulated so far was relative to
// the old max, so it is rescaled by alpha = exp2(m_old - m_new).  A row that has seen only -inf keeps m_new = -inf;
// subtracting 0 instead keeps exp2 away from (-inf) - (-inf) = NaN.
template <int MT, int NB>
FA_DEVICE void softmax_probs_tile(float (&s)[MT][NB][4], float (&row_max)[MT][2], float (&row_sum)[MT][2],
                                  float (&alpha)[MT][2]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) mx = fmaxf(mx, fmaxf(s[mt][nb][2 * r], s[mt][nb][2 * r + 1]));
      mx = fmaxf(mx, shfl_xor(mx, 1));
      mx = fmaxf(mx, shfl_xor(mx, 2));
      const float m_new = fmaxf(row_max[mt][r], mx);
      const float m_sub = m_new == -INFINITY ? 0.f : m_new;
      alpha[mt][r] = fast_exp2(row_max[mt][r] - m_sub);
      row_max[mt][r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        s[mt][nb][2 * r] = fast_exp2(s[mt][nb][2 * r] - m_sub);
        s[mt][nb][2 * r + 1] = fast_exp2(s[mt][nb][2 * r + 1] - m_sub);
        sum += s[mt][nb][2 * r] + s[mt][nb][2 * r + 1];
      }
      row_sum[mt][r] = row_sum[mt][r] * alpha[mt][r] + sum;  // the normaliser counts probabilities before dropout
    }
  }
}

// O *= alpha, row by row (C fragment rows g and g + 8 of each m-tile: elements 0, 1 and 2, 3).
template <int MT, int NO>
FA_DEVICE void rescale_rows(float (&acc)[MT][NO][4], const float (&alpha)[MT][2]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nb = 0; nb < NO; ++nb) {
      acc[mt][nb][0] *= alpha[mt][0];
      acc[mt][nb][1] *= alpha[mt][0];
      acc[mt][nb][2] *= alpha[mt][1];
      acc[mt][nb][3] *= alpha[mt][1];
    }
}

// Both, for kernels whose O is not being written by an MMA in flight.
template <int MT, int NB, int NO>
FA_DEVICE void online_softmax_tile(float (&s)[MT][NB][4], float (&acc)[MT][NO][4], float (&row_max)[MT][2],
                                   float (&row_sum)[MT][2]) {
  float alpha[MT][2];
  softmax_probs_tile(s, row_max, row_sum, alpha);
  rescale_rows(acc, alpha);
}

// Dropout on the probabilities: dropped elements 0, kept ones scaled by 1 / (1 - p).  The keep-bits come 32 at a
// time: all of a lane's elements at once when there are at most 32 (element e = (mt NB + nb) 4 + i), else per m-tile
// and group of 8 n-blocks (the wgmma forward's 128-key tiles: 64 per lane).
template <int MT, int NB>
FA_DEVICE void dropout_tile(const AttnParams& p, int bh, float (&s)[MT][NB][4], int row0, int n0, int g, int t) {
  if constexpr (MT * NB * 4 <= 32) {
    const uint32_t keep = dropout_keep_bits<MT * NB * 4>(
        p, bh, [&](int e) { return row0 + 16 * (e / (4 * NB)) + g + 8 * ((e % 4) / 2); },
        [&](int e) { return n0 + 8 * ((e / 4) % NB) + 2 * t + (e % 2); });
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          s[mt][nb][i] = (keep >> ((mt * NB + nb) * 4 + i)) & 1u ? s[mt][nb][i] * p.drop_scale : 0.f;
  } else {
    static_assert(NB % 8 == 0, "n-blocks in groups of 8");
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int c = 0; c < NB / 8; ++c) {  // element e = (nb - 8 c) 4 + i
        const uint32_t keep = dropout_keep_bits<32>(
            p, bh, [&](int e) { return row0 + 16 * mt + g + 8 * ((e % 4) / 2); },
            [&](int e) { return n0 + 8 * (8 * c + e / 4) + 2 * t + (e % 2); });
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
          for (int i = 0; i < 4; ++i)
            s[mt][8 * c + nb][i] = (keep >> (nb * 4 + i)) & 1u ? s[mt][8 * c + nb][i] * p.drop_scale : 0.f;
      }
  }
}

// After the last tile: O / row sum and the LSE.  Split-KV: this split's normalised output (float32) and LSE,
// straight from the fragments.  Otherwise the tile is staged through `stage` (BM rows of stride STRIDE; free
// shared memory) for 16-byte global stores.  Every thread of the CTA calls it (it has barriers).
template <typename T, int MT, int DT, int BM, int NT, int STRIDE>
FA_DEVICE void fwd_epilogue(const AttnParams& p, const Group& grp, int bh, int split, int m0, int warp_row0,
                            const float (&acc)[MT][DT / 8][4], const float (&row_max)[MT][2],
                            const float (&row_sum)[MT][2], T* stage, int tid, int lane) {
  const int g = lane / 4, t = lane % 4;
  if (p.num_splits > 1) {
    const int64_t split_row0 = (static_cast<int64_t>(split) * p.B * p.Hq + bh) * p.Lq;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float l = row_sum[mt][r];
        l += shfl_xor(l, 1);
        l += shfl_xor(l, 2);
        const int m = m0 + warp_row0 + 16 * mt + g + 8 * r;
        if (m >= p.Lq) continue;
        const float inv = l != 0.f ? 1.f / l : 0.f;  // l = 0: no key seen; l NaN (a NaN score) stays NaN
        float* o = p.out_split + (split_row0 + m) * p.D;
#pragma unroll
        for (int nb = 0; nb < DT / 8; ++nb) {
          const int c = 8 * nb + 2 * t;
          if (c < p.D) {  // D is a multiple of 8: columns c and c + 1 are both in range
            o[c] = acc[mt][nb][2 * r] * inv;
            o[c + 1] = acc[mt][nb][2 * r + 1] * inv;
          }
        }
        if (t == 0) p.lse_split[split_row0 + m] = l != 0.f ? (row_max[mt][r] + fast_log2(l)) * kLn2 : -INFINITY;
      }
    }
    return;
  }

  // Normalise, stage the tile through shared memory (16-byte global stores), write the LSE.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float inv[2], lse[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[mt][r];
      l += shfl_xor(l, 1);
      l += shfl_xor(l, 2);
      inv[r] = l != 0.f ? 1.f / l : 0.f;  // l = 0: no key seen (out 0, lse -inf); NaN: a NaN score, NaN out
      lse[r] = l != 0.f ? (row_max[mt][r] + fast_log2(l)) * kLn2 : -INFINITY;
    }
    frag_to_smem<T, DT / 8, STRIDE>(stage + (warp_row0 + 16 * mt) * STRIDE, acc[mt], inv[0], inv[1], lane);
    if (t == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int m = m0 + warp_row0 + 16 * mt + g + 8 * r;
        if (m < p.Lq) p.lse[static_cast<int64_t>(bh) * p.Lq + m] = lse[r];
      }
    }
  }
  __syncthreads();
  T* og = static_cast<T*>(p.out) + grp.b * p.o_sb + blockIdx.y * p.o_sh;
  auto o_rows = [&](int m) { return row_offset(p, grp, p.o_sm, p.o_sx, m); };
  store_tile<T, BM, DT, NT>(og, o_rows, stage, m0, p.Lq, p.D, tid);
}

template <typename T, int DT>
__global__ void __launch_bounds__(FwdTile<DT>::kThreads) attn_fwd_kernel(const AttnParams p) {
  using Tile = FwdTile<DT>;
  constexpr int MT = Tile::kMT, BM = Tile::kBM, BN = Tile::kBN, S = Tile::kStride, NT = Tile::kThreads;
  constexpr int KS = DT / 16, STAGES = Tile::kStages;
  FA_SHARED_MEMORY(smem);
  // [Q: BM][S] unless aliased, then [STAGES][K, V][BN][S]; sQ is reused to stage the output.
  T* const sKV = reinterpret_cast<T*>(smem) + (Tile::kAliasQ ? 0 : BM * S);
  T* const sQ = Tile::kAliasQ ? sKV + (STAGES - 1) * 2 * BN * S : reinterpret_cast<T*>(smem);
  auto sK = [&](int stage) { return sKV + stage * 2 * BN * S; };
  auto sV = [&](int stage) { return sKV + stage * 2 * BN * S + BN * S; };

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const FwdBlock<T> blk = fwd_block<T>(p, BM);
  const Group& grp = blk.grp;
  const int split = blk.split, bh = blk.bh, m0 = blk.m0, n_begin = blk.n_begin, n_end = blk.n_end;
  const auto q_rows = blk.rows(p, p.q_sm, p.q_sx), k_rows = blk.rows(p, p.k_sm, p.k_sx),
             v_rows = blk.rows(p, p.v_sm, p.v_sx);
  const int n_tiles = n_end > n_begin ? ceil_div(n_end - n_begin, BN) : 0;  // tile j: keys n_begin + j BN ..

  // Pipeline prologue: Q (group 0), K/V tiles 0 .. STAGES - 2 (groups 1 .. STAGES - 1).  Every stage commits a
  // group, empty past the last tile, so that "tile j has landed" is always "at most STAGES - 1 groups pending".
  load_tile_async<T, BM, DT, NT>(sQ, blk.qg, q_rows, m0, p.Lq, p.D, tid);
  cp_async_commit();
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < n_tiles) {
      load_tile_async<T, BN, DT, NT>(sK(st), blk.kg, k_rows, n_begin + st * BN, p.Lk, p.D, tid);
      load_tile_async<T, BN, DT, NT>(sV(st), blk.vg, v_rows, n_begin + st * BN, p.Lk, p.D, tid);
    }
    cp_async_commit();
  }

  // This warp owns rows [warp_row0, warp_row0 + 16 MT) of the block: m-tile mt holds rows 16 mt + g and
  // 16 mt + g + 8 in this lane (index r = 0, 1 below).
  const int warp_row0 = warp * 16 * MT;
  const bool warp_active = m0 + warp_row0 < p.Lq;
  float acc[MT][DT / 8][4];  // O (unnormalised)
  float row_max[MT][2];      // running max of s2 per row (log2 domain)
  float row_sum[MT][2];      // this lane's part of sum exp2(s2 - row_max) per row
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < DT / 8; ++i) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }
  // Q fragments, loaded once (a placeholder when Q is read from shared memory at every k-step: kQInSmem)
  uint32_t qf[Tile::kQInSmem ? 1 : MT][Tile::kQInSmem ? 1 : KS][4];

  for (int j = 0; j < n_tiles; ++j) {
    const int st = j % STAGES;
    if constexpr (Tile::kAliasQ) {
      if (j == 0) {  // Q shares the buffers the prefetch below fills: read it into registers first
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) load_a_frags<KS>(qf[mt], sQ + (warp_row0 + 16 * mt) * S, S, lane);
        __syncthreads();
      }
    }
    // Prefetch tile j + STAGES - 1 into the buffer tile j - 1 used (freed by the __syncthreads at the end of
    // iteration j - 1), then wait for tile j (and Q): the STAGES - 1 newer groups may stay in flight.
    const int ahead = j + STAGES - 1;
    if (ahead < n_tiles) {
      const int sa = ahead % STAGES;
      load_tile_async<T, BN, DT, NT>(sK(sa), blk.kg, k_rows, n_begin + ahead * BN, p.Lk, p.D, tid);
      load_tile_async<T, BN, DT, NT>(sV(sa), blk.vg, v_rows, n_begin + ahead * BN, p.Lk, p.D, tid);
    }
    cp_async_commit();
    cp_async_wait<STAGES - 1>();
    __syncthreads();
    if constexpr (!Tile::kAliasQ && !Tile::kQInSmem) {
      if (j == 0) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) load_a_frags<KS>(qf[mt], sQ + (warp_row0 + 16 * mt) * S, S, lane);
      }
    }
    // A warp whose rows all lie past Lq skips the products and the softmax (it still loads and meets the
    // barriers): the last query block of a sequence, and half the warps of a Swin window CTA (49 of 128 rows).
    if (warp_active) {
      const T* kt = sK(st);
      const T* vt = sV(st);
      const int n0 = n_begin + j * BN;

      // S = Q K^T for this warp's rows x BN keys (fp32).
      float s[MT][BN / 8][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
      if constexpr (Tile::kQInSmem)
        gemm_ss_mt<T, MT, KS, BN / 8, false>(s, sQ + warp_row0 * S, S, kt, S, lane);
      else
        gemm_rs_mt<T, MT, KS, BN / 8, false>(s, qf, kt, S, lane);

      const int row0 = m0 + warp_row0;
      score_tile(p, grp, blk.mask, s, tile_needs_mods(p, m0, m0 + BM, n0, n0 + BN), row0, n0, g, t);
      online_softmax_tile(s, acc, row_max, row_sum);
      if (p.dropout) dropout_tile(p, bh, s, row0, n0, g, t);

      // O += P V: P (rounded to T) goes from C to A fragments in registers; V is the k-major B operand.
      uint32_t pf[MT][BN / 16][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) c_to_a<T, BN / 8>(pf[mt], s[mt]);
      gemm_rs_mt<T, MT, BN / 16, DT / 8, true>(acc, pf, vt, S, lane);
    }
    __syncthreads();  // every warp is done with buffer st before iteration j + 1 prefetches into it
  }
  cp_async_wait<0>();
  __syncthreads();  // sQ is free (when n_tiles == 0, Q's copy may still have been in flight)

  fwd_epilogue<T, MT, DT, BM, NT, S>(p, grp, bh, split, m0, warp_row0, acc, row_max, row_sum, sQ, tid, lane);
}

// Split-KV merge (flash-decoding): with O_s, LSE_s each split's output (normalised over its keys) and log-sum-exp,
// the result is LSE = log sum_s exp(LSE_s) and O = sum_s exp(LSE_s - LSE) O_s.  Computed online over the splits
// with the forward's running-max rescale, in log2 units; a split that saw no key has LSE_s = -inf and weighs 0; a
// row no split saw gets O = 0, LSE = -inf.  One warp per row (16 rows per CTA), lane l owns columns l + 32 i.
constexpr int kMergeRows = 16;
constexpr int kMergeCols = 256 / 32;  // head dims up to 256

template <typename T>
__global__ void __launch_bounds__(128) attn_fwd_merge_kernel(const AttnParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Group grp = cta_group(p);
  const int h = blockIdx.y, bh = grp.z * p.Hq + h;
  const int64_t split_stride = static_cast<int64_t>(p.B) * p.Hq * p.Lq;  // rows per split in the workspaces
  T* og = static_cast<T*>(p.out) + grp.b * p.o_sb + h * p.o_sh;
  for (int r = warp; r < kMergeRows; r += 4) {
    const int m = blockIdx.x * kMergeRows + r;
    if (m >= p.Lq) break;  // uniform across the warp
    const int64_t row = static_cast<int64_t>(bh) * p.Lq + m;
    float acc[kMergeCols];
#pragma unroll
    for (int i = 0; i < kMergeCols; ++i) acc[i] = 0.f;
    float row_max = -INFINITY, row_sum = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      const float lse2 = p.lse_split[s * split_stride + row] * kLog2e;
      const float m_new = fmaxf(row_max, lse2);
      const float m_sub = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(row_max - m_sub), w = exp2f(lse2 - m_sub);
      const float* o = p.out_split + (s * split_stride + row) * p.Dv;
#pragma unroll
      for (int i = 0; i < kMergeCols; ++i) {
        const int c = lane + 32 * i;
        if (c < p.Dv) acc[i] = acc[i] * alpha + w * o[c];
      }
      row_sum = row_sum * alpha + w;
      row_max = m_new;
    }
    const float inv = row_sum != 0.f ? 1.f / row_sum : 0.f;  // NaN (a NaN split) stays NaN
    T* o = og + static_cast<int64_t>(m) * p.o_sm;
#pragma unroll
    for (int i = 0; i < kMergeCols; ++i) {
      const int c = lane + 32 * i;
      if (c < p.Dv) o[c] = from_float<T>(acc[i] * inv);
    }
    if (lane == 0) p.lse[row] = row_sum != 0.f ? (row_max + log2f(row_sum)) * kLn2 : -INFINITY;
  }
}

// ==========================================================================================================
// Backward
// ==========================================================================================================

// Delta = rowsum(dO * O) - dLse, so that dS = P * (dP - Delta): the dLse term is the gradient flowing into the
// returned LSE (d lse / d s = P), folded into the same row constant.  One warp per row, 16 rows per CTA.
constexpr int kDeltaRows = 16;

template <typename T>
__global__ void __launch_bounds__(128) attn_bwd_delta_kernel(const AttnParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Group grp = cta_group(p);
  const int h = blockIdx.y, b = grp.b, bh = grp.z * p.Hq + h;
  const T* og = static_cast<const T*>(p.out) + b * p.o_sb + h * p.o_sh;
  const T* dog = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
  for (int r = warp; r < kDeltaRows; r += 4) {
    const int m = blockIdx.x * kDeltaRows + r;
    if (m >= p.Lq) break;  // uniform across the warp
    const T* o = og + row_offset(p, grp, p.o_sm, p.o_sx, m);
    const T* d = dog + row_offset(p, grp, p.do_sm, p.do_sx, m);
    float sum = 0.f;
    for (int c = lane; c < p.Dv; c += 32) sum += to_float(o[c]) * to_float(d[c]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += shfl_xor(sum, off);
    if (lane == 0) {
      const int64_t row = static_cast<int64_t>(bh) * p.Lq + m;
      p.delta[row] = sum - (p.dlse != nullptr ? p.dlse[row] : 0.f);
    }
  }
}

// The plan both tensor-core dK/dV kernels follow: the CTA's key block (batch b, kv head hk, keys [n0, n0 + BN)) and
// its steps -- (query head of the GQA group, tile of BM queries) pairs, without the tiles causal masking hides from
// every key of the block -- each loaded into one of two shared buffers (Q, dO by cp.async; lse2, Delta by plain
// stores, visible after the next __syncthreads).
template <typename T, int DT, int BM, int BN, int NT>
struct KVBlockSteps {
  static constexpr int S = DT + 8;
  const AttnParams& p;
  const Group grp;
  const int b, hk, n0;
  int mt_lo, mt_count, items;

  FA_DEVICE explicit KVBlockSteps(const AttnParams& params)
      : p(params), grp(cta_group(params)), b(grp.b), hk(blockIdx.y), n0(blockIdx.x * BN) {
    // Query m sees key n iff m >= n - causal_offset, so the first query that sees any key of this block is
    // n0 - causal_offset.
    const int m_start = p.causal ? imax(0, n0 - p.causal_offset) : 0;
    mt_lo = m_start / BM;
    mt_count = m_start >= p.Lq ? 0 : ceil_div(p.Lq, BM) - mt_lo;
    items = p.group * mt_count;
  }
  FA_DEVICE int head(int item) const { return hk * p.group + item / mt_count; }
  FA_DEVICE int first_query(int item) const { return (mt_lo + item % mt_count) * BM; }

  FA_DEVICE void load_kv(T* sK, T* sV, int tid) const {
    const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
    const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
    load_tile_async<T, BN, DT, NT>(sK, kg, [&](int n) { return row_offset(p, grp, p.k_sm, p.k_sx, n); }, n0, p.Lk,
                                   p.D, tid);
    load_tile_async<T, BN, DT, NT>(sV, vg, [&](int n) { return row_offset(p, grp, p.v_sm, p.v_sx, n); }, n0, p.Lk,
                                   p.D, tid);
  }

  // Starts loading step `item` into buffer st of sQ, sdO ([2][BM][S]) and sLse2, sDelta ([2][BM]).
  FA_DEVICE void issue(int item, int st, T* sQ, T* sdO, float* sLse2, float* sDelta, int tid) const {
    const int hq = head(item), m0 = first_query(item);
    const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + hq * p.q_sh;
    const T* dog = static_cast<const T*>(p.dout) + b * p.do_sb + hq * p.do_sh;
    load_tile_async<T, BM, DT, NT>(sQ + st * BM * S, qg, [&](int m) { return row_offset(p, grp, p.q_sm, p.q_sx, m); },
                                   m0, p.Lq, p.D, tid);
    load_tile_async<T, BM, DT, NT>(sdO + st * BM * S, dog,
                                   [&](int m) { return row_offset(p, grp, p.do_sm, p.do_sx, m); }, m0, p.Lq, p.D, tid);
    if (tid < BM) {
      const int m = m0 + tid;
      const int64_t row = static_cast<int64_t>(grp.z * p.Hq + hq) * p.Lq + m;
      sLse2[st * BM + tid] = m < p.Lq ? lse_log2(p.lse[row]) : INFINITY;
      sDelta[st * BM + tid] = m < p.Lq ? p.delta[row] : 0.f;
    }
  }

  // At the top of step it: starts loading step it + 1 into the other buffer, then waits for step it's loads
  // (issued a step earlier); the caller's __syncthreads makes them visible.
  FA_DEVICE void advance(int it, T* sQ, T* sdO, float* sLse2, float* sDelta, int tid) const {
    if (it + 1 < items) {
      issue(it + 1, (it & 1) ^ 1, sQ, sdO, sLse2, sDelta, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
  }

  // The staged dK (sK) and dV (sV) tiles to their rows in global memory.
  FA_DEVICE void store_dkdv(const T* sK, const T* sV, int tid) const {
    T* dkg = static_cast<T*>(p.dk) + b * p.dk_sb + hk * p.dk_sh;
    T* dvg = static_cast<T*>(p.dv) + b * p.dv_sb + hk * p.dv_sh;
    store_tile<T, BN, DT, NT>(dkg, [&](int n) { return row_offset(p, grp, p.dk_sm, p.dk_sx, n); }, sK, n0, p.Lk, p.D,
                              tid);
    store_tile<T, BN, DT, NT>(dvg, [&](int n) { return row_offset(p, grp, p.dv_sm, p.dv_sx, n); }, sV, n0, p.Lk, p.D,
                              tid);
  }
};

template <int DT>
struct BwdKVTile {
  static constexpr int kWarps = 4, kThreads = 32 * kWarps;
  static constexpr int kBN = 16 * kWarps;         // keys per CTA
  static constexpr int kBM = DT <= 64 ? 64 : 32;  // queries per tile
  static constexpr int kStride = DT + 8;
  template <typename T>
  static constexpr size_t smem_bytes() {  // K, V, 2 x (Q, dO), 2 x (lse2, delta)
    return size_t(2 * kBN + 4 * kBM) * kStride * sizeof(T) + 4 * kBM * sizeof(float);
  }
};

template <typename T, int DT>
__global__ void __launch_bounds__(BwdKVTile<DT>::kThreads) attn_bwd_dkdv_kernel(const AttnParams p) {
  using Tile = BwdKVTile<DT>;
  constexpr int BM = Tile::kBM, BN = Tile::kBN, S = Tile::kStride, NT = Tile::kThreads, KS = DT / 16;
  FA_SHARED_MEMORY(smem);
  T* sK = reinterpret_cast<T*>(smem);  // [BN][S]; reused to stage dK
  T* sV = sK + BN * S;                 // [BN][S]; reused to stage dV
  T* sQ = sV + BN * S;                 // [2][BM][S]
  T* sdO = sQ + 2 * BM * S;            // [2][BM][S]
  float* sLse2 = reinterpret_cast<float*>(sdO + 2 * BM * S);  // [2][BM]
  float* sDelta = sLse2 + 2 * BM;                             // [2][BM]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const KVBlockSteps<T, DT, BM, BN, NT> plan(p);
  const Group& grp = plan.grp;
  const int n0 = plan.n0, items = plan.items;
  plan.load_kv(sK, sV, tid);
  cp_async_commit();
  if (items > 0) plan.issue(0, 0, sQ, sdO, sLse2, sDelta, tid);
  cp_async_commit();

  float dk[DT / 8][4], dv[DT / 8][4];
#pragma unroll
  for (int i = 0; i < DT / 8; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) dk[i][c] = dv[i][c] = 0.f;
  const int n_row = n0 + warp * 16 + g;  // this lane's keys (rows of S^T): n_row, n_row + 8

  for (int it = 0; it < items; ++it) {
    const int st = it & 1;
    plan.advance(it, sQ, sdO, sLse2, sDelta, tid);
    __syncthreads();
    const int hq = plan.head(it), m0 = plan.first_query(it);
    const int bh = grp.z * p.Hq + hq;
    const char* mask = mask_slice(p, grp, hq);
    const T* q_s = sQ + st * BM * S;
    const T* do_s = sdO + st * BM * S;
    const float* lse2_s = sLse2 + st * BM;
    const float* delta_s = sDelta + st * BM;

    // S^T = K Q^T: this warp's 16 keys x BM queries.  Element (nb, i): key n_row + 8 (i / 2),
    // query m0 + 8 nb + 2t + i % 2.
    float s[BM / 8][4];
#pragma unroll
    for (int i = 0; i < BM / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    gemm_ss<T, KS, BM / 8, false>(s, sK + warp * 16 * S, S, q_s, S, lane);
    const bool mods = tile_needs_mods(p, m0, m0 + BM, n0, n0 + BN);
#pragma unroll
    for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int ml = 8 * nb + 2 * t + (i % 2);
        const float x =
            mods ? modified_score(p, grp, mask, s[nb][i], m0 + ml, n_row + 8 * (i / 2)) : s[nb][i] * p.scale_log2;
        s[nb][i] = fast_exp2(x - lse2_s[ml]);  // P^T
      }

    // dP^T = V dO^T (dO as the n-major B operand: its rows are the queries).
    float dp[BM / 8][4];
#pragma unroll
    for (int i = 0; i < BM / 8; ++i) dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
    gemm_ss<T, KS, BM / 8, false>(dp, sV + warp * 16 * S, S, do_s, S, lane);

    // dS^T = P^T * (dP^T (dropped) - Delta[query]) overwrites dP^T; then P^T becomes Pd^T = P^T * keep / (1 - p)
    // in place (one Philox draw per element serves both).
    const uint32_t keep = !p.dropout ? 0xffffffffu : dropout_keep_bits<BM / 2>(
        p, bh, [&](int e) { return m0 + 8 * (e / 4) + 2 * t + (e % 2); },  // element e = 4 nb + i
        [&](int e) { return n_row + 8 * ((e % 4) / 2); });
#pragma unroll
    for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int ml = 8 * nb + 2 * t + (i % 2);
        if (p.dropout) {
          const bool kept = (keep >> (4 * nb + i)) & 1u;
          dp[nb][i] = s[nb][i] * ((kept ? dp[nb][i] * p.drop_scale : 0.f) - delta_s[ml]);
          s[nb][i] = kept ? s[nb][i] * p.drop_scale : 0.f;
        } else {
          dp[nb][i] = s[nb][i] * (dp[nb][i] - delta_s[ml]);
        }
      }

    // dV += Pd^T dO and dK += dS^T Q: P^T and dS^T (rows keys, columns queries) are already A operands with
    // k = queries, and dO and Q are the k-major B operands (their rows are the queries).
    uint32_t af[BM / 16][4];
    c_to_a<T, BM / 8>(af, s);
    gemm_rs<T, BM / 16, DT / 8, true>(dv, af, do_s, S, lane);
    c_to_a<T, BM / 8>(af, dp);
    gemm_rs<T, BM / 16, DT / 8, true>(dk, af, q_s, S, lane);
    __syncthreads();  // buffer st is free for the prefetch of item it + 2
  }
  cp_async_wait<0>();
  __syncthreads();  // sK, sV free (the K/V copies may still have been in flight when items == 0)

  frag_to_smem<T, DT / 8, S>(sK + warp * 16 * S, dk, p.scale, p.scale, lane);
  frag_to_smem<T, DT / 8, S>(sV + warp * 16 * S, dv, 1.f, 1.f, lane);
  __syncthreads();
  plan.store_dkdv(sK, sV, tid);
}

// dK/dV for head dims past 128 (DT 256): a 16-key warp tile accumulating dK and dV over the whole head dim would
// need 2 x 128 registers, so the head dim is split between two warps (FA2's decomposition; bench/NOTES.md entry 20).
// 8 warps, 64 keys per CTA, 32 queries per step; per step:
//   phase 1: warp w computes S^T and dP^T for keys 16 (w % 4).. and queries 16 (w / 4).. (each score once), turns
//     them into Pd^T and dS^T as the 4-warp kernel does, and writes both to shared memory as T;
//   phase 2: warp w accumulates dV += Pd^T dO and dK += dS^T Q for keys 16 (w % 4).. and head-dim half w / 4, the
//     A operands read from shared memory (128 accumulator registers per thread).
template <int DT>
struct BwdKVWideTile {
  static constexpr int kWarps = 8, kThreads = 32 * kWarps;
  static constexpr int kBN = 64;  // keys per CTA: 4 groups of 16
  static constexpr int kBM = 32;  // queries per step: 2 halves of 16
  static constexpr int kStride = DT + 8;
  static constexpr int kPStride = kBM + 8;  // the Pd^T / dS^T tiles [kBN][kBM + 8]
  template <typename T>
  static constexpr size_t smem_bytes() {  // K, V, 2 x (Q, dO), Pd^T, dS^T, 2 x (lse2, delta)
    return size_t(2 * kBN + 4 * kBM) * kStride * sizeof(T) + size_t(2 * kBN * kPStride) * sizeof(T) +
           4 * kBM * sizeof(float);
  }
};

template <typename T, int DT>
__global__ void __launch_bounds__(BwdKVWideTile<DT>::kThreads) attn_bwd_dkdv_wide_kernel(const AttnParams p) {
  using Tile = BwdKVWideTile<DT>;
  constexpr int BM = Tile::kBM, BN = Tile::kBN, S = Tile::kStride, PS = Tile::kPStride, NT = Tile::kThreads;
  constexpr int KS = DT / 16, HALF = DT / 2;
  FA_SHARED_MEMORY(smem);
  T* sK = reinterpret_cast<T*>(smem);  // [BN][S]; reused to stage dK
  T* sV = sK + BN * S;                 // [BN][S]; reused to stage dV
  T* sQ = sV + BN * S;                 // [2][BM][S]
  T* sdO = sQ + 2 * BM * S;            // [2][BM][S]
  T* sPt = sdO + 2 * BM * S;           // [BN][PS]: Pd^T of the step
  T* sdSt = sPt + BN * PS;             // [BN][PS]: dS^T of the step
  float* sLse2 = reinterpret_cast<float*>(sdSt + BN * PS);  // [2][BM]
  float* sDelta = sLse2 + 2 * BM;                            // [2][BM]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int key_group = warp % 4, half = warp / 4;  // phase 1: query half; phase 2: head-dim half
  const KVBlockSteps<T, DT, BM, BN, NT> plan(p);
  const Group& grp = plan.grp;
  const int n0 = plan.n0, items = plan.items;
  plan.load_kv(sK, sV, tid);
  cp_async_commit();
  if (items > 0) plan.issue(0, 0, sQ, sdO, sLse2, sDelta, tid);
  cp_async_commit();

  float dk[HALF / 8][4], dv[HALF / 8][4];
#pragma unroll
  for (int i = 0; i < HALF / 8; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) dk[i][c] = dv[i][c] = 0.f;
  const int n_row = n0 + key_group * 16 + g;  // this lane's keys (rows of S^T): n_row, n_row + 8
  const int q_off = half * 16;                // phase 1: this warp's queries within the step

  for (int it = 0; it < items; ++it) {
    const int st = it & 1;
    plan.advance(it, sQ, sdO, sLse2, sDelta, tid);
    __syncthreads();
    const int hq = plan.head(it), m0 = plan.first_query(it);
    const int bh = grp.z * p.Hq + hq;
    const char* mask = mask_slice(p, grp, hq);
    const T* q_s = sQ + st * BM * S;
    const T* do_s = sdO + st * BM * S;
    const float* lse2_s = sLse2 + st * BM;
    const float* delta_s = sDelta + st * BM;

    // Phase 1.  S^T = K Q^T for 16 keys x 16 queries; element (nb, i): key n_row + 8 (i / 2),
    // query m0 + q_off + 8 nb + 2t + i % 2.
    float s[2][4], dp[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[i][c] = dp[i][c] = 0.f;
    gemm_ss<T, KS, 2, false>(s, sK + key_group * 16 * S, S, q_s + q_off * S, S, lane);
    const bool mods = tile_needs_mods(p, m0, m0 + BM, n0, n0 + BN);
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int ml = q_off + 8 * nb + 2 * t + (i % 2);
        const float x =
            mods ? modified_score(p, grp, mask, s[nb][i], m0 + ml, n_row + 8 * (i / 2)) : s[nb][i] * p.scale_log2;
        s[nb][i] = fast_exp2(x - lse2_s[ml]);  // P^T
      }
    gemm_ss<T, KS, 2, false>(dp, sV + key_group * 16 * S, S, do_s + q_off * S, S, lane);  // dP^T = V dO^T
    const uint32_t keep = !p.dropout ? 0xffffffffu : dropout_keep_bits<8>(
        p, bh, [&](int e) { return m0 + q_off + 8 * (e / 4) + 2 * t + (e % 2); },  // element e = 4 nb + i
        [&](int e) { return n_row + 8 * ((e % 4) / 2); });
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int ml = q_off + 8 * nb + 2 * t + (i % 2);
        if (p.dropout) {
          const bool kept = (keep >> (4 * nb + i)) & 1u;
          dp[nb][i] = s[nb][i] * ((kept ? dp[nb][i] * p.drop_scale : 0.f) - delta_s[ml]);
          s[nb][i] = kept ? s[nb][i] * p.drop_scale : 0.f;
        } else {
          dp[nb][i] = s[nb][i] * (dp[nb][i] - delta_s[ml]);
        }
      }
    frag_to_smem<T, 2, PS>(sPt + key_group * 16 * PS + q_off, s, 1.f, 1.f, lane);
    frag_to_smem<T, 2, PS>(sdSt + key_group * 16 * PS + q_off, dp, 1.f, 1.f, lane);
    __syncthreads();

    // Phase 2.  dV += Pd^T dO and dK += dS^T Q for this warp's 16 keys and head-dim columns [half * HALF, +HALF):
    // Pd^T and dS^T (rows keys, columns the step's BM queries) are the A operands, dO and Q the k-major B operands.
    gemm_ss<T, BM / 16, HALF / 8, true>(dv, sPt + key_group * 16 * PS, PS, do_s + half * HALF, S, lane);
    gemm_ss<T, BM / 16, HALF / 8, true>(dk, sdSt + key_group * 16 * PS, PS, q_s + half * HALF, S, lane);
    __syncthreads();  // buffer st and the Pd^T / dS^T tiles are free for the next step
  }
  cp_async_wait<0>();
  __syncthreads();  // sK, sV free (the K/V copies may still have been in flight when items == 0)

  frag_to_smem<T, HALF / 8, S>(sK + key_group * 16 * S + half * HALF, dk, p.scale, p.scale, lane);
  frag_to_smem<T, HALF / 8, S>(sV + key_group * 16 * S + half * HALF, dv, 1.f, 1.f, lane);
  __syncthreads();
  plan.store_dkdv(sK, sV, tid);
}

template <int DT>
struct BwdQTile {
  static constexpr int kWarps = 4, kThreads = 32 * kWarps;
  static constexpr int kBM = 16 * kWarps;         // queries per CTA
  static constexpr int kBN = DT <= 64 ? 64 : 32;  // keys per K/V tile
  static constexpr int kStride = DT + 8;
  template <typename T>
  static constexpr size_t smem_bytes() { return size_t(2 * kBM + 4 * kBN) * kStride * sizeof(T); }  // Q, dO, 2 x (K, V)
};

template <typename T, int DT>
__global__ void __launch_bounds__(BwdQTile<DT>::kThreads) attn_bwd_dq_kernel(const AttnParams p) {
  using Tile = BwdQTile<DT>;
  constexpr int BM = Tile::kBM, BN = Tile::kBN, S = Tile::kStride, NT = Tile::kThreads, KS = DT / 16;
  FA_SHARED_MEMORY(smem);
  T* sQ = reinterpret_cast<T*>(smem);  // [BM][S]; reused to stage dQ
  T* sdO = sQ + BM * S;                // [BM][S]
  T* sK = sdO + BM * S;                // [2][BN][S]
  T* sV = sK + 2 * BN * S;             // [2][BN][S]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const Group grp = cta_group(p);
  const int m_block = blockIdx.x, h = blockIdx.y, b = grp.b;
  const int bh = grp.z * p.Hq + h, hk = h / p.group;
  const int m0 = m_block * BM;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* dog = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const char* mask = mask_slice(p, grp, h);
  auto q_rows = [&](int m) { return row_offset(p, grp, p.q_sm, p.q_sx, m); };
  auto do_rows = [&](int m) { return row_offset(p, grp, p.do_sm, p.do_sx, m); };
  auto k_rows = [&](int n) { return row_offset(p, grp, p.k_sm, p.k_sx, n); };
  auto v_rows = [&](int n) { return row_offset(p, grp, p.v_sm, p.v_sx, n); };
  auto dq_rows = [&](int m) { return row_offset(p, grp, p.dq_sm, p.dq_sx, m); };

  int n_end = p.Lk;
  if (p.causal) n_end = imin(p.Lk, imax(0, imin(m0 + BM, p.Lq) + p.causal_offset));
  const int n_tiles = ceil_div(n_end, BN);

  load_tile_async<T, BM, DT, NT>(sQ, qg, q_rows, m0, p.Lq, p.D, tid);
  load_tile_async<T, BM, DT, NT>(sdO, dog, do_rows, m0, p.Lq, p.D, tid);
  cp_async_commit();
  if (n_tiles > 0) {
    load_tile_async<T, BN, DT, NT>(sK, kg, k_rows, 0, p.Lk, p.D, tid);
    load_tile_async<T, BN, DT, NT>(sV, vg, v_rows, 0, p.Lk, p.D, tid);
  }
  cp_async_commit();

  const int m_row = m0 + warp * 16 + g;  // this lane's rows: m_row, m_row + 8
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int m = m_row + 8 * r;
    const int64_t row = static_cast<int64_t>(bh) * p.Lq + m;
    lse2[r] = m < p.Lq ? lse_log2(p.lse[row]) : INFINITY;
    delta[r] = m < p.Lq ? p.delta[row] : 0.f;
  }
  float dq[DT / 8][4];
#pragma unroll
  for (int i = 0; i < DT / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

  for (int j = 0; j < n_tiles; ++j) {
    const int st = j & 1;
    if (j + 1 < n_tiles) {
      load_tile_async<T, BN, DT, NT>(sK + (st ^ 1) * BN * S, kg, k_rows, (j + 1) * BN, p.Lk, p.D, tid);
      load_tile_async<T, BN, DT, NT>(sV + (st ^ 1) * BN * S, vg, v_rows, (j + 1) * BN, p.Lk, p.D, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* kt = sK + st * BN * S;
    const T* vt = sV + st * BN * S;
    const int n0 = j * BN;

    // S = Q K^T and P = exp2(s2 - lse2); element (nb, i): query m_row + 8 (i / 2), key n0 + 8 nb + 2t + i % 2.
    float s[BN / 8][4];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    gemm_ss<T, KS, BN / 8, false>(s, sQ + warp * 16 * S, S, kt, S, lane);
    const bool mods = tile_needs_mods(p, m0, m0 + BM, n0, n0 + BN);
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float x = mods ? modified_score(p, grp, mask, s[nb][i], m_row + 8 * (i / 2),
                                              n0 + 8 * nb + 2 * t + (i % 2))
                             : s[nb][i] * p.scale_log2;
        s[nb][i] = fast_exp2(x - lse2[i / 2]);
      }

    // dP = dO V^T (V's rows are the keys: the n-major B operand); dS = P * (dP (dropped) - Delta[row]).
    float dp[BN / 8][4];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
    gemm_ss<T, KS, BN / 8, false>(dp, sdO + warp * 16 * S, S, vt, S, lane);
    const uint32_t keep = !p.dropout ? 0xffffffffu : dropout_keep_bits<BN / 2>(
        p, bh, [&](int e) { return m_row + 8 * ((e % 4) / 2); },  // element e = 4 nb + i
        [&](int e) { return n0 + 8 * (e / 4) + 2 * t + (e % 2); });
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float d = (keep >> (4 * nb + i)) & 1u ? dp[nb][i] * (p.dropout ? p.drop_scale : 1.f) : 0.f;
        s[nb][i] = s[nb][i] * (d - delta[i / 2]);
      }
    if (p.dmask != nullptr) {  // dS is the gradient of the additive mask or bias (scores outside every tile stay 0)
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int m = m_row + 8 * (i / 2), n = n0 + 8 * nb + 2 * t + (i % 2);
          if (m < p.Lq && n < p.Lk) p.dmask[(static_cast<int64_t>(bh) * p.Lq + m) * p.Lk + n] = s[nb][i];
        }
    }

    // dQ += dS K (K as the k-major B operand: its rows are the keys).
    uint32_t af[BN / 16][4];
    c_to_a<T, BN / 8>(af, s);
    gemm_rs<T, BN / 16, DT / 8, true>(dq, af, kt, S, lane);
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();

  frag_to_smem<T, DT / 8, S>(sQ + warp * 16 * S, dq, p.scale, p.scale, lane);
  __syncthreads();
  T* dqg = static_cast<T*>(p.dq) + b * p.dq_sb + h * p.dq_sh;
  store_tile<T, BM, DT, NT>(dqg, dq_rows, sQ, m0, p.Lq, p.D, tid);
}

constexpr size_t kSmemLimit = 99 * 1024;  // opt-in dynamic shared memory per block on sm_86 / sm_89
static_assert(FwdTile<64>::smem_bytes<__half>() <= kSmemLimit, "forward, DT 64");
static_assert(FwdTile<128>::smem_bytes<__half>() <= kSmemLimit, "forward, DT 128");
static_assert(FwdTile<256>::smem_bytes<__half>() <= kSmemLimit, "forward, DT 256");
static_assert(BwdKVTile<64>::smem_bytes<__half>() <= kSmemLimit, "dK/dV, DT 64");
static_assert(BwdKVTile<128>::smem_bytes<__half>() <= kSmemLimit, "dK/dV, DT 128");
static_assert(BwdQTile<64>::smem_bytes<__half>() <= kSmemLimit, "dQ, DT 64");
static_assert(BwdQTile<128>::smem_bytes<__half>() <= kSmemLimit, "dQ, DT 128");
// The tensor-core backward of head dims past 128 needs more: sm_80 (163 KiB) and sm_90 (227 KiB) have it; elsewhere
// kernel_family (fa_ops.cuh) sends that backward to the CUDA-core kernels.
constexpr size_t kWideBwdSmemBytes = BwdKVWideTile<256>::smem_bytes<__half>() > BwdQTile<256>::smem_bytes<__half>()
                                         ? BwdKVWideTile<256>::smem_bytes<__half>()
                                         : BwdQTile<256>::smem_bytes<__half>();
static_assert(kWideBwdSmemBytes <= 163 * 1024, "dK/dV and dQ, DT 256: within sm_80's opt-in shared memory");

// ==========================================================================================================
// Launchers (grids: x = row tiles, y = heads, z = batch or (batch, window) group)
// ==========================================================================================================
#ifdef FASTATTN_EMULATE
using Stream = void*;
#else
using Stream = cudaStream_t;
#endif

constexpr int kMaxGridZ = 65535;

// Launches `kernel` on the grid (x, y, p.B), in launches of at most kMaxGridZ along z (p.z0: a launch's first z).
template <typename Kernel>
void launch_over_z(Kernel kernel, int grid_x, int grid_y, int threads, size_t smem_bytes, const AttnParams& p,
                   Stream stream) {
  for (int z0 = 0; z0 < p.B; z0 += kMaxGridZ) {
    AttnParams chunk = p;
    chunk.z0 = z0;
    const dim3 grid(grid_x, grid_y, p.B - z0 < kMaxGridZ ? p.B - z0 : kMaxGridZ);
    FA_LAUNCH(kernel, grid, threads, smem_bytes, stream, chunk);
  }
}

// After a split-KV forward: the merge into out / lse.
template <typename T>
void launch_fwd_merge(const AttnParams& p, Stream stream) {
  if (p.num_splits > 1) launch_over_z(attn_fwd_merge_kernel<T>, ceil_div(p.Lq, kMergeRows), p.Hq, 128, 0, p, stream);
}

// A forward kernel over its Tile's query blocks (x split-KV splits), then the split merge.
template <typename T, typename Tile, typename Kernel>
void launch_fwd_kernel(Kernel kernel, const AttnParams& p, Stream stream) {
  if (p.B == 0 || p.Hq == 0 || p.Lq == 0) return;
  launch_over_z(kernel, ceil_div(p.Lq, Tile::kBM) * p.num_splits, p.Hq, Tile::kThreads, Tile::template smem_bytes<T>(),
                p, stream);
  launch_fwd_merge<T>(p, stream);
}

template <typename T, int DT>
void launch_fwd(const AttnParams& p, Stream stream) {
  launch_fwd_kernel<T, FwdTile<DT>>(attn_fwd_kernel<T, DT>, p, stream);
}

template <typename T, int DT>
void launch_bwd(const AttnParams& p, Stream stream) {
  if (p.B == 0 || p.Hq == 0) return;
  if (p.Lq > 0) launch_over_z(attn_bwd_delta_kernel<T>, ceil_div(p.Lq, kDeltaRows), p.Hq, 128, 0, p, stream);
  if (p.Lk > 0) {
    if constexpr (DT > 128) {  // the head dim split between two warps (BwdKVWideTile)
      using Tile = BwdKVWideTile<DT>;
      launch_over_z(attn_bwd_dkdv_wide_kernel<T, DT>, ceil_div(p.Lk, Tile::kBN), p.Hkv, Tile::kThreads,
                    Tile::template smem_bytes<T>(), p, stream);
    } else {
      using Tile = BwdKVTile<DT>;
      launch_over_z(attn_bwd_dkdv_kernel<T, DT>, ceil_div(p.Lk, Tile::kBN), p.Hkv, Tile::kThreads,
                    Tile::template smem_bytes<T>(), p, stream);
    }
  }
  if (p.Lq > 0) {
    using Tile = BwdQTile<DT>;
    launch_over_z(attn_bwd_dq_kernel<T, DT>, ceil_div(p.Lq, Tile::kBM), p.Hq, Tile::kThreads,
                  Tile::template smem_bytes<T>(), p, stream);
  }
}

}  // namespace fastattn_cuda
