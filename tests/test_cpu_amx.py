"""The CPU kernels' AMX paths for bfloat16 (csrc/cpu/amx.h; the dense forward amx_forward.h and backward
amx_backward.h, TimeSformer's spatial forward) and the dispatch of bf16.

The kernel tests need a CPU with AMX-BF16 (Sapphire Rapids or later) and skip elsewhere; the dispatch tests run
everywhere.  FASTATTN_CPU_AMX=0 (FASTATTN_CPU_AMX_BWD=0 for the backward) switches the kernel path off per call,
so each test compares the two paths in one process as well as both with the float64 reference.
"""
import pytest
import torch

import fastattn
from helpers import assert_close_rule, max_err, reference64


@pytest.fixture(scope="module")
def amx():
    from fastattn import _ext
    if not _ext.load():
        pytest.skip(_ext.error())
    if not torch.ops.fastattn_internal.cpu_amx_bf16():
        pytest.skip("this CPU has no AMX-BF16 (or FASTATTN_CPU_AMX=0 / FASTATTN_CPU_ISA is set)")


def _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Lq, D, generator=g).bfloat16(), torch.randn(B, Hkv, Lk, D, generator=g).bfloat16(),
            torch.randn(B, Hkv, Lk, Dv, generator=g).bfloat16())


def _forward(q, k, v, monkeypatch, amx_on, **kw):
    monkeypatch.setenv("FASTATTN_CPU_AMX", "1" if amx_on else "0")
    return fastattn.attention(q, k, v, backend="cpu", return_lse=True, **kw)


def _check(q, k, v, monkeypatch, **kw):
    """The AMX forward against the float64 reference (tolerance rule, output and LSE); returns its output."""
    out, lse = _forward(q, k, v, monkeypatch, True, **kw)
    ref_out, ref_lse = reference64(q, k, v, attn_mask=kw.get("attn_mask"), causal=kw.get("causal", False),
                                   scale=kw.get("scale"))
    low = fastattn.attention(q, k, v, backend="reference", **kw)
    assert out.dtype == torch.bfloat16 and out.shape == ref_out.shape
    assert_close_rule(out, low, ref_out)
    assert max_err(lse, ref_lse) <= 1e-5 * max(1.0, ref_lse[torch.isfinite(ref_lse)].abs().max().item())
    return out


# (B, Hq, Hkv, Lq, Lk, D, Dv): head dims off the 32-element tile grid, odd ones (their key rows are copied
# before packing), Dv != D, GQA, query counts off the 16-row grid, key counts off the 32-key grid, several
# query (128) and key (512) blocks.
SHAPES = [(1, 2, 2, 1, 1, 8, 8), (2, 3, 3, 77, 131, 40, 24), (1, 4, 2, 200, 600, 64, 64), (1, 2, 1, 129, 513, 33, 17),
          (2, 2, 2, 16, 32, 128, 128), (1, 1, 1, 37, 3, 96, 80), (1, 2, 2, 300, 1100, 256, 200), (1, 1, 1, 5, 7, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_parity_with_reference(amx, monkeypatch, shape, causal):
    q, k, v = _inputs(*shape)
    out = _check(q, k, v, monkeypatch, causal=causal)
    other, _ = _forward(q, k, v, monkeypatch, False, causal=causal)
    if shape[3] * shape[4] > 100:  # the float32 path is another computation (P rounded to bf16 or not)
        assert not torch.equal(out, other), "FASTATTN_CPU_AMX=0 gave the AMX path's bits: the switch did nothing"


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.bfloat16])
def test_masks(amx, monkeypatch, mask_dtype):
    q, k, v = _inputs(2, 2, 2, 70, 600, 64, 64)
    g = torch.Generator().manual_seed(1)
    if mask_dtype == torch.bool:
        mask = torch.rand(2, 1, 70, 600, generator=g) > 0.3
        mask[0, 0, 5] = False  # a row that sees no key: output 0, LSE -inf
    else:
        mask = torch.randn(1, 2, 70, 600, generator=g).to(mask_dtype)
    _check(q, k, v, monkeypatch, attn_mask=mask)


