// Fused attention on the CPU: FlashAttention-2's algorithm with BLAS block products.
//
// Forward.  Work items are (batch, head, block of kFwdBlockM queries), spread over threads by at::parallel_for
// (with fewer items than threads, also split along the keys and merged by the LSE: forward_key_splits).
// Each walks the keys in blocks of kFwdBlockN:
//     S = scale * Q_blk K_blk^T          (BLAS; [BM, BN] scores of this block pair, the only score buffer)
//     S += mask; S = -inf where causal hides the key
//     online softmax per query row (running max m, running sum l, accumulator acc):
//         m_new = max(m, rowmax S);   P = exp(S - m_new);   alpha = exp(m - m_new)
//         l = alpha * l + rowsum P;   acc = alpha * acc      (rescale what was summed against the old max)
//         P = P * keep / (1 - p)      (dropout after the normaliser: as the reference and Triton kernels)
//     acc += P V_blk                     (BLAS)
// then out = acc / l and lse = m + log l; a row that saw no key gets out = 0 and lse = -inf.
// Extra memory: O(threads * BM * BN) -- no [Lq, Lk] buffer, so Lq = Lk = 32k runs in a few MB.
//
// Backward (deterministic: every output element is written by one work item, in a fixed order; no atomics).
//     Delta = rowsum(dO * O) - dLse                                     (per query row)
//     per block pair: P = exp(S - lse), Pd = dropout(P), dP = dO V^T, dS = P * (dP * keep / (1 - p) - Delta)
//     dV += Pd^T dO,  dK += scale * dS^T Q,  dQ += scale * dS K,  dMask[rows, keys] = dS
// Schedules, chosen by the shape and the thread count (choose_backward_schedule):
//   single pass: work items (batch, kv head, stripe of key blocks) walk their block pairs once (5 products per
//     pair); with more than one stripe per head, partial dQs are summed afterwards in a fixed order;
//   two passes, when the partial dQs would not fit and there are too few heads to keep the threads busy: dK, dV
//     per (batch, kv head, key block) over the GQA group's query blocks, then dQ per (batch, head, query block)
//     over the key blocks -- every block pair recomputed in both (7 products per pair).
//
// Dtypes.  float32 and float64 compute in their own precision (acc_t); bfloat16 and float16 inputs are
// converted block by block to float32, computed in float32 and converted back.  The kernels are templates on
// acc_t only (two instantiations); the input dtype is a run-time switch in the block loaders.
//
// Layout.  Inputs are addressed by (batch, head, row) strides with a contiguous last dimension, so [B, L, H, D]
// buffers viewed as [B, H, L, D] are read in place; an input with a strided last dimension (or rows that
// overlap) is copied once.  The mask is read through its four strides (stride 0 on broadcast dimensions).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <string>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

#include "../ops.h"
#include "../philox.h"
#include "amx.h"
#include "amx_backward.h"
#include "amx_forward.h"
#include "attention_core.h"
#include "blas.h"
#include "kernel_common.h"
#include "row_kernels.h"

namespace fastattn::cpu {
namespace {

// ------------------------------------------------------------------------------------------------------------
// Forward (the tile is in attention_core.h)
// ------------------------------------------------------------------------------------------------------------
// Tile: ForwardTile<acc_t>, or AmxForwardTile for bf16 inputs on AMX (acc_t = float).
template <typename acc_t, typename Tile>
void forward_kernel_with(const Problem& p, const HeadTensor& out, acc_t* lse) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t BM = Tile::query_block(p);
  const int64_t n_qblocks = ceil_div(p.Lq, BM);
  const int64_t items = p.B * p.Hq * n_qblocks;
  // work item t -> (b, h, query block); causal blocks alternate from both ends (zigzag) to balance the threads
  auto locate = [&](int64_t t, int64_t* b, int64_t* h, int64_t* i0, int64_t* rows) {
    const int64_t bh = t / n_qblocks;
    const int64_t qb = p.causal != kCausalNone ? zigzag(t % n_qblocks, n_qblocks) : t % n_qblocks;
    *b = bh / p.Hq;
    *h = bh % p.Hq;
    *i0 = qb * BM;
    *rows = std::min(BM, p.Lq - *i0);
  };
  const int64_t splits = forward_key_splits(p, items);

