// The building blocks of the CPU attention kernels, shared by the dense ops (attention_cpu.cpp) and TimeSformer's
// spatial op (spacetime_cpu.cpp): the problem as the kernels see it, the score modifications, the forward's
// online-softmax tile and the backward's block-pair recomputation.  The algorithm is described at the top of
// attention_cpu.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "../philox.h"
#include "amx.h"
#include "blas.h"
#include "kernel_common.h"
#include "row_kernels.h"
#include "small_gemm.h"

namespace fastattn::cpu {

// Block sizes (tuned on a 2-core AMD EPYC with MKL, D = 64, L = 1k-8k).  The forward's [128, 512] float32 score
// tile (256 KiB) stays in L2 while the two products and the softmax pass over it; larger query blocks make the
// BLAS calls more efficient (each K and V block is reused by more rows).  The backward holds three [128, 128]
// tiles (P, dropout(P), dS).
constexpr int64_t kFwdBlockM = 128;
constexpr int64_t kFwdBlockN = 512;
constexpr int64_t kBwdBlockM = 128;
constexpr int64_t kBwdBlockN = 128;

// Whether bf16 inputs run their block products on AMX tiles (amx.h): bf16, a CPU with AMX-BF16 (and not switched
// off), and not the plain-loops GEMM path (tests' reference path).  The dense ops and the spatial op ask the same.
inline bool amx_bf16_applies(at::ScalarType dtype, GemmPath gemm) {
  return dtype == at::kBFloat16 && gemm != GemmPath::loops && amx_bf16_enabled();
}

// Whether the environment variable `name` is "0" (A/B switches, read when a tile is built: per thread and call).
inline bool env_is_zero(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::strcmp(value, "0") == 0;
}

// Work item t of n -> block index, alternating from both ends (0, n-1, 1, n-2, ...).  Under causal masking the
// cost of a block grows with its index; at::parallel_for hands each thread a contiguous range of work items, so
// this interleaving gives every thread a similar mix of cheap and expensive blocks.
inline int64_t zigzag(int64_t t, int64_t n) { return (t % 2 == 0) ? t / 2 : n - 1 - t / 2; }


// ------------------------------------------------------------------------------------------------------------
// The problem as the kernels see it
// ------------------------------------------------------------------------------------------------------------
enum MaskKind { kMaskNone = 0, kMaskBool = 1, kMaskFloat = 2 };

struct Problem {
  int64_t B = 0, Hq = 0, Hkv = 0, group = 1, Lq = 0, Lk = 0, D = 0, Dv = 0;
  HeadTensor q, k, v;
  // mask [B, Hq, Lq, Lk] through its strides (in elements)
  MaskKind mask_kind = kMaskNone;
  const char* mask = nullptr;
  at::ScalarType mask_dtype = at::kFloat;
  int64_t mask_elem = 0, msb = 0, msh = 0, msm = 0, msn = 0;
  int64_t causal = kCausalNone;
  int64_t causal_off = 0;  // query i sees key j iff j <= i + causal_off
  double scale = 1.0;
  bool dropout = false;
  uint64_t seed = 0;
  uint32_t threshold = 0;
  double drop_scale = 1.0;
  GemmPath gemm = GemmPath::blas;
  bool amx_bf16 = false;  // bf16 inputs, products on AMX (the dense forward: amx_forward.h; backward: amx_backward.h)

  // Keys [0, kv_end) can be visible to the queries [i0, i0 + rows).
  int64_t kv_end(int64_t i0, int64_t rows) const {
    if (causal == kCausalNone) return Lk;
    return std::min(Lk, std::max<int64_t>(0, i0 + rows + causal_off));
  }
  // First query that can see a key of [j0, ...).
  int64_t q_begin(int64_t j0) const {
    if (causal == kCausalNone) return 0;
    return std::min(Lq, std::max<int64_t>(0, j0 - causal_off));
  }
};

template <typename acc_t, typename mask_t>
void apply_mask_tile(acc_t* S, int64_t lds, int64_t rows, int64_t cols, const char* base, int64_t s_row,
                     int64_t s_col) {
  const auto* m0 = reinterpret_cast<const mask_t*>(base);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    const mask_t* m = m0 + r * s_row;
    acc_t* s = S + r * lds;
    if constexpr (std::is_same<mask_t, bool>::value) {
      if (s_col == 1) {
        for (int64_t c = 0; c < cols; ++c) s[c] = m[c] ? s[c] : kNegInf;
      } else {
        for (int64_t c = 0; c < cols; ++c) s[c] = m[c * s_col] ? s[c] : kNegInf;
      }
    } else {
      if (s_col == 1) {
        for (int64_t c = 0; c < cols; ++c) s[c] += static_cast<acc_t>(static_cast<float>(m[c]));
      } else {
        for (int64_t c = 0; c < cols; ++c) s[c] += static_cast<acc_t>(static_cast<float>(m[c * s_col]));
      }
    }
  }
}

