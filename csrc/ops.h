// Shared by the CPU and CUDA implementations of the fastattn ops (csrc/ops.cpp has the schemas).
//
// The output layouts are part of the ops' contract: the fake (meta) implementations in fastattn/_ext.py
// allocate exactly the same shapes and strides, so every implementation must allocate through these helpers.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>

namespace fastattn {

// Causal codes of the schemas' `int causal` argument.
constexpr int64_t kCausalNone = 0;         // every key
constexpr int64_t kCausalTopLeft = 1;      // query i sees keys j <= i
constexpr int64_t kCausalBottomRight = 2;  // query i sees keys j <= i + (Lk - Lq)

// Query i sees key j iff j <= i + causal_offset (when causal != 0).
inline int64_t causal_offset(int64_t causal, int64_t len_q, int64_t len_k) {
  return causal == kCausalBottomRight ? len_k - len_q : 0;
}

// Row statistics (lse, Delta) and the dense mask gradient: float32, float64 for float64 inputs.
inline at::ScalarType stats_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// A new [B, H, L, last_dim] tensor in the memory order of `ref` ([B, H, L, D] or a [B, L, H, D] buffer viewed
// as [B, H, L, D]), so the output of a free transpose is itself a free transpose (as the Triton backend).
inline at::Tensor empty_like_layout(const at::Tensor& ref, int64_t last_dim, at::ScalarType dtype) {
  const auto B = ref.size(0), H = ref.size(1), L = ref.size(2);
  auto opts = ref.options().dtype(dtype);
  if (ref.stride(1) < ref.stride(2)) {  // heads inside sequence: the [B, L, H, D] layout
    return at::empty({B, L, H, last_dim}, opts).transpose(1, 2);
  }
  return at::empty({B, H, L, last_dim}, opts);
}

// Tests set FASTATTN_POISON_OUTPUTS=1: outputs start as NaN, so an element a kernel forgets to write fails.
inline bool poison_outputs() {
  const char* env = std::getenv("FASTATTN_POISON_OUTPUTS");
  return env != nullptr && std::strcmp(env, "1") == 0;
}

inline void maybe_poison(at::Tensor& t) {
  if (poison_outputs() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
}

}  // namespace fastattn
