"""The public API around the kernels: bad input, dispatch and explain, the SDPA drop-in, torch.compile."""
import os

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import _ext
from fastattn.problem import make_problem
from fastattn.backends import BACKENDS
from helpers import make_qkv


def qkv(*shape_args, **kw):
    return make_qkv(*shape_args, requires_grad=False, **kw)


# --- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_args,exc,words", [
    (lambda q, k, v: (q[0], k, v), ValueError, "q: expected a 4-D tensor"),
    (lambda q, k, v: (q, k.half(), v), TypeError, "dtypes must match"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "q: dtype torch.int32 is not supported"),
    (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "batch size"),
    (lambda q, k, v: (q, k[:, :, :, :3], v), ValueError, "k: head dim (3) must equal q's (8)"),
    (lambda q, k, v: (q, k, v[:, :, :4]), ValueError, "v: sequence length (4) must equal k's (6)"),
    (lambda q, k, v: (q, k[:, :3], v[:, :3]), ValueError, "must divide q's number of heads"),
    (lambda q, k, v: (q, k, v[:, :1]), ValueError, "v: number of heads"),
    (lambda q, k, v: (q[..., :0], k[..., :0], v), ValueError, "q: head dim must be at least 1"),
    (lambda q, k, v: (q, k, v.to("meta")), ValueError, "must be on one device"),
])
def test_bad_tensors_raise_naming_the_argument(make_args, exc, words):
    q, k, v = qkv(2, 4, 4, 5, 6, 8, 8)
    with pytest.raises(exc, match=None) as info:
        fastattn.attention(*make_args(q, k, v))
    assert words in str(info.value)


@pytest.mark.parametrize("mask,exc,words", [
    (torch.ones(5, 7, dtype=torch.bool), ValueError, "attn_mask: shape (5, 7) is not broadcastable"),
    (torch.ones(3, 4, 5, 6), ValueError, "attn_mask: shape (3, 4, 5, 6)"),
    (torch.ones(1, 2, 4, 5, 6), ValueError, "attn_mask: shape (1, 2, 4, 5, 6)"),
    (torch.ones(5, 6, dtype=torch.int64), TypeError, "attn_mask: expected a bool"),
    ("nope", TypeError, "attn_mask: expected a torch.Tensor"),
])
def test_bad_masks_raise(mask, exc, words):
    q, k, v = qkv(2, 4, 4, 5, 6, 8, 8)
    with pytest.raises(exc) as info:
        fastattn.attention(q, k, v, attn_mask=mask)
    assert words in str(info.value)


@pytest.mark.parametrize("dqk,dv,dtype,words", [(600, 8, torch.float32, "q: head dim 600 exceeds"),
                                                (8, 513, torch.float32, "v: head dim 513 exceeds"),
                                                (300, 8, torch.float64, "q: head dim 300 exceeds the Triton kernels' maximum 256")])
def test_head_dims_beyond_the_triton_kernels(dqk, dv, dtype, words):
    """Head dims > 512 (> 256 in float64) are served by reference/sdpa; forcing triton raises, naming the argument."""
    q, k, v = (torch.randn(1, 2, n, d, dtype=dtype) for n, d in ((5, dqk), (6, dqk), (6, dv)))
    with pytest.raises(RuntimeError) as info:
        fastattn.attention(q, k, v, backend="triton")
    assert words in str(info.value)
    expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(fastattn.attention(q, k, v), expected)


@pytest.mark.parametrize("kwargs,words", [
    (dict(causal="diagonal"), "causal: expected"),
    (dict(dropout_p=1.0), "dropout_p: must be in [0, 1)"),
    (dict(dropout_p=-0.1), "dropout_p"),
    (dict(scale=float("nan")), "scale: must be finite"),
    (dict(backend="flash9"), "backend: unknown backend 'flash9'"),
    (dict(backend=3), "backend: expected a backend name"),
    (dict(backend=["cpu", None]), "backend: expected a backend name"),
    (dict(scale="a"), "scale: expected a number"),
    (dict(dropout_p=None), "dropout_p: expected a number"),
])
def test_bad_options_raise(kwargs, words):
    q, k, v = qkv(1, 2, 2, 5, 6, 8, 8)
    with pytest.raises((ValueError, TypeError)) as info:
        fastattn.attention(q, k, v, **kwargs)
    assert words in str(info.value)


def test_numpy_and_tensor_scalars_are_numbers():
    np = pytest.importorskip("numpy")
    q, k, v = qkv(1, 2, 2, 5, 6, 8, 8)
    expected = fastattn.attention(q, k, v, scale=0.25, backend="reference")
    for scale in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25)):
        torch.testing.assert_close(fastattn.attention(q, k, v, scale=scale, backend="reference"), expected)


