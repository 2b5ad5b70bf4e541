// Philox-4x32-10: the counter-based random number generator of fastattn's dropout, for host (C++) and device
// (CUDA) code alike.
//
// The dropout keep-mask is a pure function of (seed, b * Hq + h, query index m, key index n), so the backward
// regenerates it instead of storing it, and every backend draws the same mask:
//
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (n, m, b * Hq + h, 0)
//   keep    = (first output word >> 8) >= round(dropout_p * 2^24)      i.e. P(keep) = 1 - dropout_p
//
// This is the stream of Triton's tl.philox (fastattn/kernels/triton_attention.py `_dropout_keep`) and of the
// reference implementation in PyTorch (fastattn/backends/reference.py `philox4x32`, `dropout_keep_mask`).
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTATTN_HOST_DEVICE inline
#endif

namespace fastattn {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;    // key schedule increments (golden ratio, sqrt(3) - 1)
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;  // round multipliers
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;

struct Philox4x32 {
  uint32_t x0, x1, x2, x3;
};

// High 32 bits of the 64-bit product a * b.
FASTATTN_HOST_DEVICE uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Ten rounds of Philox-4x32 on counter (c0, c1, c2, c3) with the 64-bit key `seed`.
FASTATTN_HOST_DEVICE Philox4x32 philox4x32_10(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t c0_old = c0, c2_old = c2;
    c0 = philox_mulhi(kPhiloxRoundB, c2_old) ^ c1 ^ k0;
    c2 = philox_mulhi(kPhiloxRoundA, c0_old) ^ c3 ^ k1;
    c1 = c2_old * kPhiloxRoundB;  // low 32 bits of the products (uint32 arithmetic wraps)
    c3 = c0_old * kPhiloxRoundA;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return {c0, c1, c2, c3};
}

// True when element (query m, key n) of head row `bh` = b * Hq + h survives dropout.
// `threshold` = dropout_threshold(p): keep iff the top 24 bits of the first word are >= it.
FASTATTN_HOST_DEVICE bool dropout_keep(uint64_t seed, uint32_t bh, uint32_t m, uint32_t n, uint32_t threshold) {
  return (philox4x32_10(seed, n, m, bh, 0u).x0 >> 8) >= threshold;
}

// round(p * 2^24) with ties to even, as Python's round() in fastattn.backends.reference.dropout_threshold.
// p * 2^24 is exact in double for p in [0, 1), so only genuine ties (x.5) need the rule.
FASTATTN_HOST_DEVICE uint32_t dropout_threshold(double p) {
  const double x = p * 16777216.0;
  double r = static_cast<double>(static_cast<int64_t>(x + 0.5));  // round half up ...
  if (r - x == 0.5 && (static_cast<int64_t>(r) & 1)) r -= 1.0;    // ... then ties to even
  return static_cast<uint32_t>(r);
}

}  // namespace fastattn
