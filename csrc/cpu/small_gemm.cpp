// Register-tile products for the CPU attention kernels (see small_gemm.h), on AVX-512 or AVX2 + FMA.
//
// C is computed in column panels of CV vectors (16 floats per zmm, 8 per ymm) and, within a panel, in tiles of R
// rows whose R x CV accumulators stay in registers for the whole K loop.  Per k, a tile loads the CV vectors of
// B's row k and broadcasts R scalars of A's column k: R * CV FMAs for CV loads and R broadcasts.  The shapes
// (R, CV) take at most the ISA's register file (small_gemm_tiles.inc).  A panel that N does not fill uses masked
// loads and stores for its last vector.
//
// Operands are packed (copied) only where the access pattern needs it:
//   * B transposed (mm_nt: B(k, j) = Bm[j * ldb + k]): to [K, ldp] so that B's rows are contiguous;
//   * B or A rows far apart (row stride >= kFarStride floats, e.g. TimeSformer's patch rows 24 KiB apart):
//     rows that far apart map to few cache sets and evict each other while a panel reuses them (B only when
//     more than one row tile reuses it).
// On AVX-512 the vector width is most of the gain over MKL on AMD CPUs, where MKL runs AVX2 kernels (NOTES entry
// 22); on AVX2-only CPUs the kernel itself runs at MKL's rate and the gain is the packing MKL does per product
// (NOTES entry 45).
//
// The kernels are written once (small_gemm_tiles.inc) over a traits struct `Isa` and compiled twice, each copy in
// its own namespace under `#pragma GCC target` for its ISA; small_gemm() calls the copy chosen at run time.
#include "small_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "row_kernels.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define FA_SMALL_GEMM_X86 1
#include <immintrin.h>
#define FA_TILE_INLINE inline __attribute__((always_inline))
// The register tile's loops must unroll completely, or acc[R][CV] lives on the stack (GCC's default peeling
// limits stop short of R = 12).
#define FA_UNROLL _Pragma("GCC unroll 32")
#else
#define FA_SMALL_GEMM_X86 0
#endif

namespace fastattn::cpu {

#if FA_SMALL_GEMM_X86
namespace {

constexpr int64_t kFarStride = 2048;         // floats (8 KiB): row strides at least this far get packed
constexpr int64_t kMaxK = 4096;              // longer K loops: BLAS (its cache blocking over K pays there)
constexpr int64_t kMaxPacked = int64_t(1) << 21;  // floats per packed operand (8 MiB)

// A row stride that is a multiple of 1 KiB puts the rows of a packed operand into the same cache sets: pad it.
// Always a multiple of 16 floats (both ISAs' vectors; transpose_32bit's zero-filled columns).
int64_t packed_stride(int64_t cols) {
  int64_t ld = (cols + 15) / 16 * 16;
  if (ld % 256 == 0) ld += 16;
  return ld;
}

}  // namespace

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
namespace avx512_tiles {
namespace {

struct Isa {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int64_t kLanes = 16;
  static FA_TILE_INLINE V zero() { return _mm512_setzero_ps(); }
  static FA_TILE_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
  static FA_TILE_INLINE void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static FA_TILE_INLINE V set1(float x) { return _mm512_set1_ps(x); }
  static FA_TILE_INLINE V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static FA_TILE_INLINE V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  // The first n lanes, 1 <= n <= 16.
  static FA_TILE_INLINE Mask first(int64_t n) { return n >= 16 ? Mask(0xFFFF) : Mask((1u << n) - 1); }
  static FA_TILE_INLINE V load_first(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static FA_TILE_INLINE void store_first(Mask m, float* p, V v) { _mm512_mask_storeu_ps(p, m, v); }
  // Lanes 8..15 moved to 0..7.
  static FA_TILE_INLINE V upper_half(V v) { return _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(3, 2, 3, 2)); }

  // r[i] (row i of a 16 x 16 block) -> r[c] = column c, in three shuffle stages.
  static FA_TILE_INLINE void transpose(V* r) {
    V t[16], u[16];
    // t[2i], t[2i+1]: rows 2i and 2i+1 interleaved (per 128-bit lane: a0 b0 a1 b1 / a2 b2 a3 b3).
    FA_UNROLL
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    // u[4g + c], lane l: rows 4g..4g+3 at column c + 4l.
    FA_UNROLL
    for (int g = 0; g < 16; g += 4) {
      u[g + 0] = _mm512_shuffle_ps(t[g], t[g + 2], 0x44);
      u[g + 1] = _mm512_shuffle_ps(t[g], t[g + 2], 0xEE);
      u[g + 2] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0x44);
      u[g + 3] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
    }
    // Column c + 4l gathers lane l of u[c], u[4 + c], u[8 + c], u[12 + c].
    FA_UNROLL
    for (int c = 0; c < 4; ++c) {
      const V v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
      const V w0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
      const V w1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
      r[c] = _mm512_shuffle_f32x4(v0, w0, 0x88);
      r[c + 4] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
      r[c + 8] = _mm512_shuffle_f32x4(v1, w1, 0x88);
      r[c + 12] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
    }
  }

