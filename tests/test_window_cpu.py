"""The C++ CPU window kernels (csrc/cpu/window_cpu.cpp; ops fastattn::window_fwd / window_bwd): the Swin shift,
partition and reverse as index math, the bias table read in-kernel with its gradient, the region mask from
coordinates -- against the reference composite (float64 oracle, the low-precision tolerance rule), gradcheck,
dropout with the other backends' keep-masks, bitwise-deterministic backward, opcheck, argument errors."""
import zlib

import pytest
import torch

import fastattn
from fastattn.nn import WindowAttention
from helpers import assert_close_rule



CASES = {  # B, H, W, heads, d, dv, window, shift, unpadded
    "w7_shift0": (2, 7, 14, 2, 16, 16, (7, 7), (0, 0), None),
    "w7_shift3": (2, 14, 14, 3, 32, 32, (7, 7), (3, 3), None),
    "w4x8_shift": (2, 8, 16, 2, 8, 8, (4, 8), (2, 4), None),
    "shift_h_only_dv": (1, 8, 8, 1, 8, 12, (4, 4), (2, 0), None),
    "timm_roll_then_pad": (1, 8, 8, 1, 8, 8, (4, 4), (2, 2), (7, 6)),
    "odd_dims": (3, 6, 10, 3, 5, 7, (3, 5), (1, 2), None),
    "window_is_image": (1, 5, 5, 2, 24, 24, (5, 5), (2, 2), None),
    "one_token_windows": (2, 3, 4, 1, 8, 8, (1, 1), (0, 0), None),
}


def _inputs(case, dtype=torch.float64, table=True):
    B, H, W, heads, d, dv, window, shift, unpadded = CASES[case]
    g = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    q = torch.randn(B, H, W, heads, d, dtype=dtype, generator=g)
    k = torch.randn(B, H, W, heads, d, dtype=dtype, generator=g)
    v = torch.randn(B, H, W, heads, dv, dtype=dtype, generator=g)
    tb = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads, dtype=dtype, generator=g) if table else None
    return [q, k, v, tb]


def _run(backend, tensors, case, dtype, grad, dropout_p=0.0, table_dtype=None):
    """table_dtype: the bias table's dtype (default: q's) -- float32 with bf16/fp16 q/k/v is mixed-precision
    training (parameters in float32, activations in low precision)."""
    *_, window, shift, unpadded = CASES[case]
    dtypes = [dtype] * 3 + [table_dtype or dtype]
    ts = [None if t is None else t.detach().to(dt).requires_grad_() for t, dt in zip(tensors, dtypes)]
    torch.manual_seed(7)  # the same dropout seed for every run
    out = fastattn.window_attention(ts[0], ts[1], ts[2], window_size=window, shift_size=shift,
                                    rel_pos_bias_table=ts[3], unpadded_size=unpadded, backend=backend,
                                    dropout_p=dropout_p)
    grads = torch.autograd.grad(out, [t for t in ts if t is not None], grad.to(dtype))
    return [out, *grads]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_composite(ops, case, dtype):
    tensors = _inputs(case)
    B, H, W, heads, d, dv, *_ = CASES[case]
    grad = torch.randn(B, H, W, heads, dv, dtype=torch.float64)
    # The table stays float32 for bf16/fp16 inputs (autocast training): a bf16/fp16 table gradient would be a
    # sum of B * windows score gradients rounded once to 8/11 bits, which drowns any difference in the kernels.
    table_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    fast = _run("cpu", tensors, case, dtype, grad, table_dtype=table_dtype)
    lowp = _run("reference", tensors, case, dtype, grad, table_dtype=table_dtype)
    ref = _run("reference", tensors, case, torch.float64, grad)
    for name, a, b, c in zip(["out", "dq", "dk", "dv", "dtable"], fast, lowp, ref):
        assert a.shape == c.shape and a.dtype == b.dtype, name
        if dtype == torch.float64:
            torch.testing.assert_close(a, c, atol=1e-10, rtol=1e-10, msg=name)
        else:
            assert_close_rule(a, b, c, name)


def test_without_table_and_with_dropout(ops):
    tensors = _inputs("w7_shift3", table=False)
    grad = torch.randn(2, 14, 14, 3, 32, dtype=torch.float64)
    for p in (0.0, 0.3):
        fast = _run("cpu", tensors, "w7_shift3", torch.float64, grad, dropout_p=p)
        ref = _run("reference", tensors, "w7_shift3", torch.float64, grad, dropout_p=p)
        for name, a, b in zip(["out", "dq", "dk", "dv"], fast, ref):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"{name} (dropout {p})")


def test_dropout_with_table_matches_reference_keep_mask(ops):
    tensors = _inputs("w4x8_shift")
    grad = torch.randn(2, 8, 16, 2, 8, dtype=torch.float64)
    fast = _run("cpu", tensors, "w4x8_shift", torch.float64, grad, dropout_p=0.25)
    ref = _run("reference", tensors, "w4x8_shift", torch.float64, grad, dropout_p=0.25)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dtable"], fast, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


def test_gradcheck_float64(ops):
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 4, 6, 2, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 4, 6, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    table = torch.randn(3 * 5, 2, dtype=torch.float64, generator=g, requires_grad=True)

    def f(q, k, v, table):
        return fastattn.window_attention(q, k, v, window_size=(2, 3), shift_size=(1, 1), rel_pos_bias_table=table,
                                         backend="cpu")

    assert torch.autograd.gradcheck(f, (q, k, v, table))


