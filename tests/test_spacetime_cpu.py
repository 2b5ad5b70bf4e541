"""The C++ CPU spatial op (csrc/cpu/spacetime_cpu.cpp; ops fastattn::spatial_fwd / spatial_bwd): TimeSformer's
spatial attention with the cls token -- per (video, frame, head) the [cls, N patches] rows gathered by index math
(the keys straight into K^T for the float32 tiles), the cls mean and its gradients' frame sums in the kernel --
against the naive
float64 composite (output and gradients), the low-precision tolerance rule, gradcheck, opcheck, a bitwise
deterministic backward (run to run and across thread counts), argument errors, and the dispatch that routes
``fastattn.spatial_attention`` on CPU tensors to it."""
import zlib

import pytest
import torch

import fastattn
from helpers import assert_close_rule
from test_spacetime import naive_spatial



CASES = {  # B, T, N, heads, d, dv, token order
    "nt_small": (2, 3, 7, 2, 8, 6, "nt"),
    "tn_small": (2, 3, 7, 2, 8, 6, "tn"),
    "one_frame": (3, 1, 5, 3, 4, 4, "nt"),
    "one_patch": (2, 4, 1, 2, 5, 3, "nt"),
    "odd_dims": (1, 5, 9, 3, 7, 5, "tn"),
    "two_query_blocks": (1, 2, 140, 1, 8, 8, "nt"),    # 1 + N > 128: query and backward key blocks
    "two_key_blocks_fwd": (1, 2, 600, 1, 4, 4, "tn"),  # 1 + N > 512: the forward's key blocks
    "full_last_key_block": (1, 1, 512, 1, 4, 4, "nt"),  # 513 keys: a last key block of one key
    "tiles_kt": (2, 3, 40, 2, 16, 12, "nt"),  # 1 + N > 16: float32 keys into K^T (register tiles)
    "kt_padded_stride": (1, 2, 230, 1, 8, 8, "tn"),  # K^T's row stride would be 256 floats: padded
}


def _inputs(case, dtype=torch.float64, layout="separate"):
    B, T, N, heads, d, dv, order = CASES[case]
    g = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    L = 1 + T * N
    if layout == "interleaved":  # views of one [B, L, 3, heads, d] qkv projection (d == dv)
        q, k, v = torch.randn(B, L, 3, heads, d, dtype=dtype, generator=g).unbind(2)
    elif layout == "broadcast_tokens":  # every token the same row (stride 0): copied once by the op
        q, k = (torch.randn(B, 1, heads, d, dtype=dtype, generator=g).expand(B, L, heads, d) for _ in range(2))
        v = torch.randn(B, L, heads, dv, dtype=dtype, generator=g)
    elif layout == "strided_last":  # head dims not contiguous: copied once by the op
        q, k = (torch.randn(B, L, d, heads, dtype=dtype, generator=g).transpose(2, 3) for _ in range(2))
        v = torch.randn(B, L, dv, heads, dtype=dtype, generator=g).transpose(2, 3)
    else:
        q, k = (torch.randn(B, L, heads, d, dtype=dtype, generator=g) for _ in range(2))
        v = torch.randn(B, L, heads, dv, dtype=dtype, generator=g)
    return [t.requires_grad_() for t in (q, k, v)], T, order


def _grads(out, leaves, dout):
    return torch.autograd.grad(out, leaves, dout)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_naive_float64(ops, case):
    (q, k, v), T, order = _inputs(case)
    out = fastattn.spatial_attention(q, k, v, num_frames=T, token_order=order, backend="cpu")
    ref = naive_spatial(q, k, v, T, order)
    assert out.shape == ref.shape and out.is_contiguous()
    assert (out - ref).abs().max().item() <= 1e-10
    dout = torch.randn_like(ref)
    for name, got, want in zip("qkv", _grads(out, (q, k, v), dout), _grads(ref, (q, k, v), dout)):
        assert (got - want).abs().max().item() <= 1e-10, f"grad {name}"