  if (splits == 1) {
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      SerialBlasGuard serial_blas;
      Tile tile(p, BM);
      for (int64_t t = begin; t < end; ++t) {
        int64_t b, h, i0, rows;
        locate(t, &b, &h, &i0, &rows);
        tile.run(p, b, h, i0, rows, 0, p.kv_end(i0, rows));
        for (int64_t r = 0; r < rows; ++r) {
          finish_row(p, tile.acc + r * tile.acc_ld, tile.m[r], tile.l[r], out, b, h, i0 + r, lse);
        }
      }
    });
    return;
  }

  // Split keys: split s of item t covers the key blocks [s * per_split, (s + 1) * per_split).
  const int64_t per_split = ceil_div(ceil_div(p.Lk, kFwdBlockN), splits) * kFwdBlockN;
  const auto opts = at::TensorOptions().dtype(acc_scalar_type<acc_t>());
  at::Tensor part_acc = at::empty({items * splits, BM, p.Dv}, opts);
  at::Tensor part_ml = at::empty({items * splits, 2, BM}, opts);
  acc_t* pa = part_acc.data_ptr<acc_t>();
  acc_t* pml = part_ml.data_ptr<acc_t>();
  at::parallel_for(0, items * splits, 1, [&](int64_t begin, int64_t end) {
    SerialBlasGuard serial_blas;
    Tile tile(p, BM);
    for (int64_t u = begin; u < end; ++u) {
      int64_t b, h, i0, rows;
      locate(u / splits, &b, &h, &i0, &rows);
      const int64_t kv_end = p.kv_end(i0, rows), s = u % splits;
      const int64_t j_begin = std::min(kv_end, s * per_split), j_end = std::min(kv_end, (s + 1) * per_split);
      tile.run(p, b, h, i0, rows, j_begin, j_end);
      for (int64_t r = 0; r < rows; ++r) {
        std::copy(tile.acc + r * tile.acc_ld, tile.acc + r * tile.acc_ld + p.Dv, pa + (u * BM + r) * p.Dv);
      }
      std::copy(tile.m, tile.m + rows, pml + u * 2 * BM);
      std::copy(tile.l, tile.l + rows, pml + u * 2 * BM + BM);
    }
  });
  // Merge (the LSE merge): M = max_s m_s;  l = sum_s l_s exp(m_s - M);  acc = sum_s acc_s exp(m_s - M).
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> a(p.Dv);
    for (int64_t t = begin; t < end; ++t) {
      int64_t b, h, i0, rows;
      locate(t, &b, &h, &i0, &rows);
      for (int64_t r = 0; r < rows; ++r) {
        acc_t M = kNegInf;
        for (int64_t s = 0; s < splits; ++s) M = std::max(M, pml[(t * splits + s) * 2 * BM + r]);
        std::fill(a.begin(), a.end(), acc_t(0));
        acc_t l = 0;
        for (int64_t s = 0; s < splits; ++s) {
          const int64_t u = t * splits + s;
          const acc_t ms = pml[u * 2 * BM + r], ls = pml[u * 2 * BM + BM + r];
          if (ms == kNegInf) {  // this split saw no visible key of the row (l_s = 0) -- or only NaN scores (NaN)
            l += ls;
            continue;
          }
          const acc_t w = std::exp(ms - M);
          l += ls * w;
          const acc_t* src = pa + (u * BM + r) * p.Dv;
          for (int64_t d = 0; d < p.Dv; ++d) a[d] += src[d] * w;
        }
        finish_row(p, a.data(), M, l, out, b, h, i0 + r, lse);
      }
    }
  });
}

template <typename acc_t>
void forward_kernel(const Problem& p, const HeadTensor& out, acc_t* lse) {
  if constexpr (std::is_same<acc_t, float>::value) {
    if (p.amx_bf16) return forward_kernel_with<float, AmxForwardTile>(p, out, lse);
  }
  forward_kernel_with<acc_t, ForwardTile<acc_t>>(p, out, lse);
}

// ------------------------------------------------------------------------------------------------------------
// Backward (the block-pair recomputation is in attention_core.h)
// ------------------------------------------------------------------------------------------------------------
// Two-pass backward, pass 2: dK, dV for (batch, kv head, block of keys); the GQA group's query heads are summed
// in a fixed order.
template <typename acc_t>
void dkdv_kernel(const Problem& p, const BackwardTensors& t, const acc_t* lse, const acc_t* delta) {
  const int64_t BM = kBwdBlockM, BN = kBwdBlockN;
  const int64_t n_kblocks = ceil_div(p.Lk, BN);
  at::parallel_for(0, p.B * p.Hkv * n_kblocks, 1, [&](int64_t begin, int64_t end) {
    SerialBlasGuard serial_blas;
    BwdScratch<acc_t> s(p, BN);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bhk = task / n_kblocks;
      const int64_t kb = p.causal != kCausalNone ? zigzag(task % n_kblocks, n_kblocks) : task % n_kblocks;
      const int64_t b = bhk / p.Hkv, hk = bhk % p.Hkv;
      const int64_t j0 = kb * BN, cols = std::min(BN, p.Lk - j0);
      int64_t ldk, ldv, ldq, ldo;
      const acc_t* K = load_rows(p.k, b, hk, j0, cols, s.k_buf, &ldk);
      const acc_t* V = load_rows(p.v, b, hk, j0, cols, s.v_buf, &ldv);
      std::fill(s.dk, s.dk + cols * p.D, acc_t(0));
      std::fill(s.dv, s.dv + cols * p.Dv, acc_t(0));
      for (int64_t g = 0; g < p.group; ++g) {
        const int64_t h = hk * p.group + g;
        for (int64_t i0 = p.q_begin(j0); i0 < p.Lq; i0 += BM) {
          const int64_t rows = std::min(BM, p.Lq - i0);
          const acc_t* Q = load_rows(p.q, b, h, i0, rows, s.q_buf, &ldq);
          const acc_t* dO = load_rows(t.dout, b, h, i0, rows, s.do_buf, &ldo);
          recompute_pair(p, s.tiles, Q, ldq, dO, ldo, K, ldk, V, ldv, b, h, i0, rows, j0, cols, lse, delta);
          mm_tn<acc_t>(p.gemm, cols, p.Dv, rows, acc_t(1), s.tiles.dropped(), BN, dO, ldo, acc_t(1), s.dv,
                       p.Dv);  // dV += Pd^T dO
          mm_tn<acc_t>(p.gemm, cols, p.D, rows, static_cast<acc_t>(p.scale), s.tiles.dS, BN, Q, ldq, acc_t(1),
                       s.dk, p.D);  // dK += scale * dS^T Q
        }
      }
      store_rows(s.dk, cols, t.dk, b, hk, j0);
      store_rows(s.dv, cols, t.dv, b, hk, j0);
    }
  });
}

