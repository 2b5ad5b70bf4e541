// Block matrix products of the CPU attention kernels, in row-major terms.
//
// float32 products run on the register tiles of small_gemm.h where the CPU has AVX-512 or AVX2 + FMA
// (GemmPath::tiles; AVX-512: 2-14 % faster ops than MKL on an AMD machine, bench/NOTES.md entry 22; AVX2: entry 45).  Everything else calls
// the BLAS that PyTorch itself links (MKL's sgemm_/dgemm_ on x86 wheels, OpenBLAS elsewhere), looked up as weak
// symbols: a torch build without them (or FASTATTN_CPU_BLAS=0) runs the plain loops of blas.cpp instead --
// correct, several times slower.  FASTATTN_CPU_GEMM=blas keeps float32 on BLAS (for A/B runs and tests).
#pragma once

#include <cstdint>

namespace fastattn::cpu {

// The block products are small and already spread over threads by at::parallel_for: the BLAS must run each one
// on the calling thread.  torch turns MKL's dynamic threading off (at::set_num_threads), so MKL may otherwise
// start a team of its own per call -- and where at::parallel_for runs inline (one work item), it does: products
// of a few MFLOP split over threads ran several times slower.  This guard sets the calling thread's BLAS thread
// count to 1 (MKL_Set_Num_Threads_Local / openblas_set_num_threads_local, when the BLAS has them) and restores it.
class SerialBlasGuard {
 public:
  SerialBlasGuard();
  ~SerialBlasGuard();
  SerialBlasGuard(const SerialBlasGuard&) = delete;
  SerialBlasGuard& operator=(const SerialBlasGuard&) = delete;

 private:
  int previous_mkl_ = -1;
  int previous_openblas_ = -1;
};

// How an op call's block products run; gemm_path() picks it once per op call (the environment is read then).
enum class GemmPath : uint8_t {
  loops,  // plain loops: torch without BLAS symbols, or FASTATTN_CPU_BLAS=0
  blas,   // torch's BLAS (float64 always; float32 without AVX2 or with FASTATTN_CPU_GEMM=blas)
  tiles,  // float32 on the register tiles of small_gemm.h (AVX-512 or AVX2), BLAS for the products they decline
};
GemmPath gemm_path();

// Every matrix is row-major with a leading dimension (row stride) >= its number of columns.
//   mm_nt:  C[M,N] = alpha * A[M,K] * B[N,K]^T + beta * C
//   mm_nn:  C[M,N] = alpha * A[M,K] * B[K,N]   + beta * C
//   mm_tn:  C[M,N] = alpha * A[K,M]^T * B[K,N] + beta * C
// `gemm` (from gemm_path(), once per op call) picks the implementation.
template <typename T>
void mm_nt(GemmPath gemm, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
           int64_t ldb, T beta, T* C, int64_t ldc);
template <typename T>
void mm_nn(GemmPath gemm, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
           int64_t ldb, T beta, T* C, int64_t ldc);
template <typename T>
void mm_tn(GemmPath gemm, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
           int64_t ldb, T beta, T* C, int64_t ldc);

}  // namespace fastattn::cpu