template <typename acc_t>
void apply_mask_tile_f64(acc_t* S, int64_t lds, int64_t rows, int64_t cols, const char* base, int64_t s_row,
                         int64_t s_col) {  // float64 masks keep their precision
  const auto* m0 = reinterpret_cast<const double*>(base);
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* s = S + r * lds;
    for (int64_t c = 0; c < cols; ++c) s[c] += static_cast<acc_t>(m0[r * s_row + c * s_col]);
  }
}

// The score modifications of the tile S[rows, cols] at queries i0.., keys j0.. of head (b, h):
// the mask (bool: -inf where False; float: added) and causal masking (-inf where j > i + causal_off).
// keys_major: the tile is S^T (ForwardTile::step_keys_major), S^T[c * lds + r] the score of query i0 + r and key
// j0 + c -- the mask is read with its query and key strides swapped.
template <typename acc_t>
void modify_scores(const Problem& p, acc_t* S, int64_t lds, int64_t b, int64_t h, int64_t i0, int64_t rows,
                   int64_t j0, int64_t cols, bool keys_major = false) {
  if (p.mask_kind != kMaskNone) {
    const char* base = p.mask + (b * p.msb + h * p.msh + i0 * p.msm + j0 * p.msn) * p.mask_elem;
    // the tile's own rows and columns, and the mask's strides along them
    const int64_t t_rows = keys_major ? cols : rows, t_cols = keys_major ? rows : cols;
    const int64_t s_row = keys_major ? p.msn : p.msm, s_col = keys_major ? p.msm : p.msn;
    switch (p.mask_dtype) {
      case at::kBool: apply_mask_tile<acc_t, bool>(S, lds, t_rows, t_cols, base, s_row, s_col); break;
      case at::kFloat: apply_mask_tile<acc_t, float>(S, lds, t_rows, t_cols, base, s_row, s_col); break;
      case at::kDouble: apply_mask_tile_f64<acc_t>(S, lds, t_rows, t_cols, base, s_row, s_col); break;
      case at::kBFloat16: apply_mask_tile<acc_t, c10::BFloat16>(S, lds, t_rows, t_cols, base, s_row, s_col); break;
      case at::kHalf: apply_mask_tile<acc_t, c10::Half>(S, lds, t_rows, t_cols, base, s_row, s_col); break;
      default: TORCH_CHECK(false, "mask: unsupported dtype ", p.mask_dtype);
    }
  }
  if (p.causal != kCausalNone) {
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
    if (keys_major) {
      for (int64_t c = 0; c < cols; ++c) {
        // key j0 + c is visible to the queries i0 + r with r >= j0 + c - causal_off - i0
        const int64_t hidden = std::min(rows, std::max<int64_t>(0, j0 + c - p.causal_off - i0));
        acc_t* s = S + c * lds;
        for (int64_t r = 0; r < hidden; ++r) s[r] = kNegInf;
      }
      return;
    }
    for (int64_t r = 0; r < rows; ++r) {
      // keys j0 + c with c < visible are allowed for query i0 + r
      const int64_t visible = std::max<int64_t>(0, i0 + r + p.causal_off + 1 - j0);
      acc_t* s = S + r * lds;
      for (int64_t c = visible; c < cols; ++c) s[c] = kNegInf;
    }
  }
}

template <typename acc_t>
void apply_dropout(const Problem& p, acc_t* row, int64_t n, int64_t bh, int64_t i, int64_t j0) {
  dropout_row(row, n, p.seed, static_cast<uint32_t>(bh), static_cast<uint32_t>(i), static_cast<uint32_t>(j0),
              p.threshold, static_cast<acc_t>(p.drop_scale));
}

// ------------------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------------------
// Key splits of the forward (flash-decoding on the CPU): when (batch, head, query block) work items are fewer
// than the threads -- few queries against many keys: Perceiver's latents, decoding -- each item's keys are cut
// into splits that run in parallel; each split leaves its unnormalised rows (acc, m, l), and a merge pass
// combines them in split order (deterministic).  1 = no split.
inline int64_t forward_key_splits(const Problem& p, int64_t items) {
  const int64_t threads = at::get_num_threads();
  const int64_t key_blocks = ceil_div(p.Lk, kFwdBlockN);
  if (items >= threads || key_blocks < 2) return 1;
  return std::min(key_blocks, ceil_div(2 * threads, items));  // about two splits per thread
}

