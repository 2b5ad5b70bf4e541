// The fastattn::attention_fwd / attention_bwd and window_fwd / window_bwd operators on top of the kernels in
// fa_kernels.cuh: argument checks (TORCH_CHECK naming the argument), output allocation, parameter set-up and
// dispatch over dtype x padded head dim.  Device-agnostic except where marked, so that the same code also runs
// with the host-emulated kernels (FASTATTN_EMULATE, CPU tensors; see fa_emulate_ops.cuh).
//
// Two kernel families behind the same ops (kernel_family picks one per call and direction):
//   tensor cores (fa_kernels.cuh): float16 / bfloat16 with Dv == Dqk, a multiple of 8 -- forward and backward up to
//     256 (padded to 64, 128 or 256; the backward past 128 where the device has the shared memory of its wide
//     tiles: sm_80, sm_90);
//   CUDA cores (fa_simt.cuh): everything else up to head dim 256 -- float32, head dims 1..256 (Dqk and Dv each,
//     any values, Dv may differ), the backward of head dims 136..256 on sm_86 / sm_89.
// Both: GQA/MQA; causal top-left (1) / bottom-right (2); bool or float masks broadcastable to [B, Hq, Lq, Lk]
// (with the float mask's gradient); dropout with the Philox stream of the Triton kernels; any (batch, head, row)
// strides of q/k/v with a contiguous head dim.  Window ops: the same dtypes and head dims, any window / shift /
// unpadded size, the bias table in any float dtype (read as float32; its gradient float32), any image strides.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include "fa_kernels.cuh"
#include "fa_wgmma_fwd.cuh"
#include "fa_simt.cuh"
#include "ops.h"  // csrc/ops.h: the output layouts shared with the fake implementations

#ifndef FASTATTN_EMULATE
// (c10's light CUDA headers only: ATen/cuda/CUDAContext.h would pull in the cuBLAS/cuSPARSE headers)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fastattn_cuda {

constexpr int64_t kMaxHeadDim = kSimtMaxDim;  // 256, every kernel family's limit
constexpr int64_t kMaxNarrowBwdHeadDim = 128;  // past it, the tensor-core backward needs kWideBwdSmemBytes

// Opt-in dynamic shared memory per block of q's device, in bytes.
inline int64_t max_smem_optin(const at::Tensor& q) {
#ifdef FASTATTN_EMULATE
  (void)q;
  return 227 * 1024;  // an H100's
#else
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, q.get_device()));
  return bytes;
#endif
}

// Which kernels a call runs: the CUDA-core ones (fa_simt.cuh) for everything the tensor-core kernels cannot take --
// float32, Dv != Dqk, head dims not a multiple of 8, and the backward of head dims past 128 on devices without the
// shared memory of its wide tiles (kWideBwdSmemBytes, ~143 KiB: sm_86 / sm_89).
struct Family {
  bool simt_fwd, simt_bwd;
};

inline Family kernel_family(at::ScalarType dtype, int64_t d, int64_t dv, int64_t smem_optin) {
  const bool simt = dtype == at::kFloat || d != dv || d % 8 != 0;
  const bool wide_fits = smem_optin >= static_cast<int64_t>(kWideBwdSmemBytes);
  return {simt, simt || (d > kMaxNarrowBwdHeadDim && !wide_fits)};
}

inline void check_dtype(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat,
              "q: the CUDA kernels take float16, bfloat16 or float32, got ", q.scalar_type());
}

inline void check_head_dims(int64_t d, int64_t dv) {
  TORCH_CHECK(d >= 1 && d <= kMaxHeadDim, "q: head dim ", d, " is not supported by the CUDA kernels (1 to ",
              kMaxHeadDim, ")");
  TORCH_CHECK(dv >= 1 && dv <= kMaxHeadDim, "v: head dim ", dv, " is not supported by the CUDA kernels (1 to ",
              kMaxHeadDim, ")");
}

inline Stream current_stream(const at::Tensor& q) {
#ifdef FASTATTN_EMULATE
  (void)q;
  return nullptr;
#else
  return c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
#endif
}

inline void check_device(const at::Tensor& q) {
#ifdef FASTATTN_EMULATE
  TORCH_CHECK(q.device().is_cpu(), "q: the emulated CUDA kernels take CPU tensors, got ", q.device());
#else
  TORCH_CHECK(q.is_cuda(), "q: expected a CUDA tensor, got one on ", q.device());
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.get_device()));
  TORCH_CHECK(major >= 8, "fastattn CUDA kernels need compute capability >= 8.0 (tensor-core mma.sync for "
              "fp16/bf16, cp.async); device ", q.get_device(), " has ", major, ".", minor);
