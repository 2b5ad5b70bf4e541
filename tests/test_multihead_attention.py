"""fastattn.MultiheadAttention against torch.nn.MultiheadAttention sharing the same state_dict.

Every parity test compares the outputs, the attention weights and the gradients of the inputs, of the
parameters and of float masks.  Masks never fully mask a query row here (key 0 is always allowed), since
torch returns NaN for such rows on its need_weights=True path; the fastattn behaviour (zeros) has its own
test.  Modules stay in training mode with dropout=0 (or inputs require grad), so torch never takes its
inference fast path unless a test wants it.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fastattn
from fastattn import MultiheadAttention
from fastattn.backends import BACKENDS
from fastattn.nn import multihead_attention as mha_module

E, H, N, L, S = 12, 3, 2, 5, 7  # head_dim 4
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
WEIGHT_MODES = {  # need_weights, average_attn_weights
    "no_weights": (False, True),
    "avg_weights": (True, True),
    "head_weights": (True, False),
}
ATTN_KINDS = [None, "bool2d", "bool3d", "float2d", "float3d"]
KPM_KINDS = [None, "bool", "float"]

mixed_mask_warning = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")


# ---------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------
def make_pair(dtype=torch.float64, device="cpu", embed_dim=E, num_heads=H, backend=None, **kwargs):
    """(torch module, fastattn module) with the same random parameters (biases non-zero, unlike the init)."""
    ref = torch.nn.MultiheadAttention(embed_dim, num_heads, dtype=dtype, device=device, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    ours = MultiheadAttention(embed_dim, num_heads, dtype=dtype, device=device, backend=backend, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def make_inputs(sharing="cross", batched=True, batch_first=False, kdim=E, vdim=E, dtype=torch.float64,
                device="cpu", L=L, S=S):
    """(query, key, value); sharing: "self" (one tensor), "kv" (key is value) or "cross" (three tensors)."""
    def make(length, dim):
        shape = ((N, length, dim) if batch_first else (length, N, dim)) if batched else (length, dim)
        return torch.randn(shape, dtype=dtype, device=device)
    q = make(L, E)
    if sharing == "self":
        return q, q, q
    k = make(S, kdim)
    if sharing == "kv":
        return q, k, k
    return q, k, make(S, vdim)


def make_attn_mask(kind, batched=True, dtype=torch.float64, device="cpu", L=L, S=S):
    """torch convention: bool True = masked out.  Key 0 always stays allowed (no fully masked row)."""
    if kind is None:
        return None
    shape = (L, S) if kind.endswith("2d") else ((N * H if batched else H), L, S)
    blocked = torch.rand(shape, device=device) < 0.4
    blocked[..., 0] = False
    if kind.startswith("bool"):
        return blocked
    return torch.randn(shape, dtype=dtype, device=device).masked_fill(blocked, float("-inf"))


def make_kpm(kind, batched=True, dtype=torch.float64, device="cpu", S=S):
    if kind is None:
        return None
    blocked = torch.rand((N, S) if batched else (S,), device=device) < 0.3
    blocked[..., 0] = False
    if kind == "bool":
        return blocked
    return torch.randn(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, float("-inf"))


def causal_mask(kind, L, dtype=torch.float64):
    blocked = torch.ones(L, L, dtype=torch.bool).triu(1)
    return blocked if kind == "bool" else torch.zeros(L, L, dtype=dtype).masked_fill(blocked, float("-inf"))


# ---------------------------------------------------------------------------------------------------------
# Running and comparing
# ---------------------------------------------------------------------------------------------------------
def run(module, inputs, attn_mask=None, key_padding_mask=None, grad_seed=0, **kwargs):
    """forward + backward of a fixed random loss on output and weights.

    Returns (out, weights, {name: grad}) with the grads of the inputs (identity of shared inputs kept), of
    every parameter, and of the float masks."""
    leaves, copies = {}, []
    for t in inputs:
        if id(t) not in leaves:
            leaves[id(t)] = t.detach().clone().requires_grad_()
        copies.append(leaves[id(t)])
    masks = {}
    for name, m in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
        if m is not None and m.is_floating_point():
            m = m.detach().clone().requires_grad_()
        masks[name] = m
    out, w = module(*copies, **masks, **kwargs)

    gen = torch.Generator().manual_seed(grad_seed)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)).sum()
    if w is not None:
        loss = loss + (w * torch.randn(w.shape, generator=gen, dtype=w.dtype).to(w.device)).sum()
    named = {f"input{i}": t for i, t in enumerate(leaves.values())}
    named.update({n: p for n, p in module.named_parameters()})
    named.update({n: m for n, m in masks.items() if m is not None and m.requires_grad})
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    return out.detach(), (None if w is None else w.detach()), dict(zip(named, grads))


def assert_parity(ref, ours, inputs, tol=None, **kwargs):
    """ours and torch give the same output, weights and gradients (within tol)."""
    dtype = inputs[0].dtype
    tol = TOL[dtype] if tol is None else tol
    out_r, w_r, g_r = run(ref, inputs, **kwargs)
    out_o, w_o, g_o = run(ours, inputs, **kwargs)
    torch.testing.assert_close(out_o, out_r, atol=tol, rtol=tol)
    assert out_o.dtype == out_r.dtype
    if w_r is None:
        assert w_o is None
    else:
        torch.testing.assert_close(w_o, w_r, atol=tol, rtol=tol)
    assert g_o.keys() == g_r.keys()
    for name in g_r:
        if g_r[name] is None:
            assert g_o[name] is None or not g_o[name].any(), name
        else:
            torch.testing.assert_close(g_o[name], g_r[name], atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
    return out_o, w_o


def weight_kwargs(mode):
    need_weights, average = WEIGHT_MODES[mode]
    return dict(need_weights=need_weights, average_attn_weights=average)


# ---------------------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------------------
@mixed_mask_warning
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode", list(WEIGHT_MODES))
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("kpm_kind", KPM_KINDS, ids=lambda k: f"kpm_{k}")
@pytest.mark.parametrize("attn_kind", ATTN_KINDS, ids=lambda k: f"attn_{k}")
def test_masks(attn_kind, kpm_kind, batch_first, mode, dtype):
    ref, ours = make_pair(dtype, batch_first=batch_first)
    inputs = make_inputs(batch_first=batch_first, dtype=dtype)
    assert_parity(ref, ours, inputs, attn_mask=make_attn_mask(attn_kind, dtype=dtype),
                  key_padding_mask=make_kpm(kpm_kind, dtype=dtype), **weight_kwargs(mode))


MODULE_OPTIONS = {
    "no_bias": dict(bias=False),
    "bias_kv": dict(add_bias_kv=True),
    "zero_attn": dict(add_zero_attn=True),
    "bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True),
    "kdim_vdim": dict(kdim=5, vdim=6),
    "kdim_vdim_bias_kv_no_bias": dict(kdim=5, vdim=6, add_bias_kv=True, bias=False),
    "kdim_vdim_zero_attn": dict(kdim=6, vdim=6, add_zero_attn=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode", list(WEIGHT_MODES))
@pytest.mark.parametrize("masks", ["none", "bool", "float"])
@pytest.mark.parametrize("option", list(MODULE_OPTIONS))
def test_module_options(option, masks, mode, dtype):
    kwargs = MODULE_OPTIONS[option]
    batch_first = masks != "bool"  # both layouts, without doubling the grid (test_masks covers both fully)
    ref, ours = make_pair(dtype, batch_first=batch_first, **kwargs)
    kdim, vdim = kwargs.get("kdim", E), kwargs.get("vdim", E)
    inputs = make_inputs("kv" if kdim == vdim else "cross", batch_first=batch_first, kdim=kdim, vdim=vdim,
                         dtype=dtype)
    mask_kw = {} if masks == "none" else dict(attn_mask=make_attn_mask(masks + "3d", dtype=dtype),
                                               key_padding_mask=make_kpm(masks, dtype=dtype))
    assert_parity(ref, ours, inputs, **mask_kw, **weight_kwargs(mode))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode", list(WEIGHT_MODES))
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("sharing", ["self", "kv", "cross"])
def test_input_sharing(sharing, batch_first, mode, dtype):
    """Self-attention (one packed projection) and shared key/value take torch's packed-matmul shortcuts."""
    ref, ours = make_pair(dtype, batch_first=batch_first)
    length = L if sharing == "self" else S
    inputs = make_inputs(sharing, batch_first=batch_first, dtype=dtype)
    assert_parity(ref, ours, inputs, attn_mask=make_attn_mask("bool2d", S=length), **weight_kwargs(mode))


