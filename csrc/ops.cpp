// The fastattn operator schemas (torch.library), and the Python module init of fastattn._C.
//
// Implementations register per device: csrc/cpu/attention_cpu.cpp (TORCH_LIBRARY_IMPL(fastattn, CPU, m)) and
// csrc/cuda/ (TORCH_LIBRARY_IMPL(fastattn, CUDA, m)); the fake (meta) implementations, used by torch.compile
// and torch.library.opcheck, are registered in Python by fastattn/_ext.py once the library is loaded.
//
// TORCH_LIBRARY (a "DEF" library) may exist once per namespace; the Python custom ops of the Triton backend
// (fastattn::triton_attention_forward, ...) are defined through torch.library "FRAGMENT" libraries, which
// coexist with it in the same namespace.  No other C++ file may use TORCH_LIBRARY(fastattn, ...): add
// definitions here, or use TORCH_LIBRARY_FRAGMENT.
//
// attention_fwd(q, k, v, mask, seed, causal, scale, dropout_p) -> (out, lse)
//   q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv]: one dtype (CPU: float32, float64, bfloat16,
//     float16), any strides (a strided head dim or overlapping rows are copied once); Hq % Hkv == 0 (GQA: query
//     head h reads key/value head h / (Hq / Hkv)).
//   mask: None, bool (True = attend) or floating (added to the scaled scores, any float dtype), of size
//     [B, Hq, Lq, Lk] with any strides -- broadcast dimensions as stride-0 views, never materialised.
//   seed: int64, one element (on the CPU); required when dropout_p > 0 (csrc/philox.h: the keep-mask stream).
//   causal: 0 none, 1 top-left (j <= i), 2 bottom-right (j <= i + Lk - Lq).
//   scale: multiplies q k^T.  dropout_p in [0, 1): kept probabilities are scaled by 1 / (1 - dropout_p).
//   out: [B, Hq, Lq, Dv] in q's dtype and memory order (csrc/ops.h empty_like_layout).
//   lse: [B, Hq, Lq] float32 (float64 for float64 inputs), contiguous, natural log; -inf for a row that sees no
//     key (its output row is 0).
//
// attention_bwd(q, k, v, mask, seed, out, lse, dout, dlse, causal, scale, dropout_p, mask_needs_grad)
//     -> (dq, dk, dv, dmask)
//   out, lse: the forward's results; dout: like out; dlse: None or [B, Hq, Lq] (the gradient of lse).
//   Delta = rowsum(dout * out) - dlse;  dS = P * (dP - Delta)  (the lse gradient folds into Delta).
//   dq, dk, dv: in the dtype and memory order of q, k, v.  dmask: when mask_needs_grad, the dense
//   [B, Hq, Lq, Lk] gradient of the additive mask (= dS; float32, float64 for float64 inputs, contiguous; the
//   caller sums it over the broadcast dimensions), else an empty tensor of shape [0].
//
// attention_bwd_into(q, k, v, mask, seed, out, lse, dout, dlse, causal, scale, dropout_p, mask_needs_grad,
//                    dq!, dk!, dv!) -> dmask                                                     (CPU only)
//   attention_bwd writing into the caller's dq, dk, dv (sizes and dtype of q, k, v; any strides with a contiguous
//   last dim; they may be slices of one buffer): fastattn's packed-qkv path hands it the slices of the gradient of
//   the tensor q, k, v were cut from, so autograd does not stack three gradients into it (fastattn/functional.py).
//
// window_fwd(q, k, v, table, seed, geometry, scale, dropout_p) -> (out, lse)        (Swin W-MSA / SW-MSA)
//   q, k [B, H, W, heads, d], v [B, H, W, heads, dv]: image layout, one dtype, any strides (a strided head dim is
//     copied once).  geometry = [H, W, wh, ww, sh, sw, uh, uw]: window, cyclic shift (torch.roll by (-sh, -sw)
//     within the top-left uh x uw region; uh = H, uw = W unless timm's roll-then-pad order) -- the layout of
//     fastattn.window_attention, whose docstring has the semantics.
//   table: None or the relative-position bias table [(2wh-1)(2ww-1), heads] (any float dtype), added to the scaled
//     scores with timm's relative_position_index; -100 between tokens of different shift regions when shifted.
//   out: [B, H, W, heads, dv] contiguous, q's dtype.  lse: [B * windows, heads, wh * ww] (float32/float64).
//   Dropout's Philox coordinate bh = (b * windows + w) * heads + h (as the Triton kernels).
//
// window_bwd(q, k, v, table, seed, out, lse, dout, geometry, scale, dropout_p, table_needs_grad)
//     -> (dq, dk, dv, dtable)
//   dq, dk, dv: contiguous, in q's dtype.  dtable: the table's gradient (table's shape, float32/float64) when
//   table_needs_grad, else an empty tensor of shape [0].
//
// spatial_fwd(q, k, v, num_frames, token_order, scale) -> (out, out_cls, lse)     (TimeSformer's spatial half)
//   q, k [B, 1 + T*N, heads, d], v [B, 1 + T*N, heads, dv]: token 0 the cls token, then N patches per frame in
//     token_order "nt" (patch n of frame t at token 1 + n*T + t) or "tn" (1 + t*N + n); one dtype, any strides.
//   Each frame's [cls, N patches] attend over themselves; the cls output is the mean over the T frames
//   (fastattn.spatial_attention with cls_token=True, no dropout).  CPU only (csrc/cpu/spacetime_cpu.cpp).
//   out: [B, 1 + T*N, heads, dv] contiguous, q's dtype.  out_cls: the cls token's per-frame outputs
//   [B, T, heads, dv]; lse: [B, T, heads, 1 + N] (row 0: the cls query); both float32 (float64 for float64).
//
// spatial_bwd(q, k, v, out, out_cls, lse, dout, num_frames, token_order, scale) -> (dq, dk, dv)
//   dq, dk, dv: contiguous, in q's dtype.  Deterministic (the cls token's per-frame terms are summed in order).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastattn, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? seed, int causal, float scale, "
      "float dropout_p) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? seed, Tensor out, Tensor lse, "
      "Tensor dout, Tensor? dlse, int causal, float scale, float dropout_p, bool mask_needs_grad) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask)");
  m.def(
      "attention_bwd_into(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? seed, Tensor out, Tensor lse, "
      "Tensor dout, Tensor? dlse, int causal, float scale, float dropout_p, bool mask_needs_grad, "
      "Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv) -> Tensor dmask");
  m.def(
      "window_fwd(Tensor q, Tensor k, Tensor v, Tensor? table, Tensor? seed, int[] geometry, float scale, "
      "float dropout_p) -> (Tensor out, Tensor lse)");
  m.def(
      "window_bwd(Tensor q, Tensor k, Tensor v, Tensor? table, Tensor? seed, Tensor out, Tensor lse, Tensor dout, "
      "int[] geometry, float scale, float dropout_p, bool table_needs_grad) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dtable)");
  m.def(
      "spatial_fwd(Tensor q, Tensor k, Tensor v, int num_frames, str token_order, float scale) "
      "-> (Tensor out, Tensor out_cls, Tensor lse)");
  m.def(
      "spatial_bwd(Tensor q, Tensor k, Tensor v, Tensor out, Tensor out_cls, Tensor lse, Tensor dout, "
      "int num_frames, str token_order, float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
}

// `import fastattn._C` (setup.py) needs a module init function; the ops themselves are registered by the
// static initialisers above when the library is loaded.  The JIT build (fastattn/_ext.py) loads the library
// with torch.ops.load_library instead, which does not need it.
#ifdef TORCH_EXTENSION_NAME
#define FASTATTN_CONCAT_(a, b) a##b
#define FASTATTN_CONCAT(a, b) FASTATTN_CONCAT_(a, b)
#define FASTATTN_STR_(a) #a
#define FASTATTN_STR(a) FASTATTN_STR_(a)

PyMODINIT_FUNC FASTATTN_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      FASTATTN_STR(TORCH_EXTENSION_NAME),
      "fastattn's compiled kernels; the ops are torch.ops.fastattn.attention_fwd / attention_bwd",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
#endif
