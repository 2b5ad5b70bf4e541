// Swin window attention on the CPU (ops window_fwd / window_bwd, schemas in csrc/ops.cpp): the cyclic shift, the
// window partition and their reverse are index math, the relative-position bias is read from the table and the
// region mask computed from coordinates -- the same layout as the Triton kernels' LAYOUT 1
// (fastattn/kernels/triton_attention.py), with the same semantics as fastattn.window_attention's composite.
//
// Geometry (the `geometry` argument, [H, W, wh, ww, sh, sw, uh, uw]): q, k, v are [B, H, W, heads, d] images;
// window w = (window row wy, window column wx) of the shifted grid holds tokens n = ty * ww + tx at shifted
// position (y', x') = (wy * wh + ty, wx * ww + tx), which reads pixel ((y' + sh) mod uh, (x' + sw) mod uw) when
// (y', x') is inside the top-left uh x uw region the shift wraps in, and pixel (y', x') otherwise (padding stays
// in place).  This is torch.roll(x, (-sh, -sw)) followed by the partition; the output goes back to the same pixels.
//
// A window has N = wh * ww tokens (49 for Swin's 7 x 7), so its whole [N, N] score matrix is one tile: no online
// softmax is needed.  Work items are windows (batch, window); each runs its heads one after the other:
//     gather Q, K, V rows of the window's tokens, all heads (strided image rows -> [heads, N, d]; bf16/fp16 ->
//     float32), then per head:
//     S = scale * Q K^T + bias[h] (+ region mask: -100 between tokens of different shift regions)   [BLAS]
//     P = softmax(S) (lse = m + log l);  P = dropout(P);  O = P V                                   [BLAS]
//     and scatter the window's O rows back to the tokens' pixels
// The bias [heads, N, N] is gathered from the table once per call (timm's relative_position_index).
//
// Backward per window and head (nothing crosses windows, so each dq/dk/dv row is written by one work item):
//     P = exp(S - lse), Pd = dropout(P), dP = dO V^T, dS = P * (dP * keep / (1 - p) - Delta), Delta = rowsum(dO O)
//     dV = Pd^T dO,  dK = scale * dS^T Q,  dQ = scale * dS K
// and, when the table needs its gradient, dS is summed over batch and windows into [heads, N, N] and scattered into
// the table's rows (dTable[index(i, j), h] += sum dS[h, i, j]).  The sum is deterministic and independent of the
// thread count: windows are cut into a fixed number of chunks (depending on the shape only), each chunk sums into
// its own buffer in window order, and the chunks are added in order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../ops.h"
#include "../philox.h"
#include "blas.h"
#include "kernel_common.h"
#include "row_kernels.h"

namespace fastattn::cpu {
namespace {

constexpr double kRegionMaskValue = -100.0;  // Swin's value between tokens of different regions (not -inf)

// An image tensor [B, H, W, heads, d] with a contiguous last dimension; strides in elements.
struct ImageTensor {
  char* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t elem = 0, sb = 0, sy = 0, sx = 0, sh = 0, dim = 0;

  char* row(int64_t b, int64_t y, int64_t x, int64_t h) const {
    return data + (b * sb + y * sy + x * sx + h * sh) * elem;
  }
};

at::Tensor with_contiguous_last_dim(const at::Tensor& t) {
  return (t.size(4) <= 1 || t.stride(4) == 1) ? t : t.contiguous();
}

ImageTensor image_tensor(const at::Tensor& t) {
  ImageTensor v;
  v.data = static_cast<char*>(t.data_ptr());
  v.dtype = t.scalar_type();
  v.elem = static_cast<int64_t>(t.element_size());
  v.sb = t.stride(0);
  v.sy = t.stride(1);
  v.sx = t.stride(2);
  v.sh = t.stride(3);
  v.dim = t.size(4);
  return v;
}

// The window geometry and the per-token tables derived from it (small: H * W entries, N * N for the bias index).
struct Window {
  int64_t B = 0, H = 0, W = 0, heads = 0, D = 0, Dv = 0;
  int64_t wh = 0, ww = 0, sh = 0, sw = 0, uh = 0, uw = 0;
  int64_t windows_w = 0, num_windows = 0, N = 0;
  bool shifted = false;
  std::vector<int32_t> ys, xs;    // [num_windows * N]: the pixel token n of window w reads
  std::vector<uint8_t> region;    // [num_windows * N]: its shift region (3 * row region + column region)
  std::vector<int32_t> rel_index; // [N * N]: the bias table row of the pair (i, j) (timm's index)