// One row's online-softmax step, given its new maximum m_new and the sum of exp(s - m_new) over the block:
// l = alpha l + row_sum, m = m_new and the accumulated output row scaled by alpha = exp(m_old - m_new).  Returns
// false, changing nothing, for a row with no visible key so far (m_new = -inf and sum 0); m_new = -inf with a NaN
// sum -- NaN scores only -- goes on: l becomes NaN, and with it the row's output and LSE.
// acc_fresh: the row holds nothing yet (the block's P V will overwrite it).
template <typename acc_t>
inline bool rescale_row(const Problem& p, acc_t m_new, acc_t row_sum, bool acc_fresh, acc_t* m, acc_t* l,
                        acc_t* acc_row) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  if (m_new == kNegInf && row_sum == acc_t(0)) return false;
  // alpha rescales what was accumulated against the old maximum (0 when nothing was).
  const acc_t alpha = *m == kNegInf ? acc_t(0) : std::exp(*m - m_new);
  *l = *l * alpha + row_sum;  // the normaliser sees P before dropout
  *m = m_new;
  if (!acc_fresh && alpha != acc_t(1)) {
    for (int64_t d = 0; d < p.Dv; ++d) acc_row[d] *= alpha;
  }
  return true;
}

// The online-softmax update of the query rows [i0, i0 + rows) for one block of scores S (keys j0 .. j0 + cols):
// m, l and the rows of acc (leading dimension acc_ld, Dv columns used) are rescaled and S becomes
// P = exp(S - m_new), then dropout(P), ready for acc += P V.
// acc_fresh: acc holds nothing yet (the first key block; the caller's acc += P V then overwrites it): no rescale.
template <typename acc_t>
void online_softmax_update(const Problem& p, acc_t* S, int64_t lds, int64_t rows, int64_t cols, bool acc_fresh,
                           acc_t* m, acc_t* l, acc_t* acc, int64_t acc_ld, int64_t bh, int64_t i0, int64_t j0) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* s = S + r * lds;
    acc_t m_new = m[r];
    // m_new = max(m, this row's scores); s = exp(s - m_new) -- zeros if no key was visible so far
    const acc_t row_sum = max_exp_sum(s, cols, &m_new, /*normalize=*/false);
    if (!rescale_row(p, m_new, row_sum, acc_fresh, &m[r], &l[r], acc + r * acc_ld)) continue;
    if (p.dropout) apply_dropout(p, s, cols, bh, i0 + r, j0);
  }
}

// Keys-major blocks (ForwardTile::step_keys_major, recompute_pair_keys_major): for heads of 16..64 queries, one
// query head per kv head, no dropout (its keep-mask is generated along S's rows), float32 on the register tiles
// (on BLAS they did not help: MKL packs both operands either way), more than 16 keys (fewer take small_gemm's dot
// products), FASTATTN_CPU_KEYS_MAJOR not "0" (A/B runs, tests).  Fewer queries leave most of S^T's 16-query
// vectors empty; more amortise the key transposes well enough that the row-major blocks are as fast (entry 31).
constexpr int64_t kKeysMajorMinRows = 16;
inline bool keys_major_applies(const Problem& p) {
  return p.gemm == GemmPath::tiles && !p.dropout && p.group == 1 && p.Lk > 16 && p.Lq >= kKeysMajorMinRows &&
         p.Lq <= kMaxColumnRows && !env_is_zero("FASTATTN_CPU_KEYS_MAJOR");
}

// The per-thread buffers of the forward and the online-softmax loop over the keys [j_begin, j_end) of the query
// rows [i0, i0 + rows) of head (b, h): on return acc holds the unnormalised output rows, m the row maxima and
// l the row sums of exp(S - m).
template <typename acc_t>
struct ForwardTile {
  Scratch<acc_t> scratch;
  acc_t *S, *acc, *m, *l, *q_buf, *k_buf, *v_buf;
  int64_t acc_ld;  // acc's leading dimension (p.Dv)

  // float32 on the register tiles: each key block is transposed once per thread into a slot ([D, kKeyTLd]) and
  // kept while the thread's next query blocks (of the same head: at::parallel_for hands out contiguous items)
  // reuse it -- mm_nt would transpose it again for every query block (NOTES entry 24).  A slot is tagged with
  // the address of its block's first key row, which names the block within one op call (p.k's rows do not move
  // during a call; a caller that reuses one key buffer for other keys passes its own K^T: use_transposed_keys).
  // Above kMaxKeySlotBytes a single slot is repacked per block.
  static constexpr int64_t kKeyTLd = kFwdBlockN + 16;  // not a multiple of 1 KiB (cache sets)
  static constexpr int64_t kMaxKeySlotBytes = int64_t(32) << 20;
  bool transpose_keys = false;
  std::unique_ptr<acc_t[]> key_slots;  // uninitialised: a transpose writes every column a product reads
  std::vector<const char*> key_slot_tag;  // empty until first used
  const acc_t* caller_kt = nullptr;        // use_transposed_keys
  int64_t caller_kt_ld = 0;
  // Keys-major blocks (float32 on the tiles): where a key block feeds one query block only -- a head's queries fit
  // one block, Perceiver's latents against its inputs -- its transpose is not reused, so the scores are computed
  // transposed instead, S^T = K Q^T with K read in place and Q^T transposed once per run(); the online softmax
  // runs down S^T's columns and acc += P V reads P^T as a transposed operand (NOTES entry 31; keys_major_applies).
  bool keys_major = false;
  // Query blocks of at most kDotKeysMaxRows rows take their scores as dot products (run()).
  static constexpr int64_t kDotKeysMaxRows = 8;
  bool dot_keys_enabled = true;
  std::unique_ptr<acc_t[]> q_t;  // Q^T of run()'s query rows, [D, q_t_ld]
  int64_t q_t_ld = 0;

