// Shared by the CPU and CUDA implementations of the fastattn ops (csrc/ops.cpp has the schemas).
//
// The output layouts are part of the ops' contract: the fake (meta) implementations in fastattn/_ext.py
// allocate exactly the same shapes and strides, so every implementation must allocate through these helpers.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>

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

// The window ops' geometry argument [H, W, wh, ww, sh, sw, uh, uw] (csrc/ops.cpp): image, window, cyclic shift,
// unpadded size.
struct WindowGeometry {
  int64_t H = 0, W = 0, wh = 0, ww = 0, sh = 0, sw = 0, uh = 0, uw = 0;
  int64_t table_rows() const { return (2 * wh - 1) * (2 * ww - 1); }
};

// The device-independent checks of window_fwd / window_bwd: q, k, v as images [B, H, W, heads, d] of one dtype
// (k shaped like q, v differing at most in its head dim), the geometry, scale, dropout_p and the bias table's
// dtype and shape.  Each implementation checks devices, dtypes and head dims it supports itself.
inline WindowGeometry check_window_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const std::optional<at::Tensor>& table, at::IntArrayRef geometry,
                                        double scale, double dropout_p) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"v", v}})
    TORCH_CHECK(t.defined() && t.dim() == 5, name, ": expected a 5-D tensor [B, H, W, heads, head_dim], got shape ",
                t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "k, v: dtypes must match q's (", q.scalar_type(), "), got k ", k.scalar_type(), ", v ",
              v.scalar_type());
  TORCH_CHECK(k.sizes() == q.sizes(), "k: shape ", k.sizes(), " must equal q's ", q.sizes());
  TORCH_CHECK(v.sizes().slice(0, 4) == q.sizes().slice(0, 4), "v: shape ", v.sizes(),
              " must match q's [B, H, W, heads] (only its head dim may differ), got q ", q.sizes());
  TORCH_CHECK(geometry.size() == 8, "geometry: expected [H, W, wh, ww, sh, sw, uh, uw] (8 ints), got ",
              geometry.size(), " values");
  WindowGeometry g{geometry[0], geometry[1], geometry[2], geometry[3],
                   geometry[4], geometry[5], geometry[6], geometry[7]};
  TORCH_CHECK(g.H == q.size(1) && g.W == q.size(2), "geometry: image size (", g.H, ", ", g.W,
              ") must equal q's H, W (", q.size(1), ", ", q.size(2), ")");
  TORCH_CHECK(g.wh >= 1 && g.ww >= 1 && g.wh <= g.H && g.ww <= g.W, "geometry: window (", g.wh, ", ", g.ww,
              ") must be positive and fit in the image (", g.H, ", ", g.W, ")");
  TORCH_CHECK(g.H % g.wh == 0 && g.W % g.ww == 0, "q: image (", g.H, ", ", g.W,
              ") must be a multiple of the window (", g.wh, ", ", g.ww, "); pad first");
  TORCH_CHECK(g.sh >= 0 && g.sh < g.wh && g.sw >= 0 && g.sw < g.ww, "geometry: shift (", g.sh, ", ", g.sw,
              ") must be in [0, window)");
  TORCH_CHECK(g.uh >= 1 && g.uh <= g.H && g.uw >= 1 && g.uw <= g.W, "geometry: unpadded size (", g.uh, ", ",
              g.uw, ") must be within the image (", g.H, ", ", g.W, ")");
  TORCH_CHECK(std::isfinite(scale), "scale: must be finite, got ", scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p: must be in [0, 1), got ", dropout_p);
  if (table.has_value() && table->defined()) {
    const at::Tensor& tb = *table;
    TORCH_CHECK(at::isFloatingType(tb.scalar_type()), "table: expected a floating dtype, got ", tb.scalar_type());
    TORCH_CHECK(tb.dim() == 2 && tb.size(0) == g.table_rows() && tb.size(1) == q.size(3),
                "table: expected shape [(2*wh-1)*(2*ww-1), heads] = [", g.table_rows(), ", ", q.size(3),
                "], got ", tb.sizes());
  }
  return g;
}

}  // namespace fastattn