// Two-pass backward, pass 3: dQ (and the dense mask gradient) for (batch, head, block of queries).
template <typename acc_t>
void dq_kernel(const Problem& p, const BackwardTensors& t, const acc_t* lse, const acc_t* delta, acc_t* dmask) {
  const int64_t BM = kBwdBlockM, BN = kBwdBlockN;
  const int64_t n_qblocks = ceil_div(p.Lq, BM);
  at::parallel_for(0, p.B * p.Hq * n_qblocks, 1, [&](int64_t begin, int64_t end) {
    SerialBlasGuard serial_blas;
    BwdScratch<acc_t> s(p, 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / n_qblocks;
      const int64_t qb = p.causal != kCausalNone ? zigzag(task % n_qblocks, n_qblocks) : task % n_qblocks;
      const int64_t b = bh / p.Hq, h = bh % p.Hq, hk = h / p.group;
      const int64_t i0 = qb * BM, rows = std::min(BM, p.Lq - i0);
      int64_t ldq, ldo, ldk, ldv;
      const acc_t* Q = load_rows(p.q, b, h, i0, rows, s.q_buf, &ldq);
      const acc_t* dO = load_rows(t.dout, b, h, i0, rows, s.do_buf, &ldo);
      std::fill(s.dq, s.dq + rows * p.D, acc_t(0));
      const int64_t kv_end = p.kv_end(i0, rows);
      for (int64_t j0 = 0; j0 < kv_end; j0 += BN) {
        const int64_t cols = std::min(BN, kv_end - j0);
        const acc_t* K = load_rows(p.k, b, hk, j0, cols, s.k_buf, &ldk);
        const acc_t* V = load_rows(p.v, b, hk, j0, cols, s.v_buf, &ldv);
        recompute_pair(p, s.tiles, Q, ldq, dO, ldo, K, ldk, V, ldv, b, h, i0, rows, j0, cols, lse, delta);
        write_mask_grad(p, dmask, s.tiles.dS, kBwdBlockN, bh, i0, rows, j0, cols);
        mm_nn<acc_t>(p.gemm, rows, p.D, cols, static_cast<acc_t>(p.scale), s.tiles.dS, BN, K, ldk, acc_t(1),
                     s.dq, p.D);  // dQ += scale * dS K
      }
      store_rows(s.dq, rows, t.dq, b, h, i0);
    }
  });
}

constexpr int64_t kOnePairMax = 256;

// Items of a few queries against a few keys (TimeSformer's temporal attention: 8 frames, whose rows lie a token
// stride apart -- 9 KiB in ViT-B's qkv tensor -- so every row is a cache miss the hardware prefetchers do not
// foresee): the single-pass backward prefetches the next item's rows while computing this one (NOTES entry 33;
// the same in the forward gained nothing measurable).
inline bool short_items(const Problem& p) {
  return p.Lq <= 16 && p.Lk <= 16 && !env_is_zero("FASTATTN_CPU_PREFETCH");
}

// dQ = the stripes' partial dQs summed in the fixed order s = 0..S-1 (reproducible), to t.dq.
template <typename acc_t>
void sum_dq_partials(const Problem& p, const BackwardTensors& t, int64_t stripes, const acc_t* dq_partial) {
  const int64_t rows_total = p.B * p.Hq * p.Lq;
  at::parallel_for(0, rows_total, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(p.D);
    for (int64_t row = begin; row < end; ++row) {
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t st = 0; st < stripes; ++st) {  // fixed order
        const acc_t* part = dq_partial + (st * rows_total + row) * p.D;
        for (int64_t d = 0; d < p.D; ++d) sum[d] += part[d];
      }
      const int64_t i = row % p.Lq, bh = row / p.Lq;
      store_row(sum.data(), t.dq.dtype, t.dq.row(bh / p.Hq, bh % p.Hq, i), p.D);
    }
  });
}