  // The query rows of the forward's work items (AmxForwardTile has its own).
  static int64_t query_block(const Problem&) { return kFwdBlockM; }

  // block_m: the most query rows one run() takes.
  explicit ForwardTile(const Problem& p, int64_t block_m = kFwdBlockM)
      : scratch(Scratch<acc_t>::rounded(block_m * kFwdBlockN) + Scratch<acc_t>::rounded(block_m * p.Dv) +
                2 * Scratch<acc_t>::rounded(block_m) + Scratch<acc_t>::rounded(block_m * p.D) +
                Scratch<acc_t>::rounded(kFwdBlockN * p.D) + Scratch<acc_t>::rounded(kFwdBlockN * p.Dv)) {
    S = scratch.take(block_m * kFwdBlockN);  // scores, then probabilities, of one block pair
    acc = scratch.take(block_m * p.Dv);      // unnormalised output rows
    m = scratch.take(block_m);               // running row max
    l = scratch.take(block_m);               // running row sum of exp(S - m)
    q_buf = scratch.take(block_m * p.D);     // conversion buffers (bf16/fp16 inputs)
    k_buf = scratch.take(kFwdBlockN * p.D);
    v_buf = scratch.take(kFwdBlockN * p.Dv);
    acc_ld = p.Dv;
    if constexpr (std::is_same<acc_t, float>::value) {
      // (at most 16 keys: mm_nt's dot-product kernel reads the keys in place, small_gemm.cpp)
      transpose_keys = p.gemm == GemmPath::tiles && p.Lk > 16;
      keys_major = keys_major_applies(p) && p.Lq <= block_m;
      dot_keys_enabled = !env_is_zero("FASTATTN_CPU_DOT_KEYS");  // =0: transposed keys (A/B runs, tests)
      if (keys_major) {
        q_t_ld = (p.Lq + 15) / 16 * 16;
        q_t.reset(new acc_t[p.D * q_t_ld]);
      }
    }
  }

  // Keys the caller has transposed already: K^T of all p.Lk keys, [p.D, ld] (kt[d * ld + j] = key j's element d);
  // run() reads its key blocks there instead of transposing p.k into the slots.  Only where transpose_keys.
  void use_transposed_keys(const acc_t* kt, int64_t ld) {
    TORCH_INTERNAL_ASSERT(transpose_keys);
    caller_kt = kt;
    caller_kt_ld = ld;
  }

  void run(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j_begin, int64_t j_end) {
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
    const int64_t hk = h / p.group;
    int64_t ldq, ldk, ldv;
    const acc_t* Q = load_rows(p.q, b, h, i0, rows, q_buf, &ldq);
    std::fill(m, m + rows, kNegInf);
    std::fill(l, l + rows, acc_t(0));
    if (j_end <= j_begin) std::fill(acc, acc + rows * p.Dv, acc_t(0));  // else the first block's P V writes it
    if constexpr (std::is_same<acc_t, float>::value) {
      if (keys_major && caller_kt == nullptr) {
        transpose_32bit(rows, p.D, Q, ldq, q_t.get(), q_t_ld);
        for (int64_t j0 = j_begin; j0 < j_end; j0 += kFwdBlockN) {
          const int64_t cols = std::min(kFwdBlockN, j_end - j0);
          const acc_t* K = load_rows(p.k, b, hk, j0, cols, k_buf, &ldk);
          const acc_t* V = load_rows(p.v, b, hk, j0, cols, v_buf, &ldv);
          step_keys_major(p, K, ldk, V, ldv, b, h, i0, rows, j0, cols, /*acc_fresh=*/j0 == j_begin);
        }
        return;
      }
    }
    // A few query rows (decoding: one per head): the scores as dot products of each row with the keys read in
    // place, 16 keys per call (small_gemm's short_nt) -- a transposed key block would serve these rows only.
    const bool dot_keys = transpose_keys && caller_kt == nullptr && rows <= kDotKeysMaxRows && dot_keys_enabled;
    for (int64_t j0 = j_begin; j0 < j_end; j0 += kFwdBlockN) {
      const int64_t cols = std::min(kFwdBlockN, j_end - j0);
      const acc_t* K;
      if (caller_kt != nullptr) {
        K = caller_kt + j0;
        ldk = caller_kt_ld;
      } else if (transpose_keys && !dot_keys) {
        K = transposed_keys(p, b, hk, j0);
        ldk = kKeyTLd;
      } else {
        K = load_rows(p.k, b, hk, j0, cols, k_buf, &ldk);
      }
      const acc_t* V = load_rows(p.v, b, hk, j0, cols, v_buf, &ldv);
      step(p, Q, ldq, K, ldk, transpose_keys && !dot_keys, V, ldv, b, h, i0, rows, j0, cols,
           /*acc_fresh=*/j0 == j_begin);
    }
  }

