// CUDA implementations of the fastattn::attention_fwd / attention_bwd and window_fwd / window_bwd operators
// (schemas: csrc/ops.cpp).  Kernels: fa_kernels.cuh (tensor cores), fa_simt.cuh (CUDA cores); argument checks and
// dispatch: fa_ops.cuh.
//
// Instantiations (kept few for build time): tensor cores {float16, bfloat16} x padded head dim {64, 128} x
// {forward, dK/dV, dQ} plus the forward for padded head dim 256; CUDA cores {float16, bfloat16, float32} x
// {forward, dK/dV, dQ} (head dims are a runtime value there); the Delta and split-KV merge kernels per dtype -- 29
// kernels, shared by the dense and the window ops.  Causal, mask kind, dropout, split-KV and the Swin window layout are runtime switches (uniform branches),
// not template parameters.
#include <torch/library.h>

#include "fa_ops.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "fastattn CUDA kernels need sm_80 or newer (mma.sync bf16, ldmatrix, cp.async): set FASTATTN_CUDA_ARCHS >= 8.0"
#endif

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("attention_fwd", &fastattn_cuda::attention_fwd);
  m.impl("attention_bwd", &fastattn_cuda::attention_bwd);
  m.impl("window_fwd", &fastattn_cuda::window_fwd);
  m.impl("window_bwd", &fastattn_cuda::window_bwd);
}