// Single-pass backward: work items (batch, kv head, key stripe) walk each block pair of their keys once (5 block
// products instead of the two-pass 7), for the whole GQA group of query heads.  Stripe s of S owns the key blocks
// s, s + S, s + 2S, ... (interleaved, so causal masking costs every stripe about the same); its dK, dV rows are its
// own.  With one stripe, dQ is accumulated per query block and written directly; with S > 1 each stripe writes
// its partial dQ to dq_partial[s] and the stripes are summed afterwards in order s = 0..S-1.
template <typename acc_t>
void fused_backward_kernel(const Problem& p, const BackwardTensors& t, const acc_t* lse, const acc_t* delta,
                           acc_t* dmask, int64_t stripes, acc_t* dq_partial) {
  // Short non-causal sequences (ViT's 197 tokens, BERT's 128-512 at the short end) in one block pair per head: fewer,
  // larger BLAS products (ViT-B shapes, 2-core EPYC: 2-4 % faster; bench/NOTES.md entry 19).  Causal keeps the
  // 128 x 128 blocks, whose hidden pairs it skips.
  const bool one_pair = stripes == 1 && p.causal == kCausalNone && p.Lq <= kOnePairMax && p.Lk <= kOnePairMax;
  const int64_t BM = one_pair ? std::max<int64_t>(p.Lq, 1) : kBwdBlockM, BN = one_pair ? std::max<int64_t>(p.Lk, 1) : kBwdBlockN;
  const int64_t ld = one_pair ? (BN + 15) / 16 * 16 : kBwdBlockN;
  const int64_t n_kblocks = ceil_div(p.Lk, BN);
  // Keys-major pairs (attention_core.h): tiles [BN, ld_t] inside the [BM, ld] ones (ld_t = 16..64 <= BM = 128).
  const bool keys_major = std::is_same<acc_t, float>::value && !one_pair && keys_major_applies(p);
  const bool prefetch = stripes == 1 && short_items(p);
  const int64_t ld_t = (p.Lq + 15) / 16 * 16;
  // Row-major pairs on the register tiles: each item's K^T, V^T transposed once into per-thread slots (the
  // item's key blocks kb = stripe, stripe + S, ...: slot (kb - stripe) / S) and reused by all its query blocks.
  const bool key_slots = std::is_same<acc_t, float>::value && p.gemm == GemmPath::tiles && !keys_major &&
                         !one_pair && BN == kBwdBlockN && BackwardKeySlots::fits(p, ceil_div(n_kblocks, stripes)) &&
                         !env_is_zero("FASTATTN_CPU_BWD_KEY_SLOTS");
  at::parallel_for(0, p.B * p.Hkv * stripes, 1, [&](int64_t begin, int64_t end) {
    SerialBlasGuard serial_blas;
    BwdScratch<acc_t> s(p, p.Lk, BM, ld);  // dK, dV accumulators for every key of a head (a stripe uses its blocks)
    std::unique_ptr<acc_t[]> q_t, do_t;  // Q^T, dO^T of the query block (keys-major)
    if (keys_major) {
      q_t.reset(new acc_t[p.D * ld_t]);
      do_t.reset(new acc_t[p.Dv * ld_t]);
    }
    std::unique_ptr<BackwardKeySlots> slots;
    if (key_slots) slots.reset(new BackwardKeySlots(p, ceil_div(n_kblocks, stripes)));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bhk = item / stripes, stripe = item % stripes;
      const int64_t b = bhk / p.Hkv, hk = bhk % p.Hkv;
      if (prefetch && item + 1 < end) {  // the next item's rows (one stripe: short_items), while this one computes
        const int64_t nb = (bhk + 1) / p.Hkv, nhk = (bhk + 1) % p.Hkv;
        prefetch_rows(p.k, nb, nhk, 0, p.Lk);
        prefetch_rows(p.v, nb, nhk, 0, p.Lk);
        for (int64_t g = 0; g < p.group; ++g) {
          prefetch_rows(p.q, nb, nhk * p.group + g, 0, p.Lq);
          prefetch_rows(t.dout, nb, nhk * p.group + g, 0, p.Lq);
        }
      }
      for (int64_t kb = stripe; kb < n_kblocks; kb += stripes) {
        const int64_t j0 = kb * BN, cols = std::min(BN, p.Lk - j0);
        std::fill(s.dk + j0 * p.D, s.dk + (j0 + cols) * p.D, acc_t(0));
        std::fill(s.dv + j0 * p.Dv, s.dv + (j0 + cols) * p.Dv, acc_t(0));
        if constexpr (std::is_same<acc_t, float>::value) {
          if (slots) {
            int64_t ldk, ldv;
            const float* K = load_rows(p.k, b, hk, j0, cols, s.k_buf, &ldk);
            const float* V = load_rows(p.v, b, hk, j0, cols, s.v_buf, &ldv);
            slots->fill(p, (kb - stripe) / stripes, K, ldk, V, ldv, cols);
          }
        }
      }
      for (int64_t g = 0; g < p.group; ++g) {
        const int64_t h = hk * p.group + g, bh = b * p.Hq + h;
        for (int64_t i0 = 0; i0 < p.Lq; i0 += BM) {
          const int64_t rows = std::min(BM, p.Lq - i0);
          int64_t ldq, ldo, ldk, ldv;
          const acc_t* Q = load_rows(p.q, b, h, i0, rows, s.q_buf, &ldq);
          const acc_t* dO = load_rows(t.dout, b, h, i0, rows, s.do_buf, &ldo);
          std::fill(s.dq, s.dq + rows * p.D, acc_t(0));
          const int64_t kv_end = p.kv_end(i0, rows);
          if constexpr (std::is_same<acc_t, float>::value) {
            if (keys_major) {
              transpose_32bit(rows, p.D, Q, ldq, q_t.get(), ld_t);
              transpose_32bit(rows, p.Dv, dO, ldo, do_t.get(), ld_t);
              for (int64_t j0 = stripe * BN; j0 < kv_end; j0 += stripes * BN) {
                const int64_t cols = std::min(BN, kv_end - j0);
                const float* K = load_rows(p.k, b, hk, j0, cols, s.k_buf, &ldk);
                const float* V = load_rows(p.v, b, hk, j0, cols, s.v_buf, &ldv);
                recompute_pair_keys_major(p, s.tiles, ld_t, q_t.get(), do_t.get(), K, ldk, V, ldv, b, h, i0, rows,
                                          j0, cols, lse, delta);
                write_mask_grad_keys_major(p, dmask, s.tiles.dS, ld_t, bh, i0, rows, j0, cols);
                mm_nn<float>(p.gemm, cols, p.Dv, rows, 1.0f, s.tiles.P, ld_t, dO, ldo, 1.0f, s.dv + j0 * p.Dv,
                             p.Dv);  // dV += P^T dO
                mm_nn<float>(p.gemm, cols, p.D, rows, static_cast<float>(p.scale), s.tiles.dS, ld_t, Q, ldq, 1.0f,
                             s.dk + j0 * p.D, p.D);  // dK += scale * dS^T Q
                mm_tn<float>(p.gemm, rows, p.D, cols, static_cast<float>(p.scale), s.tiles.dS, ld_t, K, ldk, 1.0f,
                             s.dq, p.D);  // dQ += scale * (dS^T)^T K
              }
            }
          }
          for (int64_t j0 = stripe * BN; !keys_major && j0 < kv_end; j0 += stripes * BN) {
            const int64_t cols = std::min(BN, kv_end - j0);
            const acc_t* K = load_rows(p.k, b, hk, j0, cols, s.k_buf, &ldk);  // dQ's product reads K's rows
            TransposedBlock<acc_t> kv_t;
            if constexpr (std::is_same<acc_t, float>::value) {
              if (slots) kv_t = slots->block(p, (j0 / BN - stripe) / stripes);
            }
            // V's rows only where no slot holds V^T (bf16 inputs would be converted again for every pair)
            ldv = 0;
            const acc_t* V = kv_t.vt != nullptr ? nullptr : load_rows(p.v, b, hk, j0, cols, s.v_buf, &ldv);
            recompute_pair(p, s.tiles, Q, ldq, dO, ldo, K, ldk, V, ldv, b, h, i0, rows, j0, cols, lse, delta, kv_t);
            write_mask_grad(p, dmask, s.tiles.dS, ld, bh, i0, rows, j0, cols);
            mm_tn<acc_t>(p.gemm, cols, p.Dv, rows, acc_t(1), s.tiles.dropped(), ld, dO, ldo, acc_t(1),
                         s.dv + j0 * p.Dv, p.Dv);  // dV += Pd^T dO
            mm_tn<acc_t>(p.gemm, cols, p.D, rows, static_cast<acc_t>(p.scale), s.tiles.dS, ld, Q, ldq,
                         acc_t(1), s.dk + j0 * p.D, p.D);  // dK += scale * dS^T Q
            mm_nn<acc_t>(p.gemm, rows, p.D, cols, static_cast<acc_t>(p.scale), s.tiles.dS, ld, K, ldk,
                         acc_t(1), s.dq, p.D);  // dQ += scale * dS K
          }
          if (stripes == 1) {
            store_rows(s.dq, rows, t.dq, b, h, i0);
          } else {
            acc_t* part = dq_partial + ((stripe * p.B * p.Hq + bh) * p.Lq + i0) * p.D;
            std::copy(s.dq, s.dq + rows * p.D, part);
          }
        }
      }
      for (int64_t kb = stripe; kb < n_kblocks; kb += stripes) {
        const int64_t j0 = kb * BN, cols = std::min(BN, p.Lk - j0);
        store_rows(s.dk + j0 * p.D, cols, t.dk, b, hk, j0);
        store_rows(s.dv + j0 * p.Dv, cols, t.dv, b, hk, j0);
      }
    }
  });
  if (stripes > 1) sum_dq_partials(p, t, stripes, dq_partial);
}

