// Warpgroup MMA (wgmma.mma_async, sm_90a) for the Hopper forward kernel (fa_wgmma_fwd.cuh): shared-memory
// descriptors of the 128-byte-swizzled tiles, the async MMA itself, and its fences.
//
// A warpgroup is 4 consecutive warps (128 threads, the first warp's index a multiple of 4).  One
// wgmma.m64nNk16 computes D[64 x N] (+)= A[64 x 16] * B[16 x N] with fp32 D in registers, B read from shared
// memory through a 64-bit descriptor, and A either from shared memory (descriptor; "SS") or from registers ("RS").
// Register layouts (PTX ISA "Register Fragments and Shared Memory Matrix Layouts" for wgmma; CuTe's ALayout_64x16 and
// CLayout_64xN): warp w of the warpgroup owns rows 16 w .. 16 w + 15, and within them each lane holds exactly the
// mma.sync m16n8k16 fragments of fa_primitives.cuh -- A as the 16 x 16 A fragment (a0..a3), D as N / 8 C
// fragments, register 4 j + i = C fragment j, element i.  So a float d[N / 8][4] accumulator is the kernels' usual
// c[NB][4], and c_to_a turns it into the RS form's A operand.
//
// Shared-memory tiles use the 128-byte swizzle (CUTLASS's Layout_K_SW128_Atom / Layout_MN_SW128_Atom for 16-bit
// types): a [rows][cols] tile is stored as cols / 64 column blocks ("atoms" of 64 elements = 128 bytes), each
// [rows][64] row-major, and in row r the 16-byte chunk c (elements 8c .. 8c + 7 of the block) sits at chunk
// position c ^ (r % 8).  The XOR is applied by the hardware to address bits [4, 7) from bits [7, 10), so every
// block must start 1024-byte aligned.  The same physical tile serves both majors:
//   K-major (the contraction dim contiguous: Q and K in S = Q K^T) -- rows are M or N, 8-row groups SBO = 1024
//     bytes apart; LBO unused (1, as CuTe sets it); a k16 step inside a block is a +32-byte start address;
//   MN-major (V in O = P V: keys are the contraction dim K, the head dim N is contiguous; "transpose B") -- runs of
//     64 N-elements LBO = rows * 128 bytes apart (the next column block), 8-key groups SBO = 1024 bytes apart; a
//     k16 step is +16 rows = +2048 bytes.
// Descriptor bits (CuTe's GmmaDescriptor): [0, 14) start address >> 4, [16, 30) LBO >> 4, [32, 46) SBO >> 4,
// [49, 52) base offset (0: blocks 1024-aligned), [62, 64) layout (1 = 128-byte swizzle).
// tests/test_wgmma_descriptors.py checks these encoders against CuTe's make_gmma_desc on the same layouts.
//
// Ordering: the MMA runs asynchronously after issue.  wgmma_fence() before the first MMA of a batch (its registers
// were last written by ordinary code), wgmma_commit() to close the batch, wgmma_wait<N>() until at most N batches
// are pending; fence_operands() keeps the compiler from moving reads or writes of the accumulators across those
// points.  Shared memory written by the generic proxy (cp.async, st.shared) must be made visible to the async proxy
// with fence_proxy_async() by the writing threads before the barrier that precedes the MMA.
//
// With FASTATTN_EMULATE every primitive has a host emulation (fa_emulate.cuh) that decodes the descriptors by the
// same canonical layouts and computes each lane's fragment when its batch is waited for.
#pragma once

#include <cstdint>
#include <type_traits>

#include "fa_primitives.cuh"

#if defined(FASTATTN_EMULATE) || (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define FA_HAS_WGMMA 1
#else
#define FA_HAS_WGMMA 0
#endif

