// Test hook: torch.ops.fastattn_internal.block_product runs one block product of blas.h / small_gemm.h on
// tensors, so tests can check every implementation (plain loops, BLAS, the AVX-512 tiles) directly on shapes and
// strides the attention ops rarely produce.  Not part of the public API (its own namespace, not in OPS).
//
//   block_product(a, b, c, form, path, alpha, beta) -> bool
//     form "nt": c[M,N] = alpha * a[M,K] b[N,K]^T + beta * c;  "nn": a[M,K] b[K,N];  "tn": a[K,M]^T b[K,N]
//     path "loops" | "blas" | "tiles" (small_gemm directly; returns false, c untouched, where it declines)
//   a, b, c: 2-D, float32 (float64 for loops/blas), unit column stride, any row stride; c is written in place.
//
//   amx_block_product(a, b_vnni, c, accumulate, repeats) -> bool: amx.h's amx_gemm_bf16 (tests, microbenchmarks).
//   cpu_amx_bf16() -> bool: whether the dense forward runs bf16 inputs on AMX here (amx.h; dispatch reads it).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "amx.h"
#include "blas.h"
#include "small_gemm.h"

namespace fastattn::cpu {
namespace {

template <typename T>
bool run_block_product(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const std::string& form,
                       const std::string& path, double alpha_d, double beta_d) {
  const int64_t M = c.size(0), N = c.size(1);
  const int64_t K = form == "tn" ? a.size(0) : a.size(1);
  const T alpha = static_cast<T>(alpha_d), beta = static_cast<T>(beta_d);
  const T* A = a.const_data_ptr<T>();
  const T* B = b.const_data_ptr<T>();
  T* C = c.mutable_data_ptr<T>();
  const int64_t lda = a.stride(0), ldb = b.stride(0), ldc = c.stride(0);
  if (path == "tiles") {
    if constexpr (std::is_same<T, float>::value) {
      TORCH_CHECK(small_gemm_available(), "block_product: path 'tiles' needs a CPU with AVX-512");
      if (form == "nt") return small_gemm(M, N, K, alpha, A, lda, 1, B, 1, ldb, beta, C, ldc);
      if (form == "nn") return small_gemm(M, N, K, alpha, A, lda, 1, B, ldb, 1, beta, C, ldc);
      return small_gemm(M, N, K, alpha, A, 1, lda, B, ldb, 1, beta, C, ldc);
    }
    TORCH_CHECK(false, "block_product: path 'tiles' is float32 only");
  }
  const GemmPath gemm = path == "blas" ? GemmPath::blas : GemmPath::loops;
  if (form == "nt") {
    mm_nt<T>(gemm, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else if (form == "nn") {
    mm_nn<T>(gemm, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else {
    mm_tn<T>(gemm, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  return true;
}

bool block_product(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, std::string form,
                   std::string path, double alpha, double beta) {
  TORCH_CHECK(form == "nt" || form == "nn" || form == "tn", "block_product: form must be nt, nn or tn, got ", form);
  TORCH_CHECK(path == "loops" || path == "blas" || path == "tiles",
              "block_product: path must be loops, blas or tiles, got ", path);
  for (const auto* t : {&a, &b, &c}) {
    TORCH_CHECK(t->dim() == 2 && t->stride(1) == 1 && t->stride(0) >= t->size(1),
                "block_product: a, b and c must be 2-D with unit column stride");
    TORCH_CHECK(t->scalar_type() == c.scalar_type() && t->device().is_cpu(),
                "block_product: a, b and c must be CPU tensors of one dtype");
  }
  TORCH_CHECK(c.scalar_type() == at::kFloat || c.scalar_type() == at::kDouble,
              "block_product: float32 or float64 only");
  const int64_t M = c.size(0), N = c.size(1);
  const int64_t K = form == "tn" ? a.size(0) : a.size(1);
  const bool shapes_ok = form == "nt"   ? (a.size(0) == M && b.size(0) == N && b.size(1) == K)
                         : form == "nn" ? (a.size(0) == M && b.size(0) == K && b.size(1) == N)
                                        : (a.size(1) == M && b.size(0) == K && b.size(1) == N);
  TORCH_CHECK(shapes_ok, "block_product: shapes of a, b, c do not match form ", form);
  return c.scalar_type() == at::kFloat ? run_block_product<float>(a, b, c, form, path, alpha, beta)
                                       : run_block_product<double>(a, b, c, form, path, alpha, beta);
}

// c[M, N] (+)= a[M, K] b, bf16 a, b in amx.h's VNNI layout (int32 [K/2, N]), on AMX tiles; `repeats` times (so a
// benchmark times the tiles without the call overhead).  M, N multiples of 16, K of 32.  Returns false without AMX.
bool amx_block_product(const at::Tensor& a, const at::Tensor& b_vnni, const at::Tensor& c, bool accumulate,
                       int64_t repeats) {
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && b_vnni.scalar_type() == at::kInt && c.scalar_type() == at::kFloat,
              "amx_block_product: expected a bf16, b_vnni int32, c float32");
  for (const auto* t : {&a, &b_vnni, &c}) {
    TORCH_CHECK(t->dim() == 2 && t->stride(1) == 1 && t->device().is_cpu(),
                "amx_block_product: a, b_vnni and c must be 2-D CPU tensors with unit column stride");
  }
  const int64_t M = c.size(0), N = c.size(1), K = a.size(1);
  TORCH_CHECK(a.size(0) == M && b_vnni.size(0) * 2 == K && b_vnni.size(1) == N && M % 16 == 0 && N % 16 == 0 &&
                  K % 32 == 0,
              "amx_block_product: shapes a ", a.sizes(), " b_vnni ", b_vnni.sizes(), " c ", c.sizes());
  if (!amx_bf16_enabled()) return false;
  AmxTileScope scope;
  for (int64_t r = 0; r < repeats; ++r) {
    amx_gemm_bf16(M, N, K, reinterpret_cast<const uint16_t*>(a.const_data_ptr()), a.stride(0),
                  reinterpret_cast<const uint32_t*>(b_vnni.const_data_ptr()), b_vnni.stride(0),
                  c.mutable_data_ptr<float>(), c.stride(0), accumulate);
  }
  return true;
}

}  // namespace
}  // namespace fastattn::cpu

TORCH_LIBRARY(fastattn_internal, m) {
  m.def("block_product(Tensor a, Tensor b, Tensor(c!) c, str form, str path, float alpha, float beta) -> bool");
  // Whether the dense forward runs bf16 inputs on AMX tiles here (csrc/cpu/amx.h): read by dispatch and tests.
  m.def("cpu_amx_bf16() -> bool", [] { return fastattn::cpu::amx_bf16_enabled(); });
  m.def("amx_block_product(Tensor a, Tensor b_vnni, Tensor(c!) c, bool accumulate, int repeats) -> bool");
}

TORCH_LIBRARY_IMPL(fastattn_internal, CPU, m) {
  m.impl("block_product", &fastattn::cpu::block_product);
  m.impl("amx_block_product", &fastattn::cpu::amx_block_product);
}
