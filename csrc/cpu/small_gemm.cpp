// AVX-512 register-tile products for the CPU attention kernels (see small_gemm.h).
//
// C is computed in column panels of CV vectors (16 floats each) and, within a panel, in tiles of R rows whose
// R x CV accumulators stay in zmm registers for the whole K loop.  Per k, a tile loads the CV vectors of B's
// row k and broadcasts R scalars of A's column k: R * CV FMAs for CV loads and R broadcasts.  The shapes
// (R, CV) below take R * CV + CV + 1 of the 32 registers (14..31; 8 x 3 = 28 spilled in GCC 12, hence 7 x 3).
// A panel that N does not fill uses masked loads and stores.
//
// Operands are packed (copied) only where the access pattern needs it:
//   * B transposed (mm_nt: B(k, j) = Bm[j * ldb + k]): to [K, ldp] so that B's rows are contiguous;
//   * B or A rows far apart (row stride >= kFarStride floats, e.g. TimeSformer's patch rows 24 KiB apart):
//     rows that far apart map to few cache sets and evict each other while a panel reuses them (B only when
//     more than one row tile reuses it).
// The AVX-512 width is most of the gain over MKL on AMD CPUs, where MKL runs AVX2 kernels (NOTES entry 22).
#include "small_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "row_kernels.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define FA_SMALL_GEMM_X86 1
#include <immintrin.h>
#define FA_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#define FA_TILE_INLINE inline __attribute__((always_inline))
// The register tile's loops must unroll completely, or acc[R][CV] lives on the stack (GCC's default peeling
// limits stop short of R = 12).
#define FA_UNROLL _Pragma("GCC unroll 32")
#else
#define FA_SMALL_GEMM_X86 0
#endif

namespace fastattn::cpu {

bool small_gemm_available() {
#if FA_SMALL_GEMM_X86
  static const bool available = std::strcmp(row_kernels().isa, "avx512") == 0;
  return available;
#else
  return false;
#endif
}

#if FA_SMALL_GEMM_X86
namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kFarStride = 2048;         // floats (8 KiB): row strides at least this far get packed
constexpr int64_t kMaxK = 4096;              // longer K loops: BLAS (its cache blocking over K pays there)
constexpr int64_t kMaxPacked = int64_t(1) << 21;  // floats per packed operand (8 MiB)

// One R x (CV * 16) tile of C.  rows <= R valid rows (the tail tile of a panel repeats its last row in the
// registers of the missing ones and does not store them); last_mask selects the valid lanes of vector CV - 1.
// kUnitACol: A(i, k) = A[i * a_row + k] (row-major A), else A(i, k) = A[i * a_row + k * a_col].
template <int R, int CV, bool kUnitACol>
FA_TARGET_AVX512 FA_TILE_INLINE void tile(int64_t K, const float* A, int64_t a_row, int64_t a_col, int64_t rows,
                                         const float* B, int64_t b_row, __mmask16 last_mask, float alpha,
                                         float beta, float* C, int64_t ldc) {
  const float* a_rows[R];
  FA_UNROLL
  for (int r = 0; r < R; ++r) a_rows[r] = A + std::min<int64_t>(r, rows - 1) * a_row;
  __m512 acc[R][CV];
  FA_UNROLL
  for (int r = 0; r < R; ++r)
    FA_UNROLL
    for (int c = 0; c < CV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * b_row;
    __m512 bv[CV];
    FA_UNROLL
    for (int c = 0; c < CV - 1; ++c) bv[c] = _mm512_loadu_ps(b + kLanes * c);
    bv[CV - 1] = _mm512_maskz_loadu_ps(last_mask, b + kLanes * (CV - 1));
    const int64_t ak = kUnitACol ? k : k * a_col;
    FA_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(a_rows[r][ak]);
      FA_UNROLL
      for (int c = 0; c < CV; ++c) acc[r][c] = _mm512_fmadd_ps(a, bv[c], acc[r][c]);
    }
  }
  const __m512 alpha_v = _mm512_set1_ps(alpha), beta_v = _mm512_set1_ps(beta);
  FA_UNROLL
  for (int r = 0; r < R; ++r) {
    if (r >= rows) break;
    float* c_row = C + r * ldc;
    FA_UNROLL
    for (int c = 0; c < CV; ++c) {
      const __mmask16 m = c == CV - 1 ? last_mask : __mmask16(0xFFFF);
      __m512 v = _mm512_mul_ps(acc[r][c], alpha_v);
      if (beta != 0.0f) v = _mm512_fmadd_ps(beta_v, _mm512_maskz_loadu_ps(m, c_row + kLanes * c), v);
      _mm512_mask_storeu_ps(c_row + kLanes * c, m, v);
    }
  }
}