@pytest.mark.parametrize("op", ["window", "spatial", "temporal"])
def test_layout_ops_name_a_zero_head_dim_with_the_default_scale(op):
    """The default scale d ** -0.5 is not computed before the head dim is checked (it divided by zero)."""
    with pytest.raises(ValueError, match="q: head dim must be at least 1"):
        if op == "window":
            x0, v3 = torch.randn(1, 4, 4, 2, 0), torch.randn(1, 4, 4, 2, 3)
            fastattn.window_attention(x0, x0, v3, window_size=2)
        elif op == "spatial":
            s0, s3 = torch.randn(1, 7, 2, 0), torch.randn(1, 7, 2, 3)
            fastattn.spatial_attention(s0, s0, s3, num_frames=2)
        else:
            s0, s3 = torch.randn(1, 6, 2, 0), torch.randn(1, 6, 2, 3)
            fastattn.temporal_attention(s0, s0, s3, num_frames=2)


@pytest.mark.parametrize("backend", ["reference", "cpu", "sdpa"])
def test_no_keys_at_all_gives_zero_rows(backend):
    """Lk = 0: every row is fully masked -- output 0, LSE -inf, zero gradients (the reference backend's softmax
    took the max over an empty dimension)."""
    if backend == "cpu" and _ext.error() is not None:
        pytest.skip(f"the extension is not built: {_ext.error()}")
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    k, v = torch.randn(1, 2, 0, 8, requires_grad=True), torch.randn(1, 2, 0, 4, requires_grad=True)
    if backend == "sdpa":
        out, lse = fastattn.attention(q, k, v, backend=backend), None
    else:
        out, lse = fastattn.attention(q, k, v, backend=backend, return_lse=True)
        assert torch.isneginf(lse).all()
    assert out.shape == (1, 2, 5, 4) and (out == 0).all()
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert (dq == 0).all()


# --- dispatch ------------------------------------------------------------------------------------------------
def test_automatic_choice_on_cpu_and_explain_says_why():
    """On CPU tensors the fused C++ kernels serve when the extension is built; else sdpa, and explain says why."""
    from fastattn.backends import BACKENDS
    q, k, v = qkv(1, 2, 2, 5, 6, 8, 8)
    text = fastattn.explain(q, k, v)
    cpu_reasons = BACKENDS["cpu"].reasons(make_problem(q, k, v))
    if cpu_reasons:
        assert "chosen: sdpa" in text and "cpu: rejected:" in text
    else:
        assert "chosen: cpu" in text
    text = fastattn.explain(q, k, v, return_lse=True)
    assert ("chosen: reference" if cpu_reasons else "chosen: cpu") in text
    assert "sdpa: rejected: sdpa cannot return the log-sum-exp" in text


def test_forced_backend_that_cannot_serve_raises_with_every_reason():
    q, k, v = qkv(1, 2, 2, 5, 6, 8, 8)
    with pytest.raises(RuntimeError) as info:
        fastattn.attention(q, k, v, return_lse=True, backend=["sdpa", "cuda"])
    msg = str(info.value)
    assert "no backend can serve" in msg and "backend= argument" in msg
    assert "sdpa: sdpa cannot return the log-sum-exp" in msg and "cuda: " in msg


def test_context_manager_and_environment_variable(monkeypatch):
    q, k, v = qkv(1, 2, 2, 5, 6, 8, 8)
    used = []
    for name in ("reference", "sdpa"):
        orig = BACKENDS[name].forward
        monkeypatch.setattr(BACKENDS[name], "forward",
                            lambda p, s=None, _n=name, _o=orig: (used.append(_n), _o(p, s))[1])
    with fastattn.use_backend("reference"):
        fastattn.attention(q, k, v)
    monkeypatch.setenv("FASTATTN_BACKEND", "reference")
    fastattn.attention(q, k, v)
    fastattn.attention(q, k, v, backend="sdpa")  # the argument wins over the environment
    with fastattn.use_backend("sdpa"):            # the context manager wins over the environment
        fastattn.attention(q, k, v)
    assert used == ["reference", "reference", "sdpa", "sdpa"]
    monkeypatch.setenv("FASTATTN_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="FASTATTN_BACKEND"):
        fastattn.attention(q, k, v)
    monkeypatch.setenv("FASTATTN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTATTN_BACKEND: unknown backend 'bogus'"):
        fastattn.attention(q, k, v)


def test_available_backends_lists_every_slot():
    assert set(fastattn.available_backends()) == {"reference", "sdpa", "triton", "cuda", "cpu"}


# --- the F.scaled_dot_product_attention drop-in ----------------------------------------------------------
@pytest.mark.parametrize("case", ["4d", "3d", "5d", "causal", "bool_mask", "float_mask", "gqa", "scale", "dv"])
def test_sdpa_drop_in_matches_torch(case):
    shape_q, shape_k, shape_v = (2, 4, 9, 16), (2, 4, 11, 16), (2, 4, 11, 16)
    kw = {}
    if case == "3d":
        shape_q, shape_k, shape_v = (3, 9, 16), (3, 11, 16), (3, 11, 16)
    if case == "5d":
        shape_q, shape_k, shape_v = (2, 3, 4, 9, 16), (2, 3, 4, 11, 16), (2, 3, 4, 11, 16)
        kw["attn_mask"] = torch.randn(3, 1, 9, 11)
    if case == "causal":
        kw["is_causal"] = True
    if case == "bool_mask":
        kw["attn_mask"] = torch.rand(9, 11) > 0.2
    if case == "float_mask":
        kw["attn_mask"] = torch.randn(2, 1, 9, 11)
    if case == "gqa":
        shape_k, shape_v = (2, 2, 11, 16), (2, 2, 11, 16)
        kw["enable_gqa"] = True
    if case == "scale":
        kw["scale"] = 0.37
    if case == "dv":
        shape_v = (2, 4, 11, 24)
    q, k, v = torch.randn(shape_q), torch.randn(shape_k), torch.randn(shape_v)
    expected = F.scaled_dot_product_attention(q, k, v, **kw)
    for backend in ("sdpa", "reference"):
        with fastattn.use_backend(backend):
            got = fastattn.scaled_dot_product_attention(q, k, v, **kw)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("shapes", [((2, 3, 5, 8), (1, 3, 7, 8)), ((1, 3, 5, 8), (2, 3, 7, 8)),
                                    ((2, 4, 3, 5, 8), (2, 1, 3, 7, 8))])
def test_sdpa_drop_in_broadcasts_batch_dims(shapes):
    """torch's attention broadcasts the dimensions before the heads (one key/value set shared by a batch)."""
    shape_q, shape_kv = shapes
    q = torch.randn(shape_q, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(shape_kv, dtype=torch.float64, requires_grad=True) for _ in range(2))
    expected = F.scaled_dot_product_attention(q, k, v)
    got = fastattn.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(got, expected)
    g = torch.randn_like(expected)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(expected, (q, k, v), g)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="do not broadcast"):
        fastattn.scaled_dot_product_attention(torch.randn(2, 3, 5, 8), torch.randn(3, 3, 7, 8),
                                              torch.randn(3, 3, 7, 8))


