// Vectorised float32 row loops of the CPU attention kernels, compiled per ISA and chosen at run time.
// See row_kernels.h.  The loop bodies are written once, as always-inline templates that the compiler
// auto-vectorises: each runs over blocks of kLanes independent lanes (partial sums and maxima per lane, combined
// in a fixed order), so no reassociation (-ffast-math) is needed and results are reproducible run to run.
// The hot AVX-512 and AVX2 loops (row max, exp + sum, scale + max, the softmax step) are written in intrinsics
// further down, with more accumulators and a tree reduction of the lanes: their sums round in another order than
// the generic bodies', so float32 results differ in the last bits between ISAs (each is still reproducible run to
// run).  The generic bodies serve the SSE2 baseline and the colder loops.
#include "row_kernels.h"

// The vector helpers below are always inlined into the per-ISA functions, so no vector crosses a call boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../philox.h"

#if defined(__GNUC__)
#define FA_INLINE inline __attribute__((always_inline))
#else
#define FA_INLINE inline
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#include <immintrin.h>
#define FA_X86_DISPATCH 1
#define FA_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define FA_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#define FA_UNROLL_ROW _Pragma("GCC unroll 8")
#else
#define FA_X86_DISPATCH 0
#endif

namespace fastattn::cpu {
namespace {

constexpr int kLanes = 16;  // one AVX-512 register of floats, two AVX2 ones, four SSE ones

// GCC/Clang generic vectors: the compiler lowers each operation to the ISA of the function it is inlined into
// (one zmm, two ymm or four xmm instructions).  Loads and stores go through memcpy (unaligned).
typedef float vfloat __attribute__((vector_size(4 * kLanes)));
typedef int32_t vint __attribute__((vector_size(4 * kLanes)));

FA_INLINE vfloat splat(float x) { return vfloat{} + x; }

FA_INLINE vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

FA_INLINE void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

// Lanes combined in a fixed order (results do not depend on the ISA's register width).
FA_INLINE float lane_sum(vfloat v) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

FA_INLINE float lane_max(vfloat v) {
  float m = v[0];
  for (int l = 1; l < kLanes; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

// exp(x) for the arguments of a softmax (x <= ~0), to about 1 ulp, in straight-line vector code (std::exp is a
// library call the compiler cannot vectorise).
//   exp(x) = 2^n * exp(r),  n = round(x / ln 2),  r = x - n ln 2 in [-ln2/2, ln2/2]
// n is rounded with the 1.5 * 2^23 trick (adding it leaves n in the low mantissa bits), ln 2 is split in a
// high part with few mantissa bits (n * ln2_hi is exact) and a low part (Cody-Waite), exp(r) is its degree-7
// Taylor polynomial (truncation error < r^8 / 8! = 3e-8 relative), and 2^n is built in the exponent field.
// Arguments below -87 (including -inf: masked scores) give 0; exp(-87) = 1.6e-38 is the last normal float.
constexpr float kExpLo = -87.0f, kExpHi = 88.0f;

FA_INLINE vfloat exp_softmax(vfloat x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;         // 11 significant bits: n * kLn2Hi is exact for |n| < 2^13
  constexpr float kLn2Lo = 1.428606765330187045e-06f;  // ln 2 - kLn2Hi
  constexpr float kShifter = 12582912.0f;              // 1.5 * 2^23, whose bit pattern is 0x4B400000
  vfloat xc = x < kExpLo ? splat(kExpLo) : x;
  xc = xc > kExpHi ? splat(kExpHi) : xc;
  const vfloat shifted = xc * kLog2e + kShifter;       // kShifter + round(xc / ln 2), exactly
  const vfloat n = shifted - kShifter;
  vint ni;                                             // round(xc / ln 2) as an integer
  std::memcpy(&ni, &shifted, sizeof(ni));
  ni -= 0x4B400000;
  vfloat r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  vfloat p = splat(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vint bits = (ni + 127) << 23;                  // 2^n
  vfloat two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < kExpLo ? splat(0.0f) : p * two_n;
}

FA_INLINE float row_max_body(const float* x, int64_t n) {
  vfloat lanes = splat(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vfloat v = load(x + j);
    lanes = v > lanes ? v : lanes;
  }
  float m = lane_max(lanes);
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

FA_INLINE float exp_shift_sum_body(float* x, int64_t n, float shift) {
  vfloat lanes = splat(0.0f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vfloat e = exp_softmax(load(x + j) - shift);
    store(x + j, e);
    lanes += e;
  }
  if (j < n) {  // the tail, padded: one more vector through a stack copy
    alignas(64) float tmp[kLanes];
    const int64_t rest = n - j;
    for (int l = 0; l < kLanes; ++l) tmp[l] = l < rest ? x[j + l] - shift : -std::numeric_limits<float>::infinity();
    const vfloat e = exp_softmax(load(tmp));
    store(tmp, e);
    for (int64_t l = 0; l < rest; ++l) x[j + l] = tmp[l];
    lanes += e;  // padded lanes are exp(-inf) = 0
  }
  return lane_sum(lanes);
}

// x[j] *= scale in place; returns the new row's max.
FA_INLINE float scale_row_max_body(float* x, int64_t n, float scale) {  // NaN is skipped, as in row_max
  vfloat lanes = splat(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vfloat v = load(x + j) * scale;
    store(x + j, v);
    lanes = v > lanes ? v : lanes;
  }
  float m = lane_max(lanes);
  for (; j < n; ++j) {
    x[j] *= scale;
    m = x[j] > m ? x[j] : m;
  }
  return m;
}

FA_INLINE float max_exp_sum_body(float* x, int64_t n, float* m_io, bool normalize) {
  const float m = std::max(*m_io, row_max_body(x, n));
  if (m == -std::numeric_limits<float>::infinity()) return unseen_row_probabilities(x, n);
  const float sum = exp_shift_sum_body(x, n, m);
  if (normalize) {
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < n; ++j) x[j] *= inv;
  }
  *m_io = m;
  return sum;
}

// sum_j x[j] y[j]: two 16-lane accumulators, lanes combined in lane_sum's fixed order.
FA_INLINE float dot_body(const float* x, const float* y, int64_t n) {
  vfloat s0 = splat(0.0f), s1 = splat(0.0f);
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    s0 += load(x + j) * load(y + j);
    s1 += load(x + j + kLanes) * load(y + j + kLanes);
  }
  if (j + kLanes <= n) {
    s0 += load(x + j) * load(y + j);
    j += kLanes;
  }
  float s = lane_sum(s0 + s1);
  for (; j < n; ++j) s += x[j] * y[j];
  return s;
}

// NV column vectors (rows <= 16 NV), kept in registers: one pass over the keys for the maxima and one for the
// exps and sums, each over all columns at once (independent chains per vector, each key row read contiguously).
template <int NV>
FA_INLINE void column_max_exp_sum_tile(float* st, int64_t ld, int64_t cols, float* m_io, float* sums_out) {
  vfloat mx[NV], shift[NV], sum[NV];
  for (int v = 0; v < NV; ++v) mx[v] = load(m_io + v * kLanes);
  for (int64_t j = 0; j < cols; ++j) {
    const float* row = st + j * ld;
    for (int v = 0; v < NV; ++v) {
      const vfloat x = load(row + v * kLanes);
      mx[v] = x > mx[v] ? x : mx[v];  // NaN skipped, as in row_max
    }
  }
  for (int v = 0; v < NV; ++v) {
    shift[v] = mx[v] == -std::numeric_limits<float>::infinity() ? splat(0.0f) : mx[v];  // no finite score: x - 0
    sum[v] = splat(0.0f);
  }
  for (int64_t j = 0; j < cols; ++j) {
    float* row = st + j * ld;
    for (int v = 0; v < NV; ++v) {
      const vfloat e = exp_softmax(load(row + v * kLanes) - shift[v]);
      store(row + v * kLanes, e);
      sum[v] += e;
    }
  }
  for (int v = 0; v < NV; ++v) {
    store(m_io + v * kLanes, mx[v]);
    store(sums_out + v * kLanes, sum[v]);
  }
}

FA_INLINE void column_max_exp_sum_body(float* st, int64_t ld, int64_t cols, int64_t rows, const float* m_old,
                                      float* m_new, float* sums) {
  constexpr int kMaxVectors = kMaxColumnRows / kLanes;
  const int nv = static_cast<int>((rows + kLanes - 1) / kLanes);
  alignas(64) float m_buf[kMaxVectors * kLanes], sum_buf[kMaxVectors * kLanes];
  for (int r = 0; r < nv * kLanes; ++r) m_buf[r] = r < rows ? m_old[r] : -std::numeric_limits<float>::infinity();
  switch (nv) {
    case 1: column_max_exp_sum_tile<1>(st, ld, cols, m_buf, sum_buf); break;
    case 2: column_max_exp_sum_tile<2>(st, ld, cols, m_buf, sum_buf); break;
    case 3: column_max_exp_sum_tile<3>(st, ld, cols, m_buf, sum_buf); break;
    default: column_max_exp_sum_tile<4>(st, ld, cols, m_buf, sum_buf); break;
  }
  for (int64_t r = 0; r < rows; ++r) {
    m_new[r] = m_buf[r];
    sums[r] = sum_buf[r];
  }
}

template <int NV>
FA_INLINE void column_exp_shift_tile(float* st, int64_t ld, int64_t cols, const float* shift_in) {
  vfloat shift[NV];
  for (int v = 0; v < NV; ++v) shift[v] = load(shift_in + v * kLanes);
  for (int64_t j = 0; j < cols; ++j) {
    float* row = st + j * ld;
    for (int v = 0; v < NV; ++v) store(row + v * kLanes, exp_softmax(load(row + v * kLanes) - shift[v]));
  }
}

FA_INLINE void column_exp_shift_body(float* st, int64_t ld, int64_t cols, int64_t rows, const float* shift) {
  constexpr int kMaxVectors = kMaxColumnRows / kLanes;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const int nv = static_cast<int>((rows + kLanes - 1) / kLanes);
  alignas(64) float buf[kMaxVectors * kLanes];
  // LSE -inf (the row saw no key, its scores are -inf): shift by +inf instead, so that exp(x - inf) = 0.
  for (int r = 0; r < nv * kLanes; ++r) buf[r] = r < rows && shift[r] != -kInf ? shift[r] : kInf;
  switch (nv) {
    case 1: column_exp_shift_tile<1>(st, ld, cols, buf); break;
    case 2: column_exp_shift_tile<2>(st, ld, cols, buf); break;
    case 3: column_exp_shift_tile<3>(st, ld, cols, buf); break;
    default: column_exp_shift_tile<4>(st, ld, cols, buf); break;
  }
}

// Philox in lanes: the same rounds as csrc/philox.h, written over arrays so the 32x32->64 multiplies vectorise.
FA_INLINE void dropout_row_body(float* p, int64_t n, uint64_t seed, uint32_t bh, uint32_t m, uint32_t n0,
                                uint32_t threshold, float scale) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      c0[l] = n0 + static_cast<uint32_t>(j + l);
      c1[l] = m;
      c2[l] = bh;
      c3[l] = 0u;
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      for (int l = 0; l < kLanes; ++l) {
        const uint64_t prod_b = static_cast<uint64_t>(kPhiloxRoundB) * c2[l];
        const uint64_t prod_a = static_cast<uint64_t>(kPhiloxRoundA) * c0[l];
        const uint32_t new_c0 = static_cast<uint32_t>(prod_b >> 32) ^ c1[l] ^ k0;
        const uint32_t new_c2 = static_cast<uint32_t>(prod_a >> 32) ^ c3[l] ^ k1;
        c1[l] = static_cast<uint32_t>(prod_b);
        c3[l] = static_cast<uint32_t>(prod_a);
        c0[l] = new_c0;
        c2[l] = new_c2;
      }
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    for (int l = 0; l < kLanes; ++l) p[j + l] = (c0[l] >> 8) >= threshold ? p[j + l] * scale : 0.0f;
  }
  for (; j < n; ++j) {
    const bool keep = dropout_keep(seed, bh, m, n0 + static_cast<uint32_t>(j), threshold);
    p[j] = keep ? p[j] * scale : 0.0f;
  }
}

// --- the three compilations -----------------------------------------------------------------------------------
float row_max_baseline(const float* x, int64_t n) { return row_max_body(x, n); }
float dot_baseline(const float* x, const float* y, int64_t n) { return dot_body(x, y, n); }
float exp_shift_sum_baseline(float* x, int64_t n, float shift) { return exp_shift_sum_body(x, n, shift); }
float scale_row_max_baseline(float* x, int64_t n, float scale) { return scale_row_max_body(x, n, scale); }
float max_exp_sum_baseline(float* x, int64_t n, float* m_io, bool normalize) {
  return max_exp_sum_body(x, n, m_io, normalize);
}
void dropout_row_baseline(float* p, int64_t n, uint64_t seed, uint32_t bh, uint32_t m, uint32_t n0,
                          uint32_t threshold, float scale) {
  dropout_row_body(p, n, seed, bh, m, n0, threshold, scale);
}
void column_max_exp_sum_baseline(float* st, int64_t ld, int64_t cols, int64_t rows, const float* m_old, float* m_new,
                                 float* sums) {
  column_max_exp_sum_body(st, ld, cols, rows, m_old, m_new, sums);
}
void column_exp_shift_baseline(float* st, int64_t ld, int64_t cols, int64_t rows, const float* shift) {
  column_exp_shift_body(st, ld, cols, rows, shift);
}

#if FA_X86_DISPATCH
// The AVX2 row loops in intrinsics, as the AVX-512 ones below: the generic 16-lane bodies compiled for AVX2 came
// out as scalar max/blend steps and stack round trips (GCC 12 splits a 64-byte vector into ymm halves through
// memory), and ran the softmax at a third of the rate of these (bench/NOTES.md entry 44).  Vectors of 8 lanes,
// tails loaded through VMASKMOV (stored through a stack buffer), lanes reduced in a fixed tree: reproducible run
// to run.
constexpr int kLanes8 = 8;

// The lanes of a ymm vector that hold one of `left` remaining elements (all 8 when left >= 8), as VMASKMOV wants.
FA_TARGET_AVX2 FA_INLINE __m256i tail_mask_avx2(int64_t left) {
  const int keep = static_cast<int>(std::min<int64_t>(left, kLanes8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(keep), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

FA_TARGET_AVX2 FA_INLINE float reduce_max_avx2(__m256 v) {  // inputs never NaN (the accumulators skip it)
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

FA_TARGET_AVX2 FA_INLINE float reduce_add_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The first `count` (< 8) lanes of v stored to x: through a stack buffer, since VMASKMOV's store form is microcoded
// on AMD Zen (one per 49-score row was measurable in Swin's softmax: NOTES entry 45).
FA_TARGET_AVX2 FA_INLINE void store_tail_avx2(float* x, __m256 v, int64_t count) {
  alignas(32) float lanes[kLanes8];
  _mm256_store_ps(lanes, v);
  std::memcpy(x, lanes, sizeof(float) * static_cast<size_t>(count));
}

// min(left, 8) lanes of v stored to x (a whole vector with a plain store).
FA_TARGET_AVX2 FA_INLINE void store_first_avx2(float* x, __m256 v, int64_t left) {
  if (left >= kLanes8) {
    _mm256_storeu_ps(x, v);
  } else {
    store_tail_avx2(x, v, left);
  }
}

// Lanes past a tail read as -inf (for the max), never loaded from memory.
FA_TARGET_AVX2 FA_INLINE __m256 load_tail_or_neg_inf(const float* x, __m256i mask) {
  return _mm256_blendv_ps(_mm256_set1_ps(-std::numeric_limits<float>::infinity()), _mm256_maskload_ps(x, mask),
                          _mm256_castsi256_ps(mask));
}

// exp_softmax in AVX2 intrinsics: the same Cody-Waite reduction, cheaper on the two FMA pipes (9 of their
// operations instead of 11, and no VROUNDPS / VCVTPS2DQ):
//   n = round(x / ln 2) by the 1.5 * 2^23 shifter in one FMA, as exp_softmax does; the shifted value's low
//     mantissa bits hold n, so 2^n's exponent field is those bits plus 127, shifted by 23;
//   exp(r) on [-ln2/2, ln2/2] by a degree-5 polynomial fitted for the least maximum relative error (9.2e-8 before
//     rounding; constant term exactly 1, so exp(0) = 1 exactly, as the row's maximum needs) in place of the
//     degree-7 Taylor polynomial: measured over every float in [-87, 1], at most 2.0 ulp from exp (the Taylor
//     form: 0.94).  torch's own CPU flash attention uses an exp of that class (at::vec's exp_u20).
// x is clamped to [-87, 88] first, so n lies in [-126, 127] and 2^n is a normal float; x < -87 (masked scores,
// -inf) gives exactly 0; NaN stays NaN (MAXPS/MINPS return their second operand on NaN, and p * 2^n keeps it).
FA_TARGET_AVX2 FA_INLINE __m256 exp_softmax_avx2(__m256 x) {
  const __m256 lo = _mm256_set1_ps(kExpLo);
  const __m256 tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  const __m256 xc = _mm256_min_ps(_mm256_set1_ps(kExpHi), _mm256_max_ps(lo, x));
  const __m256 shifter = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23
  const __m256 shifted = _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), shifter);
  const __m256 n = _mm256_sub_ps(shifted, shifter);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), xc);  // Cody-Waite, as exp_softmax
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(0.008290272206068039f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.04189816117286682f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.1666763871908188f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.4999914765357971f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.9999997019767761f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i two_n =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(shifted), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)));
}