// Columns [0, CV * 16) of C (the last vector masked by last_mask), every row, in tiles of R rows.
template <int R, int CV, bool kUnitACol>
FA_TARGET_AVX512 void panel(int64_t M, int64_t K, const float* A, int64_t a_row, int64_t a_col, const float* B,
                            int64_t b_row, __mmask16 last_mask, float alpha, float beta, float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; i += R) {
    tile<R, CV, kUnitACol>(K, A + i * a_row, a_row, a_col, std::min<int64_t>(R, M - i), B, b_row, last_mask,
                           alpha, beta, C + i * ldc, ldc);
  }
}

template <bool kUnitACol>
FA_TARGET_AVX512 void all_panels(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t a_row,
                                 int64_t a_col, const float* B, int64_t b_row, float beta, float* C, int64_t ldc) {
  const int64_t vectors = (N + kLanes - 1) / kLanes;
  const int64_t tail = N % kLanes;
  const __mmask16 tail_mask = tail == 0 ? __mmask16(0xFFFF) : __mmask16((1u << tail) - 1);
  if (M == 1) {  // one row (decoding's P V): up to 8 vectors per pass, no rows of a taller tile computed in vain
    for (int64_t v = 0; v < vectors; v += 8) {
      const int64_t cv = std::min<int64_t>(8, vectors - v);
      const __mmask16 mask = v + cv == vectors ? tail_mask : __mmask16(0xFFFF);
      const float* b = B + v * kLanes;
      float* c = C + v * kLanes;
      switch (cv) {
        case 8: tile<1, 8, kUnitACol>(K, A, a_row, a_col, 1, b, b_row, mask, alpha, beta, c, ldc); break;
        case 7: tile<1, 7, kUnitACol>(K, A, a_row, a_col, 1, b, b_row, mask, alpha, beta, c, ldc); break;
        case 6: tile<1, 6, kUnitACol>(K, A, a_row, a_col, 1, b, b_row, mask, alpha, beta, c, ldc); break;
        case 5: tile<1, 5, kUnitACol>(K, A, a_row, a_col, 1, b, b_row, mask, alpha, beta, c, ldc); break;
        case 4: tile<1, 4, kUnitACol>(K, A, a_row, a_col, 1, b, b_row, mask, alpha, beta, c, ldc); break;
        case 3: tile<1, 3, kUnitACol>(K, A, a_row, a_col, 1, b, b_row, mask, alpha, beta, c, ldc); break;
        case 2: tile<1, 2, kUnitACol>(K, A, a_row, a_col, 1, b, b_row, mask, alpha, beta, c, ldc); break;
        default: tile<1, 1, kUnitACol>(K, A, a_row, a_col, 1, b, b_row, mask, alpha, beta, c, ldc); break;
      }
    }
    return;
  }
  // Panels of 4 vectors; a remainder of 1 vector joins the previous panel (a 5-vector panel), so that no
  // 1-vector panel (R broadcasts per R FMAs) runs unless N <= 16.
  int64_t v = 0;
  while (v < vectors) {
    const int64_t left = vectors - v;
    const int64_t cv = left == 5 ? 5 : std::min<int64_t>(left, 4);
    const __mmask16 mask = v + cv == vectors ? tail_mask : __mmask16(0xFFFF);
    const float* b = B + v * kLanes;
    float* c = C + v * kLanes;
    switch (cv) {
      case 5: panel<5, 5, kUnitACol>(M, K, A, a_row, a_col, b, b_row, mask, alpha, beta, c, ldc); break;
      case 4: panel<6, 4, kUnitACol>(M, K, A, a_row, a_col, b, b_row, mask, alpha, beta, c, ldc); break;
      case 3: panel<7, 3, kUnitACol>(M, K, A, a_row, a_col, b, b_row, mask, alpha, beta, c, ldc); break;
      case 2: panel<12, 2, kUnitACol>(M, K, A, a_row, a_col, b, b_row, mask, alpha, beta, c, ldc); break;
      default: panel<12, 1, kUnitACol>(M, K, A, a_row, a_col, b, b_row, mask, alpha, beta, c, ldc); break;
    }
    v += cv;
  }
}