// The backward's schedule, from the shape and the thread count T only (so results are bitwise reproducible run to
// run for a given thread count):
//   single pass with S key stripes, S = T / gcd(B * Hkv, T) (B * Hkv * S work items, a multiple of T), at most one
//     stripe per key block, when the partial dQ buffers (S * B * Hq * Lq * D) fit in kMaxPartialBytes;
//   else the single pass with one stripe if its B * Hkv items keep the threads busy enough
//     (ceil(B*Hkv / T) * 5 <= B*Hkv * 7 / T), else the two-pass schedule.
// FASTATTN_CPU_BACKWARD=single|striped|two_pass forces one (tests, benchmarks).
struct BackwardSchedule {
  bool two_pass = false;
  int64_t stripes = 1;
};

constexpr int64_t kMaxPartialBytes = int64_t(256) << 20;

BackwardSchedule choose_backward_schedule(const Problem& p, int64_t acc_bytes) {
  BackwardSchedule s;
  const int64_t heads = std::max<int64_t>(1, p.B * p.Hkv);
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t n_kblocks = std::max<int64_t>(1, ceil_div(p.Lk, kBwdBlockN));
  const int64_t striped = std::min(n_kblocks, threads / std::gcd(heads, threads));
  const bool striped_fits = striped * p.B * p.Hq * p.Lq * p.D * acc_bytes <= kMaxPartialBytes;
  const bool single_busy = ceil_div(heads, threads) * 5 * threads <= heads * 7;

  const char* env = std::getenv("FASTATTN_CPU_BACKWARD");
  const std::string forced = env != nullptr ? env : "";
  if (forced == "single") return s;
  if (forced == "striped") {
    s.stripes = std::min<int64_t>(n_kblocks, std::max<int64_t>(2, striped));
    return s;
  }
  if (forced == "two_pass") {
    s.two_pass = true;
    return s;
  }
  TORCH_CHECK(forced.empty() || forced == "auto",
              "FASTATTN_CPU_BACKWARD: expected auto, single, striped or two_pass, got ", forced);
  if (striped > 1 && striped_fits) {
    s.stripes = striped;
  } else if (!single_busy && striped > 1) {
    s.two_pass = true;
  }
  return s;
}