 private:
  // The keys-major step of one key block [j0, j0 + cols) for the query rows of q_t: S^T = scale K Q^T ([cols,
  // q_t_ld] in S), the online softmax down its columns (per query r: m, l and acc's row r, as
  // online_softmax_update), then acc (+)= P V = (P^T)^T V.
  void step_keys_major(const Problem& p, const acc_t* K, int64_t ldk, const acc_t* V, int64_t ldv, int64_t b,
                       int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols, bool acc_fresh) {
    mm_nn<acc_t>(p.gemm, cols, rows, p.D, static_cast<acc_t>(p.scale), K, ldk, q_t.get(), q_t_ld, acc_t(0), S,
                 q_t_ld);
    modify_scores(p, S, q_t_ld, b, h, i0, rows, j0, cols, /*keys_major=*/true);
    acc_t m_new[kMaxColumnRows], sums[kMaxColumnRows];
    column_max_exp_sum(S, q_t_ld, cols, rows, m, m_new, sums);
    for (int64_t r = 0; r < rows; ++r) rescale_row(p, m_new[r], sums[r], acc_fresh, &m[r], &l[r], acc + r * acc_ld);
    mm_tn<acc_t>(p.gemm, rows, p.Dv, cols, acc_t(1), S, q_t_ld, V, ldv, acc_fresh ? acc_t(0) : acc_t(1), acc, acc_ld);
  }

  // K^T of the key block starting at j0 of (b, hk) in its slot, transposed now unless the slot holds it already.
  // The slot always holds the whole block (keys j0 .. min(j0 + kFwdBlockN, Lk)): a causal query block may use
  // fewer of its keys than the next one.
  const acc_t* transposed_keys(const Problem& p, int64_t b, int64_t hk, int64_t j0) {
    if (key_slot_tag.empty()) {  // first use: the slots, one per key block unless that is too much
      const int64_t slot_floats = p.D * kKeyTLd, blocks = ceil_div(p.Lk, kFwdBlockN);
      const int64_t n = blocks * slot_floats * int64_t(sizeof(acc_t)) <= kMaxKeySlotBytes ? blocks : 1;
      key_slots.reset(new acc_t[n * slot_floats]);
      key_slot_tag.assign(n, nullptr);
    }
    const int64_t slots = static_cast<int64_t>(key_slot_tag.size());
    const int64_t slot = slots == 1 ? 0 : j0 / kFwdBlockN;
    acc_t* dst = key_slots.get() + slot * p.D * kKeyTLd;
    const char* tag = p.k.row(b, hk, j0);
    if (key_slot_tag[slot] == tag) return dst;
    const int64_t cols = std::min(kFwdBlockN, p.Lk - j0);
    int64_t ldk;
    const acc_t* K = load_rows(p.k, b, hk, j0, cols, k_buf, &ldk);
    transpose_32bit(cols, p.D, K, ldk, dst, kKeyTLd);
    key_slot_tag[slot] = tag;
    return dst;
  }

  // One block of keys [j0, j0 + cols) for the query rows [i0, i0 + rows).  k_transposed: K holds K^T ([D, ldk]).
  // acc_fresh: the first block of run(), whose P V is written to acc instead of added.
  void step(const Problem& p, const acc_t* Q, int64_t ldq, const acc_t* K, int64_t ldk, bool k_transposed,
            const acc_t* V, int64_t ldv, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
            bool acc_fresh) {
    // S's leading dimension: the block's columns rounded up to 16 (a short key range keeps S compact).
    const int64_t BN = std::min(kFwdBlockN, (cols + 15) / 16 * 16);
    const int64_t Dv = p.Dv, bh = b * p.Hq + h;
    const acc_t scale = static_cast<acc_t>(p.scale);
    if (k_transposed) {
      mm_nn<acc_t>(p.gemm, rows, cols, p.D, scale, Q, ldq, K, ldk, acc_t(0), S, BN);
    } else if (p.gemm == GemmPath::tiles && rows <= kDotKeysMaxRows) {
      for (int64_t c = 0; c < cols; c += 16) {  // <= 16 keys per product: dot products, nothing transposed
        mm_nt<acc_t>(p.gemm, rows, std::min<int64_t>(16, cols - c), p.D, scale, Q, ldq, K + c * ldk, ldk, acc_t(0),
                     S + c, BN);
      }
    } else {
      mm_nt<acc_t>(p.gemm, rows, cols, p.D, scale, Q, ldq, K, ldk, acc_t(0), S, BN);
    }
    modify_scores(p, S, BN, b, h, i0, rows, j0, cols);
    online_softmax_update(p, S, BN, rows, cols, acc_fresh, m, l, acc, Dv, bh, i0, j0);
    mm_nn<acc_t>(p.gemm, rows, Dv, cols, acc_t(1), S, BN, V, ldv, acc_fresh ? acc_t(0) : acc_t(1), acc, Dv);
  }
};

