// Block matrix products of the CPU attention kernels, in row-major terms.
//
// They call the BLAS that PyTorch itself links (MKL's sgemm_/dgemm_ on x86 wheels, OpenBLAS elsewhere),
// looked up as weak symbols: a torch build without them (or FASTATTN_CPU_BLAS=0) runs the plain loops of
// blas.cpp instead -- correct, several times slower.
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

// True when the BLAS symbols were found and FASTATTN_CPU_BLAS is not "0" (read per call of the ops).
bool blas_available();

// Every matrix is row-major with a leading dimension (row stride) >= its number of columns.
//   mm_nt:  C[M,N] = alpha * A[M,K] * B[N,K]^T + beta * C
//   mm_nn:  C[M,N] = alpha * A[M,K] * B[K,N]   + beta * C
//   mm_tn:  C[M,N] = alpha * A[K,M]^T * B[K,N] + beta * C
// `use_blas` picks BLAS or the fallback loops (the caller decides once per op call).
template <typename T>
void mm_nt(bool use_blas, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
           int64_t ldb, T beta, T* C, int64_t ldc);
template <typename T>
void mm_nn(bool use_blas, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
           int64_t ldb, T beta, T* C, int64_t ldc);
template <typename T>
void mm_tn(bool use_blas, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
           int64_t ldb, T beta, T* C, int64_t ldc);

}  // namespace fastattn::cpu