@pytest.mark.parametrize("layout", ["interleaved", "strided_last", "broadcast_tokens"])
def test_strided_inputs(ops, layout):
    case = "nt_small" if layout == "strided_last" else "one_frame"
    (q, k, v), T, order = _inputs(case, layout=layout)
    out = fastattn.spatial_attention(q, k, v, num_frames=T, token_order=order, scale=0.3, backend="cpu")
    ref = naive_spatial(q, k, v, T, order, scale=0.3)
    assert (out - ref).abs().max().item() <= 1e-10
    dout = torch.randn_like(ref)
    for got, want in zip(_grads(out, (q, k, v), dout), _grads(ref, (q, k, v), dout)):
        assert (got - want).abs().max().item() <= 1e-10


def test_cpu_tensors_dispatch_to_the_op(ops):
    """The default dispatch on CPU picks the cpu backend, and with it the fused op (its autograd node); dropout
    takes the concatenating composite (still on the cpu backend's attention kernels)."""
    (q, k, v), T, order = _inputs("nt_small", dtype=torch.float32)
    assert "_SpatialCPU" in fastattn.spatial_attention(q, k, v, num_frames=T).grad_fn.name()
    out = fastattn.spatial_attention(q, k, v, num_frames=T, dropout_p=0.3, backend="cpu")
    assert "_SpatialCPU" not in out.grad_fn.name()
    assert "_SpatialCPU" not in fastattn.spatial_attention(q, k, v, num_frames=T, backend="reference").grad_fn.name()


@pytest.mark.parametrize("case", ["odd_dims", "tiles_kt", "kt_padded_stride", "full_last_key_block"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_tolerance_rule(ops, dtype, case):
    """max|fast - ref64| <= 2 max|ref_lowp - ref64| + 1e-5 (tests/helpers.py), output and gradients; float32 and
    bf16 with more than 16 rows take the register tiles' K^T path where the CPU has AVX2 or AVX-512."""
    (q, k, v), T, order = _inputs(case, dtype=torch.float32)
    low = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = fastattn.spatial_attention(*low, num_frames=T, token_order=order, backend="cpu")
    assert out.dtype == dtype
    ref_low = naive_spatial(*low, T, order)
    ref64 = naive_spatial(*x64, T, order)
    assert_close_rule(out, ref_low, ref64)
    dout = torch.randn(ref64.shape, dtype=torch.float64)
    got = _grads(out, low, dout.to(dtype))
    want_low = _grads(ref_low, low, dout.to(dtype))
    want64 = _grads(ref64, x64, dout)
    for name, a, b, c in zip("qkv", got, want_low, want64):
        assert_close_rule(a, b, c, what=f"d{name}")


def test_gradcheck(ops):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 1 + 2 * 3, 2, 3, dtype=torch.float64, generator=g).requires_grad_()
               for _ in range(3))
    for order in ("nt", "tn"):
        assert torch.autograd.gradcheck(
            lambda q, k, v: fastattn.spatial_attention(q, k, v, num_frames=2, token_order=order, backend="cpu"),
            (q, k, v), atol=1e-7, rtol=1e-5)


def _op_samples():
    (q, k, v), T, _ = _inputs("nt_small", dtype=torch.float32)
    q, k, v = (t.detach() for t in (q, k, v))
    return [
        (q, k, v, T, "nt", 0.3),
        (q.double(), k.double(), v.double(), T, "tn", 0.5),
        (q.bfloat16(), k.bfloat16(), v.bfloat16(), T, "nt", 0.3),
    ]