#endif
}

// The tensor-core kernels copy 16-byte chunks with cp.async: the head dim (the last) must be contiguous and the
// other strides and the data pointer 16-byte aligned.  The CUDA-core kernels read element by element: only the head
// dim must be contiguous.  Anything else (rare: odd views) is copied to a contiguous tensor.
inline at::Tensor kernel_layout(const at::Tensor& t, bool simt) {
  const int64_t last = t.dim() - 1;
  if (simt) return t.stride(last) == 1 || t.size(last) == 1 ? t : t.clone(at::MemoryFormat::Contiguous);
  const int64_t align = 16 / static_cast<int64_t>(t.element_size());
  bool ok = t.stride(last) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t i = 0; i < last; ++i)
    if (t.size(i) > 1 && t.stride(i) % align != 0) ok = false;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

inline void check_operand(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor");
  TORCH_CHECK(t.dim() == 4, name, ": expected a 4-D tensor [batch, heads, seq, head_dim], got ", t.dim(), " dims");
  TORCH_CHECK(t.device() == q.device(), name, ": expected a tensor on q's device ", q.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, ": dtype ", t.scalar_type(), " differs from q's ",
              q.scalar_type());
}

// Checks seed / dropout_p (already range-checked) and fills the dropout parameters.
inline void set_dropout(AttnParams& p, const std::optional<at::Tensor>& seed, double dropout_p) {
  p.dropout = dropout_p > 0.0;
  if (p.dropout) {
    TORCH_CHECK(seed.has_value() && seed->defined(), "seed: required when dropout_p > 0");
    TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong, "seed: expected one int64 element, got ",
                seed->numel(), " of ", seed->scalar_type());
    p.seed = static_cast<uint64_t>(seed->item<int64_t>());
    // the reference's dropout_threshold: round(p * 2^24), ties to even like Python's round
    p.drop_threshold = static_cast<uint32_t>(std::nearbyint(dropout_p * 16777216.0));
    p.drop_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  }
}

struct Problem {
  at::Tensor q, k, v, mask;  // mask: expanded view or undefined
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
  Family family;  // which kernels (kernel_family)
};