  double scale = 1.0;
  bool dropout = false;
  uint64_t seed = 0;
  uint32_t threshold = 0;
  double drop_scale = 1.0;
  GemmPath gemm = GemmPath::blas;

  // Swin's region along one axis of the shifted grid: timm's slices (0, -win), (-win, -shift), (-shift, None) with
  // Python slice semantics (a zero shift makes the whole axis region 2).
  static int64_t axis_region(int64_t p, int64_t length, int64_t win, int64_t shift) {
    if (shift == 0) return 2;
    return p >= length - shift ? 2 : (p >= length - win ? 1 : 0);
  }

  void build_tables() {
    windows_w = W / ww;
    num_windows = (H / wh) * windows_w;
    N = wh * ww;
    shifted = sh > 0 || sw > 0;
    ys.resize(num_windows * N);
    xs.resize(num_windows * N);
    region.resize(num_windows * N);
    for (int64_t w = 0; w < num_windows; ++w) {
      for (int64_t n = 0; n < N; ++n) {
        const int64_t yp = (w / windows_w) * wh + n / ww, xp = (w % windows_w) * ww + n % ww;  // shifted grid
        const bool inside = yp < uh && xp < uw;
        ys[w * N + n] = static_cast<int32_t>(inside ? (yp + sh) % uh : yp);
        xs[w * N + n] = static_cast<int32_t>(inside ? (xp + sw) % uw : xp);
        region[w * N + n] = static_cast<uint8_t>(3 * axis_region(yp, H, wh, sh) + axis_region(xp, W, ww, sw));
      }
    }
    // index(i, j) = (dy + wh - 1) * (2 ww - 1) + (dx + ww - 1), (dy, dx) = in-window offset of query i from key j
    rel_index.resize(N * N);
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t j = 0; j < N; ++j) {
        const int64_t dy = i / ww - j / ww + wh - 1, dx = i % ww - j % ww + ww - 1;
        rel_index[i * N + j] = static_cast<int32_t>(dy * (2 * ww - 1) + dx);
      }
    }
  }
};

// bias[h, i, j] = table[rel_index(i, j), h] in acc_t (empty without a table).
template <typename acc_t>
std::vector<acc_t> gather_bias(const Window& g, const std::optional<at::Tensor>& table) {
  std::vector<acc_t> bias;
  if (!table.has_value()) return bias;
  const at::Tensor t = table->to(at::kDouble).contiguous();  // [(2wh-1)(2ww-1), heads], small
  const double* tp = t.data_ptr<double>();
  bias.resize(g.heads * g.N * g.N);
  for (int64_t h = 0; h < g.heads; ++h) {
    for (int64_t ij = 0; ij < g.N * g.N; ++ij) {
      bias[h * g.N * g.N + ij] = static_cast<acc_t>(tp[g.rel_index[ij] * g.heads + h]);
    }
  }
  return bias;
}

// The rows of window w's tokens, every head -> dst [heads, N, dim] in acc_t.  Token-major: the heads of a token
// are adjacent in the image ([..., heads, d] rows, or the [3, heads, d] of a qkv projection), so each token's
// memory is read in one sweep -- the gathers read every input byte exactly once, from DRAM for large images.
template <typename acc_t>
void gather_window(const Window& g, const ImageTensor& t, int64_t b, int64_t w, acc_t* dst) {
  for (int64_t n = 0; n < g.N; ++n) {
    const int64_t y = g.ys[w * g.N + n], x = g.xs[w * g.N + n];
    for (int64_t h = 0; h < g.heads; ++h) convert_row(t.row(b, y, x, h), t.dtype, dst + (h * g.N + n) * t.dim, t.dim);
  }
}