// ------------------------------------------------------------------------------------------------------------
// The ops: argument checks, allocation, dispatch on the accumulation type
// ------------------------------------------------------------------------------------------------------------
void check_head_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 4, name, ": expected a 4-D tensor [batch, heads, seq, head_dim], got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, name,
              ": dtype ", dt, " is not supported by the CPU kernels (float32, float64, bfloat16, float16)");
}

// Checks q, k, v, mask, seed, causal, dropout_p; fills the problem (the tensors it points to must outlive it:
// the caller keeps q, k, v and mask alive).
Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& seed, int64_t causal,
                     double scale, double dropout_p) {
  check_head_tensor(q, "q");
  check_head_tensor(k, "k");
  check_head_tensor(v, "v");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "k, v: dtypes must match q's (", q.scalar_type(), "), got k ", k.scalar_type(), ", v ",
              v.scalar_type());
  Problem p;
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Lq = q.size(2);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.Lk = k.size(2);
  p.Dv = v.size(3);
  TORCH_CHECK(k.size(0) == p.B && v.size(0) == p.B, "k, v: batch size must equal q's (", p.B, "), got k ",
              k.size(0), ", v ", v.size(0));
  TORCH_CHECK(v.size(1) == p.Hkv, "v: number of heads (", v.size(1), ") must equal k's (", p.Hkv, ")");
  TORCH_CHECK(p.Hkv > 0 && p.Hq % p.Hkv == 0, "k: number of key/value heads (", p.Hkv,
              ") must divide q's number of heads (", p.Hq, ")");
  TORCH_CHECK(v.size(2) == p.Lk, "v: sequence length (", v.size(2), ") must equal k's (", p.Lk, ")");
  TORCH_CHECK(k.size(3) == p.D, "k: head dim (", k.size(3), ") must equal q's (", p.D, ")");
  TORCH_CHECK(p.D > 0 && p.Dv > 0, "q, v: head dims must be at least 1, got ", p.D, " and ", p.Dv);
  TORCH_CHECK(causal == kCausalNone || causal == kCausalTopLeft || causal == kCausalBottomRight,
              "causal: expected 0 (none), 1 (top-left) or 2 (bottom-right), got ", causal);
  TORCH_CHECK(std::isfinite(scale), "scale: must be finite, got ", scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p: must be in [0, 1), got ", dropout_p);
  p.group = p.Hq / p.Hkv;
  p.q = head_tensor(q);
  p.k = head_tensor(k);
  p.v = head_tensor(v);
  p.causal = causal;
  p.causal_off = causal_offset(causal, p.Lq, p.Lk);
  p.scale = scale;

  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device().is_cpu(), "mask: expected a CPU tensor, got one on ", m.device());
    TORCH_CHECK(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()),
                "mask: expected bool (True = attend) or a floating dtype (added to the scores), got ",
                m.scalar_type());
    TORCH_CHECK(m.dim() == 4 && m.size(0) == p.B && m.size(1) == p.Hq && m.size(2) == p.Lq && m.size(3) == p.Lk,
                "mask: expected size [B, Hq, Lq, Lk] = [", p.B, ", ", p.Hq, ", ", p.Lq, ", ", p.Lk,
                "] (broadcast dimensions as stride-0 views: mask.expand(...)), got ", m.sizes());
    const auto mdt = m.scalar_type();
    TORCH_CHECK(mdt == at::kBool || mdt == at::kFloat || mdt == at::kDouble || mdt == at::kBFloat16 ||
                    mdt == at::kHalf,
                "mask: unsupported dtype ", mdt);
    p.mask_kind = mdt == at::kBool ? kMaskBool : kMaskFloat;
    p.mask = static_cast<const char*>(m.data_ptr());
    p.mask_dtype = mdt;
    p.mask_elem = static_cast<int64_t>(m.element_size());
    p.msb = m.stride(0);
    p.msh = m.stride(1);
    p.msm = m.stride(2);
    p.msn = m.stride(3);
  }

  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value(), "seed: required when dropout_p > 0 (an int64 tensor of one element)");
    const at::Tensor& s = *seed;
    TORCH_CHECK(s.device().is_cpu(), "seed: expected a CPU tensor, got one on ", s.device());
    TORCH_CHECK(s.scalar_type() == at::kLong && s.numel() == 1,
                "seed: expected an int64 tensor of one element, got ", s.scalar_type(), " with ", s.numel(),
                " elements");
    p.dropout = true;
    p.seed = static_cast<uint64_t>(s.item<int64_t>());
    p.threshold = dropout_threshold(dropout_p);
    p.drop_scale = 1.0 / (1.0 - dropout_p);
  }
  p.gemm = gemm_path();
  p.amx_bf16 = amx_bf16_applies(q.scalar_type(), p.gemm);
  return p;
}

