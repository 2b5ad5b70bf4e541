// Test hook: torch.ops.fastattn_internal.block_product runs one block product of blas.h / small_gemm.h on
// tensors, so tests can check every implementation (plain loops, BLAS, the AVX-512 and AVX2 tiles) directly on
// shapes and strides the attention ops rarely produce.  Not part of the public API (its own namespace, not in OPS).
//
//   block_product(a, b, c, form, path, alpha, beta) -> bool
//     form "nt": c[M,N] = alpha * a[M,K] b[N,K]^T + beta * c;  "nn": a[M,K] b[K,N];  "tn": a[K,M]^T b[K,N]
//     path "loops" | "blas" | "tiles" (small_gemm directly, the tiles the ops use here; returns false, c
//     untouched, where it declines) | "tiles_avx2" | "tiles_avx512" (that ISA's tiles; cpu_row_isas() lists the
//     ISAs this CPU runs)
//   a, b, c: 2-D, float32 (float64 for loops/blas), unit column stride, any row stride; c is written in place.
//
//   amx_block_product(a, b_vnni, c, accumulate, repeats) -> bool: amx.h's amx_gemm_bf16 (tests, microbenchmarks).
//   cpu_amx_bf16() -> bool: whether the dense forward runs bf16 inputs on AMX here (amx.h; dispatch reads it).
//
//   row_kernel(x, y, op, isa, arg) -> Tensor: one row loop of row_kernels.h on every row of x (2-D float32, unit
//     column stride), with the variant compiled for `isa` ("baseline", "avx2", "avx512"; cpu_row_isas() lists
//     those this CPU runs).  Returns [rows, 2] float32: the loop's result and, for max_exp_sum, the new max.
//       "row_max"                              max of the row (x untouched)
//       "scale_row_max"                        x *= arg; the new row's max
//       "exp_shift_sum"                        x = exp(x - arg); their sum
//       "max_exp_sum" / "max_exp_sum_normalize"  the softmax step from a running max arg (may be -inf)
//       "dot"                                  sum of x * y over the row (y as x)
//     and the keys-major column loops on x as one tile St [keys, ld] (ld = x's row stride, a multiple of 16), for
//     query columns r < rows = arg (<= 64), y [1, >= rows] holding the old maxima (column_max_exp_sum) or the
//     shifts (column_exp_shift); the result's row r holds column r's sum and new max.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "amx.h"
#include "blas.h"
#include "row_kernels.h"
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
  if (path.rfind("tiles", 0) == 0) {
    if constexpr (std::is_same<T, float>::value) {
      decltype(&small_gemm) gemm = &small_gemm;
      if (path == "tiles") {
        TORCH_CHECK(small_gemm_available(), "block_product: path 'tiles' needs a CPU with AVX2 or AVX-512 (and "
                    "FASTATTN_CPU_ISA not baseline)");
      } else {
        const SmallGemmKernels* kernels = small_gemm_kernels_for_isa(path.substr(6));
        TORCH_CHECK(kernels != nullptr, "block_product: path ", path, ": this CPU cannot run it");
        gemm = kernels->gemm;
      }
      if (form == "nt") return gemm(M, N, K, alpha, A, lda, 1, B, 1, ldb, beta, C, ldc);
      if (form == "nn") return gemm(M, N, K, alpha, A, lda, 1, B, ldb, 1, beta, C, ldc);
      return gemm(M, N, K, alpha, A, 1, lda, B, ldb, 1, beta, C, ldc);
    }
    TORCH_CHECK(false, "block_product: path ", path, " is float32 only");
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
  TORCH_CHECK(path == "loops" || path == "blas" || path == "tiles" || path == "tiles_avx2" || path == "tiles_avx512",
              "block_product: path must be loops, blas, tiles, tiles_avx2 or tiles_avx512, got ", path);
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

at::Tensor row_kernel(const at::Tensor& x, const at::Tensor& y, std::string op, std::string isa, double arg) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.stride(1) == 1,
              "row_kernel: x must be a 2-D float32 CPU tensor with unit column stride");
  const RowKernels* kernels = row_kernels_for_isa(isa);
  TORCH_CHECK(kernels != nullptr, "row_kernel: isa ", isa, " is unknown or this CPU cannot run it");
  const int64_t rows = x.size(0), n = x.size(1);
  if (op == "dot") {
    TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == at::kFloat && y.stride(1) == 1,
                "row_kernel: y must match x for op dot");
  }
  if (op == "column_max_exp_sum" || op == "column_exp_shift") {
    const int64_t columns = static_cast<int64_t>(arg), ld = x.stride(0);
    TORCH_CHECK(columns >= 0 && columns <= kMaxColumnRows && ld % 16 == 0 && columns <= ld && n <= ld,
                "row_kernel: column ops need arg = rows <= ", kMaxColumnRows, " and a row stride that is a multiple "
                "of 16 and at least rows");
    TORCH_CHECK(y.dim() == 2 && y.size(0) == 1 && y.size(1) >= columns && y.scalar_type() == at::kFloat &&
                    y.is_contiguous(), "row_kernel: y must be [1, >= rows] float32 for the column ops");
    at::Tensor sums_and_maxima = at::zeros({2, columns}, x.options());  // returned transposed: [columns, 2]
    float* sums = sums_and_maxima.mutable_data_ptr<float>();
    if (op == "column_max_exp_sum") {
      kernels->column_max_exp_sum(x.mutable_data_ptr<float>(), ld, rows, columns, y.const_data_ptr<float>(),
                                  sums + columns, sums);
    } else {
      kernels->column_exp_shift(x.mutable_data_ptr<float>(), ld, rows, columns, y.const_data_ptr<float>());
    }
    return sums_and_maxima.t().contiguous();
  }
  at::Tensor result = at::zeros({rows, 2}, x.options());
  float* res = result.mutable_data_ptr<float>();
  float* X = x.mutable_data_ptr<float>();
  const float a = static_cast<float>(arg);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = X + r * x.stride(0);
    if (op == "row_max") {
      res[2 * r] = kernels->row_max(row, n);
    } else if (op == "scale_row_max") {
      res[2 * r] = kernels->scale_row_max(row, n, a);
    } else if (op == "exp_shift_sum") {
      res[2 * r] = kernels->exp_shift_sum(row, n, a);
    } else if (op == "max_exp_sum" || op == "max_exp_sum_normalize") {
      float m = a;
      res[2 * r] = kernels->max_exp_sum(row, n, &m, op == "max_exp_sum_normalize");
      res[2 * r + 1] = m;
    } else if (op == "dot") {
      res[2 * r] = kernels->dot(row, y.const_data_ptr<float>() + r * y.stride(0), n);
    } else {
      TORCH_CHECK(false, "row_kernel: unknown op ", op);
    }
  }
  return result;
}