// Software prefetch of window w's token rows (all heads), issued one window ahead: the gathers' cache misses are
// the largest single cost of these kernels (each window's tokens are wh runs of ww pixels, whose starts the
// hardware prefetcher cannot predict), and a window's compute is long enough to hide the next window's loads.
// Into L2, not L1: a window's q/k/v rows (56 KiB for Swin-T stage 1) do not fit next to the current window's
// buffers in a 32 KiB L1, which evicted them before use (L2 prefetch: Swin-T stage 1, 2-core EPYC, -8 % forward
// and forward+backward; bench/NOTES.md entry 22).
inline void prefetch_window(const Window& g, const ImageTensor& t, int64_t b, int64_t w) {
  constexpr int64_t kLine = 64;
  const int64_t row_bytes = t.dim * t.elem;
  // the heads of a pixel as one span when they are close together (the usual [heads, d] or [3, heads, d] rows)
  const int64_t span = (g.heads - 1) * t.sh * t.elem + row_bytes;
  const bool one_span = t.sh >= 0 && span <= 16 * 1024;
  for (int64_t n = 0; n < g.N; ++n) {
    const char* base = t.row(b, g.ys[w * g.N + n], g.xs[w * g.N + n], 0);
    if (one_span) {
      for (int64_t off = 0; off < span; off += kLine) __builtin_prefetch(base + off, 0, kPrefetchToL2);
    } else {
      for (int64_t h = 0; h < g.heads; ++h) {
        for (int64_t off = 0; off < row_bytes; off += kLine) {
          __builtin_prefetch(base + h * t.sh * t.elem + off, 0, kPrefetchToL2);
        }
      }
    }
  }
}

// src [heads, N, dim] -> the rows of window w's tokens (token-major, as gather_window).
template <typename acc_t>
void scatter_window(const Window& g, const acc_t* src, const ImageTensor& t, int64_t b, int64_t w) {
  for (int64_t n = 0; n < g.N; ++n) {
    const int64_t y = g.ys[w * g.N + n], x = g.xs[w * g.N + n];
    for (int64_t h = 0; h < g.heads; ++h) store_row(src + (h * g.N + n) * t.dim, t.dtype, t.row(b, y, x, h), t.dim);
  }
}

// S[N, N] = scale * Q K^T + bias[h] + region mask of window w.
template <typename acc_t>
void window_scores(const Window& g, const acc_t* Q, const acc_t* K, const std::vector<acc_t>& bias, int64_t w,
                   int64_t h, acc_t* S) {
  const int64_t N = g.N;
  mm_nt<acc_t>(g.gemm, N, N, g.D, static_cast<acc_t>(g.scale), Q, g.D, K, g.D, acc_t(0), S, N);
  if (!bias.empty()) {
    const acc_t* bh = bias.data() + h * N * N;
    for (int64_t ij = 0; ij < N * N; ++ij) S[ij] += bh[ij];
  }
  if (g.shifted) {
    const uint8_t* reg = g.region.data() + w * N;
    const acc_t penalty = static_cast<acc_t>(kRegionMaskValue);
    for (int64_t i = 0; i < N; ++i) {
      acc_t* s = S + i * N;
      for (int64_t j = 0; j < N; ++j) s[j] += reg[i] != reg[j] ? penalty : acc_t(0);
    }
  }
}

// Philox's bh coordinate of (batch, window, head): the same as the Triton kernels' and the composite's
// ([B, nW * heads] and [B * nW, heads] layouts both number it (b * nW + w) * heads + h).
uint32_t dropout_bh(const Window& g, int64_t b, int64_t w, int64_t h) {
  return static_cast<uint32_t>((b * g.num_windows + w) * g.heads + h);
}