FA_TARGET_AVX2 float row_max_avx2(const float* x, int64_t n) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m0 = neg_inf, m1 = neg_inf, m2 = neg_inf, m3 = neg_inf;
  int64_t j = 0;
  for (; j + 4 * kLanes8 <= n; j += 4 * kLanes8) {
    m0 = _mm256_max_ps(_mm256_loadu_ps(x + j), m0);  // NaN skipped: MAXPS returns the accumulator
    m1 = _mm256_max_ps(_mm256_loadu_ps(x + j + kLanes8), m1);
    m2 = _mm256_max_ps(_mm256_loadu_ps(x + j + 2 * kLanes8), m2);
    m3 = _mm256_max_ps(_mm256_loadu_ps(x + j + 3 * kLanes8), m3);
  }
  for (; j < n; j += kLanes8) m0 = _mm256_max_ps(load_tail_or_neg_inf(x + j, tail_mask_avx2(n - j)), m0);
  return reduce_max_avx2(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
}

FA_TARGET_AVX2 float scale_row_max_avx2(float* x, int64_t n, float scale) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), sc = _mm256_set1_ps(scale);
  __m256 m0 = neg_inf, m1 = neg_inf;
  int64_t j = 0;
  for (; j + 2 * kLanes8 <= n; j += 2 * kLanes8) {
    const __m256 v0 = _mm256_mul_ps(_mm256_loadu_ps(x + j), sc);
    const __m256 v1 = _mm256_mul_ps(_mm256_loadu_ps(x + j + kLanes8), sc);
    _mm256_storeu_ps(x + j, v0);
    _mm256_storeu_ps(x + j + kLanes8, v1);
    m0 = _mm256_max_ps(v0, m0);
    m1 = _mm256_max_ps(v1, m1);
  }
  for (; j < n; j += kLanes8) {
    const __m256i mask = tail_mask_avx2(n - j);
    const __m256 v = _mm256_mul_ps(_mm256_maskload_ps(x + j, mask), sc);
    store_first_avx2(x + j, v, n - j);
    m0 = _mm256_max_ps(_mm256_blendv_ps(neg_inf, v, _mm256_castsi256_ps(mask)), m0);
  }
  return reduce_max_avx2(_mm256_max_ps(m0, m1));
}

