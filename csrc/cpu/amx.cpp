// AMX-BF16 block products and their operand packing (see amx.h).
//
// TDPBF16PS multiplies a 16 x 32 bf16 tile A by a 32 x 16 bf16 tile B held as 16 rows of 16 (k, k + 1) pairs and
// adds the products to a 16 x 16 float32 tile C.  Eight tile registers: amx_gemm_bf16 keeps a 2 x 2 block of C
// tiles (32 x 32 floats) in tmm0-3 for the whole K loop, with A tiles in tmm4-5 and B tiles in tmm6-7 -- per 32 of
// K, four loads feed four products.
#include "amx.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "row_kernels.h"
#include "small_gemm.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && defined(__linux__)
#define FA_AMX_X86 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define FA_TARGET_AMX __attribute__((target("amx-tile,amx-bf16")))
#define FA_TARGET_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define FA_AMX_X86 0
#endif

namespace fastattn::cpu {

#if FA_AMX_X86
namespace {

// Linux hands out the 8 KiB tile state only to processes that ask for it (arch_prctl, kernel >= 5.16).
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

bool cpu_and_os_support_amx() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool amx_bf16 = (d >> 22) & 1, amx_tile = (d >> 24) & 1;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  const bool avx512_bf16 = (a >> 5) & 1;
  if (!(amx_bf16 && amx_tile && avx512_bf16)) return false;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// The tile configuration (LDTILECFG's 64-byte operand): palette 1, eight 16-row x 64-byte tiles.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// One block of C: TM x TN tiles of 16 x 16 floats at C, over K (a multiple of 32).
template <int TM, int TN>
FA_TARGET_AMX inline void tile_block(int64_t K, const uint16_t* A, int64_t lda, const uint32_t* B, int64_t ldb,
                                     float* C, int64_t ldc, bool accumulate) {
  const int64_t a_stride = lda * 2, b_stride = ldb * 4, c_stride = ldc * 4;  // bytes
  if (accumulate) {
    _tile_loadd(0, C, c_stride);
    if constexpr (TN == 2) _tile_loadd(1, C + 16, c_stride);
    if constexpr (TM == 2) _tile_loadd(2, C + 16 * ldc, c_stride);
    if constexpr (TM == 2 && TN == 2) _tile_loadd(3, C + 16 * ldc + 16, c_stride);
  } else {
    _tile_zero(0);
    if constexpr (TN == 2) _tile_zero(1);
    if constexpr (TM == 2) _tile_zero(2);
    if constexpr (TM == 2 && TN == 2) _tile_zero(3);
  }
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    _tile_loadd(4, A + k0, a_stride);
    if constexpr (TM == 2) _tile_loadd(5, A + 16 * lda + k0, a_stride);
    const uint32_t* b = B + (k0 / 2) * ldb;  // rows of (k, k + 1) pairs
    _tile_loadd(6, b, b_stride);
    if constexpr (TN == 2) _tile_loadd(7, b + 16, b_stride);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (TN == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (TM == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (TM == 2 && TN == 2) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, C, c_stride);
  if constexpr (TN == 2) _tile_stored(1, C + 16, c_stride);
  if constexpr (TM == 2) _tile_stored(2, C + 16 * ldc, c_stride);
  if constexpr (TM == 2 && TN == 2) _tile_stored(3, C + 16 * ldc + 16, c_stride);
}

TileConfig full_tiles_config() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  return config;
}

// The configuration lives in static storage: GCC's _tile_loadconfig tells the compiler it reads only the first
// 8 bytes, so the stores to a local configuration's later fields were dropped as dead.
FA_TARGET_AMX void load_tile_config() {
  static const TileConfig config = full_tiles_config();
  _tile_loadconfig(&config);
}

FA_TARGET_AMX void release_tiles() { _tile_release(); }

// Interleaves the bf16 rows a and b (32 elements each) into the (a[i], b[i]) words 0-15 and 16-31.
FA_TARGET_AVX512BF16 inline void interleave_rows(__m512i a, __m512i b, __m512i* lo, __m512i* hi) {
  alignas(64) static constexpr uint16_t kLo[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                   8,  40, 9,  41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                   24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  *lo = _mm512_permutex2var_epi16(a, _mm512_load_si512(kLo), b);
  *hi = _mm512_permutex2var_epi16(a, _mm512_load_si512(kHi), b);
}

FA_TARGET_AVX512BF16 void pack_values_avx512(int64_t N, int64_t Dv, const uint16_t* V, int64_t ld_v, int64_t n_pad,
                                             uint32_t* dst, int64_t ld_dst) {
  for (int64_t kk = 0; kk < n_pad / 2; ++kk) {
    uint32_t* out = dst + kk * ld_dst;
    const int64_t k = 2 * kk;
    for (int64_t d0 = 0; d0 < ld_dst; d0 += 32) {
      const int64_t dn = std::max<int64_t>(0, std::min<int64_t>(32, Dv - d0));
      const __mmask32 mask = dn == 32 ? ~__mmask32(0) : __mmask32((uint64_t(1) << dn) - 1);
      const __m512i a = k < N ? _mm512_maskz_loadu_epi16(mask, V + k * ld_v + d0) : _mm512_setzero_si512();
      const __m512i b = k + 1 < N ? _mm512_maskz_loadu_epi16(mask, V + (k + 1) * ld_v + d0) : _mm512_setzero_si512();
      __m512i lo, hi;
      interleave_rows(a, b, &lo, &hi);
      const int64_t wn = std::min<int64_t>(32, ld_dst - d0);  // words of this row left
      const __mmask16 m_lo = wn >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << wn) - 1);
      _mm512_mask_storeu_epi32(out + d0, m_lo, lo);
      if (wn > 16) {
        const __mmask16 m_hi = wn >= 32 ? __mmask16(0xFFFF) : __mmask16((1u << (wn - 16)) - 1);
        _mm512_mask_storeu_epi32(out + d0 + 16, m_hi, hi);
      }
    }
  }
}

FA_TARGET_AVX512BF16 void float_to_bf16_avx512(const float* src, int64_t n, int64_t n_pad, uint16_t* dst) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), reinterpret_cast<const __m256i&>(h));
  }
  if (j < n) {
    const __mmask16 mask = __mmask16((1u << (n - j)) - 1);
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), reinterpret_cast<const __m256i&>(h));  // zeros past n
    j += 16;
  }
  for (; j < n_pad; ++j) dst[j] = 0;
}