// Checks q/k/v/mask/seed/causal/scale/dropout_p and fills the shared part of the kernel parameters.
inline Problem prepare(AttnParams& p, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                       const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& seed,
                       int64_t causal, double scale, double dropout_p) {
  TORCH_CHECK(q_in.defined() && q_in.dim() == 4, "q: expected a 4-D tensor [batch, heads, seq, head_dim]");
  check_device(q_in);
  check_dtype(q_in);
  check_operand("k", k_in, q_in);
  check_operand("v", v_in, q_in);
  Problem pr;
  pr.B = q_in.size(0), pr.Hq = q_in.size(1), pr.Lq = q_in.size(2), pr.D = q_in.size(3);
  pr.Hkv = k_in.size(1), pr.Lk = k_in.size(2), pr.Dv = v_in.size(3);
  TORCH_CHECK(k_in.size(0) == pr.B && v_in.size(0) == pr.B, "k, v: batch size must equal q's (", pr.B, "), got ",
              k_in.size(0), " and ", v_in.size(0));
  TORCH_CHECK(v_in.size(1) == pr.Hkv && v_in.size(2) == pr.Lk, "v: [batch, heads, seq] must equal k's ",
              k_in.sizes().slice(0, 3), ", got ", v_in.sizes().slice(0, 3));
  TORCH_CHECK(pr.Hkv > 0 && pr.Hq % pr.Hkv == 0, "k: the number of key/value heads (", pr.Hkv,
              ") must divide q's number of heads (", pr.Hq, ")");
  TORCH_CHECK(k_in.size(3) == pr.D, "k: head dim ", k_in.size(3), " must equal q's (", pr.D, ")");
  check_head_dims(pr.D, pr.Dv);
  TORCH_CHECK(pr.B <= 65535 && pr.Hq <= 65535, "q: batch (", pr.B, ") and heads (", pr.Hq,
              ") must each be at most 65535 (CUDA grid dimensions)");
  TORCH_CHECK(pr.Lq < (int64_t(1) << 31) && pr.Lk < (int64_t(1) << 31), "q, k: sequence lengths must fit in int32");
  TORCH_CHECK(causal >= 0 && causal <= 2, "causal: expected 0 (none), 1 (top-left) or 2 (bottom-right), got ", causal);
  TORCH_CHECK(std::isfinite(scale), "scale: must be finite, got ", scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p: must be in [0, 1), got ", dropout_p);

  pr.family = kernel_family(q_in.scalar_type(), pr.D, pr.Dv, max_smem_optin(q_in));
  pr.q = kernel_layout(q_in, pr.family.simt_fwd);  // (the CUDA-core backward reads any layout the forward takes)
  pr.k = kernel_layout(k_in, pr.family.simt_fwd);
  pr.v = kernel_layout(v_in, pr.family.simt_fwd);

  p = AttnParams{};
  p.q = pr.q.data_ptr();
  p.k = pr.k.data_ptr();
  p.v = pr.v.data_ptr();
  p.q_sb = pr.q.stride(0), p.q_sh = pr.q.stride(1), p.q_sm = pr.q.stride(2);
  p.k_sb = pr.k.stride(0), p.k_sh = pr.k.stride(1), p.k_sm = pr.k.stride(2);
  p.v_sb = pr.v.stride(0), p.v_sh = pr.v.stride(1), p.v_sm = pr.v.stride(2);
  p.B = static_cast<int>(pr.B), p.Hq = static_cast<int>(pr.Hq), p.Hkv = static_cast<int>(pr.Hkv);
  p.group = static_cast<int>(pr.Hq / pr.Hkv);
  p.Lq = static_cast<int>(pr.Lq), p.Lk = static_cast<int>(pr.Lk);
  p.D = static_cast<int>(pr.D), p.Dv = static_cast<int>(pr.Dv);
  p.causal = causal != 0;
  p.causal_offset = static_cast<int>(fastattn::causal_offset(causal, pr.Lq, pr.Lk));
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  p.mask_kind = kMaskNone;
  if (mask.has_value() && mask->defined()) {
    at::Tensor m = *mask;
    TORCH_CHECK(m.device() == q_in.device(), "mask: expected a tensor on q's device ", q_in.device(), ", got ",
                m.device());
    TORCH_CHECK(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()),
                "mask: expected a bool (True = attend) or floating-point (added to the scores) tensor, got ",
                m.scalar_type());
    const std::vector<int64_t> target{pr.B, pr.Hq, pr.Lq, pr.Lk};
    bool ok = m.dim() <= 4;
    for (int64_t i = 0; ok && i < m.dim(); ++i) {
      const int64_t s = m.size(m.dim() - 1 - i), want = target[3 - i];
      ok = s == want || s == 1;
    }
    TORCH_CHECK(ok, "mask: shape ", m.sizes(), " is not broadcastable to [batch, heads, Lq, Lk] = ", target);
    if (m.scalar_type() != at::kBool && m.scalar_type() != at::kFloat) m = m.to(at::kFloat);
    pr.mask = m.expand(target);
    p.mask = pr.mask.data_ptr();
    p.mk_sb = pr.mask.stride(0), p.mk_sh = pr.mask.stride(1), p.mk_sm = pr.mask.stride(2), p.mk_sn = pr.mask.stride(3);
    p.mask_kind = m.scalar_type() == at::kBool ? kMaskBool : kMaskFloat;
  }

  set_dropout(p, seed, dropout_p);
  p.num_splits = 1;  // the forward may split the keys (choose_splits)
  p.keys_per_split = static_cast<int>(std::max<int64_t>(pr.Lk, 1));
  return pr;
}

inline int multiprocessor_count(const at::Tensor& q) {
#ifdef FASTATTN_EMULATE
  (void)q;
  return 132;  // an H100's
#else
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()));
  return sms;
#endif
}