FA_TARGET_AVX2 float exp_shift_sum_avx2(float* x, int64_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 2 * kLanes8 <= n; j += 2 * kLanes8) {
    const __m256 e0 = exp_softmax_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j), sh));
    const __m256 e1 = exp_softmax_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j + kLanes8), sh));
    _mm256_storeu_ps(x + j, e0);
    _mm256_storeu_ps(x + j + kLanes8, e1);
    s0 = _mm256_add_ps(s0, e0);
    s1 = _mm256_add_ps(s1, e1);
  }
  for (; j < n; j += kLanes8) {
    const __m256i mask = tail_mask_avx2(n - j);
    // Lanes past n: exp(0 - shift) computed, then zeroed before the sum and never stored.
    const __m256 e = _mm256_and_ps(_mm256_castsi256_ps(mask),
                                   exp_softmax_avx2(_mm256_sub_ps(_mm256_maskload_ps(x + j, mask), sh)));
    store_first_avx2(x + j, e, n - j);
    s0 = _mm256_add_ps(s0, e);
  }
  return reduce_add_avx2(_mm256_add_ps(s0, s1));
}

// As max_exp_sum_avx512: rows up to kRegisterVectorsAvx2 ymm vectors (64 scores: Swin's 49 keys, TimeSformer's
// 8 frames) stay in registers through max, exp, sum and normalisation (16 ymm registers: 8 for the row, the rest
// for exp's temporaries); longer rows take two passes.
constexpr int kRegisterVectorsAvx2 = 8;