@pytest.mark.parametrize("i", range(3))
def test_opcheck(ops, i):
    args = _op_samples()[i]
    torch.library.opcheck(ops.spatial_fwd.default, args)
    q, k, v, T, order, scale = args
    out, out_cls, lse = ops.spatial_fwd(*args)
    assert out_cls.shape == (q.shape[0], T, q.shape[2], v.shape[-1])
    assert lse.shape == (q.shape[0], T, q.shape[2], 1 + (q.shape[1] - 1) // T)
    dout = torch.randn_like(out)
    torch.library.opcheck(ops.spatial_bwd.default, (q, k, v, out, out_cls, lse, dout, T, order, scale))


def test_backward_is_bitwise_deterministic(ops):
    """Run to run and across thread counts: every row is written by one work item, the cls token's per-frame
    terms are summed in frame order."""
    (q, k, v), T, order = _inputs("two_query_blocks", dtype=torch.float32)
    dout = torch.randn(q.shape[:3] + (v.shape[-1],))
    threads = torch.get_num_threads()

    def run(n):
        torch.set_num_threads(n)
        try:
            out = fastattn.spatial_attention(q, k, v, num_frames=T, token_order=order, backend="cpu")
            return [out.detach()] + list(_grads(out, (q, k, v), dout))
        finally:
            torch.set_num_threads(threads)
    first, again, single = run(2), run(2), run(1)
    for a, b, c in zip(first, again, single):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_empty_batch(ops):
    q, k, v = (torch.randn(0, 1 + 2 * 3, 2, 4, requires_grad=True) for _ in range(3))
    out = fastattn.spatial_attention(q, k, v, num_frames=2, backend="cpu")
    assert out.shape == (0, 7, 2, 4)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_argument_errors_name_the_argument(ops):
    q, k, v = (torch.randn(1, 1 + 2 * 3, 2, 4) for _ in range(3))
    with pytest.raises(RuntimeError, match="num_frames: expected a positive int"):
        ops.spatial_fwd(q, k, v, 0, "nt", 1.0)
    with pytest.raises(RuntimeError, match="q: 7 tokens do not fit num_frames=4"):
        ops.spatial_fwd(q, k, v, 4, "nt", 1.0)
    with pytest.raises(RuntimeError, match="token_order: expected 'nt' or 'tn'"):
        ops.spatial_fwd(q, k, v, 2, "ht", 1.0)
    with pytest.raises(RuntimeError, match="k: shape"):
        ops.spatial_fwd(q, k[:, :5], v, 2, "nt", 1.0)
    with pytest.raises(RuntimeError, match="v: shape"):
        ops.spatial_fwd(q, k, v[:, :, :1], 2, "nt", 1.0)
    with pytest.raises(RuntimeError, match="k, v: dtypes must match"):
        ops.spatial_fwd(q, k.double(), v, 2, "nt", 1.0)
    with pytest.raises(RuntimeError, match="q: dtype Int is not supported"):
        ops.spatial_fwd(q.int(), k.int(), v.int(), 2, "nt", 1.0)
    with pytest.raises(RuntimeError, match="q: expected a 4-D tensor"):
        ops.spatial_fwd(q[0], k[0], v[0], 2, "nt", 1.0)
    with pytest.raises(RuntimeError, match="scale: must be finite"):
        ops.spatial_fwd(q, k, v, 2, "nt", float("nan"))
    out, out_cls, lse = ops.spatial_fwd(q, k, v, 2, "nt", 1.0)
    with pytest.raises(RuntimeError, match="lse: expected a CPU Float tensor of size"):
        ops.spatial_bwd(q, k, v, out, out_cls, lse[:, :1], out, 2, "nt", 1.0)
    with pytest.raises(RuntimeError, match="out_cls: expected a CPU Float tensor"):
        ops.spatial_bwd(q, k, v, out, out_cls.double(), lse, out, 2, "nt", 1.0)
    with pytest.raises(RuntimeError, match="dout: expected size"):
        ops.spatial_bwd(q, k, v, out, out_cls, lse, out[:, :3], 2, "nt", 1.0)
    with pytest.raises(RuntimeError, match="out: dtype must match"):
        ops.spatial_bwd(q, k, v, out.double(), out_cls, lse, out, 2, "nt", 1.0)


def test_torch_compile(ops):
    """Under torch.compile the op still runs (the custom ops' fake implementations give the traced shapes) and
    matches the eager reference, output and gradients."""
    (q, k, v), T, order = _inputs("nt_small", dtype=torch.float32)
    compiled = torch.compile(lambda q, k, v: fastattn.spatial_attention(q, k, v, num_frames=T, token_order=order))
    out = compiled(q, k, v)
    ref = fastattn.spatial_attention(q, k, v, num_frames=T, token_order=order, backend="reference")
    assert (out - ref).abs().max().item() <= 1e-5
    dout = torch.randn_like(ref)
    for got, want in zip(_grads(out, (q, k, v), dout), _grads(ref, (q, k, v), dout)):
        assert (got - want).abs().max().item() <= 1e-5
