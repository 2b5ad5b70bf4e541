// float32 block products on register tiles (AVX-512 or AVX2 + FMA), for the small products of the CPU attention
// kernels.
//
// The attention kernels' products are small (a 197 x 197 x 64 score tile, a 49 x 49 x 32 window), and their
// operands often sit at a large row stride in the caller's tensor (TimeSformer's spatial rows are T tokens
// apart: 24 KiB for ViT-B, so all of a frame's rows fall into the same few cache sets).  MKL's sgemm spends
// ~14 % of such a call packing its operands and runs its kernel on them at ~75 % of the large-GEMM rate.  These
// kernels pack only what needs it (a transposed or widely strided operand, once per call) and keep a
// register tile of C for the whole K loop: see bench/NOTES.md entry 22 for the measurements.
//
// Generic strides: A(i, k) = A[i * a_row + k * a_col], B(k, j) = B[k * b_row + j * b_col], C row-major with
// leading dimension ldc, so one entry point serves mm_nt (B transposed), mm_nn and mm_tn (A transposed).
// Each C element is a sequential sum over k (on AVX2, for B rows that are not 64-byte multiples apart, one per K
// chunk, added to C in order): a fixed order, independent of threads, so results are reproducible.
#pragma once

#include <cstdint>
#include <string>

namespace fastattn::cpu {

// True when register tiles run here: those of the row kernels' ISA (row_kernels.h), AVX-512 or AVX2 + FMA -- so
// FASTATTN_CPU_ISA=avx2 picks the AVX2 tiles and FASTATTN_CPU_ISA=baseline none.  blas.cpp's gemm_path() also
// honours FASTATTN_CPU_GEMM=blas.
bool small_gemm_available();
// "avx512" or "avx2" (the tiles in use), nullptr where none.
const char* small_gemm_isa();

// C[M,N] = alpha * A B + beta * C (beta == 0 overwrites C, as in BLAS).  The caller checks
// small_gemm_available() first.  Returns false, computing nothing, for a product outside what the kernels are
// tuned for (the caller then uses BLAS).
bool small_gemm(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t a_row, int64_t a_col,
                const float* B, int64_t b_row, int64_t b_col, float beta, float* C, int64_t ldc);

// dst[k * ld_dst + j] = src[j * ld_src + k] for j < N, k < K: a transpose of 32-bit words (moved as bits, so bf16
// pairs travel as one word: amx.cpp's key packing), zeros in the columns [N, round16(N)) of dst.  Needs
// small_gemm_available().
void transpose_32bit(int64_t N, int64_t K, const void* src, int64_t ld_src, void* dst, int64_t ld_dst);

// One ISA's kernels by name ("avx512", "avx2"), or nullptr where this build or CPU lacks them: the test hook
// torch.ops.fastattn_internal.block_product checks each ISA's tiles in one process (the AVX2 ones on AVX-512
// machines too, where the ops never pick them).
struct SmallGemmKernels {
  bool (*gemm)(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t a_row, int64_t a_col,
               const float* B, int64_t b_row, int64_t b_col, float beta, float* C, int64_t ldc);
  void (*transpose)(int64_t N, int64_t K, const void* src, int64_t ld_src, void* dst, int64_t ld_dst);
  const char* isa;
};
const SmallGemmKernels* small_gemm_kernels_for_isa(const std::string& isa);

}  // namespace fastattn::cpu