// out = acc / l and lse = m + log l for one row (a row that saw no key, l = 0: out 0, lse -inf; l NaN -- a NaN
// score -- gives NaN for both).
template <typename acc_t>
void finish_row(const Problem& p, acc_t* a, acc_t m, acc_t l, const HeadTensor& out, int64_t b, int64_t h, int64_t i,
                acc_t* lse) {
  if (l != acc_t(0)) {
    const acc_t inv = acc_t(1) / l;
    for (int64_t d = 0; d < p.Dv; ++d) a[d] *= inv;
    lse[(b * p.Hq + h) * p.Lq + i] = m + std::log(l);
  } else {
    std::fill(a, a + p.Dv, acc_t(0));
    lse[(b * p.Hq + h) * p.Lq + i] = -std::numeric_limits<acc_t>::infinity();
  }
  store_row(a, out.dtype, out.row(b, h, i), p.Dv);
}


// ------------------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------------------
struct BackwardTensors {
  HeadTensor out, dout, dq, dk, dv;
};

// P = exp(S - lse) for the rows of a tile (a row with lse = -inf saw no key: P = 0).
template <typename acc_t>
void probabilities(acc_t* S, int64_t lds, int64_t rows, int64_t cols, const acc_t* lse_rows) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* s = S + r * lds;
    if (lse_rows[r] == -std::numeric_limits<acc_t>::infinity()) {
      std::fill(s, s + cols, acc_t(0));
    } else {
      exp_shift_sum(s, cols, lse_rows[r]);
    }
  }
}

// Pd = dropout(P), into its own buffer (P itself is still needed for dS).
template <typename acc_t>
void dropped_probabilities(const Problem& p, const acc_t* P, acc_t* Pd, int64_t ld, int64_t rows, int64_t cols,
                           int64_t bh, int64_t i0, int64_t j0) {
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(P + r * ld, P + r * ld + cols, Pd + r * ld);
    apply_dropout(p, Pd + r * ld, cols, bh, i0 + r, j0);
  }
}

// dS = P * (dP' - Delta), written over dP, where dP' = dP * keep / (1 - p) under dropout.  The keep-mask is read
// back from Pd (Pd != 0 exactly where the element was kept and P > 0; where P == 0, dS is 0 either way).
template <typename acc_t>
void score_gradients(const Problem& p, const acc_t* P, const acc_t* Pd, acc_t* dP, int64_t ld, int64_t rows,
                     int64_t cols, const acc_t* delta_rows) {
  const acc_t ds = static_cast<acc_t>(p.drop_scale);
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* pr = P + r * ld;
    acc_t* g = dP + r * ld;
    const acc_t delta = delta_rows[r];
    if (p.dropout) {
      const acc_t* pd = Pd + r * ld;
      for (int64_t c = 0; c < cols; ++c) g[c] = pr[c] * ((pd[c] != acc_t(0) ? g[c] * ds : acc_t(0)) - delta);
    } else {
      for (int64_t c = 0; c < cols; ++c) g[c] = pr[c] * (g[c] - delta);
    }
  }
}

template <typename acc_t>
void delta_kernel(const Problem& p, const BackwardTensors& t, const acc_t* dlse, acc_t* delta) {
  const int64_t rows_total = p.B * p.Hq * p.Lq;
  at::parallel_for(0, rows_total, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tmp(2 * p.Dv);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t i = idx % p.Lq, bh = idx / p.Lq, b = bh / p.Hq, h = bh % p.Hq;
      acc_t d = row_dot<acc_t>(t.out.row(b, h, i), t.dout.row(b, h, i), t.out.dtype, p.Dv, tmp.data(),
                               tmp.data() + p.Dv);
      if (dlse != nullptr) d -= dlse[idx];
      delta[idx] = d;
    }
  });
}

