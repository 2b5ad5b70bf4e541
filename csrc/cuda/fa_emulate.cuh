// A host emulator of the small subset of CUDA the attention kernels use, so that the kernels' own source --
// tile loops, fragment index math, online softmax, masking, pipelining -- runs on a CPU (compiled by g++ with
// FASTATTN_EMULATE).  Used by tests/test_cuda_backend.py on machines without a GPU; never part of the real
// extension.
//
// Model: a kernel launch runs its CTAs one after another; a CTA runs as blockDim.x std::threads (one per CUDA
// thread) sharing one shared-memory buffer.  __syncthreads is a barrier over the CTA's threads; warp
// collectives (shuffles, ldmatrix, mma) exchange operands through per-warp slots between two barriers over the
// warp's 32 threads, so each lane computes exactly the fragment the PTX ISA specifies for it.
// cp.async copies are deferred: they happen when the issuing thread waits for their group (cp.async.wait_group
// semantics), so a kernel that reads shared memory before waiting sees stale data here too.  Shared memory
// starts filled with 0xFF bytes (NaN in fp16, bf16 and fp32), so reads of never-written elements show up.
// wgmma (fa_wgmma.cuh): the 128 threads of a warpgroup exchange register A operands at issue (a barrier over the
// warpgroup); each thread computes its own D fragment when it waits for the batch (wgmma.wait_group semantics), reading
// B (and an SS-form A) from shared memory through the descriptor's canonical 128-byte-swizzled layout, so a kernel
// that overwrites a tile or reads the accumulators before waiting sees the difference here too.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

namespace fa_emu {

struct Warp {
  explicit Warp() : bar(32) {}
  std::barrier<> bar;
  const void* ptr[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  float f[32];
};

constexpr int kWgmmaSlots = 64;  // register A operands of the last 64 wgmmas a warpgroup issued

struct WarpGroup {
  WarpGroup() : bar(128) {}
  std::barrier<> bar;
  uint32_t a[kWgmmaSlots][128][4];
};

struct Cta {
  Cta(int nthreads, size_t smem_bytes)
      : bar(nthreads), smem(smem_bytes + 16, static_cast<char>(0xFF)), smem_size(smem_bytes) {
    for (int w = 0; w < (nthreads + 31) / 32; ++w) warps.emplace_back(new Warp());
    for (int g = 0; g < nthreads / 128; ++g) groups.emplace_back(new WarpGroup());
  }
  std::barrier<> bar;
  std::vector<char> smem;
  size_t smem_size;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<std::unique_ptr<WarpGroup>> groups;
  char* smem_base() {  // 16-byte aligned; shared address 0 (smem_offset)
    return reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem.data()) + 15) & ~uintptr_t(15));
  }
};

struct PendingCopy {
  void* dst;
  const void* src;
  bool valid;
};

struct PendingMma {
  float* d;
  int n;                   // N of m64nNk16
  bool scale_d;            // false: d = A B
  bool a_in_smem;          // SS form (desc_a) or RS form (the warpgroup's slot of register operands)
  int slot;
  uint64_t desc_a, desc_b;
  bool b_mn_major;
  bool bf16;
};

struct ThreadState {
  Cta* cta = nullptr;
  uint3 tid{0, 0, 0};
  uint3 bid{0, 0, 0};
  dim3 grid{1, 1, 1};
  dim3 block{1, 1, 1};
  std::vector<std::vector<PendingCopy>> groups;  // committed cp.async groups, oldest first
  std::vector<PendingCopy> open;                 // issued, not yet committed
  std::vector<std::vector<PendingMma>> mma_groups;  // committed wgmma batches, oldest first
  std::vector<PendingMma> mma_open;
  unsigned mma_seq = 0;
};

inline thread_local ThreadState tls;

inline int lane_id() { return static_cast<int>(tls.tid.x % 32); }
inline Warp& warp() { return *tls.cta->warps[tls.tid.x / 32]; }

inline void syncthreads() { tls.cta->bar.arrive_and_wait(); }

inline void syncwarp() { warp().bar.arrive_and_wait(); }

inline float shfl_xor(float v, int lane_mask) {
  Warp& w = warp();
  const int lane = lane_id();
  w.f[lane] = v;
  w.bar.arrive_and_wait();
  const float r = w.f[lane ^ lane_mask];
  w.bar.arrive_and_wait();
  return r;
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr, bool trans) {
  Warp& w = warp();
  const int lane = lane_id();
  if (reinterpret_cast<uintptr_t>(row_addr) % 16 != 0) throw std::runtime_error("ldmatrix: unaligned row address");
  w.ptr[lane] = row_addr;
  w.bar.arrive_and_wait();
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {  // row lane/4 of matrix i, columns 2(lane%4), +1
      const uint16_t* row = static_cast<const uint16_t*>(w.ptr[8 * i + lane / 4]);
      lo = row[2 * (lane % 4)];
      hi = row[2 * (lane % 4) + 1];
    } else {  // column lane/4 of matrix i, rows 2(lane%4), +1
      lo = static_cast<const uint16_t*>(w.ptr[8 * i + 2 * (lane % 4)])[lane / 4];
      hi = static_cast<const uint16_t*>(w.ptr[8 * i + 2 * (lane % 4) + 1])[lane / 4];
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  w.bar.arrive_and_wait();
}

inline float half_bits_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    uint32_t f = static_cast<uint32_t>(bits) << 16;
    float x;
    memcpy(&x, &f, 4);
    return x;
  }
  __half h;
  memcpy(&h, &bits, 2);
  return __half2float(h);
}

