// Row operations on float32 score tiles, vectorised for the CPU found at run time.
//
// The GEMMs of the attention kernels run in BLAS; what remains per score is the online-softmax work (row max,
// exp, row sum) and dropout.  row_kernels.cpp compiles these loops three times -- for the x86-64 baseline
// (SSE2), AVX2+FMA and AVX-512 -- with GCC/Clang target attributes, and picks one on first use from the CPU's
// features (like ATen's DispatchStub).  The build needs no -march flag, so one binary runs everywhere.
// float64 uses the scalar loops at the bottom of this file (float64 is for gradcheck, not for speed).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

namespace fastattn::cpu {

// The scores of a row whose max is -inf (row_max skips NaN), as probabilities: each score is -inf (a masked
// key: P = 0) or NaN, which stays.  Returns their sum: 0 for a row that sees no key -- the one row that
// attention turns into output 0 and LSE -inf -- and NaN otherwise, so that a NaN input (or an inf score)
// makes its rows NaN, as in torch's math attention, instead of silently a 0 row.
template <typename T>
inline T unseen_row_probabilities(T* x, int64_t n) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = x[j] == x[j] ? T(0) : x[j];
    sum += x[j];
  }
  return sum;
}

struct RowKernels {
  // max_j x[j]; -inf for n == 0 or an all -inf row.
  float (*row_max)(const float* x, int64_t n);
  // x[j] = exp(x[j] - shift) in place; returns sum_j of the new x[j] (fixed summation order).
  float (*exp_shift_sum)(float* x, int64_t n, float shift);
  // Dropout of one row of probabilities: p[j] = keep ? p[j] * scale : 0 with keep from csrc/philox.h for
  // (seed, bh, query m, key n0 + j).
  void (*dropout_row)(float* p, int64_t n, uint64_t seed, uint32_t bh, uint32_t m, uint32_t n0,
                      uint32_t threshold, float scale);
  // x[j] *= scale in place; returns the max of the scaled row (as row_max).
  float (*scale_row_max)(float* x, int64_t n, float scale);
  // One row's softmax step: m = max(*m_io, row_max(x)); x[j] = exp(x[j] - m) (then divided by their sum when
  // `normalize`); *m_io = m; returns the sum of the exps.  A row with m = -inf leaves *m_io and goes through
  // unseen_row_probabilities: zeros and 0 when every score is -inf, NaN when one is NaN (the max skips NaN;
  // exp(NaN - m) keeps it for a finite m).  Short rows (<= 128) stay in registers: one read and one write.
  float (*max_exp_sum)(float* x, int64_t n, float* m_io, bool normalize);
  // sum_j x[j] * y[j] in 16 partial sums combined in a fixed order (the same order for every ISA).
  float (*dot)(const float* x, const float* y, int64_t n);
  // max_exp_sum down the columns of a keys-major score tile St[j * ld + r] (keys j < cols, query columns
  // r < rows <= kMaxColumnRows; ld a multiple of 16, the columns [rows, ld) scratch): per column
  // m_new[r] = max(m_old[r], max_j St[j, r]), St[., r] = exp(St[., r] - m_new[r]), sums[r] = their sum.  A column
  // with m_new = -inf is shifted by 0 instead: zeros and sum 0 when every score is -inf, NaN when one is NaN
  // (as unseen_row_probabilities).  Each column's sum is one sequential sum over j (the same for every ISA).
  void (*column_max_exp_sum)(float* st, int64_t ld, int64_t cols, int64_t rows, const float* m_old, float* m_new,
                             float* sums);
  // The backward's probabilities down the columns of a keys-major tile: St[j * ld + r] = exp(St[j * ld + r] -
  // shift[r]) for j < cols, r < rows <= kMaxColumnRows (shift = the rows' LSE; a row with LSE -inf saw no key:
  // zeros, as `probabilities`).  ld a multiple of 16, the columns [rows, ld) scratch.
  void (*column_exp_shift)(float* st, int64_t ld, int64_t cols, int64_t rows, const float* shift);
  const char* isa;  // "avx512", "avx2" or "baseline"
};

// The variant for this CPU (chosen once).  FASTATTN_CPU_ISA=baseline|avx2 forces a lesser one (for tests).
const RowKernels& row_kernels();
// One variant by name ("baseline", "avx2", "avx512"), or nullptr where this CPU cannot run it (the test hook
// torch.ops.fastattn_internal.row_kernel checks every ISA the CPU has in one process).
const RowKernels* row_kernels_for_isa(const std::string& isa);

// --- float32: through the dispatch table --------------------------------------------------------------------
inline float row_max(const float* x, int64_t n) { return row_kernels().row_max(x, n); }
inline float exp_shift_sum(float* x, int64_t n, float shift) { return row_kernels().exp_shift_sum(x, n, shift); }
inline void dropout_row(float* p, int64_t n, uint64_t seed, uint32_t bh, uint32_t m, uint32_t n0,
                        uint32_t threshold, float scale) {
  row_kernels().dropout_row(p, n, seed, bh, m, n0, threshold, scale);
}

inline float scale_row_max(float* x, int64_t n, float scale) { return row_kernels().scale_row_max(x, n, scale); }
inline float max_exp_sum(float* x, int64_t n, float* m_io, bool normalize) {
  return row_kernels().max_exp_sum(x, n, m_io, normalize);
}

inline float dot(const float* x, const float* y, int64_t n) { return row_kernels().dot(x, y, n); }
constexpr int64_t kMaxColumnRows = 64;  // the keys-major forward's most queries per head (NOTES entry 31)
inline void column_max_exp_sum(float* st, int64_t ld, int64_t cols, int64_t rows, const float* m_old, float* m_new,
                               float* sums) {
  row_kernels().column_max_exp_sum(st, ld, cols, rows, m_old, m_new, sums);
}
inline void column_exp_shift(float* st, int64_t ld, int64_t cols, int64_t rows, const float* shift) {
  row_kernels().column_exp_shift(st, ld, cols, rows, shift);
}
// --- float64: plain loops -----------------------------------------------------------------------------------
inline double dot(const double* x, const double* y, int64_t n) {
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) s += x[j] * y[j];
  return s;
}
inline double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

inline double exp_shift_sum(double* x, int64_t n, double shift) {
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    s += x[j];
  }
  return s;
}

inline double max_exp_sum(double* x, int64_t n, double* m_io, bool normalize) {
  const double m = std::max(*m_io, row_max(x, n));
  if (m == -std::numeric_limits<double>::infinity()) return unseen_row_probabilities(x, n);
  const double sum = exp_shift_sum(x, n, m);
  if (normalize) {
    const double inv = 1.0 / sum;
    for (int64_t j = 0; j < n; ++j) x[j] *= inv;
  }
  *m_io = m;
  return sum;
}

void dropout_row(double* p, int64_t n, uint64_t seed, uint32_t bh, uint32_t m, uint32_t n0, uint32_t threshold,
                 double scale);

}  // namespace fastattn::cpu