@pytest.mark.parametrize("mode", list(WEIGHT_MODES))
def test_no_keys_at_all(mode):
    """An empty key sequence (S = 0): torch's output is out_proj's bias per row, with weights of shape [.., L, 0]
    (the reference backend's softmax used to take a max over the empty dimension)."""
    ref, ours = make_pair()
    assert_parity(ref, ours, make_inputs("kv", S=0), **weight_kwargs(mode))


@mixed_mask_warning
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode", list(WEIGHT_MODES))
@pytest.mark.parametrize("kpm_kind", KPM_KINDS, ids=lambda k: f"kpm_{k}")
@pytest.mark.parametrize("attn_kind", ATTN_KINDS, ids=lambda k: f"attn_{k}")
def test_unbatched(attn_kind, kpm_kind, mode, dtype):
    ref, ours = make_pair(dtype, batch_first=True)  # batch_first is ignored for unbatched inputs
    inputs = make_inputs(batched=False, dtype=dtype)
    out, w = assert_parity(ref, ours, inputs, attn_mask=make_attn_mask(attn_kind, batched=False, dtype=dtype),
                           key_padding_mask=make_kpm(kpm_kind, batched=False, dtype=dtype),
                           **weight_kwargs(mode))
    assert out.shape == (L, E)
    if w is not None:
        assert w.shape == ((L, S) if mode == "avg_weights" else (H, L, S))