FA_TARGET_AVX2 float max_exp_sum_avx2(float* x, int64_t n, float* m_io, bool normalize) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  if (n > kRegisterVectorsAvx2 * kLanes8) {
    const float m = std::max(*m_io, row_max_avx2(x, n));
    if (m == kNegInf) return unseen_row_probabilities(x, n);
    const float sum = exp_shift_sum_avx2(x, n, m);
    if (normalize) {
      const __m256 inv = _mm256_set1_ps(1.0f / sum);
      int64_t j = 0;
      for (; j + kLanes8 <= n; j += kLanes8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), inv));
      if (j < n) {
        const __m256i mask = tail_mask_avx2(n - j);
        store_tail_avx2(x + j, _mm256_mul_ps(_mm256_maskload_ps(x + j, mask), inv), n - j);
      }
    }
    *m_io = m;
    return sum;
  }
  // Whole vectors move with plain loads and stores, only the row's last partial vector through VMASKMOV (whose
  // store form is microcoded on AMD Zen: a masked store per vector made this loop 1.5x slower).
  const int64_t full = n / kLanes8;
  const bool partial = full * kLanes8 < n;
  const __m256i tail = tail_mask_avx2(n - full * kLanes8);
  __m256 v[kRegisterVectorsAvx2];
  __m256 mx = _mm256_set1_ps(kNegInf);
  FA_UNROLL_ROW
  for (int i = 0; i < kRegisterVectorsAvx2; ++i) {
    if (i < full) {
      v[i] = _mm256_loadu_ps(x + i * kLanes8);
    } else if (i == full && partial) {
      v[i] = load_tail_or_neg_inf(x + i * kLanes8, tail);
    } else {
      break;
    }
    mx = _mm256_max_ps(v[i], mx);  // NaN skipped, as in row_max
  }
  const float m = std::max(*m_io, reduce_max_avx2(mx));
  if (m == kNegInf) return unseen_row_probabilities(x, n);
  const int64_t nv = full + (partial ? 1 : 0);
  const __m256 sh = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  FA_UNROLL_ROW
  for (int i = 0; i < kRegisterVectorsAvx2; ++i) {
    if (i < nv) {
      v[i] = exp_softmax_avx2(_mm256_sub_ps(v[i], sh));  // the -inf padding lanes give exactly 0
      sum = _mm256_add_ps(sum, v[i]);
    }
  }
  const float total = reduce_add_avx2(sum);
  const __m256 inv = _mm256_set1_ps(normalize ? 1.0f / total : 1.0f);
  FA_UNROLL_ROW
  for (int i = 0; i < kRegisterVectorsAvx2; ++i) {
    if (i >= nv) break;
    const __m256 out = normalize ? _mm256_mul_ps(v[i], inv) : v[i];
    if (i < full) {
      _mm256_storeu_ps(x + i * kLanes8, out);
    } else {
      store_tail_avx2(x + i * kLanes8, out, n - full * kLanes8);
    }
  }
  *m_io = m;
  return total;
}