// dst[k * ld_dst + j] = src[j * ld_src + k] for j < N, k < K, by 16 x 16 blocks transposed in registers
// (three shuffle stages; the scalar loop was ~3 % of the spatial forward).  Columns j in [N, round16(N)) of dst
// get zeros (ld_dst >= round16(N)).
FA_TARGET_AVX512 void pack_transposed(int64_t N, int64_t K, const float* src, int64_t ld_src, float* dst,
                                      int64_t ld_dst) {
  for (int64_t j0 = 0; j0 < N; j0 += kLanes) {
    for (int64_t k0 = 0; k0 < K; k0 += kLanes) {
      const int64_t kn = std::min<int64_t>(kLanes, K - k0);
      const __mmask16 k_mask = kn == kLanes ? __mmask16(0xFFFF) : __mmask16((1u << kn) - 1);
      __m512 r[kLanes], t[kLanes], u[kLanes];
      FA_UNROLL
      for (int i = 0; i < kLanes; ++i) {
        r[i] = j0 + i < N ? _mm512_maskz_loadu_ps(k_mask, src + (j0 + i) * ld_src + k0) : _mm512_setzero_ps();
      }
      // t[2i], t[2i+1]: rows 2i and 2i+1 interleaved (per 128-bit lane: a0 b0 a1 b1 / a2 b2 a3 b3).
      FA_UNROLL
      for (int i = 0; i < kLanes; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
      }
      // u[4g + c], lane l: rows 4g..4g+3 at column c + 4l.
      FA_UNROLL
      for (int g = 0; g < kLanes; g += 4) {
        u[g + 0] = _mm512_shuffle_ps(t[g], t[g + 2], 0x44);
        u[g + 1] = _mm512_shuffle_ps(t[g], t[g + 2], 0xEE);
        u[g + 2] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0x44);
        u[g + 3] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
      }
      // Column c + 4l gathers lane l of u[c], u[4 + c], u[8 + c], u[12 + c].
      FA_UNROLL
      for (int c = 0; c < 4; ++c) {
        const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
        const __m512 w0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
        const __m512 w1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
        const __m512 col[4] = {_mm512_shuffle_f32x4(v0, w0, 0x88), _mm512_shuffle_f32x4(v0, w0, 0xDD),
                               _mm512_shuffle_f32x4(v1, w1, 0x88), _mm512_shuffle_f32x4(v1, w1, 0xDD)};
        FA_UNROLL
        for (int l = 0; l < 4; ++l) {
          if (c + 4 * l < kn) _mm512_storeu_ps(dst + (k0 + c + 4 * l) * ld_dst + j0, col[l]);
        }
      }
    }
  }
}