// Decoding with GQA (NOTES entry 39): one query per head, so each work item would stream its kv head's keys and
// values for a single row, once per query head of the group.  Instead the group's query heads become the rows of
// one query block: q [B, Hq, 1, D] is read as [B, Hkv, group, D] (query head hk * group + g is row g of kv head hk,
// so the head stride becomes the row stride), and the output and the mask alike; the LSE [B, Hq, 1] is already
// laid out as [B, Hkv, group].  Only where every row would see the same keys (no causal limit, or bottom-right
// with one query: every key) and there is no dropout (its keep-mask is drawn per (head, row)); float32 and bf16/fp16
// inputs (float32 statistics).  Returns whether it rewrote *p and *out.
bool pack_query_heads(Problem* p, HeadTensor* out) {
  if (p->Lq != 1 || p->group == 1 || p->dropout || p->causal == kCausalTopLeft || p->q.dtype == at::kDouble ||
      env_is_zero("FASTATTN_CPU_PACK_GQA")) {
    return false;
  }
  const int64_t group = p->group;
  p->Lq = group;
  p->Hq = p->Hkv;
  p->group = 1;
  p->q.sl = p->q.sh;
  p->q.sh *= group;
  out->sl = out->sh;
  out->sh *= group;
  p->msm = p->msh;
  p->msh *= group;
  p->causal = kCausalNone;  // bottom-right with one query hides no key
  p->causal_off = 0;
  return true;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, const std::optional<at::Tensor>& mask,
                                                     const std::optional<at::Tensor>& seed, int64_t causal,
                                                     double scale, double dropout_p) {
  check_head_tensor(q_in, "q");
  check_head_tensor(k_in, "k");
  check_head_tensor(v_in, "v");
  const at::Tensor q = with_contiguous_rows(q_in), k = with_contiguous_rows(k_in), v = with_contiguous_rows(v_in);
  const Problem p = make_problem(q, k, v, mask, seed, causal, scale, dropout_p);

  at::Tensor out = empty_like_layout(q_in, p.Dv, q.scalar_type());
  at::Tensor lse = at::empty({p.B, p.Hq, p.Lq}, q.options().dtype(stats_dtype(q.scalar_type())));
  maybe_poison(out);
  maybe_poison(lse);
  if (out.numel() == 0) return {out, lse};
  HeadTensor o = head_tensor(out);
  Problem packed = p;
  if (pack_query_heads(&packed, &o)) {
    forward_kernel<float>(packed, o, lse.data_ptr<float>());
  } else if (lse.scalar_type() == at::kDouble) {
    forward_kernel<double>(p, o, lse.data_ptr<double>());
  } else {
    forward_kernel<float>(p, o, lse.data_ptr<float>());
  }
  return {out, lse};
}

// Whether the bf16 backward runs on AMX (amx_backward.h): bf16 inputs on an AMX CPU, no dropout, and enough query
// rows per kv head to pay for packing every key block (K, V, K^T) once per work item -- measured on the Intel VM
// (NOTES entry 42): with 4,096 keys it loses to the float32 backward (whose 16-64-query pairs are keys-major) at
// 8 queries with d 64 (1.12x the time) and at 64 with d 261 (1.20x), and wins from 32 queries with d 64 (0.88x)
// and from 128 with d 261 (0.87x).  FASTATTN_CPU_AMX_BWD=1 forces it wherever it can run (tests), 0 turns it off.
bool amx_backward_applies(const Problem& p) {
  if (!p.amx_bf16 || p.dropout) return false;
  const char* env = std::getenv("FASTATTN_CPU_AMX_BWD");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  if (env != nullptr && std::strcmp(env, "1") == 0) return true;
  return p.group * p.Lq >= std::min<int64_t>(128, p.D / 2);
}