// dot_body's order exactly (16 partial sums in two sets, s0 + s1 combined lane by lane in order 0..15, then the
// scalar tail), on ymm pairs: the generic body compiled for AVX2 went through the stack.
FA_TARGET_AVX2 float dot_avx2(const float* x, const float* y, int64_t n) {
  __m256 s0a = _mm256_setzero_ps(), s0b = _mm256_setzero_ps(), s1a = _mm256_setzero_ps(), s1b = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    s0a = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j), s0a);
    s0b = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 8), _mm256_loadu_ps(y + j + 8), s0b);
    s1a = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 16), _mm256_loadu_ps(y + j + 16), s1a);
    s1b = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 24), _mm256_loadu_ps(y + j + 24), s1b);
  }
  if (j + 16 <= n) {
    s0a = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j), s0a);
    s0b = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 8), _mm256_loadu_ps(y + j + 8), s0b);
    j += 16;
  }
  alignas(32) float lanes[16];
  _mm256_store_ps(lanes, _mm256_add_ps(s0a, s1a));
  _mm256_store_ps(lanes + 8, _mm256_add_ps(s0b, s1b));
  float sum = 0.0f;
  for (int l = 0; l < 16; ++l) sum += lanes[l];
  for (; j < n; ++j) sum += x[j] * y[j];
  return sum;
}

// The keys-major column loops on ymm vectors (lanes = query columns, so each column's max and sum run
// sequentially over the keys, as in the generic bodies), in chunks of at most kColumnChunk vectors so that the
// maxima, shifts and sums of a chunk stay in the 16 ymm registers.
constexpr int kColumnChunk = 4;

