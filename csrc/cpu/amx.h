// bfloat16 block products on AMX tiles (Intel Sapphire Rapids and later), for the bf16 CPU attention forward.
//
// On CPUs with AMX, torch's own CPU SDPA runs its bf16 products on the AMX tile unit (~16x the float32 FMA rate per
// core); converting bf16 inputs to float32 and multiplying on AVX-512 (what the other kernels do) then loses to it
// by ~3x.  These helpers give the dense forward the same hardware: Q K^T and P V in bf16 with float32
// accumulation, as FlashAttention does on GPUs (P is rounded to bf16 before P V; the softmax stays in float32).
//
// Operand layouts (all zero-padded, so every tile is a full 16 x 64-byte tile and no load runs past a buffer):
//   A  row-major bf16 [M, K]: M a multiple of 16, K a multiple of 32; lda in elements.
//   B  "VNNI" pairs: B(k, n) for k = 2kk, 2kk + 1 as one 32-bit word at B[kk * ldb + n] (low half: k = 2kk);
//      K / 2 rows of N words each (N a multiple of 16); ldb in 32-bit words.
//   C  row-major float32 [M, N]; ldc in floats.
#pragma once

#include <cstdint>

namespace fastattn::cpu {

// True when the AMX-BF16 path can run: the CPU has AMX-TILE, AMX-BF16 and AVX512-BF16, the kernel granted the
// tile state (arch_prctl), the row kernels run AVX-512 (FASTATTN_CPU_ISA=avx2|baseline turns AMX off too) and
// FASTATTN_CPU_AMX is not "0" (read on every call: ops pick their path once per call).
bool amx_bf16_enabled();

// Loads the tile configuration on the calling thread for its lifetime and releases the tile state after (one per
// at::parallel_for chunk: the configuration is per thread, and another library may change it between calls).
class AmxTileScope {
 public:
  AmxTileScope();
  ~AmxTileScope();
  AmxTileScope(const AmxTileScope&) = delete;
  AmxTileScope& operator=(const AmxTileScope&) = delete;
};

// C = A B (accumulate: C += A B), in the layouts above.  Needs an AmxTileScope on this thread.
void amx_gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint32_t* B, int64_t ldb,
                   float* C, int64_t ldc, bool accumulate);

// B operand of S = Q K^T from key rows: dst[kk * ld_dst + n] = (K[n][2kk], K[n][2kk + 1]) for n < N, and zeros
// for n in [N, n_pad) and kk in [ceil(D / 2), d_pad / 2).  K rows are `ld_k` bf16 elements apart.
void pack_keys_vnni(int64_t N, int64_t D, const uint16_t* K, int64_t ld_k, int64_t n_pad, int64_t d_pad,
                    uint32_t* dst, int64_t ld_dst);

// B operand of O += P V from value rows: dst[kk * ld_dst + d] = (V[2kk][d], V[2kk + 1][d]) for d < Dv, zeros for
// d in [Dv, ld_dst) and for the keys in [N, n_pad) (n_pad even).  V rows are `ld_v` bf16 elements apart.
void pack_values_vnni(int64_t N, int64_t Dv, const uint16_t* V, int64_t ld_v, int64_t n_pad, uint32_t* dst,
                      int64_t ld_dst);

// K^T in bf16 as an A operand: dst[d * ld_dst + n] = K[n][d] for n < N, d < D; zeros for n in [N, n_pad) and d in
// [D, d_pad) (n_pad a multiple of 32, ld_dst >= n_pad).  K rows are `ld_k` bf16 elements apart.
void pack_keys_transposed(int64_t N, int64_t D, const uint16_t* K, int64_t ld_k, int64_t n_pad, int64_t d_pad,
                          uint16_t* dst, int64_t ld_dst);

// dst[j] = bf16(src[j]) (round to nearest even) for j < n, zeros for j in [n, n_pad); n_pad >= round16(n).
void float_to_bf16_row(const float* src, int64_t n, int64_t n_pad, uint16_t* dst);

// out[j] = bf16(exp(x[j] - shift)) for j < n, zeros for j in [n, n_pad) (n_pad >= round16(n)); returns the sum of
// the float32 exponentials (relative error < 3e-6: P is rounded to bf16 after).  x[j] - shift <= 0 expected.
float exp_shift_sum_bf16(const float* x, int64_t n, float shift, uint16_t* out, int64_t n_pad);

// out[j] = bf16(exp(scale * x[j] - shift)) for j < n, zeros for j in [n, n_pad); returns their float32 sum and
// sets *max_arg to the largest exponent scale * x[j] - shift (NaN skipped; -inf for none).  x is only read: the
// forward's one-pass softmax with a stale shift (amx_forward.h) redoes the row when *max_arg is too large.
float exp_scaled_sum_max_bf16(const float* x, int64_t n, float scale, float shift, uint16_t* out, int64_t n_pad,
                              float* max_arg);

// The backward's keys-major pair after its two score products (amx_backward.h): for key rows c < cols of S^T and
// dP^T ([cols, ld] float32, query r at column r, ld a multiple of 32) and r < rows:
//     P = exp(scale * S[c, r] - shift[r]),  dS = P * (dP[c, r] - delta[r])
// p16[c * ld + r] = bf16(P), ds16[c * ld + r] = bf16(dS), and dP[c, r] = dS when keep_ds (the mask gradient).
// The columns [rows, ld) and the rows [cols, cols_out) of p16 and ds16 are written as zeros (operand padding).
// shift[r] = +inf gives P = 0 (a row with LSE -inf); exp as exp_shift_sum_bf16's (relative error < 3e-6).
void amx_backward_scores(const float* S, float* dP, int64_t ld, int64_t cols, int64_t rows, float scale,
                         const float* shift, const float* delta, uint16_t* p16, uint16_t* ds16, int64_t cols_out,
                         bool keep_ds);

}  // namespace fastattn::cpu