// Split-KV (flash-decoding): when the forward's (query block, batch, head) CTAs cannot fill the GPU -- Perceiver's
// few latents against many pixels, decoding with Lq = 1 -- the keys are split so that about two waves of CTAs run,
// each split keeping at least 4 x 64 keys so that the merge stays cheap next to the attention (the Triton backend's
// rule, choose_num_splits).  FASTATTN_NUM_SPLITS forces a count (tests, experiments), as there.  Dense layout only.
inline int64_t choose_splits(const Problem& pr, int sms) {
  const int64_t quantum = kSplitKeyQuantum;
  const int64_t key_blocks = std::max<int64_t>(1, (pr.Lk + quantum - 1) / quantum);
  if (const char* forced = std::getenv("FASTATTN_NUM_SPLITS"); forced != nullptr && *forced != '\0')
    return std::clamp<int64_t>(std::atoll(forced), 1, key_blocks);
  const int64_t rows_per_cta = pr.family.simt_fwd ? kSimtBlock : pr.D > 128 ? FwdTile<256>::kBM : FwdTile<64>::kBM;
  const int64_t ctas = (pr.Lq + rows_per_cta - 1) / rows_per_cta * pr.B * pr.Hq;
  if (ctas >= sms) return 1;
  const int64_t max_splits = (pr.Lk + 4 * quantum - 1) / (4 * quantum);
  return std::max<int64_t>(1, std::min<int64_t>({max_splits, (2 * sms + ctas - 1) / ctas, 128}));
}
static_assert(FwdTile<64>::kBM == FwdTile<128>::kBM, "choose_splits assumes one query block size");

// Launches the forward / backward kernels for q's dtype (float16, bfloat16 or float32, checked by prepare*), the
// kernel family (kernel_family) and the padded head dim on the current stream, once p points at every input and
// output.
// The Hopper forward (fa_wgmma_fwd.cuh) runs head dims up to 128 when FASTATTN_CUDA_WGMMA=1, the extension has
// sm_90a code and q's device is compute capability 9.0.  Opt-in until it has been checked on a GPU.
inline bool use_wgmma_fwd(const at::Tensor& q) {
  const char* env = std::getenv("FASTATTN_CUDA_WGMMA");
  if (env == nullptr || std::strcmp(env, "1") != 0 || !wgmma_fwd_compiled()) return false;
#ifdef FASTATTN_EMULATE
  (void)q;
  return true;
#else
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.get_device()));
  return major == 9 && minor == 0;
#endif
}

template <typename T>
void launch_tensor_core_fwd(const AttnParams& p, Stream stream, bool wgmma) {
  if (p.D <= 64)
    wgmma ? launch_fwd_wgmma<T, 64>(p, stream) : launch_fwd<T, 64>(p, stream);
  else if (p.D <= 128)
    wgmma ? launch_fwd_wgmma<T, 128>(p, stream) : launch_fwd<T, 128>(p, stream);
  else
    launch_fwd<T, 256>(p, stream);
}

inline void dispatch_fwd(const AttnParams& p, const at::Tensor& q, bool simt) {
  const Stream stream = current_stream(q);
  const bool half = q.scalar_type() == at::kHalf;
  if (simt) {
    if (q.scalar_type() == at::kFloat)
      launch_simt_fwd<float>(p, stream);
    else
      half ? launch_simt_fwd<__half>(p, stream) : launch_simt_fwd<__nv_bfloat16>(p, stream);
    return;
  }
  const bool wgmma = use_wgmma_fwd(q);
  half ? launch_tensor_core_fwd<__half>(p, stream, wgmma) : launch_tensor_core_fwd<__nv_bfloat16>(p, stream, wgmma);
}

inline void dispatch_bwd(const AttnParams& p, const at::Tensor& q, bool simt) {
  const Stream stream = current_stream(q);
  const bool half = q.scalar_type() == at::kHalf, d64 = p.D <= 64, d128 = p.D <= 128;
  if (simt) {
    if (q.scalar_type() == at::kFloat)
      launch_simt_bwd<float>(p, stream);
    else
      half ? launch_simt_bwd<__half>(p, stream) : launch_simt_bwd<__nv_bfloat16>(p, stream);
    return;
  }
  if (half)
    d64 ? launch_bwd<__half, 64>(p, stream) : d128 ? launch_bwd<__half, 128>(p, stream) : launch_bwd<__half, 256>(p, stream);
  else
    d64 ? launch_bwd<__nv_bfloat16, 64>(p, stream)
        : d128 ? launch_bwd<__nv_bfloat16, 128>(p, stream) : launch_bwd<__nv_bfloat16, 256>(p, stream);
}

