// TimeSformer's spatial attention with its cls token on the CPU (ops spatial_fwd / spatial_bwd, schemas in
// csrc/ops.cpp): fastattn.spatial_attention's semantics without the composite's cls repeat and concatenation.
//
// Layout.  q, k, v are [B, 1 + T*N, heads, d] token tensors (any strides, contiguous last dim): token 0 is the
// video's cls token, then N patches for each of T frames; patch n of frame t is token 1 + n*T + t ("nt",
// TimeSformer's order) or 1 + t*N + n ("tn").  Frame t's sequence is [cls, the frame's N patches] (R = 1 + N
// rows, the cls first); every token of it attends over all of it.  A patch's output goes to its token; the cls
// token's output is the mean of its T per-frame outputs.
//
// Forward.  Work items are (b, t, head).  Per item, the frame's R rows (cls first) are gathered into contiguous
// buffers -- the keys straight into K^T where the register tiles take them transposed -- and the dense kernels'
// online-softmax tile (attention_core.h) runs on that R x R problem, so the cls query and key cost one row and
// one column of the tile's products.  Patch rows are written to their tokens of out, the cls row to
// out_cls[b, t, head] (float32/float64); afterwards out[b, 0, head] = mean_t out_cls[b, t, head], summed in
// frame order.
//
// Backward.  Per item, the dense single-pass backward over its R rows (attention_core.h's block-pair
// recomputation) on gathered q, k, v, out, dout, with the cls row's out = out_cls[b, t] and its
// dout = dout[b, 0] / T (the mean's gradient).  A patch's dq, dk, dv rows belong to one item and are written
// directly; the cls token's get one contribution per frame, written to [B, T, heads, d] partial buffers and
// summed over t in frame order afterwards -- no atomics, bitwise reproducible, independent of the threads.
//
// The backward's gathers copy each row once per item (then read from cache by every block pair); nothing of size
// [B, T, R, ...] is materialised.  No dropout: fastattn.spatial_attention takes its
// concatenating path for dropout_p > 0.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "../ops.h"
#include "amx.h"
#include "amx_forward.h"
#include "attention_core.h"
#include "blas.h"
#include "kernel_common.h"
#include "small_gemm.h"

namespace fastattn::cpu {
namespace {

// Blocks of up to 256 rows, so a frame of up to 255 patches (TimeSformer's 14 x 14) is one block -- fewer,
// larger BLAS products, and the keys and values packed by BLAS once per item (forward with 2 x 98 query rows:
// 3-6 % slower on the 2-core EPYC; the dense kernels' 128 was tuned for long sequences).
constexpr int64_t kSpatialBlockM = 256;

// A [B, L, heads, dim] token tensor with a contiguous last dimension; strides in elements.
struct TokenTensor {
  char* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t elem = 0, sb = 0, sl = 0, sh = 0, dim = 0;

  char* row(int64_t b, int64_t l, int64_t h) const { return data + (b * sb + l * sl + h * sh) * elem; }
};

// A token tensor as the kernels read it (BLAS reads a frame's patch rows as a matrix): copied once unless its
// last dimension is contiguous and its tokens are at least a row apart.
at::Tensor token_rows(const at::Tensor& t) { return with_contiguous_rows(t, 1); }

TokenTensor token_tensor(const at::Tensor& t) {
  TokenTensor v;
  v.data = static_cast<char*>(t.data_ptr());
  v.dtype = t.scalar_type();
  v.elem = static_cast<int64_t>(t.element_size());
  v.sb = t.stride(0);
  v.sl = t.stride(1);
  v.sh = t.stride(2);
  v.dim = t.size(3);
  return v;
}

// The shape of the problem and the token of each row of a frame's sequence.
struct Frames {
  int64_t B = 0, L = 0, heads = 0, T = 1, N = 0, D = 0, Dv = 0;
  bool frames_inner = true;  // "nt": patch n of frame t is token 1 + n*T + t; "tn": 1 + t*N + n
  double scale = 1.0;