// ------------------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------------------
template <typename acc_t>
void window_forward_kernel(const Window& g, const ImageTensor& q, const ImageTensor& k, const ImageTensor& v,
                           const std::vector<acc_t>& bias, const ImageTensor& out, acc_t* lse) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t N = g.N;
  const int64_t HN = g.heads * N;  // rows of a window's [heads, N, d] buffers
  at::parallel_for(0, g.B * g.num_windows, 1, [&](int64_t begin, int64_t end) {
    SerialBlasGuard serial_blas;
    using S_ = Scratch<acc_t>;
    Scratch<acc_t> scratch(S_::rounded(N * N) + 2 * S_::rounded(HN * g.D) + 2 * S_::rounded(HN * g.Dv));
    acc_t* S = scratch.take(N * N);
    acc_t* Q = scratch.take(HN * g.D);
    acc_t* K = scratch.take(HN * g.D);
    acc_t* V = scratch.take(HN * g.Dv);
    acc_t* O = scratch.take(HN * g.Dv);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / g.num_windows, w = item % g.num_windows;
      gather_window(g, q, b, w, Q);
      gather_window(g, k, b, w, K);
      gather_window(g, v, b, w, V);
      if (item + 1 < end) {
        for (const ImageTensor* t : {&q, &k, &v}) prefetch_window(g, *t, (item + 1) / g.num_windows, (item + 1) % g.num_windows);
      }
      for (int64_t h = 0; h < g.heads; ++h) {
        window_scores(g, Q + h * N * g.D, K + h * N * g.D, bias, w, h, S);
        acc_t* lse_rows = lse + (item * g.heads + h) * N;
        for (int64_t i = 0; i < N; ++i) {
          acc_t* s = S + i * N;
          acc_t m = kNegInf;
          const acc_t l = max_exp_sum(s, N, &m, /*normalize=*/true);  // s = softmax(s), l = sum exp(s - m)
          // m = -inf: every score -inf (only a table holding -inf can do this): the row sees no key, s is zeros
          // and l = 0; or NaN among them: l and s are NaN, and so are the row's output and LSE.
          if (m == kNegInf && l == acc_t(0)) {
            lse_rows[i] = kNegInf;
            continue;
          }
          lse_rows[i] = m + std::log(l);
          if (g.dropout) {
            dropout_row(s, N, g.seed, dropout_bh(g, b, w, h), static_cast<uint32_t>(i), 0u, g.threshold,
                        static_cast<acc_t>(g.drop_scale));
          }
        }
        mm_nn<acc_t>(g.gemm, N, g.Dv, N, acc_t(1), S, N, V + h * N * g.Dv, g.Dv, acc_t(0), O + h * N * g.Dv,
                     g.Dv);
      }
      scatter_window(g, O, out, b, w);
    }
  });
}

// ------------------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------------------
struct WindowGrads {
  ImageTensor out, dout, dq, dk, dv;
};

// Windows per chunk of the table-gradient sum: a function of the shape only (never of the thread count), so the
// sum's order -- and its bits -- are the same on any machine.  At most ~64 chunks of [heads, N, N] buffers.
int64_t table_chunk_windows(int64_t items) { return std::max<int64_t>(8, ceil_div(items, 64)); }