// fastattn::attention_fwd(q, k, v, mask?, seed?, causal, scale, dropout_p) -> (out, lse)
inline std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const std::optional<at::Tensor>& mask,
                                                        const std::optional<at::Tensor>& seed, int64_t causal,
                                                        double scale, double dropout_p) {
#ifndef FASTATTN_EMULATE
  const c10::cuda::OptionalCUDAGuard guard(q.device());
#endif
  AttnParams p;
  Problem pr = prepare(p, q, k, v, mask, seed, causal, scale, dropout_p);
  at::Tensor out = fastattn::empty_like_layout(q, pr.Dv, q.scalar_type());
  at::Tensor lse = at::empty({pr.B, pr.Hq, pr.Lq}, q.options().dtype(at::kFloat));
  fastattn::maybe_poison(out);
  fastattn::maybe_poison(lse);
  p.out = out.data_ptr();
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_sm = out.stride(2);
  p.lse = lse.data_ptr<float>();
  at::Tensor out_split, lse_split;  // split-KV workspaces (AttnParams): [splits, B, Hq, Lq, Dv], [splits, B, Hq, Lq]
  if (pr.Lq > 0 && pr.Lk > 0) {
    const int64_t splits = choose_splits(pr, multiprocessor_count(q));
    const int64_t per_split = (pr.Lk + splits - 1) / splits;
    p.keys_per_split = static_cast<int>((per_split + kSplitKeyQuantum - 1) / kSplitKeyQuantum * kSplitKeyQuantum);
    p.num_splits = static_cast<int>((pr.Lk + p.keys_per_split - 1) / p.keys_per_split);
    if (p.num_splits > 1) {
      out_split = at::empty({p.num_splits, pr.B, pr.Hq, pr.Lq, pr.Dv}, q.options().dtype(at::kFloat));
      lse_split = at::empty({p.num_splits, pr.B, pr.Hq, pr.Lq}, q.options().dtype(at::kFloat));
      p.out_split = out_split.data_ptr<float>();
      p.lse_split = lse_split.data_ptr<float>();
    } else {
      p.keys_per_split = static_cast<int>(pr.Lk);
    }
  }
  dispatch_fwd(p, q, pr.family.simt_fwd);
  return {out, lse};
}

// fastattn::attention_bwd(q, k, v, mask?, seed?, out, lse, dout, dlse?, causal, scale, dropout_p,
//                         mask_needs_grad) -> (dq, dk, dv, dmask)
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& seed, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& dout_in, const std::optional<at::Tensor>& dlse_in, int64_t causal, double scale,
    double dropout_p, bool mask_needs_grad) {
#ifndef FASTATTN_EMULATE
  const c10::cuda::OptionalCUDAGuard guard(q.device());
#endif
  AttnParams p;
  Problem pr = prepare(p, q, k, v, mask, seed, causal, scale, dropout_p);
  const std::vector<int64_t> out_shape{pr.B, pr.Hq, pr.Lq, pr.Dv};
  check_operand("out", out_in, q);
  check_operand("dout", dout_in, q);
  TORCH_CHECK(out_in.sizes() == out_shape, "out: expected shape ", out_shape, ", got ", out_in.sizes());
  TORCH_CHECK(dout_in.sizes() == out_shape, "dout: expected shape ", out_shape, ", got ", dout_in.sizes());
  const std::vector<int64_t> row_shape{pr.B, pr.Hq, pr.Lq};
  TORCH_CHECK(lse_in.defined() && lse_in.sizes() == row_shape && lse_in.scalar_type() == at::kFloat &&
                  lse_in.device() == q.device(),
              "lse: expected a float32 tensor of shape ", row_shape, " on ", q.device());
  at::Tensor out = kernel_layout(out_in, pr.family.simt_bwd), dout = kernel_layout(dout_in, pr.family.simt_bwd);
  at::Tensor lse = lse_in.contiguous();
  at::Tensor dlse;
  if (dlse_in.has_value() && dlse_in->defined()) {
    TORCH_CHECK(dlse_in->sizes() == row_shape && dlse_in->device() == q.device() &&
                    at::isFloatingType(dlse_in->scalar_type()),
                "dlse: expected a floating-point tensor of shape ", row_shape, " on ", q.device());
    dlse = dlse_in->to(at::kFloat).contiguous();
  }
  TORCH_CHECK(!mask_needs_grad || p.mask_kind == kMaskFloat,
              "mask_needs_grad: only a floating-point mask has a gradient");

  at::Tensor dq = fastattn::empty_like_layout(q, pr.D, q.scalar_type());
  at::Tensor dk = fastattn::empty_like_layout(k, pr.D, q.scalar_type());
  at::Tensor dv = fastattn::empty_like_layout(v, pr.Dv, q.scalar_type());
  fastattn::maybe_poison(dq);
  fastattn::maybe_poison(dk);
  fastattn::maybe_poison(dv);
  at::Tensor delta = at::empty({pr.B, pr.Hq, pr.Lq}, q.options().dtype(at::kFloat));
  at::Tensor dmask = mask_needs_grad ? at::zeros({pr.B, pr.Hq, pr.Lq, pr.Lk}, q.options().dtype(at::kFloat))
                                     : at::empty({0}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_sm = out.stride(2);
  p.dout = dout.data_ptr();
  p.do_sb = dout.stride(0), p.do_sh = dout.stride(1), p.do_sm = dout.stride(2);
  p.lse = lse.data_ptr<float>();
  p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dq_sb = dq.stride(0), p.dq_sh = dq.stride(1), p.dq_sm = dq.stride(2);
  p.dk = dk.data_ptr();
  p.dk_sb = dk.stride(0), p.dk_sh = dk.stride(1), p.dk_sm = dk.stride(2);
  p.dv = dv.data_ptr();
  p.dv_sb = dv.stride(0), p.dv_sh = dv.stride(1), p.dv_sm = dv.stride(2);
  p.dmask = mask_needs_grad ? dmask.data_ptr<float>() : nullptr;
  dispatch_bwd(p, q, pr.family.simt_bwd);
  return {dq, dk, dv, dmask};
}

// ==========================================================================================================
// Swin window attention: fastattn::window_fwd / window_bwd (schemas and contract: csrc/ops.cpp; the geometry is
// documented with the CPU op, csrc/cpu/window_cpu.cpp).  The kernels above in their window layout
// (AttnParams.window): a CTA's "batch" z is the group b * windows + w, the tensors stay images [B, H, W, heads, d]
// read and written through the token -> pixel map (no roll or partition copies), the bias table and the region mask
// are score modifications.  lse and Delta are [B * windows, heads, N] -- the dense [batch, heads, Lq] with batch =
// groups -- and the dropout coordinate is that layout's head index, bh = (b * windows + w) * heads + h.
// ==========================================================================================================

struct WindowProblem {
  at::Tensor q, k, v, table;  // kernel layouts; the table as float32, contiguous (undefined without one)
  int64_t B, H, W, heads, D, Dv, wh, ww, windows, N;
  Family family;  // which kernels (kernel_family)
};

inline void check_image(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined() && t.dim() == 5, name, ": expected a 5-D tensor [B, H, W, heads, head_dim], got shape ",
              t.defined() ? t.sizes() : at::IntArrayRef{});
}