// Element (row, col) of the 16 x 16 A operand, from the lanes' a registers (layout in fa_primitives.cuh).
inline float a_elem(const Warp& w, int row, int col, bool bf16) {
  const int lane = (row % 8) * 4 + (col % 8) / 2;
  const int reg = (row >= 8 ? 1 : 0) + (col >= 8 ? 2 : 0);
  const uint32_t v = w.a[lane][reg];
  return half_bits_to_float(static_cast<uint16_t>(col % 2 ? v >> 16 : v & 0xFFFF), bf16);
}

// Element (k, n) of the 16 x 8 B operand.
inline float b_elem(const Warp& w, int k, int n, bool bf16) {
  const int lane = n * 4 + (k % 8) / 2;
  const uint32_t v = w.b[lane][k >= 8 ? 1 : 0];
  return half_bits_to_float(static_cast<uint16_t>(k % 2 ? v >> 16 : v & 0xFFFF), bf16);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, d += a * b (products exact, fp32 sums).
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  Warp& w = warp();
  const int lane = lane_id();
  for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i];
  w.b[lane][0] = b0;
  w.b[lane][1] = b1;
  w.bar.arrive_and_wait();
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i % 2);
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += a_elem(w, row, k, bf16) * b_elem(w, k, col, bf16);
    d[i] = acc;
  }
  w.bar.arrive_and_wait();
}

inline uint32_t smem_offset(const void* p) {
  const char* base = tls.cta->smem_base();
  const char* c = static_cast<const char*>(p);
  if (c < base || c >= base + tls.cta->smem_size) throw std::runtime_error("smem_offset: not a shared-memory pointer");
  return static_cast<uint32_t>(c - base);
}

// Byte offset of element (mn, k) of a wgmma operand from its descriptor (fa_wgmma.cuh): 128-byte swizzle only;
// K-major: row mn at 128 B, 8-row groups SBO apart, k contiguous; MN-major: 64-element runs of mn LBO apart, rows k
// at 128 B, 8-row groups SBO apart.  Then the swizzle: address bits [4, 7) ^= bits [7, 10).
inline uint32_t wgmma_operand_offset(uint64_t desc, int mn, int k, bool mn_major) {
  if ((desc >> 62) != 1) throw std::runtime_error("wgmma: only the 128-byte swizzle is emulated");
  if (((desc >> 49) & 7) != 0) throw std::runtime_error("wgmma: nonzero base offset");
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  uint32_t off;
  if (!mn_major)
    off = start + (mn / 8) * sbo + (mn % 8) * 128 + k * 2;
  else
    off = start + (mn / 64) * lbo + (mn % 64) * 2 + (k / 8) * sbo + (k % 8) * 128;
  return off ^ (((off >> 7) & 7) << 4);
}

inline float wgmma_smem_elem(uint64_t desc, int mn, int k, bool mn_major, bool bf16) {
  const uint32_t off = wgmma_operand_offset(desc, mn, k, mn_major);
  if (off + 2 > tls.cta->smem_size) throw std::runtime_error("wgmma: operand outside shared memory");
  uint16_t bits;
  memcpy(&bits, tls.cta->smem_base() + off, 2);
  return half_bits_to_float(bits, bf16);
}

inline WarpGroup& warpgroup() {
  if (tls.block.x % 128 != 0) throw std::runtime_error("wgmma: the block is not a whole number of warpgroups");
  return *tls.cta->groups[tls.tid.x / 128];
}

// wgmma.mma_async issue (a = null: SS form).  The warpgroup's threads meet once so that the register operands of
// every thread are in the slot before any thread computes.
inline void wgmma_issue(float* d, int n, bool scale_d, const uint32_t* a, uint64_t desc_a, uint64_t desc_b,
                        bool b_mn_major, bool bf16) {
  WarpGroup& wg = warpgroup();
  const int slot = static_cast<int>(tls.mma_seq++ % kWgmmaSlots);
  if (a != nullptr)
    for (int i = 0; i < 4; ++i) wg.a[slot][tls.tid.x % 128][i] = a[i];
  wg.bar.arrive_and_wait();
  tls.mma_open.push_back({d, n, scale_d, a == nullptr, slot, desc_a, desc_b, b_mn_major, bf16});
}