def test_strided_views_and_odd_row_strides(amx, monkeypatch):
    """[B, L, H, D] views (rows H * D apart) and rows an odd number of elements apart (key rows then do not start on
    whole 32-bit words: the packing copies them first)."""
    base = torch.randn(2, 150, 3, 65).bfloat16()
    q = base[..., :64].transpose(1, 2)
    k = torch.randn(2, 700, 3, 65).bfloat16()[..., 1:].transpose(1, 2)
    v = torch.randn(2, 3, 700, 49).bfloat16()[..., :48]
    assert q.stride(2) % 2 == 1 and k.stride(2) % 2 == 1
    _check(q, k, v, monkeypatch)


def test_split_keys_and_unpacked_heads(amx, monkeypatch):
    """Few queries against many keys: the key splits run in parallel and merge by LSE.  D = 256 with 33k keys: the
    packed head (65 key blocks) exceeds the per-thread cache, so each block is packed where it is used."""
    q, k, v = _inputs(1, 1, 1, 33, 33000, 256, 64)
    _check(q, k, v, monkeypatch)
    q, k, v = _inputs(1, 2, 1, 3, 4000, 64, 64)
    _check(q, k, v, monkeypatch, causal="bottom_right")


def test_scale_and_extreme_scores(amx, monkeypatch):
    q, k, v = _inputs(1, 2, 2, 40, 90, 32, 32)
    _check(q, k, v, monkeypatch, scale=3.0)  # scores in the hundreds: the running max carries the softmax
    _check(q, k, v, monkeypatch, scale=-0.5)


@pytest.mark.parametrize("lazy", ["1", "0"])
def test_scores_rising_along_the_keys(amx, monkeypatch, lazy):
    """Each key block's scores exceed the running max of the blocks before by far more than the one-pass softmax's
    margin (e^8): the row must be redone with the new max (else P overflows to inf and the output is NaN); and
    falling scores, where the stale max is kept.  FASTATTN_CPU_AMX_LAZY=0 is the two-pass softmax throughout."""
    monkeypatch.setenv("FASTATTN_CPU_AMX_LAZY", lazy)
    q, k, v = _inputs(1, 2, 2, 40, 1300, 64, 64)
    ramp = torch.linspace(0.0, 20.0, 1300).view(1, 1, 1300, 1)
    k = (k.float() * 0.1 + ramp).bfloat16()  # scores rise by ~14 per unit of ramp: ~290 in all
    q = (q.float().abs() + 1.0).bfloat16()
    for kk in (k, k.flip(2)):
        _check(q, kk, v, monkeypatch)
        _check(q, kk, v, monkeypatch, causal="bottom_right")


def test_nan_inputs_as_the_float32_path(amx, monkeypatch):
    """NaN in a query row and in a key row: the AMX path gives what the float32 path gives, under the one rule of
    tests/test_nan_semantics.py -- exactly the rows that see a NaN score are NaN (here: the query's own row; every
    row for the key, nothing being masked), the others as without the NaN."""
    q, k, v = _inputs(1, 1, 1, 20, 40, 32, 32)
    q[0, 0, 3, 5] = float("nan")
    only_row_3 = torch.zeros(20, dtype=torch.bool)
    only_row_3[3] = True
    cases = ((q, k, only_row_3), (q.nan_to_num(), k.index_fill(2, torch.tensor([7]), float("nan")), torch.ones(20, dtype=torch.bool)))
    for qq, kk, nan_rows in cases:
        a, la = _forward(qq, kk, v, monkeypatch, True)
        b, lb = _forward(qq, kk, v, monkeypatch, False)
        assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isnan(la), torch.isnan(lb))
        assert torch.equal(torch.isnan(a[0, 0]).all(-1), nan_rows) and not torch.isnan(a[0, 0][~nan_rows]).any()
        assert torch.equal(torch.isnan(la[0, 0]), nan_rows) and not torch.isinf(la).any()
        if (~nan_rows).any():
            assert (a[0, 0][~nan_rows].float() - b[0, 0][~nan_rows].float()).abs().max().item() < 0.05


def test_dropout_keeps_the_philox_mask(amx, monkeypatch):
    """Dropout runs on the float32 probabilities before the bf16 rounding: the same keep-mask as the float32 path."""
    q, k, v = _inputs(1, 2, 2, 50, 300, 32, 32)
    torch.manual_seed(5)
    a, _ = _forward(q, k, v, monkeypatch, True, dropout_p=0.3)
    torch.manual_seed(5)
    b, _ = _forward(q, k, v, monkeypatch, False, dropout_p=0.3)
    torch.manual_seed(6)
    c, _ = _forward(q, k, v, monkeypatch, True, dropout_p=0.3)
    same_mask = (a.float() - b.float()).abs().max().item()
    other_mask = (a.float() - c.float()).abs().max().item()
    assert same_mask < 0.05 < other_mask, (same_mask, other_mask)