// (batch, head, image row, image column) strides of an image [B, H, W, heads, d].
inline void image_strides(const at::Tensor& t, int64_t& sb, int64_t& sh, int64_t& sm, int64_t& sx) {
  sb = t.stride(0), sh = t.stride(3), sm = t.stride(1), sx = t.stride(2);
}

// Checks q/k/v/table/seed/geometry/scale/dropout_p (the CPU op's messages where they apply) and fills the kernel
// parameters of the inputs.
inline WindowProblem prepare_window(AttnParams& p, const at::Tensor& q_in, const at::Tensor& k_in,
                                    const at::Tensor& v_in, const std::optional<at::Tensor>& table,
                                    const std::optional<at::Tensor>& seed, at::IntArrayRef geometry, double scale,
                                    double dropout_p) {
  check_image("q", q_in);
  check_device(q_in);
  check_dtype(q_in);
  check_image("k", k_in);
  check_image("v", v_in);
  TORCH_CHECK(k_in.device() == q_in.device() && v_in.device() == q_in.device(), "k, v: expected tensors on q's device ",
              q_in.device(), ", got ", k_in.device(), " and ", v_in.device());
  if (table.has_value() && table->defined())
    TORCH_CHECK(table->device() == q_in.device(), "table: expected a tensor on q's device ", q_in.device(), ", got ",
                table->device());
  const fastattn::WindowGeometry geo = fastattn::check_window_args(q_in, k_in, v_in, table, geometry, scale, dropout_p);
  const int64_t H = geo.H, W = geo.W, wh = geo.wh, ww = geo.ww, sh = geo.sh, sw = geo.sw, uh = geo.uh, uw = geo.uw;
  WindowProblem wp;
  wp.B = q_in.size(0), wp.H = H, wp.W = W, wp.heads = q_in.size(3), wp.D = q_in.size(4), wp.Dv = v_in.size(4);
  check_head_dims(wp.D, wp.Dv);
  wp.family = kernel_family(q_in.scalar_type(), wp.D, wp.Dv, max_smem_optin(q_in));
  wp.wh = wh, wp.ww = ww, wp.windows = (H / wh) * (W / ww), wp.N = wh * ww;
  TORCH_CHECK(wp.heads <= 65535, "q: heads (", wp.heads, ") must be at most 65535 (a CUDA grid dimension)");
  TORCH_CHECK(wp.B * H * W * wp.heads < (int64_t(1) << 31), "q: B * H * W * heads (", wp.B * H * W * wp.heads,
              ") must be below 2^31 (int32 row indices)");
  if (table.has_value() && table->defined()) wp.table = table->to(at::kFloat).contiguous();

  wp.q = kernel_layout(q_in, wp.family.simt_fwd);
  wp.k = kernel_layout(k_in, wp.family.simt_fwd);
  wp.v = kernel_layout(v_in, wp.family.simt_fwd);
  p = AttnParams{};
  p.q = wp.q.data_ptr();
  p.k = wp.k.data_ptr();
  p.v = wp.v.data_ptr();
  image_strides(wp.q, p.q_sb, p.q_sh, p.q_sm, p.q_sx);
  image_strides(wp.k, p.k_sb, p.k_sh, p.k_sm, p.k_sx);
  image_strides(wp.v, p.v_sb, p.v_sh, p.v_sm, p.v_sx);
  p.B = static_cast<int>(wp.B * wp.windows), p.Hq = p.Hkv = static_cast<int>(wp.heads), p.group = 1;
  p.Lq = p.Lk = static_cast<int>(wp.N), p.D = static_cast<int>(wp.D), p.Dv = static_cast<int>(wp.Dv);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.mask_kind = kMaskNone;
  set_dropout(p, seed, dropout_p);
  p.num_splits = 1, p.keys_per_split = static_cast<int>(wp.N);  // windows are short: no split-KV
  p.window = 1;
  p.windows = static_cast<int>(wp.windows), p.windows_w = static_cast<int>(W / ww);
  p.win_h = static_cast<int>(wh), p.win_w = static_cast<int>(ww);
  p.shift_h = static_cast<int>(sh), p.shift_w = static_cast<int>(sw);
  p.roll_h = static_cast<int>(sh % uh), p.roll_w = static_cast<int>(sw % uw);
  p.un_h = static_cast<int>(uh), p.un_w = static_cast<int>(uw);
  p.img_h = static_cast<int>(H), p.img_w = static_cast<int>(W);
  p.shifted = sh > 0 || sw > 0;
  p.table = wp.table.defined() ? wp.table.data_ptr<float>() : nullptr;
  return wp;
}

