// The single-pass backward of the dense CPU kernel for bfloat16 inputs on AMX (amx.h): the five block products of
// each (query block, key block) pair in bf16 on the tile unit, float32 accumulation, the elementwise work in
// float32 -- FlashAttention-2's backward as it runs on GPUs (P and dS rounded to bf16 before their products).
//
// Keys-major pairs (as the float32 keys-major pairs of attention_core.h), so that no product needs a transposed
// bf16 tile built per pair:
//     S^T  = K Q^T        A: key rows [keys, d_pad]             B: Q^T as VNNI pairs along D (pack_keys_vnni)
//     dP^T = V dO^T       A: value rows [keys, dv_pad]          B: dO^T as VNNI pairs along Dv
//     P^T = exp(scale S^T - lse),  dS^T = P^T * (dP^T - Delta)   (float32, one fused pass; amx_backward_scores)
//     dV  += P^T dO       A: bf16(P^T) [keys, queries]          B: dO as VNNI pairs along the queries
//     dK  += dS^T Q       A: bf16(dS^T)                          B: Q as VNNI pairs along the queries
//     dQ^T += K^T dS^T    A: K^T [d_pad, keys]                   B: bf16(dS^T) as VNNI pairs along the keys
// The only per-pair repacking is the last B operand (an interleave of adjacent key rows of dS^T, 32 KiB).  Per work
// item (batch, kv head, key stripe) each of its key blocks is packed once (K, V, K^T) and reused by every query
// block of the GQA group; per query block Q and dO are packed once (four layouts) and reused by every key block.
// dK, dV accumulate over the item in float32; dQ^T over the query block's key blocks, transposed when stored.
// scale is applied once at the end (dK, dQ) or folded into the scores (S^T).  No dropout (the float32 path keeps
// it: its keep-mask is drawn on float32 probabilities); masks, causal limits and the mask gradient as the float32
// keys-major pairs (modify_scores with keys_major, write_mask_grad_keys_major).
#pragma once

#include <cstring>
#include <limits>
#include <vector>

#include "amx.h"
#include "attention_core.h"