// v[j] = sum of the 16 lanes of a[j], j < 16, as one vector: a transpose-add tree (unpack, shuffle within and then
// across the 128-bit lanes), 45 operations where 16 separate reductions take ~130.  Fixed order: reproducible.
FA_TARGET_AVX512 FA_TILE_INLINE __m512 sum_lanes_16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  FA_UNROLL
  for (int p = 0; p < 8; ++p) {  // per 128-bit lane: x0+x2, y0+y2, x1+x3, y1+y3 of x = a[2p], y = a[2p+1]
    b[p] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * p], a[2 * p + 1]), _mm512_unpackhi_ps(a[2 * p], a[2 * p + 1]));
  }
  FA_UNROLL
  for (int p = 0; p < 4; ++p) {  // element e of 128-bit lane L: that lane's sum of a[4p + e]
    c[p] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * p], b[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(b[2 * p], b[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  FA_UNROLL
  for (int p = 0; p < 2; ++p) {  // 128-bit lanes: c[2p] (L0+L1), (L2+L3), then c[2p+1]'s
    d[p] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * p], c[2 * p + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[2 * p], c[2 * p + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  // 128-bit lane q, element e: the total of a[4q + e]
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// mm_nt with at most 16 columns and B's rows in place (a short key block: TimeSformer's temporal attention, 8
// frames): C(i, j) = alpha * dot(A row i, B row j) (+ beta C) in 16-lane partial products, reduced by
// sum_lanes_16.  No transpose of B, and every lane busy, where the tiles would transpose B and run a 16-lane
// vector with N lanes used.  NB: 8 or 16 dot products per row; rows j >= N reuse B's row 0 and are not stored.
// With NB = 8, rows go in pairs (acc[j] row i, acc[8 + j] row i + 1): each B load serves two FMAs and one
// reduction finishes both rows -- the one-row loop left half of the 16 accumulators, and of the reduction, empty.
template <int NB>
FA_TARGET_AVX512 void short_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t a_row,
                               const float* B, int64_t b_col, float beta, float* C, int64_t ldc) {
  const float* b_rows[NB];
  FA_UNROLL
  for (int j = 0; j < NB; ++j) b_rows[j] = B + (j < N ? j : 0) * b_col;
  const __mmask16 out_mask = N >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << N) - 1);
  const __m512 alpha_v = _mm512_set1_ps(alpha), beta_v = _mm512_set1_ps(beta);
  int64_t i = 0;
  if constexpr (NB == 8) {
    for (; i + 1 < M; i += 2) {
      const float* a0 = A + i * a_row;
      const float* a1 = a0 + a_row;
      __m512 acc[16];
      FA_UNROLL
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += kLanes) {
        const __mmask16 m = K - k >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
        const __m512 av0 = _mm512_maskz_loadu_ps(m, a0 + k), av1 = _mm512_maskz_loadu_ps(m, a1 + k);
        FA_UNROLL
        for (int j = 0; j < 8; ++j) {
          const __m512 bv = _mm512_maskz_loadu_ps(m, b_rows[j] + k);
          acc[j] = _mm512_fmadd_ps(av0, bv, acc[j]);
          acc[8 + j] = _mm512_fmadd_ps(av1, bv, acc[8 + j]);
        }
      }
      const __m512 sums = _mm512_mul_ps(sum_lanes_16(acc), alpha_v);  // lanes 0..7: row i, 8..15: row i + 1
      __m512 v[2] = {sums, _mm512_shuffle_f32x4(sums, sums, _MM_SHUFFLE(3, 2, 3, 2))};
      FA_UNROLL
      for (int r = 0; r < 2; ++r) {
        float* c_row = C + (i + r) * ldc;
        if (beta != 0.0f) v[r] = _mm512_fmadd_ps(beta_v, _mm512_maskz_loadu_ps(out_mask, c_row), v[r]);
        _mm512_mask_storeu_ps(c_row, out_mask, v[r]);
      }
    }
  }
  for (; i < M; ++i) {
    const float* a = A + i * a_row;
    __m512 acc[16];
    FA_UNROLL
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += kLanes) {
      const __mmask16 m = K - k >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
      const __m512 av = _mm512_maskz_loadu_ps(m, a + k);
      FA_UNROLL
      for (int j = 0; j < NB; ++j) acc[j] = _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, b_rows[j] + k), acc[j]);
    }
    __m512 v = _mm512_mul_ps(sum_lanes_16(acc), alpha_v);
    float* c_row = C + i * ldc;
    if (beta != 0.0f) v = _mm512_fmadd_ps(beta_v, _mm512_maskz_loadu_ps(out_mask, c_row), v);
    _mm512_mask_storeu_ps(c_row, out_mask, v);
  }
}

// Packed operands live in per-thread buffers (the kernels run inside at::parallel_for).
float* scratch(std::vector<float>& buffer, int64_t floats) {
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(static_cast<size_t>(floats));
  return buffer.data();
}