template <int NV>
FA_TARGET_AVX2 FA_INLINE void column_max_exp_sum_tile_avx2(float* st, int64_t ld, int64_t cols, float* m_io,
                                                           float* sums_out) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 mx[NV], shift[NV], sum[NV];
  for (int v = 0; v < NV; ++v) mx[v] = _mm256_loadu_ps(m_io + v * kLanes8);
  for (int64_t j = 0; j < cols; ++j) {
    const float* row = st + j * ld;
    for (int v = 0; v < NV; ++v) mx[v] = _mm256_max_ps(_mm256_loadu_ps(row + v * kLanes8), mx[v]);  // NaN skipped
  }
  for (int v = 0; v < NV; ++v) {
    // no finite score in the column: shift by 0 (exp(-inf) = 0, NaN stays)
    shift[v] = _mm256_andnot_ps(_mm256_cmp_ps(mx[v], neg_inf, _CMP_EQ_OQ), mx[v]);
    sum[v] = _mm256_setzero_ps();
  }
  for (int64_t j = 0; j < cols; ++j) {
    float* row = st + j * ld;
    for (int v = 0; v < NV; ++v) {
      const __m256 e = exp_softmax_avx2(_mm256_sub_ps(_mm256_loadu_ps(row + v * kLanes8), shift[v]));
      _mm256_storeu_ps(row + v * kLanes8, e);
      sum[v] = _mm256_add_ps(sum[v], e);
    }
  }
  for (int v = 0; v < NV; ++v) {
    _mm256_storeu_ps(m_io + v * kLanes8, mx[v]);
    _mm256_storeu_ps(sums_out + v * kLanes8, sum[v]);
  }
}

template <int NV>
FA_TARGET_AVX2 FA_INLINE void column_exp_shift_tile_avx2(float* st, int64_t ld, int64_t cols, const float* shift_in) {
  __m256 shift[NV];
  for (int v = 0; v < NV; ++v) shift[v] = _mm256_loadu_ps(shift_in + v * kLanes8);
  for (int64_t j = 0; j < cols; ++j) {
    float* row = st + j * ld;
    for (int v = 0; v < NV; ++v) {
      _mm256_storeu_ps(row + v * kLanes8, exp_softmax_avx2(_mm256_sub_ps(_mm256_loadu_ps(row + v * kLanes8), shift[v])));
    }
  }
}

// Columns [8 c0, 8 (c0 + nv)) of the tile through a chunk kernel; the column offset moves st and the buffers.
template <template <int> class Chunk, typename... Args>
FA_TARGET_AVX2 FA_INLINE void for_column_chunks(int nv, Args... args) {
  for (int c0 = 0; c0 < nv; c0 += kColumnChunk) {
    switch (std::min(kColumnChunk, nv - c0)) {
      case 1: Chunk<1>::run(c0 * kLanes8, args...); break;
      case 2: Chunk<2>::run(c0 * kLanes8, args...); break;
      case 3: Chunk<3>::run(c0 * kLanes8, args...); break;
      default: Chunk<4>::run(c0 * kLanes8, args...); break;
    }
  }
}

template <int NV>
struct MaxExpSumChunk {
  FA_TARGET_AVX2 static void run(int off, float* st, int64_t ld, int64_t cols, float* m_buf, float* sum_buf) {
    column_max_exp_sum_tile_avx2<NV>(st + off, ld, cols, m_buf + off, sum_buf + off);
  }
};

template <int NV>
struct ExpShiftChunk {
  FA_TARGET_AVX2 static void run(int off, float* st, int64_t ld, int64_t cols, const float* shift) {
    column_exp_shift_tile_avx2<NV>(st + off, ld, cols, shift + off);
  }
};

// The columns [rows, ld) are scratch (row_kernels.h), so whole vectors up to round8(rows) <= ld are read and written.
FA_TARGET_AVX2 void column_max_exp_sum_avx2(float* st, int64_t ld, int64_t cols, int64_t rows, const float* m_old,
                                            float* m_new, float* sums) {
  const int nv = static_cast<int>((rows + kLanes8 - 1) / kLanes8);
  alignas(32) float m_buf[kMaxColumnRows], sum_buf[kMaxColumnRows];
  for (int r = 0; r < nv * kLanes8; ++r) m_buf[r] = r < rows ? m_old[r] : -std::numeric_limits<float>::infinity();
  for_column_chunks<MaxExpSumChunk>(nv, st, ld, cols, m_buf, sum_buf);
  for (int64_t r = 0; r < rows; ++r) {
    m_new[r] = m_buf[r];
    sums[r] = sum_buf[r];
  }
}

FA_TARGET_AVX2 void column_exp_shift_avx2(float* st, int64_t ld, int64_t cols, int64_t rows, const float* shift) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const int nv = static_cast<int>((rows + kLanes8 - 1) / kLanes8);
  alignas(32) float buf[kMaxColumnRows];
  // LSE -inf (the row saw no key, its scores are -inf): shift by +inf instead, so that exp(x - inf) = 0.
  for (int r = 0; r < nv * kLanes8; ++r) buf[r] = r < rows && shift[r] != -kInf ? shift[r] : kInf;
  for_column_chunks<ExpShiftChunk>(nv, st, ld, cols, static_cast<const float*>(buf));
}

