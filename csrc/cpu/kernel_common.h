// Helpers shared by the CPU kernels (attention_cpu.cpp: dense; window_cpu.cpp: Swin windows): raw strided views
// of the tensors, dtype conversion of rows to the accumulation type and back, per-thread scratch memory.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "row_kernels.h"

namespace fastattn::cpu {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------------------------------
// Raw views of the tensors
// ------------------------------------------------------------------------------------------------------------

// A [B, H, L, D] tensor whose rows (last dimension) are contiguous; strides in elements.
struct HeadTensor {
  char* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t elem = 0, sb = 0, sh = 0, sl = 0, dim = 0;

  char* row(int64_t b, int64_t h, int64_t l) const { return data + (b * sb + h * sh + l * sl) * elem; }
};

// BLAS reads rows with a leading dimension >= the row length: a 4-D tensor whose last dimension is contiguous and
// whose dimension row_dim (2 for [B, H, L, D], 1 for [B, L, H, D] token tensors) steps at least a row is read in
// place; anything else (a strided last dimension, rows broadcast with stride 0) is copied once.
inline at::Tensor with_contiguous_rows(const at::Tensor& t, int64_t row_dim = 2) {
  const bool last_ok = t.size(3) <= 1 || t.stride(3) == 1;
  const bool rows_ok = t.size(row_dim) <= 1 || t.stride(row_dim) >= t.size(3);
  return (last_ok && rows_ok) ? t : t.contiguous();
}

// Software prefetch of a row's cache lines (rows a large stride apart, which the hardware prefetchers do not follow).
inline void prefetch_row(const char* row, int64_t bytes, bool for_write = false) {
  for (int64_t off = 0; off < bytes; off += 64) {
    if (for_write) {
      __builtin_prefetch(row + off, 1);
    } else {
      __builtin_prefetch(row + off);
    }
  }
}

// The rows [l0, l0 + rows) of head (b, h).
inline void prefetch_rows(const HeadTensor& t, int64_t b, int64_t h, int64_t l0, int64_t rows) {
  for (int64_t l = l0; l < l0 + rows; ++l) prefetch_row(t.row(b, h, l), t.dim * t.elem);
}

inline HeadTensor head_tensor(const at::Tensor& t) {
  HeadTensor v;
  v.data = static_cast<char*>(t.data_ptr());
  v.dtype = t.scalar_type();
  v.elem = static_cast<int64_t>(t.element_size());
  v.sb = t.stride(0);
  v.sh = t.stride(1);
  v.sl = t.stride(2);
  v.dim = t.size(3);
  return v;
}

// __builtin_prefetch's locality hint for a prefetch into L2 (prefetcht2 on x86): the kernels prefetch a whole
// work item ahead, more than L1 holds next to the current item's buffers.
constexpr int kPrefetchToL2 = 1;

template <typename acc_t>
constexpr at::ScalarType acc_scalar_type() {
  return std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
}

template <typename acc_t, typename src_t>
void convert_row_from(const char* src, acc_t* dst, int64_t n) {
  const auto* s = reinterpret_cast<const src_t*>(src);
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(static_cast<float>(s[j]));
}

// src (n elements of `dtype`) -> dst in acc_t.
template <typename acc_t>
void convert_row(const char* src, at::ScalarType dtype, acc_t* dst, int64_t n) {
  switch (dtype) {
    case at::kBFloat16: convert_row_from<acc_t, c10::BFloat16>(src, dst, n); break;
    case at::kHalf: convert_row_from<acc_t, c10::Half>(src, dst, n); break;
    case at::kFloat: {
      const auto* s = reinterpret_cast<const float*>(src);
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(s[j]);
      break;
    }
    case at::kDouble: {
      const auto* s = reinterpret_cast<const double*>(src);
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(s[j]);
      break;
    }
    default: TORCH_CHECK(false, "fastattn cpu: unsupported dtype ", dtype);
  }
}

// src in acc_t -> dst (n elements of `dtype`).
template <typename acc_t>
void store_row(const acc_t* src, at::ScalarType dtype, char* dst, int64_t n) {
  switch (dtype) {
    case at::kBFloat16: {
      auto* d = reinterpret_cast<c10::BFloat16*>(dst);
      for (int64_t j = 0; j < n; ++j) d[j] = c10::BFloat16(static_cast<float>(src[j]));
      break;
    }
    case at::kHalf: {
      auto* d = reinterpret_cast<c10::Half*>(dst);
      for (int64_t j = 0; j < n; ++j) d[j] = c10::Half(static_cast<float>(src[j]));
      break;
    }
    case at::kFloat: {
      auto* d = reinterpret_cast<float*>(dst);
      for (int64_t j = 0; j < n; ++j) d[j] = static_cast<float>(src[j]);
      break;
    }
    case at::kDouble: {
      auto* d = reinterpret_cast<double*>(dst);
      for (int64_t j = 0; j < n; ++j) d[j] = static_cast<double>(src[j]);
      break;
    }
    default: TORCH_CHECK(false, "fastattn cpu: unsupported dtype ", dtype);
  }
}

// Rows [row0, row0 + rows) of head (b, h) as an acc_t matrix with leading dimension *ld: a pointer into the
// tensor itself when it holds acc_t, else a conversion into `buf` ([rows, dim]).
template <typename acc_t>
const acc_t* load_rows(const HeadTensor& t, int64_t b, int64_t h, int64_t row0, int64_t rows, acc_t* buf,
                       int64_t* ld) {
  if (t.dtype == acc_scalar_type<acc_t>()) {
    *ld = rows > 1 ? t.sl : t.dim;  // a single row may have any stride; BLAS wants ld >= its length
    return reinterpret_cast<const acc_t*>(t.row(b, h, row0));
  }
  for (int64_t r = 0; r < rows; ++r) convert_row(t.row(b, h, row0 + r), t.dtype, buf + r * t.dim, t.dim);
  *ld = t.dim;
  return buf;
}

// sum_d a[d] * b[d] of two rows of `dtype`, accumulated in acc_t.
template <typename acc_t>
acc_t row_dot(const char* a, const char* b, at::ScalarType dtype, int64_t n, acc_t* tmp_a, acc_t* tmp_b) {
  const acc_t *x, *y;
  if (dtype == acc_scalar_type<acc_t>()) {
    x = reinterpret_cast<const acc_t*>(a);
    y = reinterpret_cast<const acc_t*>(b);
  } else {
    convert_row(a, dtype, tmp_a, n);
    convert_row(b, dtype, tmp_b, n);
    x = tmp_a;
    y = tmp_b;
  }
  // row_kernels.h: float32 in 16 partial sums (a serial sum was 7.5 % of TimeSformer's temporal forward+backward,
  // in the backward's Delta = rowsum(dO * O); NOTES entry 28), float64 in order.
  return dot(x, y, n);
}

// Per-thread scratch: one allocation, carved into aligned pieces (64-byte aligned, as BLAS prefers).
template <typename acc_t>
struct Scratch {
  at::Tensor storage;
  int64_t used = 0;
  explicit Scratch(int64_t elements)
      : storage(at::empty({elements + 64}, at::TensorOptions().dtype(acc_scalar_type<acc_t>()))) {}
  acc_t* take(int64_t n) {
    acc_t* p = storage.data_ptr<acc_t>() + used;
    used += (n + 15) / 16 * 16;
    TORCH_INTERNAL_ASSERT(used <= storage.numel());
    return p;
  }
  static int64_t rounded(int64_t n) { return (n + 15) / 16 * 16; }
};

}  // namespace fastattn::cpu