// A row stride that is a multiple of 1 KiB puts the rows of a packed operand into the same cache sets: pad it.
int64_t packed_stride(int64_t cols) {
  int64_t ld = (cols + kLanes - 1) / kLanes * kLanes;
  if (ld % 256 == 0) ld += kLanes;
  return ld;
}

}  // namespace

bool small_gemm(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t a_row, int64_t a_col,
                const float* B, int64_t b_row, int64_t b_col, float beta, float* C, int64_t ldc) {
  if (K > kMaxK) return false;
  if (M <= 0 || N <= 0) return true;
  if (N <= 16 && b_row == 1 && a_col == 1) {  // mm_nt on a short key block: dot products, nothing packed
    if (N <= 8) {
      short_nt<8>(M, N, K, alpha, A, a_row, B, b_col, beta, C, ldc);
    } else {
      short_nt<16>(M, N, K, alpha, A, a_row, B, b_col, beta, C, ldc);
    }
    return true;
  }
  const bool pack_b = b_col != 1 || (b_row >= kFarStride && M > 8);
  const bool pack_a = !(a_col == 1 && a_row < kFarStride) && !(a_row == 1);
  // A transposed B packed for a few rows of C is mostly packing: leave those to BLAS.
  if (pack_b && b_col != 1 && M < 4) return false;
  const int64_t ldb_packed = packed_stride(N), lda_packed = packed_stride(K);
  if ((pack_b && K * ldb_packed > kMaxPacked) || (pack_a && M * lda_packed > kMaxPacked)) return false;

  thread_local std::vector<float> a_buffer, b_buffer;
  if (pack_b) {
    float* packed = scratch(b_buffer, K * ldb_packed);
    if (b_col == 1) {
      for (int64_t k = 0; k < K; ++k) std::memcpy(packed + k * ldb_packed, B + k * b_row, sizeof(float) * N);
    } else if (b_row == 1) {  // mm_nt: B(k, j) = B[j * b_col + k]
      pack_transposed(N, K, B, b_col, packed, ldb_packed);
    } else {
      for (int64_t j = 0; j < N; ++j) {
        for (int64_t k = 0; k < K; ++k) packed[k * ldb_packed + j] = B[k * b_row + j * b_col];
      }
    }
    B = packed;
    b_row = ldb_packed;
  }
  if (pack_a) {
    float* packed = scratch(a_buffer, M * lda_packed);
    for (int64_t i = 0; i < M; ++i) {
      const float* src = A + i * a_row;
      float* dst = packed + i * lda_packed;
      if (a_col == 1) {
        std::memcpy(dst, src, sizeof(float) * K);
      } else {
        for (int64_t k = 0; k < K; ++k) dst[k] = src[k * a_col];
      }
    }
    A = packed;
    a_row = lda_packed;
    a_col = 1;
  }
  if (a_col == 1) {
    all_panels<true>(M, N, K, alpha, A, a_row, 1, B, b_row, beta, C, ldc);
  } else {
    all_panels<false>(M, N, K, alpha, A, a_row, a_col, B, b_row, beta, C, ldc);
  }
  return true;
}

void transpose_32bit(int64_t N, int64_t K, const void* src, int64_t ld_src, void* dst, int64_t ld_dst) {
  pack_transposed(N, K, static_cast<const float*>(src), ld_src, static_cast<float*>(dst), ld_dst);
}

#else  // no x86 AVX-512 kernels in this build

bool small_gemm(int64_t, int64_t, int64_t, float, const float*, int64_t, int64_t, const float*, int64_t, int64_t,
                float, float*, int64_t) {
  return false;
}

void transpose_32bit(int64_t N, int64_t K, const void* src, int64_t ld_src, void* dst, int64_t ld_dst) {
  const auto* s = static_cast<const uint32_t*>(src);
  auto* d = static_cast<uint32_t*>(dst);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = 0; j < N; ++j) d[k * ld_dst + j] = s[j * ld_src + k];
    for (int64_t j = N; j < (N + 15) / 16 * 16; ++j) d[k * ld_dst + j] = 0;
  }
}

#endif

}  // namespace fastattn::cpu