@mixed_mask_warning
@pytest.mark.parametrize("mode", list(WEIGHT_MODES))
@pytest.mark.parametrize("option", ["bias_kv_zero_attn", "kdim_vdim"])
def test_unbatched_module_options(option, mode):
    kwargs = MODULE_OPTIONS[option]
    ref, ours = make_pair(**kwargs)
    inputs = make_inputs(batched=False, kdim=kwargs.get("kdim", E), vdim=kwargs.get("vdim", E))
    assert_parity(ref, ours, inputs, attn_mask=make_attn_mask("float3d", batched=False),
                  key_padding_mask=make_kpm("bool", batched=False), **weight_kwargs(mode))


@mixed_mask_warning
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode", list(WEIGHT_MODES))
@pytest.mark.parametrize("option", ["plain", "bias_kv", "zero_attn"])
@pytest.mark.parametrize("kpm_kind", [None, "bool"], ids=lambda k: f"kpm_{k}")
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_is_causal(mask_kind, kpm_kind, option, mode, dtype):
    """is_causal=True with the causal attn_mask.  Without key_padding_mask and need_weights=False torch (and
    fastattn) apply the causal hint instead of the mask -- top-left, also over bias_k / zero-attn keys."""
    ref, ours = make_pair(dtype, **MODULE_OPTIONS.get(option, {}))
    inputs = make_inputs("self", dtype=dtype)
    assert_parity(ref, ours, inputs, attn_mask=causal_mask(mask_kind, L, dtype),
                  key_padding_mask=make_kpm(kpm_kind, S=L), is_causal=True, **weight_kwargs(mode))