// exp for the softmax's P in bf16 (x <= 0): 2^n * poly5(r), n = round(x log2 e), r = x - n ln 2 in [-ln2/2, ln2/2].
// The degree-5 Taylor polynomial's relative error (< r^6 / 720 = 2.5e-6) is far below P's bf16 rounding (2^-9);
// scalef builds 2^n (and underflows to 0 smoothly); x < -87 (masked scores, -inf) gives exactly 0.
FA_TARGET_AVX512BF16 inline __m512 exp_for_bf16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  const __m512 xc = _mm512_max_ps(lo, x);  // this operand order keeps NaN (MAXPS returns the second on NaN)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147180559945309f), xc);
  __m512 p = _mm512_set1_ps(1.0f / 120.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~tiny), p, n);
}

FA_TARGET_AVX512BF16 float exp_scaled_sum_max_bf16_avx512(const float* x, int64_t n, float scale, float shift,
                                                          uint16_t* out, int64_t n_pad, float* max_arg) {
  const __m512 sc = _mm512_set1_ps(scale), sh = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j < n; j += 16) {
    const __mmask16 mask = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 a = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(mask, x + j), sc, sh);
    mx = _mm512_mask_max_ps(mx, mask, a, mx);  // MAXPS returns its second operand on NaN: NaN skipped
    const __m512 e = _mm512_maskz_mov_ps(mask, exp_for_bf16(a));
    sum = _mm512_add_ps(sum, e);
    const __m256bh h = _mm512_cvtneps_pbh(e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), reinterpret_cast<const __m256i&>(h));  // 0 past n
  }
  for (; j < n_pad; ++j) out[j] = 0;
  *max_arg = _mm512_reduce_max_ps(mx);
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, sum);
  float total = 0.0f;
  for (int l = 0; l < 16; ++l) total += lanes[l];
  return total;
}

// Splits each row of (even, odd) bf16 pairs -- n words, n a multiple of 32 -- into the rows of the evens and of
// the odds: words[kk * ld_words + j] = (a_j, b_j) -> dst[2kk][j] = a_j, dst[2kk + 1][j] = b_j.
FA_TARGET_AVX512BF16 void split_pairs_avx512(const uint32_t* words, int64_t rows, int64_t n, int64_t ld_words,
                                            uint16_t* dst, int64_t ld_dst) {
  alignas(64) static constexpr uint16_t kEvensThenOdds[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20,
                                                              22, 24, 26, 28, 30, 1,  3,  5,  7,  9,  11,
                                                              13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  const __m512i index = _mm512_load_si512(kEvensThenOdds);
  for (int64_t kk = 0; kk < rows; ++kk) {
    for (int64_t j = 0; j < n; j += 16) {  // 16 words: 16 evens and 16 odds
      const __m512i w = _mm512_loadu_si512(words + kk * ld_words + j);
      const __m512i split = _mm512_permutexvar_epi16(index, w);  // lanes 0-15: evens, 16-31: odds
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (2 * kk) * ld_dst + j), _mm512_castsi512_si256(split));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (2 * kk + 1) * ld_dst + j),
                          _mm512_extracti64x4_epi64(split, 1));
    }
  }
}