template <typename acc_t>
void window_backward_kernel(const Window& g, const ImageTensor& q, const ImageTensor& k, const ImageTensor& v,
                            const std::vector<acc_t>& bias, const WindowGrads& t, const acc_t* lse,
                            acc_t* table_partials /* [chunks, heads, N, N] or null */) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t N = g.N, D = g.D, Dv = g.Dv;
  const int64_t items = g.B * g.num_windows;
  const int64_t per_chunk = table_chunk_windows(items);
  const int64_t chunks = ceil_div(items, per_chunk);
  const acc_t scale = static_cast<acc_t>(g.scale), drop_scale = static_cast<acc_t>(g.drop_scale);
  const int64_t HN = g.heads * N;  // rows of a window's [heads, N, d] buffers
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    SerialBlasGuard serial_blas;
    using S_ = Scratch<acc_t>;
    Scratch<acc_t> scratch(3 * S_::rounded(N * N) + 4 * S_::rounded(HN * D) + 4 * S_::rounded(HN * Dv) +
                           S_::rounded(N));
    acc_t* P = scratch.take(N * N);
    acc_t* Pd = scratch.take(N * N);
    acc_t* dS = scratch.take(N * N);
    acc_t* Q = scratch.take(HN * D);
    acc_t* K = scratch.take(HN * D);
    acc_t* dQ = scratch.take(HN * D);
    acc_t* dK = scratch.take(HN * D);
    acc_t* V = scratch.take(HN * Dv);
    acc_t* O = scratch.take(HN * Dv);
    acc_t* dO = scratch.take(HN * Dv);
    acc_t* dV = scratch.take(HN * Dv);
    acc_t* delta = scratch.take(N);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* dtable = table_partials != nullptr ? table_partials + chunk * g.heads * N * N : nullptr;
      if (dtable != nullptr) std::fill(dtable, dtable + g.heads * N * N, acc_t(0));
      for (int64_t item = chunk * per_chunk; item < std::min(items, (chunk + 1) * per_chunk); ++item) {
        const int64_t b = item / g.num_windows, w = item % g.num_windows;
        gather_window(g, q, b, w, Q);
        gather_window(g, k, b, w, K);
        gather_window(g, v, b, w, V);
        gather_window(g, t.out, b, w, O);
        gather_window(g, t.dout, b, w, dO);
        if (item + 1 < std::min(items, (chunk + 1) * per_chunk)) {
          for (const ImageTensor* x : {&q, &k, &v, &t.out, &t.dout}) {
            prefetch_window(g, *x, (item + 1) / g.num_windows, (item + 1) % g.num_windows);
          }
        }
        for (int64_t h = 0; h < g.heads; ++h) {
          const acc_t *Qh = Q + h * N * D, *Kh = K + h * N * D, *Vh = V + h * N * Dv, *Oh = O + h * N * Dv,
                      *dOh = dO + h * N * Dv;
          for (int64_t i = 0; i < N; ++i) {  // Delta_i = dO_i . O_i
            acc_t d = 0;
            for (int64_t c = 0; c < Dv; ++c) d += dOh[i * Dv + c] * Oh[i * Dv + c];
            delta[i] = d;
          }
          window_scores(g, Qh, Kh, bias, w, h, P);
          const acc_t* lse_rows = lse + (item * g.heads + h) * N;
          for (int64_t i = 0; i < N; ++i) {  // P = exp(S - lse): the forward's probabilities
            acc_t* p = P + i * N;
            if (lse_rows[i] == kNegInf) {
              std::fill(p, p + N, acc_t(0));
            } else {
              exp_shift_sum(p, N, lse_rows[i]);
            }
            if (g.dropout) {
              std::copy(p, p + N, Pd + i * N);
              dropout_row(Pd + i * N, N, g.seed, dropout_bh(g, b, w, h), static_cast<uint32_t>(i), 0u,
                          g.threshold, drop_scale);
            }
          }
          const acc_t* dropped = g.dropout ? Pd : P;
          mm_nt<acc_t>(g.gemm, N, N, Dv, acc_t(1), dOh, Dv, Vh, Dv, acc_t(0), dS, N);  // dP = dO V^T
          for (int64_t i = 0; i < N; ++i) {  // dS = P * (dP' - Delta); Pd != 0 exactly where kept (and P > 0)
            const acc_t* p = P + i * N;
            acc_t* s = dS + i * N;
            if (g.dropout) {
              const acc_t* pd = Pd + i * N;
              for (int64_t j = 0; j < N; ++j) s[j] = p[j] * ((pd[j] != acc_t(0) ? s[j] * drop_scale : acc_t(0)) - delta[i]);
            } else {
              for (int64_t j = 0; j < N; ++j) s[j] = p[j] * (s[j] - delta[i]);
            }
          }
          mm_tn<acc_t>(g.gemm, N, Dv, N, acc_t(1), dropped, N, dOh, Dv, acc_t(0), dV + h * N * Dv, Dv);  // Pd^T dO
          mm_tn<acc_t>(g.gemm, N, D, N, scale, dS, N, Qh, D, acc_t(0), dK + h * N * D, D);  // s dS^T Q
          mm_nn<acc_t>(g.gemm, N, D, N, scale, dS, N, Kh, D, acc_t(0), dQ + h * N * D, D);  // s dS K
          if (dtable != nullptr) {
            acc_t* acc = dtable + h * N * N;
            for (int64_t ij = 0; ij < N * N; ++ij) acc[ij] += dS[ij];
          }
        }
        scatter_window(g, dQ, t.dq, b, w);
        scatter_window(g, dK, t.dk, b, w);
        scatter_window(g, dV, t.dv, b, w);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------------------
// The ops: argument checks, allocation, dispatch on the accumulation type
// ------------------------------------------------------------------------------------------------------------
void check_image_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 5, name, ": expected a 5-D tensor [B, H, W, heads, head_dim], got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, name,
              ": dtype ", dt, " is not supported by the CPU kernels (float32, float64, bfloat16, float16)");
}