def test_sdpa_drop_in_errors_like_torch():
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="enable_gqa"):
        fastattn.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="attn_mask: must be None when is_causal"):
        fastattn.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True)


# --- torch.compile -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_torch_compile_fullgraph_no_graph_break(backend):
    """The reference and sdpa paths trace into one graph (fullgraph=True fails on any graph break)."""
    torch._dynamo.reset()
    q, k, v = make_qkv(2, 4, 2, 9, 11, 16, 16)
    bias = torch.randn(4, 9, 11, requires_grad=True)

    def f(q, k, v, bias):
        return fastattn.attention(q, k, v, attn_mask=bias, causal="bottom_right", backend=backend)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v, bias)
    out.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v, bias)]
    for t in (q, k, v, bias):
        t.grad = None
    f(q, k, v, bias).sum().backward()
    torch.testing.assert_close(out, f(q, k, v, bias))
    for g, t in zip(grads, (q, k, v, bias)):
        torch.testing.assert_close(g, t.grad)


def test_torch_compile_triton_custom_ops():
    """The Triton kernels are custom ops with fake implementations: torch.compile keeps them in one graph."""
    torch._dynamo.reset()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = make_qkv(1, 2, 1, 7, 9, 16, 8, device=device)

    def f(q, k, v):
        return fastattn.attention(q, k, v, causal=True, backend="triton")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    out.sum().backward()
    ref = fastattn.attention(q.detach(), k.detach(), v.detach(), causal=True, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_triton_custom_ops_pass_opcheck():
    from fastattn.backends.triton import _backward_op, _forward_op
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = make_qkv(1, 2, 1, 5, 6, 16, 8, requires_grad=False, device=device)
    mask = torch.randn(5, 6, device=device)
    torch.library.opcheck(_forward_op, (q, k, v, mask, None, "top_left", 0.25, 0.0),
                          test_utils=("test_schema", "test_faketensor"))
    out, lse = _forward_op(q, k, v, mask, None, "top_left", 0.25, 0.0)
    torch.library.opcheck(_backward_op, (q, k, v, mask, None, out, lse, torch.randn_like(out), None, "top_left",
                                         0.25, 0.0, True), test_utils=("test_schema", "test_faketensor"))


def test_strided_inputs_reach_the_kernel_without_a_copy(monkeypatch):
    """A [B, L, H, D] tensor transposed to [B, H, L, D] is passed to the Triton launcher as is, and the output
    comes back in the same [B, L, H, D] memory order (so the caller's reshape to [B, L, H*D] is free)."""
    from fastattn.kernels import triton_attention as kernels
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seen = {}
    orig = kernels.attention_forward

    def spy(q, k, v, *args):
        seen.update(q_ptr=q.data_ptr(), q_stride=q.stride(), k_stride=k.stride())
        return orig(q, k, v, *args)

    monkeypatch.setattr(kernels, "attention_forward", spy)
    x = torch.randn(2, 7, 3, 16, device=device)  # [B, L, H, D]
    q = x.transpose(1, 2)
    out = fastattn.attention(q, q, q, backend="triton")
    assert seen == dict(q_ptr=x.data_ptr(), q_stride=q.stride(), k_stride=q.stride())
    assert out.transpose(1, 2).is_contiguous()


def test_explain_shows_the_triton_plan_with_split_kv():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = qkv(1, 1, 1, 8, 4000, 32, 32, device=device)
    text = fastattn.explain(q, k, v, backend="triton")
    assert "chosen: triton" in text and "split-KV" in text, text
