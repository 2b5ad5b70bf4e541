// Checks csrc/cuda/fa_wgmma.cuh against CuTe (the nvidia-cutlass wheel's headers; host code only, no GPU):
//   1. the 128-byte-swizzled tile layout (sw128_offset) is CuTe's Layout_K_SW128_Atom tiled down the rows, and seen
//      MN-major (V) CuTe's Layout_MN_SW128_Atom tiled along K first -- element by element, through CuTe's tensors;
//   2. the descriptors (sw128_kmajor_desc, sw128_mnmajor_desc) have the LBO, SBO, base-offset and layout bits that
//      CuTe's make_gmma_desc computes for every k16 slice of those tiles, and the k-step start offsets
//      (sw128_k_kstep_bytes, sw128_mn_kstep_bytes) are where CuTe's slices start (the start address itself CuTe
//      only computes on a GPU);
//   3. the register layouts the host emulator (fa_emulate.cuh) gives wgmma's A operand and D accumulator are
//      CuTe's ALayout_64x16 and CLayout_64xN.
// Prints "OK (0 mismatches)" and exits 0, or lists the mismatches and exits 1.  Built by tests/test_wgmma_layouts.py.
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include <cstdio>

// after CuTe: the emulator header defines threadIdx & co. as macros
#define FASTATTN_EMULATE 1
#include "fa_wgmma.cuh"

using namespace cute;
using namespace fastattn_cuda;

static int failures = 0;
#define CHECK(cond, ...)                 \
  do {                                   \
    if (!(cond)) {                       \
      if (++failures <= 40) {            \
        printf("MISMATCH: " __VA_ARGS__); \
        printf("\n");                    \
      }                                  \
    }                                    \
  } while (0)

template <int ROWS, int COLS>
void check_tile() {
  auto k_layout = tile_to_shape(GMMA::Layout_K_SW128_Atom<half_t>{}, make_shape(Int<ROWS>{}, Int<COLS>{}));
  auto mn_layout =
      tile_to_shape(GMMA::Layout_MN_SW128_Atom<half_t>{}, make_shape(Int<COLS>{}, Int<ROWS>{}), Step<_2, _1>{});
  alignas(1024) static half_t buf[ROWS * COLS];
  Tensor tk = make_tensor(make_smem_ptr(buf), k_layout);   // (row, column)
  Tensor tm = make_tensor(make_smem_ptr(buf), mn_layout);  // (n = column, k = row)
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < COLS; ++c) {
      const int ours = sw128_offset<ROWS>(r, c), ck = int(&tk(r, c) - buf), cm = int(&tm(c, r) - buf);
      CHECK(ck == ours, "K-major %dx%d (%d, %d): cute %d, ours %d", ROWS, COLS, r, c, ck, ours);
      CHECK(cm == ours, "MN-major %dx%d (%d, %d): cute %d, ours %d", ROWS, COLS, r, c, cm, ours);
    }
  const uint64_t no_start = ~uint64_t(0xFFFF);  // every field but the start address
  for (int ks = 0; ks < COLS / 16; ++ks) {  // K-major: all ROWS rows, columns 16 ks ..
    auto slice = local_tile(tk, make_shape(Int<ROWS>{}, _16{}), make_coord(0, ks));
    const uint64_t cute_desc = SM90::GMMA::make_gmma_desc<GMMA::Major::K>(slice).desc_;
    const uint64_t ours = sw128_kmajor_desc(0);
    CHECK((cute_desc & no_start) == (ours & no_start), "K-major %dx%d step %d: cute %016llx, ours %016llx", ROWS,
          COLS, ks, (unsigned long long)cute_desc, (unsigned long long)ours);
    const long start = long(reinterpret_cast<char*>(&slice(0, 0)) - reinterpret_cast<char*>(buf));
    CHECK(start == long(sw128_k_kstep_bytes<ROWS>(ks)), "K-major %dx%d step %d starts at %ld, ours %u", ROWS, COLS,
          ks, start, sw128_k_kstep_bytes<ROWS>(ks));
  }
  for (int ks = 0; ks < ROWS / 16; ++ks) {  // MN-major: all COLS columns (N), rows (K) 16 ks ..
    auto slice = local_tile(tm, make_shape(Int<COLS>{}, _16{}), make_coord(0, ks));
    const uint64_t cute_desc = SM90::GMMA::make_gmma_desc<GMMA::Major::MN>(slice).desc_;
    const uint64_t ours = sw128_mnmajor_desc(0, sw128_mn_block_bytes<ROWS, COLS>());
    CHECK((cute_desc & no_start) == (ours & no_start), "MN-major %dx%d step %d: cute %016llx, ours %016llx", ROWS,
          COLS, ks, (unsigned long long)cute_desc, (unsigned long long)ours);
    const long start = long(reinterpret_cast<char*>(&slice(0, 0)) - reinterpret_cast<char*>(buf));
    CHECK(start == long(sw128_mn_kstep_bytes(ks)), "MN-major %dx%d step %d starts at %ld, ours %u", ROWS, COLS, ks,
          start, sw128_mn_kstep_bytes(ks));
  }
}

// The emulator's wgmma register model (fa_emulate.cuh, wgmma_compute): thread x of the warpgroup (warp w = x / 32,
// g = x % 32 / 4, t = x % 4); D register 4 j + i is (16 w + g + 8 (i / 2), 8 j + 2 t + i % 2); A register q, half e is
// (16 w + g + 8 (q % 2), 2 t + 8 (q / 2) + e).  CuTe's layouts map (thread, value) to m + 64 n (column-major 64 x N).
template <int N>
void check_registers() {
  using CLayout = GMMA::CLayout_64xN<N>;
  for (int x = 0; x < 128; ++x) {
    const int w = x / 32, g = x % 32 / 4, t = x % 4;
    for (int v = 0; v < N / 2; ++v) {
      const int j = v / 4, i = v % 4;
      const int m = 16 * w + g + 8 * (i / 2), n = 8 * j + 2 * t + i % 2;
      const int cute_idx = CLayout{}(x, v);
      CHECK(cute_idx == m + 64 * n, "D 64x%d thread %d value %d: cute (%d, %d), ours (%d, %d)", N, x, v, cute_idx % 64,
            cute_idx / 64, m, n);
    }
    if (N == 64)
      for (int v = 0; v < 8; ++v) {  // value v = register v / 2, half v % 2
        const int q = v / 2, e = v % 2;
        const int m = 16 * w + g + 8 * (q % 2), k = 2 * t + 8 * (q / 2) + e;
        const int cute_idx = GMMA::ALayout_64x16{}(x, v);
        CHECK(cute_idx == m + 64 * k, "A thread %d value %d: cute (%d, %d), ours (%d, %d)", x, v, cute_idx % 64,
              cute_idx / 64, m, k);
      }
  }
}

int main() {
  check_tile<64, 64>();
  check_tile<128, 64>();
  check_tile<64, 128>();
  check_tile<128, 128>();
  check_registers<64>();
  check_registers<128>();
  printf("%s (%d mismatches)\n", failures ? "FAIL" : "OK", failures);
  return failures ? 1 : 0;
}