Window make_window(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& seed,
                   at::IntArrayRef geometry, double scale, double dropout_p) {
  check_image_tensor(q, "q");
  check_image_tensor(k, "k");
  check_image_tensor(v, "v");
  if (table.has_value())
    TORCH_CHECK(table->device().is_cpu(), "table: expected a CPU tensor, got one on ", table->device());
  const WindowGeometry geo = check_window_args(q, k, v, table, geometry, scale, dropout_p);
  Window g;
  g.B = q.size(0);
  g.heads = q.size(3);
  g.D = q.size(4);
  g.Dv = v.size(4);
  g.H = geo.H, g.W = geo.W, g.wh = geo.wh, g.ww = geo.ww, g.sh = geo.sh, g.sw = geo.sw, g.uh = geo.uh, g.uw = geo.uw;
  TORCH_CHECK(g.D > 0 && g.Dv > 0, "q, v: head dims must be at least 1, got ", g.D, " and ", g.Dv);
  g.build_tables();
  g.scale = scale;
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value(), "seed: required when dropout_p > 0 (an int64 tensor of one element)");
    const at::Tensor& s = *seed;
    TORCH_CHECK(s.device().is_cpu(), "seed: expected a CPU tensor, got one on ", s.device());
    TORCH_CHECK(s.scalar_type() == at::kLong && s.numel() == 1,
                "seed: expected an int64 tensor of one element, got ", s.scalar_type(), " with ", s.numel(),
                " elements");
    g.dropout = true;
    g.seed = static_cast<uint64_t>(s.item<int64_t>());
    g.threshold = dropout_threshold(dropout_p);
    g.drop_scale = 1.0 / (1.0 - dropout_p);
  }
  g.gemm = gemm_path();
  return g;
}

std::tuple<at::Tensor, at::Tensor> window_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                  const at::Tensor& v_in, const std::optional<at::Tensor>& table,
                                                  const std::optional<at::Tensor>& seed, at::IntArrayRef geometry,
                                                  double scale, double dropout_p) {
  check_image_tensor(q_in, "q");
  check_image_tensor(k_in, "k");
  check_image_tensor(v_in, "v");
  const at::Tensor q = with_contiguous_last_dim(q_in), k = with_contiguous_last_dim(k_in),
                   v = with_contiguous_last_dim(v_in);
  const Window g = make_window(q, k, v, table, seed, geometry, scale, dropout_p);
  at::Tensor out = at::empty({g.B, g.H, g.W, g.heads, g.Dv}, q.options());
  at::Tensor lse = at::empty({g.B * g.num_windows, g.heads, g.N}, q.options().dtype(stats_dtype(q.scalar_type())));
  maybe_poison(out);
  maybe_poison(lse);
  if (out.numel() == 0) return {out, lse};
  if (lse.scalar_type() == at::kDouble) {
    window_forward_kernel<double>(g, image_tensor(q), image_tensor(k), image_tensor(v), gather_bias<double>(g, table),
                                  image_tensor(out), lse.data_ptr<double>());
  } else {
    window_forward_kernel<float>(g, image_tensor(q), image_tensor(k), image_tensor(v), gather_bias<float>(g, table),
                                 image_tensor(out), lse.data_ptr<float>());
  }
  return {out, lse};
}