FA_TARGET_AVX512BF16 void amx_backward_scores_avx512(const float* S, float* dP, int64_t ld, int64_t cols,
                                                     int64_t rows, float scale, const float* shift,
                                                     const float* delta, uint16_t* p16, uint16_t* ds16,
                                                     int64_t cols_out, bool keep_ds) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t c = 0; c < cols; ++c) {
    const float* s = S + c * ld;
    float* g = dP + c * ld;
    for (int64_t r = 0; r < ld; r += 16) {
      const __mmask16 valid = rows - r >= 16 ? __mmask16(0xFFFF)
                              : rows > r    ? __mmask16((1u << (rows - r)) - 1)
                                            : __mmask16(0);
      // Padding lanes forced to 0: their scores are 0 * K, NaN where a key is NaN.
      const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(s + r), sc, _mm512_loadu_ps(shift + r));
      const __m512 p = _mm512_maskz_mov_ps(valid, exp_for_bf16(x));
      const __m512 ds = _mm512_maskz_mul_ps(valid, p, _mm512_sub_ps(_mm512_loadu_ps(g + r), _mm512_loadu_ps(delta + r)));
      if (keep_ds) _mm512_storeu_ps(g + r, ds);
      const __m256bh p_h = _mm512_cvtneps_pbh(p), ds_h = _mm512_cvtneps_pbh(ds);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p16 + c * ld + r), reinterpret_cast<const __m256i&>(p_h));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ds16 + c * ld + r), reinterpret_cast<const __m256i&>(ds_h));
    }
  }
  for (int64_t c = cols; c < cols_out; ++c) {
    std::fill(p16 + c * ld, p16 + (c + 1) * ld, uint16_t(0));
    std::fill(ds16 + c * ld, ds16 + (c + 1) * ld, uint16_t(0));
  }
}

std::vector<uint16_t>& staging_buffer() {
  thread_local std::vector<uint16_t> buffer;
  return buffer;
}

}  // namespace

bool amx_bf16_enabled() {
  static const bool hardware = cpu_and_os_support_amx();
  // (the key packing's transpose_32bit and the float32 products around the tiles run AVX-512: FASTATTN_CPU_ISA=
  // avx2|baseline turns AMX off)
  const char* tiles = small_gemm_isa();
  if (!hardware || tiles == nullptr || std::strcmp(tiles, "avx512") != 0) return false;
  const char* env = std::getenv("FASTATTN_CPU_AMX");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

AmxTileScope::AmxTileScope() { load_tile_config(); }
AmxTileScope::~AmxTileScope() { release_tiles(); }

void amx_gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint32_t* B, int64_t ldb,
                   float* C, int64_t ldc, bool accumulate) {
  // GCC's tile load/store intrinsics are asm statements that declare no memory access: these barriers keep the
  // compiler from moving this function's memory traffic across them (it is another translation unit from its
  // callers, but not under LTO).
  __asm__ volatile("" ::: "memory");
  // Column blocks outer: a block's B tiles stay in L1 while the row blocks pass over them.
  for (int64_t n0 = 0; n0 < N; n0 += 32) {
    const bool two_n = n0 + 32 <= N;
    for (int64_t m0 = 0; m0 < M; m0 += 32) {
      const bool two_m = m0 + 32 <= M;
      const uint16_t* a = A + m0 * lda;
      float* c = C + m0 * ldc + n0;
      if (two_m && two_n) {
        tile_block<2, 2>(K, a, lda, B + n0, ldb, c, ldc, accumulate);
      } else if (two_m) {
        tile_block<2, 1>(K, a, lda, B + n0, ldb, c, ldc, accumulate);
      } else if (two_n) {
        tile_block<1, 2>(K, a, lda, B + n0, ldb, c, ldc, accumulate);
      } else {
        tile_block<1, 1>(K, a, lda, B + n0, ldb, c, ldc, accumulate);
      }
    }
  }  __asm__ volatile("" ::: "memory");
}

void pack_keys_vnni(int64_t N, int64_t D, const uint16_t* K, int64_t ld_k, int64_t n_pad, int64_t d_pad,
                    uint32_t* dst, int64_t ld_dst) {
  // The (k, k + 1) pairs of a key row are its 32-bit words, so the pack is a 32-bit transpose of the key rows --
  // directly from the tensor when rows start on whole words, else from a zero-padded copy.
  const uint16_t* src = K;
  int64_t ld_src = ld_k;
  if (D % 2 != 0 || ld_k % 2 != 0) {
    std::vector<uint16_t>& copy = staging_buffer();
    const int64_t d_even = (D + 1) / 2 * 2;
    if (static_cast<int64_t>(copy.size()) < N * d_even) copy.resize(N * d_even);
    for (int64_t n = 0; n < N; ++n) {
      std::memcpy(copy.data() + n * d_even, K + n * ld_k, D * sizeof(uint16_t));
      if (d_even > D) copy[n * d_even + D] = 0;
    }
    src = copy.data();
    ld_src = d_even;
  }
  const int64_t words = (D + 1) / 2;
  transpose_32bit(N, words, src, ld_src / 2, dst, ld_dst);  // zeros in columns [N, round16(N))
  for (int64_t kk = 0; kk < words; ++kk) {
    for (int64_t n = (N + 15) / 16 * 16; n < n_pad; ++n) dst[kk * ld_dst + n] = 0;
  }
  for (int64_t kk = words; kk < d_pad / 2; ++kk) std::fill(dst + kk * ld_dst, dst + kk * ld_dst + n_pad, 0u);
}

