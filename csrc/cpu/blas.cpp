// Row-major block products on top of the Fortran BLAS interface (column-major), with a plain-loop fallback.
//
// A row-major [R, C] matrix with leading dimension ld is the column-major [C, R] matrix with the same ld, i.e.
// its transpose.  So the row-major product C = op(A) op(B) is the column-major product C^T = op(B)^T op(A)^T:
// BLAS gets B first, then A, with m and n swapped.  For example mm_nt (C = A B^T) is gemm('T', 'N', m = N,
// n = M, k = K, B, A): column-major B is [K, N] and 'T' makes it [N, K] = (B^T)^T; column-major A is A^T.
#include "blas.h"

#include "small_gemm.h"

#include <climits>
#include <cstdlib>
#include <cstring>

extern "C" {
// Weak: resolved from libtorch_cpu.so (which exports its BLAS) when present, else null.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// Per-thread thread counts of MKL and OpenBLAS (both return the previous value).
int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak));
int openblas_set_num_threads_local(int nthreads) __attribute__((weak));
}

namespace fastattn::cpu {
namespace {

bool blas_disabled_by_env() {
  const char* env = std::getenv("FASTATTN_CPU_BLAS");
  return env != nullptr && std::strcmp(env, "0") == 0;
}

bool fits_int(int64_t x) { return x >= 0 && x <= INT_MAX; }

void blas_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
               float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

void blas_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
               int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

template <typename T>
bool have_blas();
template <>
bool have_blas<float>() { return sgemm_ != nullptr; }
template <>
bool have_blas<double>() { return dgemm_ != nullptr; }

// C = beta * C, with beta == 0 overwriting (C may hold garbage or NaN poison, as in BLAS).
template <typename T>
void scale_rows(int64_t M, int64_t N, T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    if (beta == T(0)) {
      for (int64_t j = 0; j < N; ++j) c[j] = T(0);
    } else if (beta != T(1)) {
      for (int64_t j = 0; j < N; ++j) c[j] *= beta;
    }
  }
}

// Column-major BLAS call for a row-major product (see the top of the file); false when it cannot be used.
template <typename T>
bool try_blas(GemmPath gemm, char tb_first, char ta_second, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
              int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (gemm == GemmPath::loops || !have_blas<T>()) return false;
  if (!fits_int(M) || !fits_int(N) || !fits_int(K) || !fits_int(lda) || !fits_int(ldb) || !fits_int(ldc)) {
    return false;
  }
  blas_gemm(tb_first, ta_second, static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), alpha, B,
            static_cast<int>(ldb), A, static_cast<int>(lda), beta, C, static_cast<int>(ldc));
  return true;
}

// The register-tile products (small_gemm.h, AVX-512 or AVX2) take float products first; they decline (false) what they
// are not built for.  Generic strides: A(i, k) = A[i * a_row + k * a_col], B(k, j) = B[k * b_row + j * b_col].
template <typename T>
bool try_small_gemm(GemmPath, int64_t, int64_t, int64_t, T, const T*, int64_t, int64_t, const T*, int64_t, int64_t, T, T*,
                    int64_t) {
  return false;  // float64 is for gradcheck: BLAS
}
template <>
bool try_small_gemm<float>(GemmPath gemm, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                           int64_t a_row, int64_t a_col, const float* B, int64_t b_row, int64_t b_col, float beta,
                           float* C, int64_t ldc) {
  return gemm == GemmPath::tiles && small_gemm(M, N, K, alpha, A, a_row, a_col, B, b_row, b_col, beta, C, ldc);
}

}  // namespace

SerialBlasGuard::SerialBlasGuard() {
  if (MKL_Set_Num_Threads_Local != nullptr) previous_mkl_ = MKL_Set_Num_Threads_Local(1);
  if (openblas_set_num_threads_local != nullptr) previous_openblas_ = openblas_set_num_threads_local(1);
}

SerialBlasGuard::~SerialBlasGuard() {
  // MKL: 0 means "no thread-local setting" (follow the global one), a valid value to restore.
  if (previous_mkl_ >= 0) MKL_Set_Num_Threads_Local(previous_mkl_);
  if (previous_openblas_ > 0) openblas_set_num_threads_local(previous_openblas_);
}

GemmPath gemm_path() {
  if (!have_blas<float>() || !have_blas<double>() || blas_disabled_by_env()) return GemmPath::loops;
  const char* env = std::getenv("FASTATTN_CPU_GEMM");
  if (env != nullptr && std::strcmp(env, "blas") == 0) return GemmPath::blas;
  return small_gemm_available() ? GemmPath::tiles : GemmPath::blas;
}

template <typename T>
void mm_nt(GemmPath gemm, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
           int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K > 0 && try_small_gemm(gemm, M, N, K, alpha, A, lda, 1, B, 1, ldb, beta, C, ldc)) return;
  if (K > 0 && try_blas(gemm, 'T', 'N', M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)) return;
  scale_rows(M, N, beta, C, ldc);
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      T s = T(0);
      for (int64_t k = 0; k < K; ++k) s += A[i * lda + k] * B[j * ldb + k];
      C[i * ldc + j] += alpha * s;
    }
  }
}

template <typename T>
void mm_nn(GemmPath gemm, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
           int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K > 0 && try_small_gemm(gemm, M, N, K, alpha, A, lda, 1, B, ldb, 1, beta, C, ldc)) return;
  if (K > 0 && try_blas(gemm, 'N', 'N', M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)) return;
  scale_rows(M, N, beta, C, ldc);
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    for (int64_t k = 0; k < K; ++k) {
      const T a = alpha * A[i * lda + k];
      const T* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

template <typename T>
void mm_tn(GemmPath gemm, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
           int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K > 0 && try_small_gemm(gemm, M, N, K, alpha, A, 1, lda, B, ldb, 1, beta, C, ldc)) return;
  if (K > 0 && try_blas(gemm, 'N', 'T', M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)) return;
  scale_rows(M, N, beta, C, ldc);
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    for (int64_t k = 0; k < K; ++k) {
      const T a = alpha * A[k * lda + i];
      const T* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

#define FASTATTN_INSTANTIATE(T)                                                                                  \
  template void mm_nt<T>(GemmPath, int64_t, int64_t, int64_t, T, const T*, int64_t, const T*, int64_t, T, T*,      \
                         int64_t);                                                                               \
  template void mm_nn<T>(GemmPath, int64_t, int64_t, int64_t, T, const T*, int64_t, const T*, int64_t, T, T*,      \
                         int64_t);                                                                               \
  template void mm_tn<T>(GemmPath, int64_t, int64_t, int64_t, T, const T*, int64_t, const T*, int64_t, T, T*, int64_t);
FASTATTN_INSTANTIATE(float)
FASTATTN_INSTANTIATE(double)
#undef FASTATTN_INSTANTIATE

}  // namespace fastattn::cpu