  int64_t rows() const { return N + 1; }
  int64_t items() const { return B * T * heads; }
  // Row r of frame t's sequence: the cls token (r = 0) or patch r - 1 of the frame.
  int64_t token(int64_t t, int64_t r) const {
    if (r == 0) return 0;
    return 1 + (frames_inner ? (r - 1) * T + t : t * N + (r - 1));
  }
};

// A contiguous [rows, dim] acc_t buffer as the one-head HeadTensor the tile code reads.
template <typename acc_t>
HeadTensor buffer_tensor(acc_t* data, int64_t dim) {
  HeadTensor t;
  t.data = reinterpret_cast<char*>(data);
  t.dtype = acc_scalar_type<acc_t>();
  t.elem = sizeof(acc_t);
  t.sl = dim;
  t.dim = dim;
  return t;
}

// The problem the tile code sees for one item: one batch, one head, R queries and R keys in the buffers.
template <typename acc_t>
Problem frame_problem(const Frames& f, acc_t* q, acc_t* k, acc_t* v) {
  Problem p;
  p.Lq = p.Lk = f.rows();
  p.D = f.D;
  p.Dv = f.Dv;
  p.q = buffer_tensor(q, f.D);
  p.k = buffer_tensor(k, f.D);
  p.v = buffer_tensor(v, f.Dv);
  p.scale = f.scale;
  p.gemm = gemm_path();
  return p;
}

// Rows far apart (TimeSformer's "nt" frame rows, 72 KiB apart in its qkv tensor) are fetched by the copy loops with
// the hardware prefetchers idle; a software prefetch this many rows ahead keeps several rows' lines in flight
// (TimeSformer-B spatial forward, Intel Xeon VM: the gathers -2.5 %, the output stores -3 %; NOTES entry 25).
constexpr int64_t kPrefetchRows = 4;


// Rows [first, R) of frame t's sequence of head h, video b -> dst rows [first, R) (converted to acc_t).
template <typename acc_t>
void gather_frame(const Frames& f, const TokenTensor& src, int64_t b, int64_t t, int64_t h, acc_t* dst,
                  int64_t first = 0) {
  const int64_t R = f.rows();
  for (int64_t r = first; r < R; ++r) {
    if (r + kPrefetchRows < R) prefetch_row(src.row(b, f.token(t, r + kPrefetchRows), h), src.dim * src.elem);
    convert_row(src.row(b, f.token(t, r), h), src.dtype, dst + r * src.dim, src.dim);
  }
}

// Software prefetch of the rows of frame t's sequence (head h, video b), issued one work item ahead by the
// backward, whose gathers wait on them: in "nt" order a frame's rows are T tokens apart (24 KiB for
// TimeSformer-B), a stride the hardware prefetcher does not follow.  (TimeSformer-B backward, 2-core EPYC: 2-4 %
// faster.  The forward prefetches a few rows ahead inside its copy loops instead: a whole item ahead gained
// nothing there on the Intel VM.)
inline void prefetch_frame(const Frames& f, const TokenTensor& x, int64_t b, int64_t t, int64_t h) {
  for (int64_t r = 0; r < f.rows(); ++r) prefetch_row(x.row(b, f.token(t, r), h), x.dim * x.elem);
}

// Work item -> (video, frame, head); items are ordered (b, t, h), so partial buffers [B, T, heads, ...] are
// indexed by the item itself.
struct Item {
  int64_t b, t, h;
};
Item locate(const Frames& f, int64_t item) {
  return {item / (f.T * f.heads), (item / f.heads) % f.T, item % f.heads};
}

// dst[b, slot, h] = sum over t (in order) of part[b, t, h] / divisor, for every (b, h): the cls token's output
// (the mean over frames) and its gradients (sums over frames).
template <typename acc_t>
void reduce_over_frames(const Frames& f, const acc_t* part, int64_t dim, acc_t divisor, const TokenTensor& dst) {
  at::parallel_for(0, f.B * f.heads, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(dim);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / f.heads, h = bh % f.heads;
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t t = 0; t < f.T; ++t) {
        const acc_t* src = part + ((b * f.T + t) * f.heads + h) * dim;
        for (int64_t d = 0; d < dim; ++d) sum[d] += src[d];
      }
      for (int64_t d = 0; d < dim; ++d) sum[d] /= divisor;
      store_row(sum.data(), dst.dtype, dst.row(b, 0, h), dim);
    }
  });
}