def test_backward_after_the_amx_forward(amx, monkeypatch):
    """The backward (float32 recomputation) with the LSE of the AMX forward."""
    q, k, v = [t.requires_grad_() for t in _inputs(1, 2, 1, 100, 300, 64, 48)]
    monkeypatch.setenv("FASTATTN_CPU_AMX", "1")
    out = fastattn.attention(q, k, v, backend="cpu", causal=True)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(fastattn.attention(q64, k64, v64, backend="reference", causal=True), (q64, k64, v64),
                              grad.double())
    low = torch.autograd.grad(fastattn.attention(q, k, v, backend="reference", causal=True), (q, k, v), grad)
    for name, a, lo, r in zip("qkv", got, low, ref):
        assert_close_rule(a, lo, r, what=f"d{name}")


def _vnni(b):
    """[K, N] bf16 -> amx.h's B layout: int32 [K / 2, N], word (kk, n) = (b[2kk, n], b[2kk + 1, n])."""
    K, N = b.shape
    return b.view(K // 2, 2, N).transpose(1, 2).contiguous().view(torch.int32).view(K // 2, N)


@pytest.mark.parametrize("M,N,K", [(16, 16, 32), (128, 512, 64), (48, 80, 96), (32, 64, 512)])
def test_amx_block_product_hook(amx, M, N, K):
    """amx_gemm_bf16 through its test hook: C = A B and C += A B, exact products summed in float32."""
    g = torch.Generator().manual_seed(M + N + K)
    a, b = torch.randn(M, K, generator=g).bfloat16(), torch.randn(K, N, generator=g).bfloat16()
    c = torch.randn(M, N, generator=g)
    c_orig, c0 = c.double(), c.clone()
    want = a.double() @ b.double()
    assert torch.ops.fastattn_internal.amx_block_product(a, _vnni(b), c, False, 1)
    assert (c.double() - want).abs().max().item() <= 1e-5 * K
    assert torch.ops.fastattn_internal.amx_block_product(a, _vnni(b), c0, True, 2)
    assert (c0.double() - (c_orig + 2 * want)).abs().max().item() <= 1e-5 * K * 3
    with pytest.raises(RuntimeError, match="amx_block_product: shapes"):
        torch.ops.fastattn_internal.amx_block_product(a[:, :K - 16] if K > 16 else a, _vnni(b), c, False, 1)


@pytest.mark.parametrize("order", ["nt", "tn"])
@pytest.mark.parametrize("N,D", [(49, 64), (196, 64), (20, 96), (7, 17)])
def test_spatial_forward_on_amx(amx, monkeypatch, order, N, D):
    """TimeSformer's spatial op in bf16 on AMX (spacetime_cpu.cpp spatial_forward_amx): every (video, frame, head)
    item refills the same buffers, so the tile's packed keys must be dropped between items; against the float64
    composite under the tolerance rule, with the float32 path (FASTATTN_CPU_AMX=0) as a second opinion."""
    from test_spacetime import naive_spatial

    B, T, H = 2, 3, 2
    g = torch.Generator().manual_seed(N + D)
    q, k, v = (torch.randn(B, 1 + N * T, H, D, generator=g) for _ in range(3))
    low = [t.bfloat16() for t in (q, k, v)]
    monkeypatch.setenv("FASTATTN_CPU_AMX", "1")
    out = fastattn.spatial_attention(*low, num_frames=T, token_order=order, backend="cpu")
    monkeypatch.setenv("FASTATTN_CPU_AMX", "0")
    other = fastattn.spatial_attention(*low, num_frames=T, token_order=order, backend="cpu")
    ref64 = naive_spatial(*[t.double() for t in low], T, order)
    assert_close_rule(out, naive_spatial(*low, T, order), ref64)
    assert (out.float() - other.float()).abs().max().item() < 0.05
    if N * N > 100:
        assert not torch.equal(out, other), "FASTATTN_CPU_AMX=0 gave the AMX path's bits"


# --- the backward on AMX (amx_backward.h; FASTATTN_CPU_AMX_BWD=0 runs the float32 backward) ------------------------
def _grads(q, k, v, grad, monkeypatch, amx_bwd, backend="cpu", **kw):
    monkeypatch.setenv("FASTATTN_CPU_AMX_BWD", "1" if amx_bwd else "0")
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    mask = kw.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kw["attn_mask"] = mask = mask.detach().clone().requires_grad_()
        leaves.append(mask)
    out = fastattn.attention(*leaves[:3], backend=backend, **kw)
    return torch.autograd.grad(out, leaves, grad)


def _check_backward(q, k, v, monkeypatch, **kw):
    """The AMX backward's dq, dk, dv (and float mask gradient) against the float64 reference under the tolerance
    rule; returns them.  Also checks that the switch selects another computation (the float32 backward)."""
    out = fastattn.attention(q, k, v, backend="reference", **kw)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
    got = _grads(q, k, v, grad, monkeypatch, True, **kw)
    kw64 = dict(kw)
    if kw.get("attn_mask") is not None and kw["attn_mask"].is_floating_point():
        kw64["attn_mask"] = kw["attn_mask"].double()
    ref = _grads(q.double(), k.double(), v.double(), grad.double(), monkeypatch, True, backend="reference", **kw64)
    low = _grads(q, k, v, grad, monkeypatch, True, backend="reference", **kw)
    for name, a, lo, r in zip(["dq", "dk", "dv", "dmask"], got, low, ref):
        assert a.dtype == lo.dtype and a.shape == r.shape, name
        assert_close_rule(a, lo, r, what=name)
    other = _grads(q, k, v, grad, monkeypatch, False, **kw)
    if q.shape[2] * k.shape[2] > 100:
        assert not all(torch.equal(a, b) for a, b in zip(got, other)), "FASTATTN_CPU_AMX_BWD=0 changed nothing"
    return got


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_backward_parity_with_reference(amx, monkeypatch, shape, causal):
    _check_backward(*_inputs(*shape), monkeypatch, causal=causal)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.bfloat16])