namespace fastattn_cuda {

// Shared-memory address (the .shared window offset) of a pointer into the CTA's shared memory.
FA_DEVICE uint32_t smem_addr(const void* p) {
#ifdef FASTATTN_EMULATE
  return fa_emu::smem_offset(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// Element offset of (row r, column col) in a 128-byte-swizzled [ROWS][cols] tile of 16-bit elements (see above).
template <int ROWS>
FA_HOST_DEVICE int sw128_offset(int r, int col) {
  return (col / 64) * (ROWS * 64) + r * 64 + ((((col / 8) % 8) ^ (r % 8)) * 8) + col % 8;
}

constexpr uint32_t kSw128AtomBytes = 1024;  // 8 rows x 128 bytes: the swizzle pattern's period and alignment

FA_HOST_DEVICE uint64_t sw128_desc(uint32_t start_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return static_cast<uint64_t>((start_addr >> 4) & 0x3FFF) | static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFF) << 16 |
         static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFF) << 32 | static_cast<uint64_t>(1) << 62;
}

// K-major operand starting at shared address `start` (a row group's first row, plus 32 bytes per k16 step).
FA_HOST_DEVICE uint64_t sw128_kmajor_desc(uint32_t start) { return sw128_desc(start, 16, kSw128AtomBytes); }

// MN-major operand: 64-element runs of N `block_bytes` apart (the tile's column-block stride, rows * 128).
FA_HOST_DEVICE uint64_t sw128_mnmajor_desc(uint32_t start, uint32_t block_bytes) {
  return sw128_desc(start, block_bytes, kSw128AtomBytes);
}

// Byte offset of k16 step ks of a K-major [ROWS][cols] tile: column block ks / 4, then 32 bytes per step inside it.
template <int ROWS>
FA_HOST_DEVICE uint32_t sw128_k_kstep_bytes(int ks) {
  return static_cast<uint32_t>((ks / 4) * ROWS * 128 + (ks % 4) * 32);
}

// Byte offset of k16 step ks of an MN-major view of a [ROWS = K][COLS = N] tile: 16 rows of 128 bytes per step.
FA_HOST_DEVICE uint32_t sw128_mn_kstep_bytes(int ks) { return static_cast<uint32_t>(ks * 16 * 128); }

// LBO of an MN-major view of a [ROWS][COLS] tile: the column-block stride, 0 when there is one block (as CuTe sets it).
template <int ROWS, int COLS>
FA_HOST_DEVICE uint32_t sw128_mn_block_bytes() {
  return COLS > 64 ? ROWS * 128 : 0;
}

FA_DEVICE void wgmma_fence() {
#if FA_HAS_WGMMA && !defined(FASTATTN_EMULATE)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

FA_DEVICE void wgmma_commit() {
#ifdef FASTATTN_EMULATE
  fa_emu::wgmma_commit();
#elif FA_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

template <int N>
FA_DEVICE void wgmma_wait() {
#ifdef FASTATTN_EMULATE
  fa_emu::wgmma_wait(N);
#elif FA_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Pins every element of an accumulator at this point of the program (no code motion across it).
template <int NB>
FA_DEVICE void fence_operands(float (&c)[NB][4]) {
#ifndef FASTATTN_EMULATE
#pragma unroll
  for (int i = 0; i < NB; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(c[i][e])::"memory");
#else
  (void)c;
#endif
}

// The same for register operands of an MMA in flight (the RS form's A fragments).
template <int NA>
FA_DEVICE void fence_operands(uint32_t (&a)[NA][4]) {
#ifndef FASTATTN_EMULATE
#pragma unroll
  for (int i = 0; i < NA; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[i][e])::"memory");
#else
  (void)a;
#endif
}

FA_DEVICE void fence_proxy_async() {
#if FA_HAS_WGMMA && !defined(FASTATTN_EMULATE)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// d[64 x N] = (scale_d ? d : 0) + A B, A and B K-major in shared memory (descriptors).  d: this lane's N / 2 floats.
template <typename T, int N>
FA_DEVICE void wgmma_ss(float* d, uint64_t desc_a, uint64_t desc_b, int scale_d);

// d[64 x N] = (scale_d ? d : 0) + A B, A from registers (this lane's m16k16 fragment), B MN-major in shared memory.
template <typename T, int N>
FA_DEVICE void wgmma_rs(float* d, const uint32_t (&a)[4], uint64_t desc_b, int scale_d);

#ifdef FASTATTN_EMULATE
template <typename T, int N>
FA_DEVICE void wgmma_ss(float* d, uint64_t desc_a, uint64_t desc_b, int scale_d) {
  fa_emu::wgmma_issue(d, N, scale_d != 0, nullptr, desc_a, desc_b, /*b_mn_major=*/false,
                      std::is_same<T, __nv_bfloat16>::value);
}
template <typename T, int N>
FA_DEVICE void wgmma_rs(float* d, const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  fa_emu::wgmma_issue(d, N, scale_d != 0, a, 0, desc_b, /*b_mn_major=*/true, std::is_same<T, __nv_bfloat16>::value);
}
#elif FA_HAS_WGMMA
// (one macro per form and shape, instantiated for f16 and bf16: inline PTX needs literal operand lists)
#define FA_WGMMA_SS_N64(TY) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {" \
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31" \
      "}, %32, %33, p, 1, 1, 0, 0;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d))

#define FA_WGMMA_SS_N128(TY) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {" \
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63" \
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d))

#define FA_WGMMA_RS_N64(TY) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {" \
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31" \
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d))

#define FA_WGMMA_RS_N128(TY) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {" \
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63" \
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d))

template <>
FA_DEVICE void wgmma_ss<__half, 64>(float* d, uint64_t desc_a, uint64_t desc_b, int scale_d) {
  FA_WGMMA_SS_N64("f16");
}
template <>
FA_DEVICE void wgmma_ss<__nv_bfloat16, 64>(float* d, uint64_t desc_a, uint64_t desc_b, int scale_d) {
  FA_WGMMA_SS_N64("bf16");
}
template <>
FA_DEVICE void wgmma_ss<__half, 128>(float* d, uint64_t desc_a, uint64_t desc_b, int scale_d) {
  FA_WGMMA_SS_N128("f16");
}
template <>
FA_DEVICE void wgmma_ss<__nv_bfloat16, 128>(float* d, uint64_t desc_a, uint64_t desc_b, int scale_d) {
  FA_WGMMA_SS_N128("bf16");
}
template <>
FA_DEVICE void wgmma_rs<__half, 64>(float* d, const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  FA_WGMMA_RS_N64("f16");
}
template <>
FA_DEVICE void wgmma_rs<__nv_bfloat16, 64>(float* d, const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  FA_WGMMA_RS_N64("bf16");
}
template <>
FA_DEVICE void wgmma_rs<__half, 128>(float* d, const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  FA_WGMMA_RS_N128("f16");
}
template <>
FA_DEVICE void wgmma_rs<__nv_bfloat16, 128>(float* d, const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  FA_WGMMA_RS_N128("bf16");
}
#endif

}  // namespace fastattn_cuda