// ------------------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------------------
// The N patch rows of frame t of video b, head h, as the one-head HeadTensor the tile reads in place: rows a
// uniform stride apart (T tokens for "nt", 1 for "tn").
HeadTensor frame_patches(const Frames& f, const TokenTensor& x, int64_t b, int64_t t, int64_t h) {
  HeadTensor v;
  v.data = x.row(b, f.token(t, 1), h);
  v.dtype = x.dtype;
  v.elem = x.elem;
  v.sl = (f.frames_inner ? f.T : 1) * x.sl;
  v.dim = x.dim;
  return v;
}

// acc / l in place and lse = m + log l of one finished row (as the dense kernels' finish_row: l NaN -- a NaN
// score -- makes both NaN; l = 0 is a row that saw no key: out 0, lse -inf).
template <typename acc_t>
void normalise_row(acc_t* a, int64_t Dv, acc_t m, acc_t l, acc_t* lse) {
  if (l != acc_t(0)) {
    const acc_t inv = acc_t(1) / l;
    for (int64_t d = 0; d < Dv; ++d) a[d] *= inv;
    *lse = m + std::log(l);
  } else {
    std::fill(a, a + Dv, acc_t(0));
    *lse = -std::numeric_limits<acc_t>::infinity();
  }
}

// The finished rows [i0, i0 + rows) of an item's tile (acc rows acc_ld apart, their m and l): normalised, with
// their LSE; row 0 (the cls query) to out_cls, the others to their tokens' output rows.
template <typename acc_t>
void store_item_rows(const Frames& f, const Item& it, int64_t item, const acc_t* m, const acc_t* l, acc_t* acc,
                     int64_t acc_ld, int64_t i0, int64_t rows, const TokenTensor& out, acc_t* out_cls, acc_t* lse) {
  const int64_t R = f.rows(), Dv = f.Dv;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    acc_t* a = acc + r * acc_ld;
    normalise_row(a, Dv, m[r], l[r], lse + item * R + i);  // LSE row 0: the cls query, row 1 + n: patch n
    if (i == 0) {
      std::copy(a, a + Dv, out_cls + item * Dv);
    } else {
      if (i + kPrefetchRows < R) {
        prefetch_row(out.row(it.b, f.token(it.t, i + kPrefetchRows), it.h), Dv * out.elem, /*for_write=*/true);
      }
      store_row(a, out.dtype, out.row(it.b, f.token(it.t, i), it.h), Dv);
    }
  }
}

// The bf16 spatial forward on AMX (CPUs with AMX-BF16; FASTATTN_CPU_AMX=0 turns it off): per item the frame's R rows
// (cls first) copied as bf16 into contiguous buffers and the dense AMX tile (amx_forward.h) run on the R x R
// problem; its packed key blocks are dropped between items (the buffers hold another frame each time).
void spatial_forward_amx(const Frames& f, const TokenTensor& q, const TokenTensor& k, const TokenTensor& v,
                         const TokenTensor& out, float* out_cls, float* lse) {
  const int64_t R = f.rows(), D = f.D, Dv = f.Dv;
  const int64_t block_m = AmxForwardTile::query_block(frame_problem<float>(f, nullptr, nullptr, nullptr));
  auto copy_rows = [&](const TokenTensor& src, int64_t b, int64_t t, int64_t h, uint16_t* dst) {
    for (int64_t r = 0; r < R; ++r) {
      if (r + kPrefetchRows < R) prefetch_row(src.row(b, f.token(t, r + kPrefetchRows), h), src.dim * src.elem);
      std::memcpy(dst + r * src.dim, src.row(b, f.token(t, r), h), src.dim * sizeof(uint16_t));
    }
  };
  at::parallel_for(0, f.items(), 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> qb(R * D), kb(R * D), vb(R * Dv);
    Problem p = frame_problem<float>(f, nullptr, nullptr, nullptr);
    auto bf16_rows = [](HeadTensor* t, uint16_t* data, int64_t dim) {
      t->data = reinterpret_cast<char*>(data);
      t->dtype = at::kBFloat16;
      t->elem = 2;
      t->sl = dim;
      t->dim = dim;
    };
    bf16_rows(&p.q, qb.data(), D);
    bf16_rows(&p.k, kb.data(), D);
    bf16_rows(&p.v, vb.data(), Dv);
    p.amx_bf16 = true;
    AmxForwardTile tile(p, block_m);
    for (int64_t item = begin; item < end; ++item) {
      const Item it = locate(f, item);
      copy_rows(q, it.b, it.t, it.h, qb.data());
      copy_rows(k, it.b, it.t, it.h, kb.data());
      copy_rows(v, it.b, it.t, it.h, vb.data());
      tile.forget_packed_blocks();
      for (int64_t i0 = 0; i0 < R; i0 += block_m) {
        const int64_t rows = std::min(block_m, R - i0);
        tile.run(p, 0, 0, i0, rows, 0, R);
        store_item_rows<float>(f, it, item, tile.m, tile.l, tile.acc, tile.acc_ld, i0, rows, out, out_cls, lse);
      }
    }
  });
  reduce_over_frames(f, out_cls, Dv, static_cast<float>(f.T), out);
}