FA_TARGET_AVX2 void dropout_row_avx2(float* p, int64_t n, uint64_t seed, uint32_t bh, uint32_t m, uint32_t n0,
                                     uint32_t threshold, float scale) {
  dropout_row_body(p, n, seed, bh, m, n0, threshold, scale);
}
// The lanes of a vector that hold one of `left` remaining elements (all 16 when left >= 16).
FA_TARGET_AVX512 FA_INLINE __mmask16 tail_mask(int64_t left) {
  return left >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

// The AVX-512 row loops in intrinsics: two or four independent accumulators (a single one makes the loop a chain
// of dependent max/add latencies) and a tree reduction of the lanes at the end (16 serial scalar steps cost as much
// as a 512-column row's loads); masked loads for the tail.  Order is fixed, so results are reproducible.
// row_max: NaN is skipped (MAXPS returns its second operand when either is NaN: the accumulator is never NaN).
FA_TARGET_AVX512 float row_max_avx512(const float* x, int64_t n) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m0 = neg_inf, m1 = neg_inf, m2 = neg_inf, m3 = neg_inf;
  int64_t j = 0;
  for (; j + 4 * kLanes <= n; j += 4 * kLanes) {
    m0 = _mm512_max_ps(_mm512_loadu_ps(x + j), m0);
    m1 = _mm512_max_ps(_mm512_loadu_ps(x + j + kLanes), m1);
    m2 = _mm512_max_ps(_mm512_loadu_ps(x + j + 2 * kLanes), m2);
    m3 = _mm512_max_ps(_mm512_loadu_ps(x + j + 3 * kLanes), m3);
  }
  for (; j < n; j += kLanes) {
    const __mmask16 mask = tail_mask(n - j);
    m0 = _mm512_max_ps(_mm512_mask_loadu_ps(neg_inf, mask, x + j), m0);
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
}

FA_TARGET_AVX512 float scale_row_max_avx512(float* x, int64_t n, float scale) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), sc = _mm512_set1_ps(scale);
  __m512 m0 = neg_inf, m1 = neg_inf;
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    const __m512 v0 = _mm512_mul_ps(_mm512_loadu_ps(x + j), sc);
    const __m512 v1 = _mm512_mul_ps(_mm512_loadu_ps(x + j + kLanes), sc);
    _mm512_storeu_ps(x + j, v0);
    _mm512_storeu_ps(x + j + kLanes, v1);
    m0 = _mm512_max_ps(v0, m0);
    m1 = _mm512_max_ps(v1, m1);
  }
  for (; j < n; j += kLanes) {
    const __mmask16 mask = tail_mask(n - j);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + j), sc);
    _mm512_mask_storeu_ps(x + j, mask, v);
    m0 = _mm512_max_ps(_mm512_mask_mov_ps(neg_inf, mask, v), m0);
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}

// exp_softmax in AVX-512 intrinsics, with the same reduction and polynomial (1 ulp) but VSCALEFPS for 2^n: it
// needs no clamp above (the softmax's x <= 0) and no integer exponent arithmetic, ~17 instead of ~24 operations
// per vector (on its own no faster: the exp pass is bound by its loads and stores, NOTES entry 24).  x < -87
// (masked scores, -inf) gives exactly 0 as in exp_softmax; NaN stays NaN.
FA_TARGET_AVX512 FA_INLINE __m512 exp_softmax_avx512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(kExpLo);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  const __m512 xc = _mm512_max_ps(lo, x);  // this operand order keeps NaN (MAXPS returns the second on NaN)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), xc);  // Cody-Waite, as exp_softmax
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~tiny), p, n);
}

FA_TARGET_AVX512 float exp_shift_sum_avx512(float* x, int64_t n, float shift) {
  const __m512 sh = _mm512_set1_ps(shift);
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    const __m512 e0 = exp_softmax_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + j), sh));
    const __m512 e1 = exp_softmax_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + j + kLanes), sh));
    _mm512_storeu_ps(x + j, e0);
    _mm512_storeu_ps(x + j + kLanes, e1);
    s0 = _mm512_add_ps(s0, e0);
    s1 = _mm512_add_ps(s1, e1);
  }
  for (; j < n; j += kLanes) {
    const __mmask16 mask = tail_mask(n - j);
    // Lanes past n: exp(0 - shift) computed, then zeroed before the sum and never stored.
    const __m512 e = _mm512_maskz_mov_ps(mask, exp_softmax_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x + j), sh)));
    _mm512_mask_storeu_ps(x + j, mask, e);
    s0 = _mm512_add_ps(s0, e);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

// Rows up to kRegisterVectors vectors are loaded once, kept in registers through max, exp, sum and the optional
// normalisation, and stored once (Swin's 49 keys, TimeSformer's 8 frames: the per-row passes and calls were
// most of their softmax); longer rows take the two passes of row_max_avx512 and exp_shift_sum_avx512.
constexpr int kRegisterVectors = 8;