// dTable[r, h] = the sum over the groups and over the pairs (i, j) at table row r (timm's relative_position_index)
// of dS[group, h, i, j].  A query i has at most one key j at a given offset, so the pairs of row r are a [rows, N]
// gather from the group-summed dS, with index N * N (a zero column) where query i has no key at that offset: a
// deterministic reduction (no atomics).
inline at::Tensor table_gradient(const at::Tensor& dscores, int64_t wh, int64_t ww) {
  const int64_t heads = dscores.size(1), N = wh * ww, rows = (2 * wh - 1) * (2 * ww - 1);
  const at::Tensor summed = dscores.sum(0).view({heads, N * N});
  const at::Tensor padded = at::cat({summed, at::zeros({heads, 1}, summed.options())}, 1);
  const auto opts = dscores.options().dtype(at::kLong);
  const at::Tensor r = at::arange(rows, opts).view({rows, 1}), i = at::arange(N, opts).view({1, N});
  // row r is the offset query - key = (r / (2 ww - 1) - (wh - 1), r % (2 ww - 1) - (ww - 1))
  const at::Tensor ky = at::div(i, ww, "floor") - (at::div(r, 2 * ww - 1, "floor") - (wh - 1));
  const at::Tensor kx = at::remainder(i, ww) - (at::remainder(r, 2 * ww - 1) - (ww - 1));
  const at::Tensor valid = (ky >= 0) & (ky < wh) & (kx >= 0) & (kx < ww);
  const at::Tensor pair = at::where(valid, i * N + ky * ww + kx, N * N);  // [rows, N]
  return padded.index_select(1, pair.view(-1)).view({heads, rows, N}).sum(2).t().contiguous();
}