// The score tiles of one (query block, key block) pair in the backward, each [BM, BN] with leading dimension ld
// (kBwdBlockN unless BwdScratch was given other block sizes).
template <typename acc_t>
struct PairTiles {
  acc_t* P;   // probabilities exp(S - lse)
  acc_t* Pd;  // dropout(P) (only with dropout)
  acc_t* dS;  // dP = dO V^T, then dS in place
  int64_t ld = kBwdBlockN;
  const acc_t* dropped() const { return Pd != nullptr ? Pd : P; }
};

// K^T and V^T of a key block, [D, ld] and [Dv, ld], where the caller has transposed them already
// (BackwardKeySlots); null members: the products transpose K and V themselves (mm_nt).
template <typename acc_t>
struct TransposedBlock {
  const acc_t* kt = nullptr;
  const acc_t* vt = nullptr;
  int64_t ld = 0;
};

// Recomputes P (and Pd) of the block pair and its score gradient dS; the callers apply the products they need.
template <typename acc_t>
void recompute_pair(const Problem& p, const PairTiles<acc_t>& t, const acc_t* Q, int64_t ldq, const acc_t* dO,
                    int64_t ldo, const acc_t* K, int64_t ldk, const acc_t* V, int64_t ldv, int64_t b, int64_t h,
                    int64_t i0, int64_t rows, int64_t j0, int64_t cols, const acc_t* lse, const acc_t* delta,
                    TransposedBlock<acc_t> kv_t = {}) {
  const int64_t BN = t.ld;
  const int64_t bh = b * p.Hq + h;
  const acc_t scale = static_cast<acc_t>(p.scale);
  if (kv_t.kt != nullptr) {
    mm_nn<acc_t>(p.gemm, rows, cols, p.D, scale, Q, ldq, kv_t.kt, kv_t.ld, acc_t(0), t.P, BN);
  } else {
    mm_nt<acc_t>(p.gemm, rows, cols, p.D, scale, Q, ldq, K, ldk, acc_t(0), t.P, BN);
  }
  modify_scores(p, t.P, BN, b, h, i0, rows, j0, cols);
  probabilities(t.P, BN, rows, cols, lse + bh * p.Lq + i0);
  if (p.dropout) dropped_probabilities(p, t.P, t.Pd, BN, rows, cols, bh, i0, j0);
  if (kv_t.vt != nullptr) {
    mm_nn<acc_t>(p.gemm, rows, cols, p.Dv, acc_t(1), dO, ldo, kv_t.vt, kv_t.ld, acc_t(0), t.dS, BN);  // dP = dO V^T
  } else {
    mm_nt<acc_t>(p.gemm, rows, cols, p.Dv, acc_t(1), dO, ldo, V, ldv, acc_t(0), t.dS, BN);  // dP = dO V^T
  }
  score_gradients(p, t.P, t.Pd, t.dS, BN, rows, cols, delta + bh * p.Lq + i0);
}

// The row-major backward's K^T and V^T, one slot per key block of a work item, transposed once per item: every
// query block of the item's query heads reuses them, where mm_nt would transpose K and V again for each pair
// (float32 on the register tiles only: BLAS packs its operands either way).  A slot is [D, kLd] + [Dv, kLd]: a
// short row stride, so the tiles read K^T in place (a stride of Lk floats would make small_gemm copy it).
struct BackwardKeySlots {
  static constexpr int64_t kLd = kBwdBlockN + 16;  // not a multiple of 1 KiB (cache sets)
  // Per thread, as the forward's slots; above it (e.g. Lk = 32k at d 128: 38 MB) the products transpose K and V
  // themselves (mm_nt), which costs ~2 % there (NOTES 45: at 4k the slots already lived in L3).
  static constexpr int64_t kMaxBytes = int64_t(32) << 20;
  std::unique_ptr<float[]> data;
  int64_t slot_floats = 0;

  static bool fits(const Problem& p, int64_t n_blocks) {
    return n_blocks * (p.D + p.Dv) * kLd * int64_t(sizeof(float)) <= kMaxBytes;
  }

  BackwardKeySlots(const Problem& p, int64_t n_blocks)
      : data(new float[n_blocks * (p.D + p.Dv) * kLd]), slot_floats((p.D + p.Dv) * kLd) {}

  // Transposes key block kb ([cols <= kBwdBlockN] rows of K and V) into its slot.
  void fill(const Problem& p, int64_t kb, const float* K, int64_t ldk, const float* V, int64_t ldv, int64_t cols) {
    float* slot = data.get() + kb * slot_floats;
    transpose_32bit(cols, p.D, K, ldk, slot, kLd);
    transpose_32bit(cols, p.Dv, V, ldv, slot + p.D * kLd, kLd);
  }
  TransposedBlock<float> block(const Problem& p, int64_t kb) const {
    const float* slot = data.get() + kb * slot_floats;
    return {slot, slot + p.D * kLd, kLd};
  }
};