inline void wgmma_commit() {
  tls.mma_groups.push_back(std::move(tls.mma_open));
  tls.mma_open.clear();
}

// This thread's D fragment of one wgmma: warp w of the warpgroup holds rows 16 w + g (+ 8), register 4 j + i is
// row 16 w + g + 8 (i / 2), column 8 j + 2 t + i % 2 (mma.sync C fragments, fa_primitives.cuh).
inline void wgmma_compute(const PendingMma& op) {
  const WarpGroup& wg = warpgroup();
  const int wt = static_cast<int>(tls.tid.x % 128), w = wt / 32, lane = wt % 32, g = lane / 4, t = lane % 4;
  auto a_elem = [&](int row, int k) {  // row 0..63 of the warpgroup's A, k 0..15
    if (op.a_in_smem) return wgmma_smem_elem(op.desc_a, row, k, /*mn_major=*/false, op.bf16);
    const int rw = row % 16;  // the owning lane of warp row / 16 (A fragment layout, fa_primitives.cuh)
    const int src = (row / 16) * 32 + (rw % 8) * 4 + (k % 8) / 2;
    const uint32_t v = wg.a[op.slot][src][(rw >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
    return half_bits_to_float(static_cast<uint16_t>(k % 2 ? v >> 16 : v & 0xFFFF), op.bf16);
  };
  float a_row[2][16];
  for (int r = 0; r < 2; ++r)
    for (int k = 0; k < 16; ++k) a_row[r][k] = a_elem(16 * w + g + 8 * r, k);
  for (int j = 0; j < op.n / 8; ++j)
    for (int i = 0; i < 4; ++i) {
      const int col = 8 * j + 2 * t + i % 2;
      float acc = 0.f;
      for (int k = 0; k < 16; ++k) acc += a_row[i / 2][k] * wgmma_smem_elem(op.desc_b, col, k, op.b_mn_major, op.bf16);
      op.d[4 * j + i] = op.scale_d ? op.d[4 * j + i] + acc : acc;
    }
}

inline void wgmma_wait(int n) {
  while (static_cast<int>(tls.mma_groups.size()) > n) {
    for (const PendingMma& op : tls.mma_groups.front()) wgmma_compute(op);
    tls.mma_groups.erase(tls.mma_groups.begin());
  }
}

inline void cp_async_16(void* dst, const void* src, bool valid) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) throw std::runtime_error("cp.async: unaligned shared address");
  if (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0)
    throw std::runtime_error("cp.async: unaligned global address");
  tls.open.push_back({dst, src, valid});
}

inline void cp_async_commit() {
  tls.groups.push_back(std::move(tls.open));
  tls.open.clear();
}

inline void cp_async_wait(int n) {
  while (static_cast<int>(tls.groups.size()) > n) {
    for (const PendingCopy& c : tls.groups.front()) {
      if (c.valid)
        memcpy(c.dst, c.src, 16);
      else
        memset(c.dst, 0, 16);
    }
    tls.groups.erase(tls.groups.begin());
  }
}

// Runs kernel() for every CTA of the grid.  The kernel reads its coordinates through the macros below.
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& kernel) {
  if (block.y != 1 || block.z != 1) throw std::runtime_error("fa_emu: 1-D blocks only");
  const int nthreads = static_cast<int>(block.x);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Cta cta(nthreads, smem_bytes);
        std::vector<std::thread> threads;
        std::vector<std::string> errors(nthreads);
        threads.reserve(nthreads);
        for (int t = 0; t < nthreads; ++t) {
          threads.emplace_back([&, t] {
            tls = ThreadState();
            tls.cta = &cta;
            tls.tid = uint3{static_cast<unsigned>(t), 0, 0};
            tls.bid = uint3{x, y, z};
            tls.grid = grid;
            tls.block = block;
            try {
              kernel();
              if (!tls.open.empty() || !tls.groups.empty()) errors[t] = "cp.async copies never waited for";
              if (!tls.mma_open.empty() || !tls.mma_groups.empty()) errors[t] = "wgmma batches never waited for";
            } catch (const std::exception& e) {
              errors[t] = e.what();  // a throwing thread leaves the others blocked: report and abort
              fprintf(stderr, "fa_emu: thread %d of CTA (%u,%u,%u): %s\n", t, x, y, z, e.what());
              std::abort();
            }
          });
        }
        for (auto& th : threads) th.join();
        for (const auto& e : errors)
          if (!e.empty()) throw std::runtime_error("fa_emu: " + e);
      }
}

}  // namespace fa_emu

// The CUDA built-ins the kernels use, for host compilation.
#define threadIdx (fa_emu::tls.tid)
#define blockIdx (fa_emu::tls.bid)
#define gridDim (fa_emu::tls.grid)
#define blockDim (fa_emu::tls.block)
#define __syncthreads() fa_emu::syncthreads()
// (cuda_runtime's host_defines.h, pulled in by cuda_fp16.h, already defines these as nothing for g++)
#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