// fastattn::window_fwd(q, k, v, table?, seed?, geometry, scale, dropout_p) -> (out, lse)
inline std::tuple<at::Tensor, at::Tensor> window_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& table,
                                                     const std::optional<at::Tensor>& seed, at::IntArrayRef geometry,
                                                     double scale, double dropout_p) {
#ifndef FASTATTN_EMULATE
  const c10::cuda::OptionalCUDAGuard guard(q.device());
#endif
  AttnParams p;
  const WindowProblem wp = prepare_window(p, q, k, v, table, seed, geometry, scale, dropout_p);
  at::Tensor out = at::empty({wp.B, wp.H, wp.W, wp.heads, wp.Dv}, q.options());
  at::Tensor lse = at::empty({wp.B * wp.windows, wp.heads, wp.N}, q.options().dtype(at::kFloat));
  fastattn::maybe_poison(out);
  fastattn::maybe_poison(lse);
  p.out = out.data_ptr();
  image_strides(out, p.o_sb, p.o_sh, p.o_sm, p.o_sx);
  p.lse = lse.data_ptr<float>();
  dispatch_fwd(p, q, wp.family.simt_fwd);
  return {out, lse};
}

// fastattn::window_bwd(q, k, v, table?, seed?, out, lse, dout, geometry, scale, dropout_p, table_needs_grad)
//     -> (dq, dk, dv, dtable)
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_bwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& table,
    const std::optional<at::Tensor>& seed, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& dout_in, at::IntArrayRef geometry, double scale, double dropout_p, bool table_needs_grad) {
#ifndef FASTATTN_EMULATE
  const c10::cuda::OptionalCUDAGuard guard(q.device());
#endif
  AttnParams p;
  const WindowProblem wp = prepare_window(p, q, k, v, table, seed, geometry, scale, dropout_p);
  auto check_like_out = [&](const char* name, const at::Tensor& t) {
    check_image(name, t);
    TORCH_CHECK(t.sizes() == v.sizes() && t.scalar_type() == q.scalar_type() && t.device() == q.device(), name,
                ": expected shape ", v.sizes(), " and dtype ", q.scalar_type(), " on ", q.device(), ", got ",
                t.sizes(), " ", t.scalar_type(), " on ", t.device());
  };
  check_like_out("out", out_in);
  check_like_out("dout", dout_in);
  const int64_t groups = wp.B * wp.windows;
  TORCH_CHECK(lse_in.defined() && lse_in.scalar_type() == at::kFloat && lse_in.device() == q.device() &&
                  lse_in.sizes() == at::IntArrayRef({groups, wp.heads, wp.N}),
              "lse: expected a float32 tensor on ", q.device(), " of shape [B * windows, heads, N] = [", groups, ", ",
              wp.heads, ", ", wp.N, "], got ", lse_in.defined() ? lse_in.sizes() : at::IntArrayRef{});
  TORCH_CHECK(!table_needs_grad || wp.table.defined(), "table_needs_grad: True needs a table");
  at::Tensor out = kernel_layout(out_in, wp.family.simt_bwd), dout = kernel_layout(dout_in, wp.family.simt_bwd);
  at::Tensor lse = lse_in.contiguous();

  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), q.options()),
             dv = at::empty(v.sizes(), q.options());
  fastattn::maybe_poison(dq);
  fastattn::maybe_poison(dk);
  fastattn::maybe_poison(dv);
  at::Tensor delta = at::empty({groups, wp.heads, wp.N}, q.options().dtype(at::kFloat));
  at::Tensor dscores;  // dS per group and head, when the table needs its gradient (every element is written)
  if (table_needs_grad) {
    dscores = at::empty({groups, wp.heads, wp.N, wp.N}, q.options().dtype(at::kFloat));
    fastattn::maybe_poison(dscores);
  }
  p.out = out.data_ptr();
  image_strides(out, p.o_sb, p.o_sh, p.o_sm, p.o_sx);
  p.dout = dout.data_ptr();
  image_strides(dout, p.do_sb, p.do_sh, p.do_sm, p.do_sx);
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  image_strides(dq, p.dq_sb, p.dq_sh, p.dq_sm, p.dq_sx);
  p.dk = dk.data_ptr();
  image_strides(dk, p.dk_sb, p.dk_sh, p.dk_sm, p.dk_sx);
  p.dv = dv.data_ptr();
  image_strides(dv, p.dv_sb, p.dv_sh, p.dv_sm, p.dv_sx);
  p.dmask = table_needs_grad ? dscores.data_ptr<float>() : nullptr;
  dispatch_bwd(p, q, wp.family.simt_bwd);
  const at::Tensor dtable =
      table_needs_grad ? table_gradient(dscores, wp.wh, wp.ww) : at::empty({0}, q.options().dtype(at::kFloat));
  return {dq, dk, dv, dtable};
}

}  // namespace fastattn_cuda