// Keys-major block pairs of the backward (where keys_major_applies, as in the forward): the tiles hold P^T and dS^T, [cols, ld_t] with the query rows along ld_t, computed from Q^T and dO^T
// ([D, ld_t], [Dv, ld_t], transposed once per query block) with K and V read in place as the broadcast operands:
//     S^T = scale K Q^T,  P^T = exp(S^T - lse),  dP^T = V dO^T,  dS^T = P^T * (dP^T - Delta)
// after which the callers' three products need no transposed operand but dQ's (dS^T read in place): no key or
// value block is transposed per pair (NOTES entry 32).
inline void recompute_pair_keys_major(const Problem& p, const PairTiles<float>& t, int64_t ld_t, const float* Q_t,
                                      const float* dO_t, const float* K, int64_t ldk, const float* V, int64_t ldv,
                                      int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                                      const float* lse, const float* delta) {
  const int64_t bh = b * p.Hq + h;
  mm_nn<float>(p.gemm, cols, rows, p.D, static_cast<float>(p.scale), K, ldk, Q_t, ld_t, 0.0f, t.P, ld_t);
  modify_scores(p, t.P, ld_t, b, h, i0, rows, j0, cols, /*keys_major=*/true);
  column_exp_shift(t.P, ld_t, cols, rows, lse + bh * p.Lq + i0);
  mm_nn<float>(p.gemm, cols, rows, p.Dv, 1.0f, V, ldv, dO_t, ld_t, 0.0f, t.dS, ld_t);  // dP^T = V dO^T
  const float* delta_rows = delta + bh * p.Lq + i0;
  for (int64_t c = 0; c < cols; ++c) {
    const float* pr = t.P + c * ld_t;
    float* g = t.dS + c * ld_t;
    for (int64_t r = 0; r < rows; ++r) g[r] = pr[r] * (g[r] - delta_rows[r]);
  }
}

template <typename acc_t>
void write_mask_grad(const Problem& p, acc_t* dmask, const acc_t* dS, int64_t ld, int64_t bh, int64_t i0, int64_t rows,
                     int64_t j0, int64_t cols) {
  if (dmask == nullptr) return;
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(dS + r * ld, dS + r * ld + cols, dmask + (bh * p.Lq + i0 + r) * p.Lk + j0);
  }
}

// The mask gradient of a keys-major pair: dmask[query, key] = dS^T[key, query].
inline void write_mask_grad_keys_major(const Problem& p, float* dmask, const float* dS_t, int64_t ld_t, int64_t bh,
                                       int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
  if (dmask == nullptr) return;
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = dmask + (bh * p.Lq + i0 + r) * p.Lk + j0;
    for (int64_t c = 0; c < cols; ++c) dst[c] = dS_t[c * ld_t + r];
  }
}

// Per-thread buffers of the backward kernels.
template <typename acc_t>
struct BwdScratch {
  Scratch<acc_t> scratch;
  PairTiles<acc_t> tiles;
  acc_t *q_buf, *do_buf, *k_buf, *v_buf, *dq, *dk, *dv;

  // dk_rows / dv_rows: rows of the dK / dV accumulators (a key block, or every key of a head).  block_m,
  // block_n: the most query / key rows of a block pair (the score tiles' leading dimension is block_n).
  BwdScratch(const Problem& p, int64_t dk_rows, int64_t block_m = kBwdBlockM, int64_t block_n = kBwdBlockN)
      : scratch(3 * Scratch<acc_t>::rounded(block_m * block_n) + Scratch<acc_t>::rounded(block_m * p.D) * 2 +
                Scratch<acc_t>::rounded(block_m * p.Dv) + Scratch<acc_t>::rounded(block_n * p.D) +
                Scratch<acc_t>::rounded(block_n * p.Dv) + Scratch<acc_t>::rounded(dk_rows * p.D) +
                Scratch<acc_t>::rounded(dk_rows * p.Dv)) {
    tiles.P = scratch.take(block_m * block_n);
    tiles.Pd = scratch.take(block_m * block_n);
    tiles.dS = scratch.take(block_m * block_n);
    tiles.ld = block_n;
    if (!p.dropout) tiles.Pd = nullptr;
    q_buf = scratch.take(block_m * p.D);
    dq = scratch.take(block_m * p.D);
    do_buf = scratch.take(block_m * p.Dv);
    k_buf = scratch.take(block_n * p.D);
    v_buf = scratch.take(block_n * p.Dv);
    dk = scratch.take(dk_rows * p.D);
    dv = scratch.take(dk_rows * p.Dv);
  }
};

template <typename acc_t>
void store_rows(const acc_t* src, int64_t rows, const HeadTensor& dst, int64_t b, int64_t h, int64_t row0) {
  for (int64_t r = 0; r < rows; ++r) store_row(src + r * dst.dim, dst.dtype, dst.row(b, h, row0 + r), dst.dim);
}


}  // namespace fastattn::cpu