template <typename acc_t>
at::Tensor run_window_backward(const Window& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& table, const WindowGrads& t, const at::Tensor& lse,
                               bool table_needs_grad) {
  const auto opts = q.options().dtype(acc_scalar_type<acc_t>());
  const int64_t items = g.B * g.num_windows;
  const int64_t chunks = items == 0 ? 0 : ceil_div(items, table_chunk_windows(items));
  at::Tensor partials;
  if (table_needs_grad) partials = at::empty({chunks, g.heads, g.N, g.N}, opts);
  if (items > 0) {
    window_backward_kernel<acc_t>(g, image_tensor(q), image_tensor(k), image_tensor(v), gather_bias<acc_t>(g, table),
                                  t, lse.data_ptr<acc_t>(),
                                  table_needs_grad ? partials.data_ptr<acc_t>() : nullptr);
  }
  if (!table_needs_grad) return at::empty({0}, opts);
  // dTable[index(i, j), h] += sum over chunks (in order) of the partial sums
  at::Tensor dtable = at::zeros({table->size(0), g.heads}, opts);
  acc_t* dt = dtable.data_ptr<acc_t>();
  const acc_t* part = partials.data_ptr<acc_t>();
  std::vector<acc_t> per_pair(g.heads * g.N * g.N, acc_t(0));
  for (int64_t c = 0; c < chunks; ++c) {
    const acc_t* pc = part + c * g.heads * g.N * g.N;
    for (int64_t e = 0; e < g.heads * g.N * g.N; ++e) per_pair[e] += pc[e];
  }
  for (int64_t h = 0; h < g.heads; ++h) {
    for (int64_t ij = 0; ij < g.N * g.N; ++ij) dt[g.rel_index[ij] * g.heads + h] += per_pair[h * g.N * g.N + ij];
  }
  return dtable;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_bwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& table,
    const std::optional<at::Tensor>& seed, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& dout_in, at::IntArrayRef geometry, double scale, double dropout_p, bool table_needs_grad) {
  check_image_tensor(q_in, "q");
  check_image_tensor(k_in, "k");
  check_image_tensor(v_in, "v");
  check_image_tensor(out_in, "out");
  check_image_tensor(dout_in, "dout");
  const at::Tensor q = with_contiguous_last_dim(q_in), k = with_contiguous_last_dim(k_in),
                   v = with_contiguous_last_dim(v_in), out = with_contiguous_last_dim(out_in),
                   dout = with_contiguous_last_dim(dout_in);
  const Window g = make_window(q, k, v, table, seed, geometry, scale, dropout_p);
  TORCH_CHECK(out.sizes() == v.sizes() && out.scalar_type() == q.scalar_type(), "out: expected shape ", v.sizes(),
              " and dtype ", q.scalar_type(), ", got ", out.sizes(), " ", out.scalar_type());
  TORCH_CHECK(dout.sizes() == out.sizes() && dout.scalar_type() == q.scalar_type(), "dout: expected shape ",
              out.sizes(), " and dtype ", q.scalar_type(), ", got ", dout.sizes(), " ", dout.scalar_type());
  const auto sdt = stats_dtype(q.scalar_type());
  TORCH_CHECK(lse_in.device().is_cpu() && lse_in.scalar_type() == sdt && lse_in.dim() == 3 &&
                  lse_in.size(0) == g.B * g.num_windows && lse_in.size(1) == g.heads && lse_in.size(2) == g.N,
              "lse: expected a ", sdt, " CPU tensor of shape [B * windows, heads, N] = [", g.B * g.num_windows, ", ",
              g.heads, ", ", g.N, "], got ", lse_in.scalar_type(), " ", lse_in.sizes());
  TORCH_CHECK(!table_needs_grad || table.has_value(), "table_needs_grad: True needs a table");
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dv = at::empty(v.sizes(), v.options());
  maybe_poison(dq);
  maybe_poison(dk);
  maybe_poison(dv);
  const WindowGrads t{image_tensor(out), image_tensor(dout), image_tensor(dq), image_tensor(dk), image_tensor(dv)};
  at::Tensor dtable = sdt == at::kDouble
                          ? run_window_backward<double>(g, q, k, v, table, t, lse, table_needs_grad)
                          : run_window_backward<float>(g, q, k, v, table, t, lse, table_needs_grad);
  return {dq, dk, dv, dtable};
}

}  // namespace
}  // namespace fastattn::cpu

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("window_fwd", &fastattn::cpu::window_fwd_cpu);
  m.impl("window_bwd", &fastattn::cpu::window_bwd_cpu);
}