def test_is_causal_hint_reaches_the_fused_op(monkeypatch):
    """need_weights=False, no key_padding_mask: the mask is dropped and fastattn.attention gets causal."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return fastattn.attention(*args, **kwargs)

    monkeypatch.setattr(mha_module, "attention", spy)
    _, ours = make_pair()
    x = make_inputs("self")[0]
    ours(x, x, x, attn_mask=causal_mask("bool", L), is_causal=True, need_weights=False)
    assert seen[-1]["causal"] == "top_left" and seen[-1]["attn_mask"] is None


def test_float32_mask_on_float64_query_without_weights():
    """torch's need_weights=False path accepts a float32 mask on any query dtype; so does fastattn."""
    ref, ours = make_pair(torch.float64)
    inputs = make_inputs()
    assert_parity(ref, ours, inputs, attn_mask=make_attn_mask("float2d", dtype=torch.float32),
                  need_weights=False)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("masks", [("bool2d", "bool"), ("float3d", "float"), ("bool3d", None), (None, "bool")])
@pytest.mark.parametrize("option", ["plain", "bias_kv_zero_attn", "kdim_vdim"])
def test_fused_backends(backend, dtype, masks, option):
    kwargs = MODULE_OPTIONS.get(option, {})
    ref, ours = make_pair(dtype, backend=backend, batch_first=True, **kwargs)
    inputs = make_inputs(batch_first=True, kdim=kwargs.get("kdim", E), vdim=kwargs.get("vdim", E), dtype=dtype)
    assert_parity(ref, ours, inputs, attn_mask=make_attn_mask(masks[0], dtype=dtype),
                  key_padding_mask=make_kpm(masks[1], dtype=dtype), need_weights=False)


def test_backend_keyword_reaches_dispatch():
    """An unavailable backend makes the fused path fail; the need_weights=True path does not use it."""
    _, ours = make_pair(backend="cuda")
    q, k, v = make_inputs()
    with pytest.raises(RuntimeError, match="no backend can serve"):
        ours(q, k, v, need_weights=False)
    ours(q, k, v, need_weights=True)
    with pytest.raises(ValueError, match="unknown backend"):
        MultiheadAttention(E, H, backend="no-such-backend")