def test_backward_masks_and_mask_gradient(amx, monkeypatch, mask_dtype):
    """Bool masks (with a row that sees no key), float masks with their gradient (written from the keys-major dS^T
    tile), a broadcast head dimension."""
    q, k, v = _inputs(2, 2, 2, 70, 300, 64, 48)
    g = torch.Generator().manual_seed(1)
    if mask_dtype == torch.bool:
        mask = torch.rand(2, 1, 70, 300, generator=g) > 0.3
        mask[0, 0, 5] = False
    else:
        mask = torch.randn(1, 2, 70, 300, generator=g).to(mask_dtype)
    _check_backward(q, k, v, monkeypatch, attn_mask=mask, causal="bottom_right")


@pytest.mark.parametrize("schedule", ["single", "striped", "two_pass"])
def test_backward_schedules(amx, monkeypatch, schedule):
    """Key stripes with partial dQs summed afterwards (few heads, many keys), one stripe, and the two-pass choice
    (run as one stripe on AMX): each under the rule, and all three the same computation up to dQ's sum order."""
    monkeypatch.setenv("FASTATTN_CPU_BACKWARD", schedule)
    q, k, v = _inputs(1, 2, 1, 150, 700, 64, 64)
    _check_backward(q, k, v, monkeypatch, causal="bottom_right")


def test_backward_strided_views(amx, monkeypatch):
    """[B, L, H, D] views, odd row strides (packing copies the rows first) and a dout that is a strided view."""
    base = torch.randn(2, 150, 3, 65).bfloat16()
    q = base[..., :64].transpose(1, 2)
    k = torch.randn(2, 90, 3, 65).bfloat16()[..., 1:].transpose(1, 2)
    v = torch.randn(2, 3, 90, 49).bfloat16()[..., :48]
    _check_backward(q, k, v, monkeypatch)