// Forward: per item, the frame's R rows (cls first) copied into contiguous buffers -- the keys straight into K^T
// where the tiles take them transposed -- and the dense tile run on one R x R problem.  (Reading the patch rows in
// place, with the cls key as an extra score column and the cls query as a 1-row tile, was 8 % slower: NOTES 25.)
template <typename acc_t>
void spatial_forward_kernel(const Frames& f, const TokenTensor& q, const TokenTensor& k, const TokenTensor& v,
                            const TokenTensor& out, acc_t* out_cls, acc_t* lse) {
  const int64_t R = f.rows(), N = f.N, D = f.D, Dv = f.Dv;
  const int64_t block_m = ceil_div(R, ceil_div(R, kSpatialBlockM));
  // K^T's row stride: at least 1 + round16(N) (the patch keys go to columns 1..N and transpose_32bit zero-fills up
  // to the next multiple of 16); not a multiple of 1 KiB, which would put K^T's rows into the same cache sets.
  int64_t ldkt = (N + 15) / 16 * 16 + 16;
  if (ldkt % 256 == 0) ldkt += 16;
  const bool direct_kt = k.dtype == acc_scalar_type<acc_t>();
  at::parallel_for(0, f.items(), 1, [&](int64_t begin, int64_t end) {
    SerialBlasGuard serial_blas;
    Scratch<acc_t> buffers(Scratch<acc_t>::rounded(R * D) * 2 + Scratch<acc_t>::rounded(R * Dv) +
                           Scratch<acc_t>::rounded(D * ldkt));
    acc_t* Qb = buffers.take(R * D);
    acc_t* Kb = buffers.take(R * D);
    acc_t* Vb = buffers.take(R * Dv);
    acc_t* Kt = buffers.take(D * ldkt);
    const Problem p = frame_problem(f, Qb, Kb, Vb);
    ForwardTile<acc_t> tile(p, block_m);
    if (tile.transpose_keys) tile.use_transposed_keys(Kt, ldkt);
    for (int64_t item = begin; item < end; ++item) {
      const Item it = locate(f, item);
      gather_frame(f, q, it.b, it.t, it.h, Qb);
      gather_frame(f, v, it.b, it.t, it.h, Vb);
      if (tile.transpose_keys && direct_kt) {
        // K^T column 0: the cls key; columns 1..N: the patch keys, transposed from their rows in place.
        const HeadTensor patches = frame_patches(f, k, it.b, it.t, it.h);
        transpose_32bit(N, D, patches.data, patches.sl, Kt + 1, ldkt);
        const acc_t* k_cls = reinterpret_cast<const acc_t*>(k.row(it.b, 0, it.h));
        for (int64_t d = 0; d < D; ++d) Kt[d * ldkt] = k_cls[d];
      } else {  // converted rows (cls first); K^T of all of them where the tiles take it
        gather_frame(f, k, it.b, it.t, it.h, Kb);
        if (tile.transpose_keys) transpose_32bit(R, D, Kb, D, Kt, ldkt);
      }
      for (int64_t i0 = 0; i0 < R; i0 += block_m) {
        const int64_t rows = std::min(block_m, R - i0);
        tile.run(p, 0, 0, i0, rows, 0, R);
        store_item_rows<acc_t>(f, it, item, tile.m, tile.l, tile.acc, Dv, i0, rows, out, out_cls, lse);
      }
    }
  });
  reduce_over_frames(f, out_cls, Dv, static_cast<acc_t>(f.T), out);  // the cls token: mean over the frames
}

// ------------------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------------------
struct SpatialGrads {
  TokenTensor out, dout, dq, dk, dv;
};