namespace fastattn::cpu {

constexpr int64_t kAmxBwdBlockM = 128;  // queries per block
constexpr int64_t kAmxBwdBlockN = 128;  // keys per block

// stripes as fused_backward_kernel's: stripe s owns the key blocks s, s + S, ...; with S > 1 each writes its
// partial dQ (float32, already scaled) to dq_partial[s] and the caller sums them.
inline void amx_backward_kernel(const Problem& p, const BackwardTensors& t, const float* lse, const float* delta,
                                float* dmask, int64_t stripes, float* dq_partial) {
  constexpr int64_t BM = kAmxBwdBlockM, BN = kAmxBwdBlockN;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  auto round_up = [](int64_t x, int64_t m) { return (x + m - 1) / m * m; };
  const int64_t d_pad = round_up(p.D, 32), dv_pad = round_up(p.Dv, 32);
  const int64_t n_kblocks = ceil_div(p.Lk, BN);
  const float scale = static_cast<float>(p.scale);
  // Scores need modifying before the exp where there is a mask or a causal limit inside the pair.
  at::parallel_for(0, p.B * p.Hkv * stripes, 1, [&](int64_t begin, int64_t end) {
    AmxTileScope tile_scope;
    // Per key block of the item (slot = block index): K rows, V rows, K^T (bf16, zero-padded), dK and dV (float32).
    std::vector<uint16_t> k16(n_kblocks * BN * d_pad), v16(n_kblocks * BN * dv_pad), kt16(n_kblocks * d_pad * BN);
    std::vector<float> dk_acc(n_kblocks * BN * d_pad), dv_acc(n_kblocks * BN * dv_pad);
    // Per query block: Q^T and dO^T in VNNI pairs along D (B of S^T, dP^T), Q and dO in pairs along the queries
    // (B of dK, dV).
    std::vector<uint32_t> qt_vnni(d_pad / 2 * BM), dot_vnni(dv_pad / 2 * BM), q_vnni(BM / 2 * d_pad),
        do_vnni(BM / 2 * dv_pad);
    // Per pair: S^T, dP^T (then dS^T) in float32 [BN, BM]; P^T and dS^T in bf16; dS^T in pairs along the keys.
    std::vector<float> st(BN * BM), dpt(BN * BM), dqt(d_pad * BM), shift(BM), delta_rows(BM), out_row(std::max(p.D, p.Dv));
    std::vector<uint16_t> p16(BN * BM), ds16(BN * BM), kt_part(d_pad * BN);
    std::vector<uint32_t> ds_vnni(BN / 2 * BM);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bhk = item / stripes, stripe = item % stripes;
      const int64_t b = bhk / p.Hkv, hk = bhk % p.Hkv;
      for (int64_t kb = stripe; kb < n_kblocks; kb += stripes) {
        const int64_t j0 = kb * BN, cols = std::min(BN, p.Lk - j0);
        uint16_t* kr = k16.data() + kb * BN * d_pad;
        uint16_t* vr = v16.data() + kb * BN * dv_pad;
        uint16_t* ktr = kt16.data() + kb * d_pad * BN;
        std::fill(kr, kr + BN * d_pad, uint16_t(0));
        std::fill(vr, vr + BN * dv_pad, uint16_t(0));
        for (int64_t c = 0; c < cols; ++c) {
          std::memcpy(kr + c * d_pad, p.k.row(b, hk, j0 + c), p.D * sizeof(uint16_t));
          std::memcpy(vr + c * dv_pad, p.v.row(b, hk, j0 + c), p.Dv * sizeof(uint16_t));
        }
        pack_keys_transposed(cols, p.D, reinterpret_cast<const uint16_t*>(p.k.row(b, hk, j0)), p.k.sl, BN, d_pad,
                             ktr, BN);
        std::fill(dk_acc.data() + kb * BN * d_pad, dk_acc.data() + (kb + 1) * BN * d_pad, 0.0f);
        std::fill(dv_acc.data() + kb * BN * dv_pad, dv_acc.data() + (kb + 1) * BN * dv_pad, 0.0f);
      }
      for (int64_t g = 0; g < p.group; ++g) {
        const int64_t h = hk * p.group + g, bh = b * p.Hq + h;
        for (int64_t i0 = 0; i0 < p.Lq; i0 += BM) {
          const int64_t rows = std::min(BM, p.Lq - i0), rows_pad = round_up(rows, 32);
          const auto* Q = reinterpret_cast<const uint16_t*>(p.q.row(b, h, i0));
          const auto* dO = reinterpret_cast<const uint16_t*>(t.dout.row(b, h, i0));
          pack_keys_vnni(rows, p.D, Q, p.q.sl, rows_pad, d_pad, qt_vnni.data(), rows_pad);
          pack_keys_vnni(rows, p.Dv, dO, t.dout.sl, rows_pad, dv_pad, dot_vnni.data(), rows_pad);
          pack_values_vnni(rows, p.D, Q, p.q.sl, rows_pad, q_vnni.data(), d_pad);
          pack_values_vnni(rows, p.Dv, dO, t.dout.sl, rows_pad, do_vnni.data(), dv_pad);
          // The columns [rows, rows_pad) are padding: shift +inf makes their P exactly 0 (as a row with LSE -inf,
          // which saw no key); amx_backward_scores also zeroes them outright (a NaN key would give NaN * 0 there).
          for (int64_t r = 0; r < rows_pad; ++r) {
            const float l = r < rows ? lse[bh * p.Lq + i0 + r] : -kInf;
            shift[r] = l == -kInf ? kInf : l;
            delta_rows[r] = r < rows ? delta[bh * p.Lq + i0 + r] : 0.0f;
          }
          std::fill(dqt.begin(), dqt.begin() + d_pad * rows_pad, 0.0f);
          const int64_t kv_end = p.kv_end(i0, rows);
          for (int64_t j0 = stripe * BN; j0 < kv_end; j0 += stripes * BN) {
            // Keys from kv_end on are hidden from the whole query block: not part of the pair (as the float32
            // backward's pairs), so that a NaN in one of them stays out of this block's gradients.
            const int64_t kb = j0 / BN, cols = std::min(BN, kv_end - j0);
            const int64_t cols16 = round_up(cols, 16), cols32 = round_up(cols, 32);
            const uint16_t* kr = k16.data() + kb * BN * d_pad;
            amx_gemm_bf16(cols16, rows_pad, d_pad, kr, d_pad, qt_vnni.data(), rows_pad, st.data(), rows_pad, false);
            amx_gemm_bf16(cols16, rows_pad, dv_pad, v16.data() + kb * BN * dv_pad, dv_pad, dot_vnni.data(), rows_pad,
                          dpt.data(), rows_pad, false);
            const bool modified =
                p.mask_kind != kMaskNone || (p.causal != kCausalNone && j0 + cols - 1 > i0 + p.causal_off);
            float score_scale = scale;
            if (modified) {  // the scores scaled first: the mask adds to scaled scores
              for (int64_t c = 0; c < cols; ++c) {
                float* s = st.data() + c * rows_pad;
                for (int64_t r = 0; r < rows; ++r) s[r] *= scale;
              }
              modify_scores(p, st.data(), rows_pad, b, h, i0, rows, j0, cols, /*keys_major=*/true);
              score_scale = 1.0f;
            }
            amx_backward_scores(st.data(), dpt.data(), rows_pad, cols, rows, score_scale, shift.data(),
                                delta_rows.data(), p16.data(), ds16.data(), cols16, dmask != nullptr);
            write_mask_grad_keys_major(p, dmask, dpt.data(), rows_pad, bh, i0, rows, j0, cols);
            amx_gemm_bf16(cols16, dv_pad, rows_pad, p16.data(), rows_pad, do_vnni.data(), dv_pad,
                          dv_acc.data() + j0 * dv_pad, dv_pad, true);  // dV += P^T dO
            amx_gemm_bf16(cols16, d_pad, rows_pad, ds16.data(), rows_pad, q_vnni.data(), d_pad,
                          dk_acc.data() + j0 * d_pad, d_pad, true);  // dK += dS^T Q (scaled when stored)
            pack_values_vnni(cols, rows_pad, ds16.data(), rows_pad, cols32, ds_vnni.data(), rows_pad);
            const uint16_t* kt = kt16.data() + kb * d_pad * BN;
            if (cols < std::min(BN, p.Lk - j0)) {  // K^T's columns [cols, cols32) must be zeros: a copy
              for (int64_t d = 0; d < d_pad; ++d) {
                std::memcpy(kt_part.data() + d * BN, kt + d * BN, cols * sizeof(uint16_t));
                std::fill(kt_part.data() + d * BN + cols, kt_part.data() + d * BN + cols32, uint16_t(0));
              }
              kt = kt_part.data();
            }
            amx_gemm_bf16(d_pad, rows_pad, cols32, kt, BN, ds_vnni.data(), rows_pad, dqt.data(), rows_pad,
                          true);  // dQ^T += K^T dS^T (scaled when stored)
          }
          // dQ = scale * (dQ^T)^T: to the output, or to this stripe's partial sum.
          for (int64_t r = 0; r < rows; ++r) {
            float* row = stripes == 1 ? out_row.data() : dq_partial + ((stripe * p.B * p.Hq + bh) * p.Lq + i0 + r) * p.D;
            for (int64_t d = 0; d < p.D; ++d) row[d] = scale * dqt[d * rows_pad + r];
            if (stripes == 1) store_row(row, t.dq.dtype, t.dq.row(b, h, i0 + r), p.D);
          }
        }
      }
      for (int64_t kb = stripe; kb < n_kblocks; kb += stripes) {
        const int64_t j0 = kb * BN, cols = std::min(BN, p.Lk - j0);
        for (int64_t c = 0; c < cols; ++c) {
          const float* dk_row = dk_acc.data() + (j0 + c) * d_pad;
          for (int64_t d = 0; d < p.D; ++d) out_row[d] = scale * dk_row[d];
          store_row(out_row.data(), t.dk.dtype, t.dk.row(b, hk, j0 + c), p.D);
          store_row(dv_acc.data() + (j0 + c) * dv_pad, t.dv.dtype, t.dv.row(b, hk, j0 + c), p.Dv);
        }
      }
    }
  });
}

}  // namespace fastattn::cpu