  // v[j] = sum of the 16 lanes of a[j], j < 16, as one vector: a transpose-add tree (unpack, shuffle within and
  // then across the 128-bit lanes), 45 operations where 16 separate reductions take ~130.  Fixed order.
  static FA_TILE_INLINE V sum_lanes(const V* a) {
    V b[8], c[4], d[2];
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
};

#include "small_gemm_tiles.inc"

}  // namespace
}  // namespace avx512_tiles
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2_tiles {
namespace {

// The first n lanes: VMASKMOV's vector mask, and n (stores of fewer than 8 lanes go through a buffer: the
// masked store is microcoded on AMD Zen, ~10x a plain one; NOTES entry 44).
struct Avx2Mask {
  __m256i bits;
  int64_t n;
};

struct Isa {
  using V = __m256;
  using Mask = Avx2Mask;
  static constexpr int64_t kLanes = 8;
  static FA_TILE_INLINE V zero() { return _mm256_setzero_ps(); }
  static FA_TILE_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  static FA_TILE_INLINE void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static FA_TILE_INLINE V set1(float x) { return _mm256_set1_ps(x); }
  static FA_TILE_INLINE V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static FA_TILE_INLINE V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  // The first n lanes, 1 <= n <= 8.
  static FA_TILE_INLINE Mask first(int64_t n) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return Mask{_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane), n};
  }
  // Masked-off lanes read as 0 and are not accessed (no fault past the end of a buffer).
  static FA_TILE_INLINE V load_first(const Mask& m, const float* p) {
    return m.n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m.bits);
  }
  static FA_TILE_INLINE void store_first(const Mask& m, float* p, V v) {
    if (m.n >= 8) {
      _mm256_storeu_ps(p, v);
    } else {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, v);
      std::memcpy(p, lanes, sizeof(float) * static_cast<size_t>(m.n));
    }
  }
  static FA_TILE_INLINE V upper_half(V v) { return v; }  // unused: short_nt pairs rows only with 16 lanes

  // r[i] (row i of an 8 x 8 block) -> r[c] = column c: unpack pairs of rows, shuffle 4-row groups within the
  // 128-bit lanes, then swap 128-bit halves between the two 4-row groups.
  static FA_TILE_INLINE void transpose(V* r) {
    V t[8], u[8];
    FA_UNROLL
    for (int i = 0; i < 8; i += 2) {  // per 128-bit lane: rows i, i+1 interleaved (elements 0,1 / 2,3)
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    FA_UNROLL
    for (int g = 0; g < 8; g += 4) {  // u[g + e], 128-bit lane L: rows g..g+3 at element e + 4L
      u[g + 0] = _mm256_shuffle_ps(t[g], t[g + 2], 0x44);
      u[g + 1] = _mm256_shuffle_ps(t[g], t[g + 2], 0xEE);
      u[g + 2] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0x44);
      u[g + 3] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
    }
    FA_UNROLL
    for (int e = 0; e < 4; ++e) {  // column e: the low lanes of u[e] (rows 0..3), u[4 + e] (rows 4..7); e + 4: high
      r[e] = _mm256_permute2f128_ps(u[e], u[4 + e], 0x20);
      r[e + 4] = _mm256_permute2f128_ps(u[e], u[4 + e], 0x31);
    }
  }

  // v[j] = sum of the 8 lanes of a[j], j < 8: pairwise horizontal adds within the 128-bit lanes, then the two
  // lanes' partial sums added.  Fixed order.
  static FA_TILE_INLINE V sum_lanes(const V* a) {
    const V h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
    const V h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
    const V lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);  // lane L, element e: a[e]'s half L
    return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
  }
};

#include "small_gemm_tiles.inc"

}  // namespace
}  // namespace avx2_tiles
#pragma GCC pop_options

const SmallGemmKernels* small_gemm_kernels_for_isa(const std::string& isa) {
  static const SmallGemmKernels avx512{avx512_tiles::gemm, avx512_tiles::transpose, "avx512"};
  static const SmallGemmKernels avx2{avx2_tiles::gemm, avx2_tiles::transpose, "avx2"};
  if (isa != "avx512" && isa != "avx2") return nullptr;
  if (row_kernels_for_isa(isa) == nullptr) return nullptr;  // the CPU lacks it
  return isa == "avx512" ? &avx512 : &avx2;
}

namespace {
// The tiles of the row kernels' ISA (so FASTATTN_CPU_ISA=avx2 selects the AVX2 tiles and =baseline none).
const SmallGemmKernels* chosen_kernels() {
  static const SmallGemmKernels* chosen = small_gemm_kernels_for_isa(row_kernels().isa);
  return chosen;
}
}  // namespace

bool small_gemm_available() { return chosen_kernels() != nullptr; }

const char* small_gemm_isa() { return chosen_kernels() != nullptr ? chosen_kernels()->isa : nullptr; }

bool small_gemm(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t a_row, int64_t a_col,
                const float* B, int64_t b_row, int64_t b_col, float beta, float* C, int64_t ldc) {
  return chosen_kernels()->gemm(M, N, K, alpha, A, a_row, a_col, B, b_row, b_col, beta, C, ldc);
}

void transpose_32bit(int64_t N, int64_t K, const void* src, int64_t ld_src, void* dst, int64_t ld_dst) {
  chosen_kernels()->transpose(N, K, src, ld_src, dst, ld_dst);
}

#else  // no x86 register tiles in this build

const SmallGemmKernels* small_gemm_kernels_for_isa(const std::string&) { return nullptr; }

bool small_gemm_available() { return false; }

const char* small_gemm_isa() { return nullptr; }


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