template <typename acc_t>
void spatial_backward_kernel(const Frames& f, const TokenTensor& q, const TokenTensor& k, const TokenTensor& v,
                             const SpatialGrads& g, const acc_t* out_cls, const acc_t* lse, acc_t* cls_dq,
                             acc_t* cls_dk, acc_t* cls_dv) {
  const int64_t R = f.rows(), D = f.D, Dv = f.Dv;
  // Block pairs of at most kSpatialBlockM x kSpatialBlockM rows, balanced: a frame of up to 255 patches is one
  // pair (5 BLAS products per item instead of 20 for 2 x 2 blocks of <= 128).
  const int64_t BM = ceil_div(R, ceil_div(R, kSpatialBlockM)), BN = BM, ld = (BN + 15) / 16 * 16;
  const acc_t scale = static_cast<acc_t>(f.scale), inv_frames = acc_t(1) / static_cast<acc_t>(f.T);
  at::parallel_for(0, f.items(), 1, [&](int64_t begin, int64_t end) {
    SerialBlasGuard serial_blas;
    Scratch<acc_t> buffers(2 * Scratch<acc_t>::rounded(R * D) + 3 * Scratch<acc_t>::rounded(R * Dv) +
                           Scratch<acc_t>::rounded(R));
    acc_t* Qb = buffers.take(R * D);
    acc_t* Kb = buffers.take(R * D);
    acc_t* Vb = buffers.take(R * Dv);
    acc_t* Ob = buffers.take(R * Dv);
    acc_t* dOb = buffers.take(R * Dv);
    acc_t* delta = buffers.take(R);
    const Problem p = frame_problem(f, Qb, Kb, Vb);
    BwdScratch<acc_t> s(p, R, BM, ld);  // s.dk, s.dv: every row of the item; s.dq: one query block
    for (int64_t item = begin; item < end; ++item) {
      const Item it = locate(f, item);
      gather_frame(f, q, it.b, it.t, it.h, Qb);
      gather_frame(f, k, it.b, it.t, it.h, Kb);
      gather_frame(f, v, it.b, it.t, it.h, Vb);
      std::copy(out_cls + item * Dv, out_cls + (item + 1) * Dv, Ob);  // the cls row's per-frame output
      gather_frame(f, g.out, it.b, it.t, it.h, Ob, 1);
      convert_row(g.dout.row(it.b, 0, it.h), g.dout.dtype, dOb, Dv);  // d(mean)/d(frame t's cls output) = 1/T
      for (int64_t d = 0; d < Dv; ++d) dOb[d] *= inv_frames;
      gather_frame(f, g.dout, it.b, it.t, it.h, dOb, 1);
      for (int64_t r = 0; r < R; ++r) delta[r] = dot(dOb + r * Dv, Ob + r * Dv, Dv);  // Delta = rowsum(dO * O)
      if (item + 1 < end) {  // the next item's rows, while this one computes
        const Item next = locate(f, item + 1);
        for (const TokenTensor* x : {&q, &k, &v, &g.out, &g.dout}) prefetch_frame(f, *x, next.b, next.t, next.h);
      }
      const acc_t* lse_rows = lse + item * R;
      std::fill(s.dk, s.dk + R * D, acc_t(0));
      std::fill(s.dv, s.dv + R * Dv, acc_t(0));
      for (int64_t i0 = 0; i0 < R; i0 += BM) {
        const int64_t rows = std::min(BM, R - i0);
        const acc_t* Q = Qb + i0 * D;
        const acc_t* dO = dOb + i0 * Dv;
        std::fill(s.dq, s.dq + rows * D, acc_t(0));
        for (int64_t j0 = 0; j0 < R; j0 += BN) {
          const int64_t cols = std::min(BN, R - j0);
          const acc_t* K = Kb + j0 * D;
          const acc_t* V = Vb + j0 * Dv;
          recompute_pair(p, s.tiles, Q, D, dO, Dv, K, D, V, Dv, 0, 0, i0, rows, j0, cols, lse_rows, delta);
          mm_tn<acc_t>(p.gemm, cols, Dv, rows, acc_t(1), s.tiles.P, ld, dO, Dv, acc_t(1), s.dv + j0 * Dv,
                       Dv);  // dV += P^T dO
          mm_tn<acc_t>(p.gemm, cols, D, rows, scale, s.tiles.dS, ld, Q, D, acc_t(1), s.dk + j0 * D,
                       D);  // dK += scale * dS^T Q
          mm_nn<acc_t>(p.gemm, rows, D, cols, scale, s.tiles.dS, ld, K, D, acc_t(1), s.dq,
                       D);  // dQ += scale * dS K
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          if (i == 0) {
            std::copy(s.dq, s.dq + D, cls_dq + item * D);
          } else {
            store_row(s.dq + r * D, g.dq.dtype, g.dq.row(it.b, f.token(it.t, i), it.h), D);
          }
        }
      }
      std::copy(s.dk, s.dk + D, cls_dk + item * D);
      std::copy(s.dv, s.dv + Dv, cls_dv + item * Dv);
      for (int64_t r = 1; r < R; ++r) {
        const int64_t tok = f.token(it.t, r);
        store_row(s.dk + r * D, g.dk.dtype, g.dk.row(it.b, tok, it.h), D);
        store_row(s.dv + r * Dv, g.dv.dtype, g.dv.row(it.b, tok, it.h), Dv);
      }
    }
  });
  reduce_over_frames(f, cls_dq, D, acc_t(1), g.dq);  // the cls token's gradients: sums over the frames
  reduce_over_frames(f, cls_dk, D, acc_t(1), g.dk);
  reduce_over_frames(f, cls_dv, Dv, acc_t(1), g.dv);
}

