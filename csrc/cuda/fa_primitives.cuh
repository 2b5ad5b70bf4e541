// Warp-level building blocks of the CUDA attention kernels (sm_80+): tensor-core MMA, ldmatrix, cp.async,
// exp2, Philox and fp16/bf16 packing.
//
// Every primitive has two implementations: inline PTX for the GPU, and (with FASTATTN_EMULATE defined) a host
// emulation of the same instruction semantics in fa_emulate.cuh, so the kernels' index math can be run and
// tested on a machine without a GPU (tests/test_cuda_backend.py builds the kernels that way).
//
// Fragment layouts of mma.sync.aligned.m16n8k16.row.col (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// lane = 0..31, g = lane / 4 ("group", 0..7) and t = lane % 4 ("thread in group", 0..3):
//
//   A (16 x 16, 4 x .b32 = 8 halves)      B (16 x 8, 2 x .b32)            C/D (16 x 8, 4 x f32)
//     a0: A[g    ][2t, 2t+1]                b0: B[2t, 2t+1    ][g]          c0, c1: C[g    ][2t, 2t+1]
//     a1: A[g + 8][2t, 2t+1]                b1: B[2t+8, 2t+9  ][g]          c2, c3: C[g + 8][2t, 2t+1]
//     a2: A[g    ][2t+8, 2t+9]
//     a3: A[g + 8][2t+8, 2t+9]
//   (in each .b32 the element with the smaller column/row index sits in the low 16 bits)
//
// ldmatrix.x4 loads four 8 x 8 b16 matrices; lanes 8i..8i+7 give the addresses of the 8 rows of matrix i, and
// register i of lane l receives row l/4, columns 2(l%4), 2(l%4)+1 of matrix i (with .trans: the transposed
// matrix, i.e. rows 2(l%4), 2(l%4)+1 of column l/4).  Both match the fragment layouts above, see the gemm
// helpers in fa_kernels.cuh for which addresses produce which fragment.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifdef FASTATTN_EMULATE
#include "fa_emulate.cuh"
#define FA_DEVICE inline
#define FA_HOST_DEVICE inline
#else
#define FA_DEVICE __device__ __forceinline__
#define FA_HOST_DEVICE __host__ __device__ __forceinline__  // pure index math, also checked from host code
#endif

namespace fastattn_cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ----------------------------------------------------------------------------------------------------------
// fp16 / bf16 conversions and packing of two values into one .b32 register (low half = first value).
// ----------------------------------------------------------------------------------------------------------
template <typename T> struct Pair;
template <> struct Pair<__half> { using type = __half2; };
template <> struct Pair<__nv_bfloat16> { using type = __nv_bfloat162; };

FA_DEVICE float to_float(__half x) { return __half2float(x); }
FA_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
FA_DEVICE float to_float(float x) { return x; }  // (the CUDA-core kernels, fa_simt.cuh, also take float32)

template <typename T> FA_DEVICE T from_float(float x);
template <> FA_DEVICE __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> FA_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> FA_DEVICE float from_float<float>(float x) { return x; }

template <typename T> FA_DEVICE uint32_t pack2(float lo, float hi);
template <> FA_DEVICE uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo
  uint32_t r;
  memcpy(&r, &h, 4);
  return r;
}
template <> FA_DEVICE uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &h, 4);
  return r;
}

// ----------------------------------------------------------------------------------------------------------
// exp2 / log2.  On the GPU ex2.approx (what exp2f becomes under --use_fast_math; ~2 ulp, exp2(-inf) = +0).
// ----------------------------------------------------------------------------------------------------------
FA_DEVICE float fast_exp2(float x) {
#ifdef FASTATTN_EMULATE
  return exp2f(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

FA_DEVICE float fast_log2(float x) {
#ifdef FASTATTN_EMULATE
  return log2f(x);
#else
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// ----------------------------------------------------------------------------------------------------------
// Warp shuffles (all 32 lanes participate).
// ----------------------------------------------------------------------------------------------------------
FA_DEVICE float shfl_xor(float v, int lane_mask) {
#ifdef FASTATTN_EMULATE
  return fa_emu::shfl_xor(v, lane_mask);
#else
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
#endif
}

// Orders the warp's shared-memory writes before its lanes read each other's (a warp-level barrier).
FA_DEVICE void syncwarp() {
#ifdef FASTATTN_EMULATE
  fa_emu::syncwarp();
#else
  __syncwarp();
#endif
}

// ----------------------------------------------------------------------------------------------------------
// Philox-4x32-10, first output word only: the dropout stream of the Triton kernels (tl.philox) and of
// fastattn.backends.reference.dropout_keep_mask.  key = (seed low word, seed high word).
// ----------------------------------------------------------------------------------------------------------
FA_DEVICE uint32_t umulhi32(uint32_t a, uint32_t b) {
#ifdef FASTATTN_EMULATE
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#else
  return __umulhi(a, b);
#endif
}

FA_DEVICE uint32_t philox_first_word(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t c0_old = c0, c2_old = c2;
    c0 = umulhi32(0xCD9E8D57u, c2_old) ^ c1 ^ k0;
    c2 = umulhi32(0xD2511F53u, c0_old) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * c2_old;
    c3 = 0xD2511F53u * c0_old;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Keep element (query m, key n) of head bh = b * Hq + h?  Counter (n, m, bh, 0); keep iff the top 24 bits of
// the first word are >= threshold = round(p * 2^24).
FA_DEVICE bool dropout_keep(uint64_t seed, uint32_t threshold, int m, int n, int bh) {
  const uint32_t r = philox_first_word(seed, static_cast<uint32_t>(n), static_cast<uint32_t>(m),
                                       static_cast<uint32_t>(bh), 0u);
  return (r >> 8) >= threshold;
}

// ----------------------------------------------------------------------------------------------------------
// ldmatrix: each lane passes the shared-memory address of "its" 16-byte matrix row (see the header comment).
// ----------------------------------------------------------------------------------------------------------
FA_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#ifdef FASTATTN_EMULATE
  fa_emu::ldmatrix_x4(r, smem_row, false);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

FA_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
#ifdef FASTATTN_EMULATE
  fa_emu::ldmatrix_x4(r, smem_row, true);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// ----------------------------------------------------------------------------------------------------------
// d += A * B on tensor cores: m16n8k16, fp16 or bf16 inputs, fp32 accumulators.
// ----------------------------------------------------------------------------------------------------------
template <typename T>
FA_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
FA_DEVICE void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef FASTATTN_EMULATE
  fa_emu::mma_16816(d, a, b0, b1, /*bf16=*/false);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
FA_DEVICE void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef FASTATTN_EMULATE
  fa_emu::mma_16816(d, a, b0, b1, /*bf16=*/true);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// ----------------------------------------------------------------------------------------------------------
// cp.async: 16-byte global -> shared copies that bypass registers (and L1: .cg).  With valid == false the
// 16 bytes are zero-filled (src-size 0: nothing is read from global memory).
// ----------------------------------------------------------------------------------------------------------
FA_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
#ifdef FASTATTN_EMULATE
  fa_emu::cp_async_16(smem_dst, gmem_src, valid);
#else
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_size));
#endif
}

FA_DEVICE void cp_async_commit() {
#ifdef FASTATTN_EMULATE
  fa_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
FA_DEVICE void cp_async_wait() {
#ifdef FASTATTN_EMULATE
  fa_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

}  // namespace fastattn_cuda
