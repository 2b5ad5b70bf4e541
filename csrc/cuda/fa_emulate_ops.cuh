// The attention operators on host-emulated kernels, for testing the CUDA kernels' source on a machine without
// a GPU.  Compile one C++ file that defines FASTATTN_EMULATE and includes this header (g++, torch and CUDA
// include paths; tests/test_cuda_backend.py does it with torch.utils.cpp_extension.load): it registers
// fastattn_emu::attention_fwd / attention_bwd / window_fwd / window_bwd -- the schemas of the fastattn ops of the
// same names -- for CPU float16 / bfloat16 tensors.  Slow (one std::thread per CUDA thread): small problems only.
#pragma once

#ifndef FASTATTN_EMULATE
#error "fa_emulate_ops.cuh is for the host emulation build only (define FASTATTN_EMULATE)"
#endif

#include <torch/library.h>

#include "fa_ops.cuh"

TORCH_LIBRARY(fastattn_emu, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? seed, int causal, float scale, "
        "float dropout_p) -> (Tensor out, Tensor lse)");
  m.def("attention_bwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? seed, Tensor out, Tensor lse, "
        "Tensor dout, Tensor? dlse, int causal, float scale, float dropout_p, bool mask_needs_grad) -> "
        "(Tensor dq, Tensor dk, Tensor dv, Tensor dmask)");
  m.def("window_fwd(Tensor q, Tensor k, Tensor v, Tensor? table, Tensor? seed, int[] geometry, float scale, "
        "float dropout_p) -> (Tensor out, Tensor lse)");
  m.def("window_bwd(Tensor q, Tensor k, Tensor v, Tensor? table, Tensor? seed, Tensor out, Tensor lse, Tensor dout, "
        "int[] geometry, float scale, float dropout_p, bool table_needs_grad) "
        "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dtable)");
}

TORCH_LIBRARY_IMPL(fastattn_emu, CPU, m) {
  m.impl("attention_fwd", &fastattn_cuda::attention_fwd);
  m.impl("attention_bwd", &fastattn_cuda::attention_bwd);
  m.impl("window_fwd", &fastattn_cuda::window_fwd);
  m.impl("window_bwd", &fastattn_cuda::window_bwd);
}