@pytest.mark.parametrize("masks, expected_shape", [
    (("bool", None), (N, 1, 1, S)),
    ((None, "bool2d"), (L, S)),
    ((None, "float2d"), (L, S)),
    ((None, "bool3d"), (N, H, L, S)),
    (("bool", "bool2d"), (N, 1, L, S)),
])
def test_fused_path_gets_one_broadcastable_mask(monkeypatch, masks, expected_shape):
    """need_weights=False runs fastattn.attention with one merged mask in the True = attend convention,
    broadcast views rather than [N, H, L, S] copies where the inputs allow, and no probabilities."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["attn_mask"])
        return fastattn.attention(*args, **kwargs)

    def no_probabilities(*args, **kwargs):
        raise AssertionError("need_weights=False must not materialise the probabilities")

    monkeypatch.setattr(mha_module, "attention", spy)
    monkeypatch.setattr(mha_module, "reference_probabilities", no_probabilities)
    _, ours = make_pair()
    kpm, attn = make_kpm(masks[0]), make_attn_mask(masks[1])
    ours(*make_inputs(), key_padding_mask=kpm, attn_mask=attn, need_weights=False)
    mask = seen[-1]
    assert tuple(mask.shape) == expected_shape
    if masks == ("bool", None):
        assert torch.equal(mask.view(N, S), ~kpm)  # converted at the boundary: True = attend


# ---------------------------------------------------------------------------------------------------------
# Triton (interpreter on CPU) and CUDA
# ---------------------------------------------------------------------------------------------------------
def _triton_parity_case():
    """A tiny need_weights=False parity case on the triton backend (L, S <= 9, E <= 16)."""
    torch.manual_seed(0)
    ref, ours = make_pair(torch.float32, embed_dim=8, num_heads=2, backend="triton", batch_first=True,
                          add_bias_kv=True)
    q = torch.randn(N, 5, 8)
    kv = torch.randn(N, 6, 8)
    attn = torch.rand(5, 6) < 0.3
    attn[:, 0] = False
    kpm = torch.zeros(N, 6, dtype=torch.bool)
    kpm[1, -2:] = True
    out_r, _, g_r = run(ref, (q, kv, kv), attn_mask=attn, key_padding_mask=kpm, need_weights=False)
    out_o, _, g_o = run(ours, (q, kv, kv), attn_mask=attn, key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(out_o, out_r, atol=1e-5, rtol=1e-5)
    for name in g_r:
        torch.testing.assert_close(g_o[name], g_r[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def _triton_serves_cpu() -> bool:
    p = fastattn.problem.make_problem(*(torch.zeros(1, 1, 1, 4) for _ in range(3)))
    return not BACKENDS["triton"].reasons(p)


@pytest.mark.slow
def test_triton_backend_cpu_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if _triton_serves_cpu():
        _triton_parity_case()
        return
    # The kernels were built without the interpreter (TRITON_INTERPRET was not set when fastattn was
    # imported): run the case in a fresh interpreter with the variable set from the start.
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import runpy; "
            f"runpy.run_path({__file__!r})['_triton_parity_case']()")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", list(WEIGHT_MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cuda_parity(mode, dtype):
    ref, ours = make_pair(dtype, device="cuda", batch_first=True, add_bias_kv=True)
    inputs = make_inputs("kv", batch_first=True, dtype=dtype, device="cuda")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert_parity(ref, ours, inputs, tol=tol, attn_mask=make_attn_mask("bool2d", device="cuda"),
                  key_padding_mask=make_kpm("bool", device="cuda"), **weight_kwargs(mode))


# ---------------------------------------------------------------------------------------------------------
# Dropout, eval mode, fully masked rows
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(WEIGHT_MODES))
def test_dropout_training_and_eval(mode):
    ref, ours = make_pair(torch.float32, dropout=0.5, batch_first=True)
    q, k, v = make_inputs(batch_first=True, dtype=torch.float32)
    kw = dict(key_padding_mask=make_kpm("bool"), **weight_kwargs(mode))

    # Training: dropout is on -- finite, and different from the eval output.
    ours.train()
    out_train, w_train = ours(q, k, v, **kw)
    assert torch.isfinite(out_train).all()

    ours.eval()
    ref.eval()
    out_eval, w_eval = ours(q, k, v, **kw)
    out_eval2, w_eval2 = ours(q, k, v, **kw)
    assert torch.equal(out_eval, out_eval2)  # no dropout in eval: deterministic
    assert not torch.allclose(out_train, out_eval)
    out_ref, w_ref = ref(q, k, v, **kw)
    torch.testing.assert_close(out_eval, out_ref, atol=1e-5, rtol=1e-5)
    if w_ref is None:
        assert w_eval is None
    else:
        assert torch.equal(w_eval, w_eval2)
        torch.testing.assert_close(w_eval, w_ref, atol=1e-5, rtol=1e-5)

    if mode == "head_weights":
        # Like torch, the returned training weights are the post-dropout ones: 0 or eval weight / (1 - p).
        dropped = w_train == 0
        assert dropped.any() and not dropped.all()
        torch.testing.assert_close(w_train[~dropped], 2 * w_eval[~dropped])


def test_eval_matches_torch_fast_path():
    """Eval mode, no grad, batch-first self-attention: torch takes its native fast path; same results."""
    ref, ours = make_pair(torch.float32, num_heads=2, batch_first=True, dropout=0.3)
    ref.eval()
    ours.eval()
    x = make_inputs("self", batch_first=True, dtype=torch.float32)[0]
    kpm = make_kpm("bool", S=L)
    with torch.no_grad():
        for need_weights in (False, True):
            out_r, w_r = ref(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
            out_o, w_o = ours(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
            torch.testing.assert_close(out_o, out_r, atol=1e-5, rtol=1e-5)
            if need_weights:
                torch.testing.assert_close(w_o, w_r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [None, "reference", "sdpa"])
@pytest.mark.parametrize("mode", list(WEIGHT_MODES))
def test_fully_masked_rows_give_zeros(backend, mode):
    """A query row that may attend to no key: fastattn gives weights 0 and output out_proj.bias (0 before
    the output projection) with finite gradients.  torch gives NaN there on its need_weights=True path;
    the other rows agree with torch."""
    ref, ours = make_pair(backend=backend)
    inputs = make_inputs()
    attn = make_attn_mask("bool2d")
    attn[1] = True  # query 1 sees no key
    out, w, grads = run(ours, inputs, attn_mask=attn, **weight_kwargs(mode))
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    torch.testing.assert_close(out[1], ours.out_proj.bias.detach().expand(N, E), atol=0, rtol=0)
    if w is not None:
        assert (w[..., 1, :] == 0).all()
    out_r, w_r, _ = run(ref, inputs, attn_mask=attn, **weight_kwargs(mode))
    keep = [i for i in range(L) if i != 1]
    torch.testing.assert_close(out[keep], out_r[keep], atol=1e-10, rtol=1e-10)
    if w is not None:
        torch.testing.assert_close(w[..., keep, :], w_r[..., keep, :], atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# Parameters and state_dicts
# ---------------------------------------------------------------------------------------------------------
STATE_OPTIONS = [dict(), dict(bias=False), dict(add_bias_kv=True), dict(kdim=5, vdim=7),
                 dict(kdim=5, vdim=7, add_bias_kv=True, add_zero_attn=True, bias=False)]


@pytest.mark.parametrize("kwargs", STATE_OPTIONS, ids=lambda kw: ",".join(kw) or "default")
def test_state_dict_round_trip(kwargs):
    ref = torch.nn.MultiheadAttention(E, H, **kwargs)
    ours = MultiheadAttention(E, H, **kwargs)
    assert ours._qkv_same_embed_dim == ref._qkv_same_embed_dim
    assert isinstance(ours.out_proj, type(ref.out_proj))
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ref) == list(sd_ours)
    assert all(sd_ref[n].shape == sd_ours[n].shape for n in sd_ref)
    for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                 "bias_k", "bias_v"):
        assert (getattr(ours, name) is None) == (getattr(ref, name) is None), name

    ours.load_state_dict(sd_ref, strict=True)  # torch -> fastattn
    assert all(torch.equal(ours.state_dict()[n], sd_ref[n]) for n in sd_ref)
    fresh = MultiheadAttention(E, H, **kwargs)
    ref.load_state_dict(fresh.state_dict(), strict=True)  # fastattn -> torch
    assert all(torch.equal(ref.state_dict()[n], fresh.state_dict()[n]) for n in sd_ref)


@pytest.mark.parametrize("kwargs", STATE_OPTIONS, ids=lambda kw: ",".join(kw) or "default")
def test_same_initialisation_as_torch(kwargs):
    """Same creation order and init functions: the same seed draws the same parameters."""
    torch.manual_seed(7)
    ref = torch.nn.MultiheadAttention(E, H, dtype=torch.float64, **kwargs)
    torch.manual_seed(7)
    ours = MultiheadAttention(E, H, dtype=torch.float64, **kwargs)
    for (n_r, p_r), (n_o, p_o) in zip(ref.named_parameters(), ours.named_parameters()):
        assert n_r == n_o and p_o.dtype == torch.float64
        assert torch.equal(p_r, p_o), n_r
    if ours.in_proj_bias is not None:
        assert not ours.in_proj_bias.any() and not ours.out_proj.bias.any()


def test_constructor_errors():
    for args in ((0, 2), (8, 0)):
        with pytest.raises(ValueError):
            torch.nn.MultiheadAttention(*args)
        with pytest.raises(ValueError):
            MultiheadAttention(*args)
    with pytest.raises(AssertionError):
        torch.nn.MultiheadAttention(10, 3)
    with pytest.raises(AssertionError):
        MultiheadAttention(10, 3)


# ---------------------------------------------------------------------------------------------------------
# Errors: the exception type torch raises, checked on torch too
# ---------------------------------------------------------------------------------------------------------
def _bad(**kw):
    return kw


BAD_CALLS = {
    # mask dtypes (torch's _canonical_mask)
    "attn_mask_int": (AssertionError, _bad(attn_mask=torch.zeros(L, S, dtype=torch.int64))),
    "kpm_int": (AssertionError, _bad(key_padding_mask=torch.zeros(N, S, dtype=torch.int32))),
    # mask ranks (torch's _mha_shape_check)
    "attn_mask_1d": (AssertionError, _bad(attn_mask=torch.zeros(S, dtype=torch.bool))),
    "attn_mask_4d": (AssertionError, _bad(attn_mask=torch.zeros(N, H, L, S, dtype=torch.bool))),
    "kpm_1d_batched": (AssertionError, _bad(key_padding_mask=torch.zeros(S, dtype=torch.bool))),
    "kpm_3d": (AssertionError, _bad(key_padding_mask=torch.zeros(N, 1, S, dtype=torch.bool))),
    "unbatched_kpm_2d": (AssertionError, _bad(batched=False, key_padding_mask=torch.zeros(1, S, dtype=torch.bool))),
    "unbatched_attn_3d_shape": (AssertionError, _bad(batched=False, attn_mask=torch.zeros(N * H, L, S, dtype=torch.bool))),
    "query_4d": (AssertionError, _bad(query=torch.randn(L, N, 1, E))),
    "key_2d_for_3d_query": (AssertionError, _bad(key=torch.randn(S, E), value=torch.randn(S, E))),
    # mask shapes
    "attn_mask_2d_shape": (RuntimeError, _bad(attn_mask=torch.zeros(L, S + 1, dtype=torch.bool))),
    "attn_mask_3d_shape": (RuntimeError, _bad(attn_mask=torch.zeros(N, L, S))),
    "kpm_seq_len": (AssertionError, _bad(key_padding_mask=torch.zeros(N, S + 1, dtype=torch.bool))),
    "kpm_batch": (AssertionError, _bad(key_padding_mask=torch.zeros(N + 1, S))),
    "unbatched_kpm_len": (AssertionError, _bad(batched=False, key_padding_mask=torch.zeros(S - 1, dtype=torch.bool))),
    # float mask dtypes other than the query's
    "attn_mask_fp32_weights": (RuntimeError, _bad(attn_mask=torch.zeros(L, S, dtype=torch.float32))),
    "kpm_fp32_weights": (RuntimeError, _bad(key_padding_mask=torch.zeros(N, S, dtype=torch.float32))),
    "attn_mask_fp16_fused": (RuntimeError, _bad(need_weights=False, attn_mask=torch.zeros(L, S, dtype=torch.float16))),
    # is_causal needs attn_mask
    "causal_without_mask": (RuntimeError, _bad(is_causal=True)),
    "causal_without_mask_fused": (RuntimeError, _bad(is_causal=True, need_weights=False)),
    # embedding sizes
    "query_embed_dim": (AssertionError, _bad(query=torch.randn(L, N, E + 1))),
    "key_value_shapes": (AssertionError, _bad(value=torch.randn(S + 1, N, E))),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_errors_match_torch(case):
    expected, kw = BAD_CALLS[case]
    kw = dict(kw)
    batched = kw.pop("batched", True)
    ref, ours = make_pair(torch.float64)
    q, k, v = make_inputs(batched=batched)
    q, k, v = kw.pop("query", q), kw.pop("key", k), kw.pop("value", v)
    with pytest.raises(expected):
        ref(q, k, v, **kw)
    with pytest.raises(expected):
        ours(q, k, v, **kw)


def test_errors_kdim_vdim():
    ref, ours = make_pair(kdim=5, vdim=6)
    q, k, v = make_inputs(kdim=5, vdim=6)
    for bad in (dict(key=torch.randn(S, N, 4)), dict(value=torch.randn(S + 1, N, 6))):
        args = (bad.get("query", q), bad.get("key", k), bad.get("value", v))
        with pytest.raises(AssertionError):
            ref(*args)
        with pytest.raises(AssertionError):
            ours(*args)


def test_mixed_mask_types_warn_like_torch():
    ref, ours = make_pair()
    q, k, v = make_inputs()
    kw = dict(attn_mask=make_attn_mask("bool2d"), key_padding_mask=make_kpm("float"))
    for module in (ref, ours):
        with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
            module(q, k, v, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(q, k, v, attn_mask=make_attn_mask("bool2d"), key_padding_mask=make_kpm("bool"))