std::vector<std::string> cpu_row_isas() {
  std::vector<std::string> isas;
  for (const char* isa : {"baseline", "avx2", "avx512"}) {
    if (row_kernels_for_isa(isa) != nullptr) isas.emplace_back(isa);
  }
  return isas;
}

}  // namespace
}  // namespace fastattn::cpu

TORCH_LIBRARY(fastattn_internal, m) {
  m.def("block_product(Tensor a, Tensor b, Tensor(c!) c, str form, str path, float alpha, float beta) -> bool");
  // Whether the dense forward runs bf16 inputs on AMX tiles here (csrc/cpu/amx.h): read by dispatch and tests.
  m.def("cpu_amx_bf16() -> bool", [] { return fastattn::cpu::amx_bf16_enabled(); });
  m.def("amx_block_product(Tensor a, Tensor b_vnni, Tensor(c!) c, bool accumulate, int repeats) -> bool");
  m.def("row_kernel(Tensor(x!) x, Tensor y, str op, str isa, float arg) -> Tensor");
  m.def("cpu_row_isas() -> str[]", &fastattn::cpu::cpu_row_isas);
}

TORCH_LIBRARY_IMPL(fastattn_internal, CPU, m) {
  m.impl("block_product", &fastattn::cpu::block_product);
  m.impl("amx_block_product", &fastattn::cpu::amx_block_product);
  m.impl("row_kernel", &fastattn::cpu::row_kernel);
}