def test_strided_qkv_views_and_no_composite(ops, monkeypatch):
    """Views of one qkv projection are read in place (the composite, which calls fastattn.attention, never runs)."""
    monkeypatch.setattr(fastattn.window, "attention", lambda *a, **k: pytest.fail("composite path used"))
    torch.manual_seed(0)
    qkv = torch.randn(2, 14, 14, 3, 3, 32, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.unbind(3)
    table = torch.randn(169, 3, dtype=torch.float64, requires_grad=True)
    out = fastattn.window_attention(q, k, v, window_size=7, shift_size=3, rel_pos_bias_table=table)  # default: cpu
    out.sum().backward()
    monkeypatch.undo()
    q2, k2, v2 = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    t2 = table.detach().clone().requires_grad_()
    ref = fastattn.window_attention(q2, k2, v2, window_size=7, shift_size=3, rel_pos_bias_table=t2,
                                    backend="reference")
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(qkv.grad, torch.stack([q2.grad, k2.grad, v2.grad], 3))
    torch.testing.assert_close(table.grad, t2.grad)


def test_backward_is_deterministic_across_runs_and_thread_counts(ops):
    tensors = _inputs("w7_shift3", dtype=torch.float32)
    grad = torch.randn(2, 14, 14, 3, 32)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 1, 3):
            torch.set_num_threads(n)
            runs.append(_run("cpu", tensors, "w7_shift3", torch.float32, grad, dropout_p=0.1))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_module_uses_the_cpu_kernels(ops):
    torch.manual_seed(0)
    m = WindowAttention(16, 2, 4).double()
    x = torch.randn(2, 7, 6, 16, dtype=torch.float64)  # padded to 8 x 8 inside
    for roll_before_pad in (False, True):
        m.roll_before_pad = roll_before_pad
        m.backend = "reference"
        ref = m(x, shift_size=2)
        m.backend = "cpu"
        torch.testing.assert_close(m(x, shift_size=2), ref, atol=1e-10, rtol=1e-10)


def _op_samples():
    q, k, v, table = (t.float() for t in _inputs("w4x8_shift"))
    seed = torch.tensor([42], dtype=torch.int64)
    geometry = [8, 16, 4, 8, 2, 4, 8, 16]
    return [
        (q, k, v, table, None, geometry, 0.3, 0.0),
        (q.double(), k.double(), v.double(), None, seed, [8, 16, 4, 8, 0, 0, 8, 16], 0.3, 0.2),
        (q.bfloat16(), k.bfloat16(), v.bfloat16(), table, None, [8, 16, 4, 8, 2, 4, 7, 15], 0.3, 0.0),
    ]


@pytest.mark.parametrize("i", range(3))
def test_opcheck(ops, i):
    args = _op_samples()[i]
    torch.library.opcheck(ops.window_fwd.default, args)
    q, k, v, table, seed, geometry, scale, p = args
    out, lse = ops.window_fwd(*args)
    dout = torch.randn_like(out)
    torch.library.opcheck(ops.window_bwd.default,
                          (q, k, v, table, seed, out, lse, dout, geometry, scale, p, table is not None))


def test_argument_errors_name_the_argument(ops):
    q, k, v, table = (t.float() for t in _inputs("w4x8_shift"))
    geo = [8, 16, 4, 8, 2, 4, 8, 16]
    with pytest.raises(RuntimeError, match="geometry: expected"):
        ops.window_fwd(q, k, v, table, None, geo[:7], 1.0, 0.0)
    with pytest.raises(RuntimeError, match="geometry: image size"):
        ops.window_fwd(q, k, v, table, None, [8, 8, 4, 8, 2, 4, 8, 8], 1.0, 0.0)
    with pytest.raises(RuntimeError, match="geometry: shift"):
        ops.window_fwd(q, k, v, table, None, [8, 16, 4, 8, 4, 4, 8, 16], 1.0, 0.0)
    with pytest.raises(RuntimeError, match="q: image"):
        ops.window_fwd(q, k, v, table, None, [8, 16, 3, 8, 2, 4, 8, 16], 1.0, 0.0)
    with pytest.raises(RuntimeError, match="table: expected shape"):
        ops.window_fwd(q, k, v, table[:-1], None, geo, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="k: shape"):
        ops.window_fwd(q, k[:, :4], v, table, None, geo, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="seed: required"):
        ops.window_fwd(q, k, v, table, None, geo, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="q: expected a 5-D"):
        ops.window_fwd(q[0], k, v, table, None, geo, 1.0, 0.0)
    out, lse = ops.window_fwd(q, k, v, table, None, geo, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="lse: expected"):
        ops.window_bwd(q, k, v, table, None, out, lse[:1], out, geo, 1.0, 0.0, True)
    with pytest.raises(RuntimeError, match="table_needs_grad"):
        ops.window_bwd(q, k, v, None, None, out, lse, out, geo, 1.0, 0.0, True)


def test_window_op_picks_the_cpu_kernels_by_default(ops, monkeypatch):
    seen = []
    real = fastattn.window._fused_ops
    monkeypatch.setattr(fastattn.window, "_fused_ops", lambda impl: seen.append(impl) or real(impl))
    q, k, v, table = _inputs("w7_shift0", dtype=torch.float32)
    fastattn.window_attention(q, k, v, window_size=7, rel_pos_bias_table=table)
    assert seen == ["cpu"]
    fastattn.window_attention(q, k, v, window_size=7, rel_pos_bias_table=table, backend="sdpa")
    assert seen == ["cpu"]  # sdpa: the composite