// ------------------------------------------------------------------------------------------------------------
// The ops
// ------------------------------------------------------------------------------------------------------------
void check_token_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 4, name, ": expected a 4-D tensor [B, 1 + T*N, heads, head_dim], got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, name,
              ": dtype ", dt, " is not supported by the CPU kernels (float32, float64, bfloat16, float16)");
}

Frames make_frames(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t num_frames,
                   const std::string& token_order, double scale) {
  check_token_tensor(q, "q");
  check_token_tensor(k, "k");
  check_token_tensor(v, "v");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "k, v: dtypes must match q's (", q.scalar_type(), "), got k ", k.scalar_type(), ", v ",
              v.scalar_type());
  TORCH_CHECK(k.sizes() == q.sizes(), "k: shape ", k.sizes(), " must equal q's ", q.sizes());
  TORCH_CHECK(v.sizes().slice(0, 3) == q.sizes().slice(0, 3), "v: shape ", v.sizes(),
              " must match q's [B, 1 + T*N, heads] (only its head dim may differ), got q ", q.sizes());
  TORCH_CHECK(num_frames >= 1, "num_frames: expected a positive int, got ", num_frames);
  TORCH_CHECK(token_order == "nt" || token_order == "tn", "token_order: expected 'nt' or 'tn', got '", token_order,
              "'");
  TORCH_CHECK(std::isfinite(scale), "scale: must be finite, got ", scale);
  Frames f;
  f.B = q.size(0);
  f.L = q.size(1);
  f.heads = q.size(2);
  f.D = q.size(3);
  f.Dv = v.size(3);
  f.T = num_frames;
  TORCH_CHECK(f.L > num_frames && (f.L - 1) % num_frames == 0, "q: ", f.L,
              " tokens do not fit num_frames=", num_frames, "; expected 1 + num_frames * N with N >= 1");
  TORCH_CHECK(f.D > 0 && f.Dv > 0, "q, v: head dims must be at least 1, got ", f.D, " and ", f.Dv);
  f.N = (f.L - 1) / num_frames;
  f.frames_inner = token_order == "nt";
  f.scale = scale;
  return f;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                               const at::Tensor& v_in, int64_t num_frames,
                                                               c10::string_view token_order, double scale) {
  const Frames f = make_frames(q_in, k_in, v_in, num_frames, std::string(token_order), scale);
  const at::Tensor q = token_rows(q_in), k = token_rows(k_in),
                   v = token_rows(v_in);
  const auto stats = q.options().dtype(stats_dtype(q.scalar_type()));
  at::Tensor out = at::empty({f.B, f.L, f.heads, f.Dv}, q.options());
  at::Tensor out_cls = at::empty({f.B, f.T, f.heads, f.Dv}, stats);
  at::Tensor lse = at::empty({f.B, f.T, f.heads, f.rows()}, stats);
  maybe_poison(out);
  maybe_poison(out_cls);
  maybe_poison(lse);
  if (f.items() == 0) return {out, out_cls, lse};
  auto run = [&](auto zero) {
    using acc_t = decltype(zero);
    spatial_forward_kernel<acc_t>(f, token_tensor(q), token_tensor(k), token_tensor(v), token_tensor(out),
                                  out_cls.data_ptr<acc_t>(), lse.data_ptr<acc_t>());
  };
  if (amx_bf16_applies(q.scalar_type(), gemm_path())) {
    spatial_forward_amx(f, token_tensor(q), token_tensor(k), token_tensor(v), token_tensor(out),
                        out_cls.data_ptr<float>(), lse.data_ptr<float>());
  } else if (lse.scalar_type() == at::kDouble) {
    run(0.0);
  } else {
    run(0.0f);
  }
  return {out, out_cls, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_bwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in,
    const at::Tensor& out_cls_in, const at::Tensor& lse_in, const at::Tensor& dout_in, int64_t num_frames,
    c10::string_view token_order, double scale) {
  const Frames f = make_frames(q_in, k_in, v_in, num_frames, std::string(token_order), scale);
  const auto stats_type = stats_dtype(q_in.scalar_type());
  for (const auto& [t, name] : {std::make_pair(&out_in, "out"), std::make_pair(&dout_in, "dout")}) {
    check_token_tensor(*t, name);
    TORCH_CHECK(t->sizes() == at::IntArrayRef({f.B, f.L, f.heads, f.Dv}), name, ": expected size [", f.B, ", ",
                f.L, ", ", f.heads, ", ", f.Dv, "], got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q_in.scalar_type(), name, ": dtype must match q's (", q_in.scalar_type(),
                "), got ", t->scalar_type());
  }
  TORCH_CHECK(out_cls_in.device().is_cpu() && out_cls_in.scalar_type() == stats_type &&
                  out_cls_in.sizes() == at::IntArrayRef({f.B, f.T, f.heads, f.Dv}),
              "out_cls: expected a CPU ", stats_type, " tensor of size [", f.B, ", ", f.T, ", ", f.heads, ", ", f.Dv,
              "], got ", out_cls_in.scalar_type(), " ", out_cls_in.sizes(), " on ", out_cls_in.device());
  TORCH_CHECK(lse_in.device().is_cpu() && lse_in.scalar_type() == stats_type &&
                  lse_in.sizes() == at::IntArrayRef({f.B, f.T, f.heads, f.rows()}),
              "lse: expected a CPU ", stats_type, " tensor of size [", f.B, ", ", f.T, ", ", f.heads, ", ", f.rows(),
              "], got ", lse_in.scalar_type(), " ", lse_in.sizes(), " on ", lse_in.device());
  const at::Tensor q = token_rows(q_in), k = token_rows(k_in),
                   v = token_rows(v_in), out = token_rows(out_in),
                   dout = token_rows(dout_in);
  const at::Tensor out_cls = out_cls_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  maybe_poison(dq);
  maybe_poison(dk);
  maybe_poison(dv);
  if (f.items() == 0) return {dq, dk, dv};  // no video or no head: no element
  SpatialGrads g{token_tensor(out), token_tensor(dout), token_tensor(dq), token_tensor(dk), token_tensor(dv)};
  const auto stats = q.options().dtype(stats_type);
  at::Tensor cls_dq = at::empty({f.items(), f.D}, stats);  // per-frame gradients of the cls token
  at::Tensor cls_dk = at::empty({f.items(), f.D}, stats);
  at::Tensor cls_dv = at::empty({f.items(), f.Dv}, stats);
  auto run = [&](auto zero) {
    using acc_t = decltype(zero);
    spatial_backward_kernel<acc_t>(f, token_tensor(q), token_tensor(k), token_tensor(v), g,
                                   out_cls.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), cls_dq.data_ptr<acc_t>(),
                                   cls_dk.data_ptr<acc_t>(), cls_dv.data_ptr<acc_t>());
  };
  if (stats_type == at::kDouble) {
    run(0.0);
  } else {
    run(0.0f);
  }
  return {dq, dk, dv};
}

}  // namespace
}  // namespace fastattn::cpu

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("spatial_fwd", &fastattn::cpu::spatial_fwd_cpu);
  m.impl("spatial_bwd", &fastattn::cpu::spatial_bwd_cpu);
}
