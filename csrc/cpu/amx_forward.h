// The forward tile of the dense CPU kernel for bfloat16 inputs on AMX (amx.h): ForwardTile's online softmax, with
// both block products in bf16 on the tile unit.
//     S = Q_blk K_blk^T           (AMX, float32 out), then S *= scale, the mask and causal limit, as ForwardTile
//     online softmax in float32   (online_softmax_update: m, l, acc rescale, dropout)
//     P16 = bf16(P);  acc += P16 V_blk   (AMX, float32 accumulators)
// The bf16 rounding of P before the second product is FlashAttention's (and torch's CPU flash kernel's); l sums P
// in float32 before rounding.
//
// Operands in AMX layout: Q rows copied into q16 (zero-padded to d_pad), each key block's K and V packed once
// per thread into the "VNNI" pairs of amx.h and kept while the thread works on that head (its query blocks reuse
// them); a head whose packed keys and values would take more than kMaxPackedBytes repacks per block.
#pragma once

#include <cstring>
#include <vector>

#include "amx.h"
#include "attention_core.h"

namespace fastattn::cpu {

struct AmxForwardTile {
  static constexpr int64_t kMaxPackedBytes = int64_t(32) << 20;  // per thread
  static constexpr int64_t kKeyLd = kFwdBlockN + 16;  // packed K row stride in words (not a multiple of 1 KiB)

  AmxTileScope tile_scope;  // first: the tiles are configured before any product
  int64_t d_pad, dv_pad, n_kblocks;
  std::vector<uint16_t> q16, p16;  // [block_m, d_pad] query rows; [block_m, kFwdBlockN] probabilities
  std::vector<float> s_buf, acc_buf, ml;
  std::vector<uint32_t> k_packed, v_packed;  // slots of packed key blocks
  std::vector<int64_t> slot_tag;             // which (batch, kv head, key block) a slot holds; -1: none
  int64_t k_slot_words, v_slot_words;
  float *S, *acc, *m, *l;
  int64_t acc_ld;

  // Block shape (NOTES entry 38): with head dims <= 64, 32 query rows per work item and 256 keys per product pair,
  // so that the [32, 256] float32 S (32 KiB) stays in L1 from QK^T's tile stores through the softmax (QK^T's
  // short K loop makes those stores its limit: 0.9 TFLOP/s with S in L2, 1.7 in L1); larger head dims keep
  // 128 x 512 (their longer K loop amortises the stores, and 32-row items re-read twice as much K and V).
  // FASTATTN_CPU_AMX_SMALL_BLOCKS=0 keeps 128 x 512 everywhere (A/B).
  static bool small_blocks(const Problem& p) {
    return p.D <= 64 && p.Dv <= 64 && !env_is_zero("FASTATTN_CPU_AMX_SMALL_BLOCKS");
  }
  static int64_t query_block(const Problem& p) { return small_blocks(p) ? 32 : kFwdBlockM; }
  const int64_t sub_n;  // keys per product pair: 256 or kFwdBlockN (a packed block holds kFwdBlockN keys)

  explicit AmxForwardTile(const Problem& p, int64_t block_m = kFwdBlockM)
      : sub_n(small_blocks(p) ? 256 : kFwdBlockN),
        d_pad(round_up(p.D, 32)),
        dv_pad(round_up(p.Dv, 32)),
        n_kblocks(ceil_div(p.Lk, kFwdBlockN)),
        q16(round_up(block_m, 16) * d_pad, 0),
        p16(round_up(block_m, 16) * kFwdBlockN, 0),
        s_buf(round_up(block_m, 16) * kFwdBlockN),
        acc_buf(round_up(block_m, 16) * dv_pad),
        ml(2 * block_m),
        k_slot_words(d_pad / 2 * kKeyLd),
        v_slot_words(kFwdBlockN / 2 * dv_pad) {
    const int64_t head_bytes = n_kblocks * (k_slot_words + v_slot_words) * 4;
    const int64_t slots = head_bytes <= kMaxPackedBytes ? n_kblocks : 1;
    k_packed.assign(slots * k_slot_words, 0);
    v_packed.assign(slots * v_slot_words, 0);
    slot_tag.assign(slots, -1);
    S = s_buf.data();
    acc = acc_buf.data();
    m = ml.data();
    l = ml.data() + block_m;
    acc_ld = dv_pad;
  }

  // Forgets the packed key blocks (a caller that refills the same buffers with other keys: the spatial op).
  void forget_packed_blocks() { std::fill(slot_tag.begin(), slot_tag.end(), int64_t(-1)); }