// The backward into given dq, dk, dv (attention_bwd allocates them; attention_bwd_into takes the caller's, e.g.
// the slices of one gradient buffer of a packed qkv tensor).  Returns dmask.
at::Tensor attention_bwd_impl(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                              const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& seed,
                              const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& dout_in,
                              const std::optional<at::Tensor>& dlse_in, int64_t causal, double scale,
                              double dropout_p, bool mask_needs_grad, at::Tensor& dq, at::Tensor& dk,
                              at::Tensor& dv) {
  check_head_tensor(q_in, "q");
  check_head_tensor(k_in, "k");
  check_head_tensor(v_in, "v");
  check_head_tensor(out_in, "out");
  check_head_tensor(dout_in, "dout");
  const at::Tensor q = with_contiguous_rows(q_in), k = with_contiguous_rows(k_in), v = with_contiguous_rows(v_in);
  const Problem p = make_problem(q, k, v, mask, seed, causal, scale, dropout_p);
  const auto stats = stats_dtype(q.scalar_type());

  for (const auto& [t, name] : {std::make_pair(&out_in, "out"), std::make_pair(&dout_in, "dout")}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef({p.B, p.Hq, p.Lq, p.Dv}), name, ": expected size [", p.B, ", ",
                p.Hq, ", ", p.Lq, ", ", p.Dv, "], got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), name, ": dtype must match q's (", q.scalar_type(), "), got ",
                t->scalar_type());
  }
  TORCH_CHECK(lse_in.device().is_cpu() && lse_in.sizes() == at::IntArrayRef({p.B, p.Hq, p.Lq}) &&
                  lse_in.scalar_type() == stats,
              "lse: expected a CPU ", stats, " tensor of size [", p.B, ", ", p.Hq, ", ", p.Lq, "], got ",
              lse_in.scalar_type(), " ", lse_in.sizes(), " on ", lse_in.device());
  TORCH_CHECK(!mask_needs_grad || p.mask_kind == kMaskFloat,
              "mask_needs_grad: only a floating-point mask has a gradient");
  const at::Tensor out = with_contiguous_rows(out_in), dout = with_contiguous_rows(dout_in);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor dlse;
  if (dlse_in.has_value()) {
    TORCH_CHECK(dlse_in->device().is_cpu() && dlse_in->sizes() == at::IntArrayRef({p.B, p.Hq, p.Lq}),
                "dlse: expected a CPU tensor of size [", p.B, ", ", p.Hq, ", ", p.Lq, "], got ", dlse_in->sizes(),
                " on ", dlse_in->device());
    dlse = dlse_in->to(stats).contiguous();
  }

  for (const auto& [t, name, ref] : {std::make_tuple(&dq, "dq", &q), std::make_tuple(&dk, "dk", &k),
                                     std::make_tuple(&dv, "dv", &v)}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == q.scalar_type() && t->sizes() == ref->sizes(), name,
                ": expected a CPU ", q.scalar_type(), " tensor of size ", ref->sizes(), ", got ", t->scalar_type(),
                " ", t->sizes(), " on ", t->device());
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, name, ": its last dimension must be contiguous, got strides ",
                t->strides());
  }
  maybe_poison(dq);
  maybe_poison(dk);
  maybe_poison(dv);
  // Key blocks a query block never sees (causal) are not visited: their mask gradient stays 0.
  at::Tensor dmask = mask_needs_grad ? at::zeros({p.B, p.Hq, p.Lq, p.Lk}, q.options().dtype(stats))
                                     : at::empty({0}, q.options().dtype(stats));
  at::Tensor delta = at::empty({p.B, p.Hq, p.Lq}, q.options().dtype(stats));

  BackwardTensors t;
  t.out = head_tensor(out);
  t.dout = head_tensor(dout);
  t.dq = head_tensor(dq);
  t.dk = head_tensor(dk);
  t.dv = head_tensor(dv);

  auto run = [&](auto zero) {
    using acc_t = decltype(zero);
    const acc_t* dlse_ptr = dlse.defined() ? dlse.data_ptr<acc_t>() : nullptr;
    acc_t* delta_ptr = delta.data_ptr<acc_t>();
    const acc_t* lse_ptr = lse.data_ptr<acc_t>();
    acc_t* dmask_ptr = mask_needs_grad ? dmask.data_ptr<acc_t>() : nullptr;
    if (p.B * p.Hq * p.Lq > 0) delta_kernel<acc_t>(p, t, dlse_ptr, delta_ptr);
    const BackwardSchedule schedule = choose_backward_schedule(p, sizeof(acc_t));
    if constexpr (std::is_same<acc_t, float>::value) {
      // bf16 on AMX (amx_backward.h): the single pass only (with one stripe where the schedule says two passes).
      if (amx_backward_applies(p)) {
        const int64_t stripes = schedule.two_pass ? 1 : schedule.stripes;
        at::Tensor dq_partial;
        if (stripes > 1) dq_partial = at::empty({stripes * p.B * p.Hq * p.Lq * p.D}, lse.options());
        float* partial = stripes > 1 ? dq_partial.data_ptr<float>() : nullptr;
        amx_backward_kernel(p, t, lse_ptr, delta_ptr, dmask_ptr, stripes, partial);
        if (stripes > 1) sum_dq_partials(p, t, stripes, static_cast<const float*>(partial));
        return;
      }
    }
    if (schedule.two_pass) {
      if (p.B * p.Hkv * p.Lk > 0) dkdv_kernel<acc_t>(p, t, lse_ptr, delta_ptr);
      if (p.B * p.Hq * p.Lq > 0) dq_kernel<acc_t>(p, t, lse_ptr, delta_ptr, dmask_ptr);
    } else {
      at::Tensor dq_partial;
      if (schedule.stripes > 1) {
        dq_partial = at::empty({schedule.stripes * p.B * p.Hq * p.Lq * p.D}, lse.options());
      }
      fused_backward_kernel<acc_t>(p, t, lse_ptr, delta_ptr, dmask_ptr, schedule.stripes,
                                   schedule.stripes > 1 ? dq_partial.data_ptr<acc_t>() : nullptr);
    }
  };
  if (stats == at::kDouble) {
    run(0.0);
  } else {
    run(0.0f);
  }
  return dmask;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& seed, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dout,
    const std::optional<at::Tensor>& dlse, int64_t causal, double scale, double dropout_p, bool mask_needs_grad) {
  check_head_tensor(q, "q");
  check_head_tensor(k, "k");
  check_head_tensor(v, "v");
  at::Tensor dq = empty_like_layout(q, q.size(3), q.scalar_type());
  at::Tensor dk = empty_like_layout(k, k.size(3), q.scalar_type());
  at::Tensor dv = empty_like_layout(v, v.size(3), q.scalar_type());
  at::Tensor dmask = attention_bwd_impl(q, k, v, mask, seed, out, lse, dout, dlse, causal, scale, dropout_p,
                                        mask_needs_grad, dq, dk, dv);
  return {dq, dk, dv, dmask};
}

at::Tensor attention_bwd_into_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& seed,
                                  const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dout,
                                  const std::optional<at::Tensor>& dlse, int64_t causal, double scale,
                                  double dropout_p, bool mask_needs_grad, at::Tensor dq, at::Tensor dk,
                                  at::Tensor dv) {
  return attention_bwd_impl(q, k, v, mask, seed, out, lse, dout, dlse, causal, scale, dropout_p, mask_needs_grad,
                            dq, dk, dv);
}

}  // namespace
}  // namespace fastattn::cpu

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("attention_fwd", &fastattn::cpu::attention_fwd_cpu);
  m.impl("attention_bwd", &fastattn::cpu::attention_bwd_cpu);
  m.impl("attention_bwd_into", &fastattn::cpu::attention_bwd_into_cpu);
}