void pack_values_vnni(int64_t N, int64_t Dv, const uint16_t* V, int64_t ld_v, int64_t n_pad, uint32_t* dst,
                      int64_t ld_dst) {
  pack_values_avx512(N, Dv, V, ld_v, n_pad, dst, ld_dst);
}

void float_to_bf16_row(const float* src, int64_t n, int64_t n_pad, uint16_t* dst) {
  float_to_bf16_avx512(src, n, n_pad, dst);
}

float exp_shift_sum_bf16(const float* x, int64_t n, float shift, uint16_t* out, int64_t n_pad) {
  float unused_max;  // x * 1 - shift rounds once, as x - shift: the same bits
  return exp_scaled_sum_max_bf16_avx512(x, n, 1.0f, shift, out, n_pad, &unused_max);
}

void pack_keys_transposed(int64_t N, int64_t D, const uint16_t* K, int64_t ld_k, int64_t n_pad, int64_t d_pad,
                          uint16_t* dst, int64_t ld_dst) {
  // K's (k, k + 1) pairs transposed as 32-bit words (pack_keys_vnni), then each row of pairs split in two rows.
  thread_local std::vector<uint32_t> words;
  if (static_cast<int64_t>(words.size()) < d_pad / 2 * n_pad) words.resize(d_pad / 2 * n_pad);
  pack_keys_vnni(N, D, K, ld_k, n_pad, d_pad, words.data(), n_pad);
  split_pairs_avx512(words.data(), d_pad / 2, n_pad, n_pad, dst, ld_dst);
}

float exp_scaled_sum_max_bf16(const float* x, int64_t n, float scale, float shift, uint16_t* out, int64_t n_pad,
                              float* max_arg) {
  return exp_scaled_sum_max_bf16_avx512(x, n, scale, shift, out, n_pad, max_arg);
}

void amx_backward_scores(const float* S, float* dP, int64_t ld, int64_t cols, int64_t rows, float scale,
                         const float* shift, const float* delta, uint16_t* p16, uint16_t* ds16, int64_t cols_out,
                         bool keep_ds) {
  amx_backward_scores_avx512(S, dP, ld, cols, rows, scale, shift, delta, p16, ds16, cols_out, keep_ds);
}

#else  // no AMX on this platform: the callers check amx_bf16_enabled() first, so the rest is unreachable

bool amx_bf16_enabled() { return false; }
AmxTileScope::AmxTileScope() {}
AmxTileScope::~AmxTileScope() {}
void amx_gemm_bf16(int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint32_t*, int64_t, float*, int64_t,
                   bool) {
  TORCH_INTERNAL_ASSERT(false, "amx_gemm_bf16 without AMX");
}
void pack_keys_vnni(int64_t, int64_t, const uint16_t*, int64_t, int64_t, int64_t, uint32_t*, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "pack_keys_vnni without AMX");
}
void pack_values_vnni(int64_t, int64_t, const uint16_t*, int64_t, int64_t, uint32_t*, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "pack_values_vnni without AMX");
}
void float_to_bf16_row(const float*, int64_t, int64_t, uint16_t*) {
  TORCH_INTERNAL_ASSERT(false, "float_to_bf16_row without AMX");
}
float exp_shift_sum_bf16(const float*, int64_t, float, uint16_t*, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "exp_shift_sum_bf16 without AMX");
}
float exp_scaled_sum_max_bf16(const float*, int64_t, float, float, uint16_t*, int64_t, float*) {
  TORCH_INTERNAL_ASSERT(false, "exp_scaled_sum_max_bf16 without AMX");
}
void pack_keys_transposed(int64_t, int64_t, const uint16_t*, int64_t, int64_t, int64_t, uint16_t*, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "pack_keys_transposed without AMX");
}
void amx_backward_scores(const float*, float*, int64_t, int64_t, int64_t, float, const float*, const float*,
                         uint16_t*, uint16_t*, int64_t, bool) {
  TORCH_INTERNAL_ASSERT(false, "amx_backward_scores without AMX");
}

#endif

}  // namespace fastattn::cpu