FA_TARGET_AVX512 float max_exp_sum_avx512(float* x, int64_t n, float* m_io, bool normalize) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  if (n > kRegisterVectors * kLanes) {
    const float m = std::max(*m_io, row_max_avx512(x, n));
    if (m == kNegInf) return unseen_row_probabilities(x, n);
    const float sum = exp_shift_sum_avx512(x, n, m);
    if (normalize) {
      const __m512 inv = _mm512_set1_ps(1.0f / sum);
      for (int64_t j = 0; j < n; j += kLanes) {
        const __mmask16 mask = tail_mask(n - j);
        _mm512_mask_storeu_ps(x + j, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + j), inv));
      }
    }
    *m_io = m;
    return sum;
  }
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  const int64_t nv = (n + kLanes - 1) / kLanes;
  __m512 v[kRegisterVectors];
  __mmask16 masks[kRegisterVectors];
  __m512 mx = neg_inf;
  FA_UNROLL_ROW
  for (int i = 0; i < kRegisterVectors; ++i) {
    if (i < nv) {
      const int64_t left = n - int64_t(i) * kLanes;
      masks[i] = tail_mask(left);
      v[i] = _mm512_mask_loadu_ps(neg_inf, masks[i], x + i * kLanes);
      mx = _mm512_max_ps(v[i], mx);  // NaN skipped, as in row_max
    }
  }
  const float m = std::max(*m_io, _mm512_reduce_max_ps(mx));
  if (m == kNegInf) return unseen_row_probabilities(x, n);
  const __m512 sh = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  FA_UNROLL_ROW
  for (int i = 0; i < kRegisterVectors; ++i) {
    if (i < nv) {
      v[i] = _mm512_maskz_mov_ps(masks[i], exp_softmax_avx512(_mm512_sub_ps(v[i], sh)));
      sum = _mm512_add_ps(sum, v[i]);
    }
  }
  const float total = _mm512_reduce_add_ps(sum);
  const __m512 inv = _mm512_set1_ps(normalize ? 1.0f / total : 1.0f);
  FA_UNROLL_ROW
  for (int i = 0; i < kRegisterVectors; ++i) {
    if (i < nv) _mm512_mask_storeu_ps(x + i * kLanes, masks[i], normalize ? _mm512_mul_ps(v[i], inv) : v[i]);
  }
  *m_io = m;
  return total;
}

FA_TARGET_AVX512 void dropout_row_avx512(float* p, int64_t n, uint64_t seed, uint32_t bh, uint32_t m, uint32_t n0,
                                         uint32_t threshold, float scale) {
  dropout_row_body(p, n, seed, bh, m, n0, threshold, scale);
}

FA_TARGET_AVX512 float dot_avx512(const float* x, const float* y, int64_t n) { return dot_body(x, y, n); }
FA_TARGET_AVX512 void column_max_exp_sum_avx512(float* st, int64_t ld, int64_t cols, int64_t rows,
                                                const float* m_old, float* m_new, float* sums) {
  column_max_exp_sum_body(st, ld, cols, rows, m_old, m_new, sums);
}
FA_TARGET_AVX512 void column_exp_shift_avx512(float* st, int64_t ld, int64_t cols, int64_t rows, const float* shift) {
  column_exp_shift_body(st, ld, cols, rows, shift);
}
#endif

struct IsaTables {
  RowKernels baseline, avx2, avx512;
  bool has_avx2 = false, has_avx512 = false;
};

const IsaTables& isa_tables() {
  static const IsaTables tables = [] {
    IsaTables t;
    t.baseline = RowKernels{row_max_baseline, exp_shift_sum_baseline, dropout_row_baseline, scale_row_max_baseline,
                            max_exp_sum_baseline, dot_baseline, column_max_exp_sum_baseline,
                            column_exp_shift_baseline, "baseline"};
    t.avx2 = t.avx512 = t.baseline;
#if FA_X86_DISPATCH
    t.avx2 = RowKernels{row_max_avx2, exp_shift_sum_avx2, dropout_row_avx2, scale_row_max_avx2, max_exp_sum_avx2,
                        dot_avx2, column_max_exp_sum_avx2, column_exp_shift_avx2, "avx2"};
    t.avx512 = RowKernels{row_max_avx512, exp_shift_sum_avx512, dropout_row_avx512, scale_row_max_avx512,
                          max_exp_sum_avx512, dot_avx512, column_max_exp_sum_avx512, column_exp_shift_avx512, "avx512"};
    __builtin_cpu_init();
    t.has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    t.has_avx512 = t.has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                   __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#endif
    return t;
  }();
  return tables;
}

}  // namespace

const RowKernels* row_kernels_for_isa(const std::string& isa) {
  const IsaTables& t = isa_tables();
  if (isa == "baseline") return &t.baseline;
  if (isa == "avx2") return t.has_avx2 ? &t.avx2 : nullptr;
  if (isa == "avx512") return t.has_avx512 ? &t.avx512 : nullptr;
  return nullptr;
}

const RowKernels& row_kernels() {
  static const RowKernels& chosen = []() -> const RowKernels& {
    // FASTATTN_CPU_ISA=baseline|avx2 forces a lesser variant, never more than the CPU has.
    const char* forced = std::getenv("FASTATTN_CPU_ISA");
    if (forced != nullptr && (std::strcmp(forced, "baseline") == 0 || std::strcmp(forced, "avx2") == 0)) {
      if (const RowKernels* k = row_kernels_for_isa(forced)) return *k;
    }
    for (const char* isa : {"avx512", "avx2"}) {
      if (const RowKernels* k = row_kernels_for_isa(isa)) return *k;
    }
    return *row_kernels_for_isa("baseline");
  }();
  return chosen;
}

void dropout_row(double* p, int64_t n, uint64_t seed, uint32_t bh, uint32_t m, uint32_t n0, uint32_t threshold,
                 double scale) {
  for (int64_t j = 0; j < n; ++j) {
    const bool keep = dropout_keep(seed, bh, m, n0 + static_cast<uint32_t>(j), threshold);
    p[j] = keep ? p[j] * scale : 0.0;
  }
}

}  // namespace fastattn::cpu