  // As ForwardTile::run: on return acc holds the unnormalised output rows, m the row
  // maxima and l the row sums of exp(S - m) of the query rows [i0, i0 + rows) over the keys [j_begin, j_end);
  // j_begin is a multiple of kFwdBlockN.
  void run(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j_begin, int64_t j_end) {
    const int64_t hk = h / p.group, bh = b * p.Hq + h;
    const int64_t rows16 = round_up(rows, 16);
    for (int64_t r = 0; r < rows16; ++r) {  // Q rows, zero-padded to [rows16, d_pad]
      uint16_t* dst = q16.data() + r * d_pad;
      if (r < rows) std::memcpy(dst, p.q.row(b, h, i0 + r), p.D * sizeof(uint16_t));
      std::fill(dst + (r < rows ? p.D : 0), dst + d_pad, uint16_t(0));
    }
    std::fill(acc, acc + rows16 * acc_ld, 0.0f);
    std::fill(m, m + rows, -std::numeric_limits<float>::infinity());
    std::fill(l, l + rows, 0.0f);
    const float scale = static_cast<float>(p.scale);
    for (int64_t j0 = j_begin; j0 < j_end; j0 += sub_n) {
      const int64_t cols = std::min(sub_n, j_end - j0);
      const int64_t BN = round_up(cols, 32);  // S's and P16's leading dimension; the second product's K
      const int64_t slot = packed_block(p, b, hk, j0 / kFwdBlockN);
      const int64_t j_in = j0 % kFwdBlockN;  // the pair's first key within its packed block
      amx_gemm_bf16(rows16, BN, d_pad, q16.data(), d_pad, k_packed.data() + slot * k_slot_words + j_in, kKeyLd, S,
                    BN, /*accumulate=*/false);
      // Without a mask, dropout or a causal limit inside this block, each row's softmax is one fused pass (exp with
      // the running max, sum, bf16 rounding), or two where the block raises the max (softmax_rows_to_bf16);
      // otherwise ForwardTile's steps, then the rounding.
      const bool plain = p.mask_kind == kMaskNone && !p.dropout &&
                         (p.causal == kCausalNone || j0 + cols - 1 <= i0 + p.causal_off);
      if (plain) {
        softmax_rows_to_bf16(rows, cols, BN, scale);
      } else {
        for (int64_t r = 0; r < rows; ++r) scale_row_max(S + r * BN, cols, scale);
        modify_scores(p, S, BN, b, h, i0, rows, j0, cols);
        online_softmax_update<float>(p, S, BN, rows, cols, /*acc_fresh=*/false, m, l, acc, acc_ld, bh, i0, j0);
        for (int64_t r = 0; r < rows; ++r) float_to_bf16_row(S + r * BN, cols, BN, p16.data() + r * BN);
      }
      // Rows [rows, rows16) of P16 hold zeros or an earlier block's values: they only reach acc's padding rows.
      // (32- or 64-row sub-blocks of a 128-row item measured no faster: NOTES entry 23; 32-row items do, entry 38.)
      amx_gemm_bf16(rows16, dv_pad, BN, p16.data(), BN, v_packed.data() + slot * v_slot_words + j_in / 2 * dv_pad,
                    dv_pad, acc, acc_ld, /*accumulate=*/true);
    }
  }

 private:
  static int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
  static constexpr float kLazyMargin = 8.0f;  // P <= e^8 ~ 3e3 with a stale max
  const bool lazy_rescale = !env_is_zero("FASTATTN_CPU_AMX_LAZY");

  // online_softmax_update for a block with nothing to mask, writing P straight into P16 (bf16).
  void softmax_rows_to_bf16(int64_t rows, int64_t cols, int64_t BN, float scale) {
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    for (int64_t r = 0; r < rows; ++r) {
      float* s = S + r * BN;
      uint16_t* p_row = p16.data() + r * BN;
      if (lazy_rescale && m[r] != kNegInf) {
        // One pass with the row's running max m as the shift, kept unless the block's scores exceed it by more
        // than kLazyMargin (then the two passes below redo the row): P = exp(scale s - m) <= e^kLazyMargin is
        // still exact in float32 and bf16's relative rounding, and acc needs no rescale (FlashAttention-4's
        // conditional rescaling).  Saves the max pass and its read and write of S.
        float max_arg;
        const float sum = exp_scaled_sum_max_bf16(s, cols, scale, m[r], p_row, BN, &max_arg);
        if (max_arg <= kLazyMargin) {
          l[r] += sum;
          continue;
        }
      }
      const float m_new = std::max(m[r], scale_row_max(s, cols, scale));
      if (m_new == kNegInf) {  // every score so far -inf: nothing to add
        std::fill(p_row, p_row + BN, uint16_t(0));
        // ... unless a score is NaN (the max skips NaN): then l, and the row's output and LSE, become NaN.
        if (unseen_row_probabilities(s, cols) != 0.0f) l[r] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      const float alpha = m[r] == kNegInf ? 0.0f : std::exp(m[r] - m_new);
      l[r] = l[r] * alpha + exp_shift_sum_bf16(s, cols, m_new, p_row, BN);
      m[r] = m_new;
      if (alpha != 1.0f) {
        float* a = acc + r * acc_ld;
        for (int64_t d = 0; d < acc_ld; ++d) a[d] *= alpha;
      }
    }
  }

  // The slot holding key block kb of (b, hk), packed now if it is not there yet.
  int64_t packed_block(const Problem& p, int64_t b, int64_t hk, int64_t kb) {
    const int64_t slots = static_cast<int64_t>(slot_tag.size());
    const int64_t slot = slots == 1 ? 0 : kb;
    const int64_t tag = (b * p.Hkv + hk) * n_kblocks + kb;
    if (slot_tag[slot] == tag) return slot;
    const int64_t j0 = kb * kFwdBlockN, n = std::min(kFwdBlockN, p.Lk - j0), n_pad = round_up(n, 32);
    pack_keys_vnni(n, p.D, reinterpret_cast<const uint16_t*>(p.k.row(b, hk, j0)), p.k.sl, n_pad, d_pad,
                   k_packed.data() + slot * k_slot_words, kKeyLd);
    pack_values_vnni(n, p.Dv, reinterpret_cast<const uint16_t*>(p.v.row(b, hk, j0)), p.v.sl, n_pad,
                     v_packed.data() + slot * v_slot_words, dv_pad);
    slot_tag[slot] = tag;
    return slot;
  }
};

}  // namespace fastattn::cpu