def test_backward_deterministic(amx, monkeypatch):
    q, k, v = _inputs(2, 4, 2, 200, 600, 64, 64)
    grad = torch.randn(2, 4, 200, 64).bfloat16()
    for schedule in ("single", "striped"):
        monkeypatch.setenv("FASTATTN_CPU_BACKWARD", schedule)
        a = _grads(q, k, v, grad, monkeypatch, True, causal=True)
        b = _grads(q, k, v, grad, monkeypatch, True, causal=True)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_backward_nan_as_the_float32_backward(amx, monkeypatch):
    """A NaN in a key row or a value row: NaN exactly where the float32 backward has it.  Key 60 is hidden from
    every query (top-left causal, 40 queries) but lies in the visible key block: it must not reach any gradient."""
    q, k, v = _inputs(1, 1, 1, 40, 70, 32, 32)
    grad = torch.randn(1, 1, 40, 32).bfloat16()
    for kk, vv in ((k.index_fill(2, torch.tensor([7]), float("nan")), v),
                   (k, v.index_fill(2, torch.tensor([9]), float("nan"))),
                   (k.index_fill(2, torch.tensor([60]), float("nan")), v)):
        a = _grads(q, kk, vv, grad, monkeypatch, True, causal=True)
        b = _grads(q, kk, vv, grad, monkeypatch, False, causal=True)
        for x, y in zip(a, b):
            assert torch.equal(torch.isnan(x), torch.isnan(y))
        if kk[0, 0, 60].isnan().any():
            assert not any(torch.isnan(x).any() for x in a)


def test_backward_dropout_keeps_the_float32_backward(amx, monkeypatch):
    """With dropout the backward is the float32 one (its keep-mask is drawn on float32 probabilities): the switch
    changes nothing."""
    q, k, v = _inputs(1, 2, 2, 50, 300, 32, 32)
    grad = torch.randn(1, 2, 50, 32).bfloat16()
    results = []
    for amx_bwd in (True, False):
        torch.manual_seed(5)
        results.append(_grads(q, k, v, grad, monkeypatch, amx_bwd, dropout_p=0.3))
    assert all(torch.equal(x, y) for x, y in zip(*results))


def test_deterministic(amx, monkeypatch):
    q, k, v = _inputs(2, 4, 2, 300, 900, 64, 64)
    a, la = _forward(q, k, v, monkeypatch, True, causal=True)
    b, lb = _forward(q, k, v, monkeypatch, True, causal=True)
    assert torch.equal(a, b) and torch.equal(la, lb)


# --- dispatch (runs everywhere: the order does not depend on the CPU) ------------------------------------------------
def test_dispatch_bf16_goes_to_the_cpu_backend(monkeypatch):
    """bf16 takes the cpu backend first for inference and training alike, as every dtype does: on AMX CPUs its
    kernels win or tie against torch's SDPA (entries 36-41; until entry 41 inference went to SDPA there)."""
    monkeypatch.delenv("FASTATTN_BACKEND", raising=False)
    q, k, v = _inputs(1, 2, 2, 8, 8, 16, 16)
    if "chosen: cpu" not in fastattn.explain(q.float(), k.float(), v.float()):
        pytest.skip("the cpu backend does not serve here")
    assert "chosen: cpu" in fastattn.explain(q, k, v)
    assert "chosen: cpu" in fastattn.explain(q.clone().requires_grad_(), k, v)
    assert "chosen: cpu" in fastattn.explain(q, k, v, dropout_p=0.1)
    assert "chosen: sdpa" in fastattn.explain(q, k, v, backend="sdpa")


def test_dispatch_space_time_ops_use_the_cpu_kernels_for_bf16(monkeypatch):
    """The space-time ops in bf16 without a gradient: the cpu backend's result, bit for bit (entry 41)."""
    monkeypatch.delenv("FASTATTN_BACKEND", raising=False)
    q0, _, _ = _inputs(1, 1, 1, 8, 8, 16, 16)
    if "chosen: cpu" not in fastattn.explain(q0.float(), q0.float(), q0.float()):
        pytest.skip("the cpu backend does not serve here")
    g = torch.Generator().manual_seed(4)
    T, N = 4, 9
    q, k, v = (torch.randn(2, 1 + N * T, 2, 16, generator=g).bfloat16() for _ in range(3))
    spatial = fastattn.spatial_attention(q, k, v, num_frames=T)
    assert torch.equal(spatial, fastattn.spatial_attention(q, k, v, num_frames=T, backend="cpu"))
    temporal = fastattn.temporal_attention(q[:, 1:], k[:, 1:], v[:, 1:], num_frames=T)
    assert torch.equal(temporal, fastattn.temporal_attention(q[:, 1:], k[:, 1:], v[:, 1:], num_frames=T,
                                                             backend="cpu"))
