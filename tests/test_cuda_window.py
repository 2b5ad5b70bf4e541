"""The CUDA window kernels (ops fastattn::window_fwd / window_bwd on csrc/cuda: the FlashAttention-2 kernels of
fa_kernels.cuh in their Swin window layout) against the reference composite ``fastattn.window_attention(...,
backend="reference")``, with the low-precision tolerance rule (tests/helpers.py: the kernels vs the composite in the
same dtype, both vs the float64 composite on the same inputs).

* CPU-runnable, emulated: the kernels' own source on the host emulator (test_cuda_backend.py's ``emu`` fixture,
  ops ``torch.ops.fastattn_emu.window_fwd / window_bwd``): the token -> pixel map of the shift and partition, the
  bias table and region mask as score modifications, windows that are not a multiple of the tiles, dropout, the
  table gradient, argument checks.
* GPU (marked ``gpu``, skipped without one): the same through ``fastattn.window_attention(backend="cuda")``,
  torch.library.opcheck of both ops, a bitwise-deterministic backward, more than 65535 (batch, window) groups.
"""
import re
import zlib

import pytest
import torch

import fastattn
from fastattn import window as window_module
from fastattn.backends import cuda as cuda_backend
from fastattn.functional import _draw_seed
from helpers import assert_close_rule
from test_cuda_backend import _cuda_or_skip, emu  # noqa: F401  (emu: the emulator fixture)

DROPOUT_SEED = 7  # torch.manual_seed before every run: the composite and the ops draw the same dropout seed


def _inputs(B, H, W, heads, d, window, dtype, device="cpu", table=True, qkv_views=False, name=""):
    """Low-precision q, k, v (views of one [B, H, W, 3, heads, d] qkv tensor when qkv_views), dout, and a float32
    bias table (mixed-precision training keeps the parameters in float32) or None."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    randn = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    if qkv_views:
        q, k, v = randn(B, H, W, 3, heads, d).unbind(3)
    else:
        q, k, v = (randn(B, H, W, heads, d) for _ in range(3))
    rows = (2 * window[0] - 1) * (2 * window[1] - 1)
    tb = torch.randn(rows, heads, generator=g).to(device) if table else None
    return q, k, v, tb, randn(B, H, W, heads, d)


def _composite(q, k, v, table, dout, dtype, window, shift, unpadded, scale, dropout_p, backend="reference"):
    """fastattn.window_attention on q, k, v converted to dtype (the table stays float32, float64 for the oracle):
    (out, dq, dk, dv, dtable or None)."""
    ts = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    tb = None if table is None else table.detach().to(torch.float64 if dtype == torch.float64 else torch.float32)
    if tb is not None:
        tb.requires_grad_()
    torch.manual_seed(DROPOUT_SEED)
    out = fastattn.window_attention(*ts, window_size=window, shift_size=shift, rel_pos_bias_table=tb, scale=scale,
                                    dropout_p=dropout_p, unpadded_size=unpadded, backend=backend)
    grads = torch.autograd.grad(out, ts + ([tb] if tb is not None else []), dout.to(dtype))
    return (out, *grads) + ((None,) if tb is None else ())


def window_check(ops, B, H, W, heads, d, window, shift, unpadded=None, dtype=torch.float16, table=True,
                 dropout_p=0.0, qkv_views=False, name=""):
    """The emulated ops vs the composite in dtype and in float64, all on the same low-precision inputs."""
    q, k, v, tb, dout = _inputs(B, H, W, heads, d, window, dtype, table=table, qkv_views=qkv_views, name=name)
    scale = d ** -0.5
    geometry = [H, W, *window, *shift, *(unpadded or (H, W))]
    torch.manual_seed(DROPOUT_SEED)
    seed = _draw_seed(dropout_p)
    out, lse = ops.window_fwd(q, k, v, tb, seed, geometry, scale, dropout_p)
    dq, dk, dv, dtable = ops.window_bwd(q, k, v, tb, seed, out, lse, dout, geometry, scale, dropout_p, table)
    N, windows = window[0] * window[1], (H // window[0]) * (W // window[1])
    assert out.shape == (B, H, W, heads, d) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (B * windows, heads, N) and lse.dtype == torch.float32
    for g, t in ((dq, q), (dk, k), (dv, v)):
        assert g.shape == t.shape and g.dtype == dtype and g.is_contiguous()
    assert dtable.dtype == torch.float32 and dtable.shape == (tb.shape if table else (0,))
    fast = (out, dq, dk, dv, dtable if table else None)
    lowp = _composite(q, k, v, tb, dout, dtype, window, shift, unpadded, scale, dropout_p)
    ref = _composite(q, k, v, tb, dout, torch.float64, window, shift, unpadded, scale, dropout_p)
    errors = {}
    for what, a, b, c in zip(("out", "dq", "dk", "dv", "dtable"), fast, lowp, ref):
        if a is not None:
            assert_close_rule(a, b, c, what)
            errors[what] = (a.double() - c).abs().max().item()
    return errors


def test_window_kernels_registered_with_the_dense_ones():
    """An extension built with the CUDA kernels registers the window ops for CUDA too (window_reasons, the fused
    path's dispatch, looks for window_fwd)."""
    if not cuda_backend.has_cuda_kernels():
        pytest.skip("the extension was built without the CUDA kernels")
    for op in ("fastattn::window_fwd", "fastattn::window_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    q = torch.randn(1, 7, 7, 2, 32, dtype=torch.float16)
    assert cuda_backend.window_reasons(q, q, q) == ["runs on CUDA tensors only, got cpu tensors"]


# B, H, W, heads, d, window, shift and options.  N = 49 is not a multiple of any tile; 12 x 12 = 144 tokens span
# several tiles of every kernel; d 16/32/64 use the kernels for the padded head dim 64, d 128 those for 128.
EMULATED_CASES = {
    "w7_shift3_qkv_views_d32": dict(B=1, H=14, W=14, heads=2, d=32, window=(7, 7), shift=(3, 3), qkv_views=True),
    "w7_no_shift_d16_bf16": dict(B=2, H=7, W=14, heads=1, d=16, window=(7, 7), shift=(0, 0), dtype=torch.bfloat16),
    "w4x8_shift_one_axis_d64": dict(B=1, H=8, W=16, heads=2, d=64, window=(4, 8), shift=(0, 3)),
    "timm_roll_then_pad_d16": dict(B=1, H=8, W=8, heads=1, d=16, window=(4, 4), shift=(2, 2), unpadded=(7, 6)),
    "dropout_no_table_d32": dict(B=1, H=8, W=8, heads=2, d=32, window=(4, 4), shift=(2, 2), table=False,
                                 dropout_p=0.3),
    "dropout_table_d64_bf16": dict(B=1, H=8, W=8, heads=1, d=64, window=(4, 4), shift=(2, 1), dropout_p=0.2,
                                   dtype=torch.bfloat16),
    "w7_shift3_d128": dict(B=1, H=7, W=14, heads=1, d=128, window=(7, 7), shift=(3, 3)),
    "w12_several_tiles_d16": dict(B=1, H=12, W=12, heads=1, d=16, window=(12, 12), shift=(5, 6)),
    # head dims past 128 in float16 / bfloat16: the DT 256 tensor-core kernels (the wide dK/dV kernel)
    "wide_f16_d160_w4x8_shift_one_axis": dict(B=1, H=8, W=16, heads=1, d=160, window=(4, 8), shift=(0, 3)),
    "wide_d256_w7_shift3_dropout_bf16": dict(B=1, H=7, W=14, heads=1, d=256, window=(7, 7), shift=(3, 3),
                                             dropout_p=0.2, dtype=torch.bfloat16),
    "wide_w12_several_tiles_d136": dict(B=1, H=12, W=12, heads=1, d=136, window=(12, 12), shift=(5, 6)),
    # the CUDA-core kernels (fa_simt.cuh): float32, head dims past 128 or not multiples of 8
    "simt_f32_w7_shift3_qkv_views_d32": dict(B=1, H=14, W=14, heads=2, d=32, window=(7, 7), shift=(3, 3),
                                             qkv_views=True, dtype=torch.float32),
    "simt_f32_roll_then_pad_d20_dropout": dict(B=1, H=8, W=8, heads=2, d=20, window=(4, 4), shift=(2, 2),
                                               unpadded=(7, 6), dropout_p=0.25, dtype=torch.float32),
    "simt_f32_d160_w4x8_shift_one_axis": dict(B=1, H=8, W=16, heads=1, d=160, window=(4, 8), shift=(0, 3),
                                              dtype=torch.float32),
}


@pytest.mark.parametrize("case", sorted(EMULATED_CASES))
def test_emulated_window_kernels_match_composite(emu, case):  # noqa: F811
    errors = window_check(emu, name=case, **EMULATED_CASES[case])
    print(case, {k: f"{v:.2e}" for k, v in errors.items()})


# The Hopper forward (FASTATTN_CUDA_WGMMA=1, csrc/cuda/fa_wgmma_fwd.cuh) on the window layout: the float16 /
# bfloat16 cases with head dims up to 128 (49-token windows leave the second warpgroup idle).
@pytest.mark.parametrize("case", sorted(c for c, cfg in EMULATED_CASES.items()
                                        if cfg.get("dtype", torch.float16) != torch.float32 and cfg["d"] <= 128))
def test_emulated_window_wgmma_forward(emu, case, monkeypatch):  # noqa: F811
    monkeypatch.setenv("FASTATTN_CUDA_WGMMA", "1")
    errors = window_check(emu, name=case, **EMULATED_CASES[case])
    print(case, {k: f"{v:.2e}" for k, v in errors.items()})


def test_emulated_window_op_argument_errors(emu):  # noqa: F811
    """The window ops' checks (csrc/cuda/fa_ops.cuh, shared with the CUDA build) name the argument."""
    h = lambda *s: torch.randn(*s, dtype=torch.float16)
    q, k, v = h(1, 8, 16, 2, 16), h(1, 8, 16, 2, 16), h(1, 8, 16, 2, 16)
    table = torch.randn(7 * 15, 2)
    geo = [8, 16, 4, 8, 2, 4, 8, 16]
    cases = [
        ((q.double(), k.double(), v.double(), table, None, geo, 1.0, 0.0),
         "q: the CUDA kernels take float16, bfloat16 or float32"),
        ((q[0], k, v, table, None, geo, 1.0, 0.0), "q: expected a 5-D tensor"),
        ((q, k.bfloat16(), v, table, None, geo, 1.0, 0.0), "k, v: dtypes must match q's"),
        ((q, k[:, :4], v, table, None, geo, 1.0, 0.0), "k: shape"),
        ((q, k, h(1, 8, 16, 2, 264), table, None, geo, 1.0, 0.0), "v: head dim 264 is not supported"),
        ((h(1, 8, 16, 2, 272),) * 3 + (table, None, geo, 1.0, 0.0), "q: head dim 272 is not supported"),
        ((q, k, v, table, None, geo[:7], 1.0, 0.0), "geometry: expected [H, W, wh, ww, sh, sw, uh, uw]"),
        ((q, k, v, table, None, [8, 8, 4, 8, 2, 4, 8, 8], 1.0, 0.0), "geometry: image size"),
        ((q, k, v, table, None, [8, 16, 4, 32, 2, 4, 8, 16], 1.0, 0.0), "geometry: window"),
        ((q, k, v, table, None, [8, 16, 3, 8, 2, 4, 8, 16], 1.0, 0.0), "q: image (8, 16) must be a multiple"),
        ((q, k, v, table, None, [8, 16, 4, 8, 4, 4, 8, 16], 1.0, 0.0), "geometry: shift"),
        ((q, k, v, table, None, [8, 16, 4, 8, 2, 4, 9, 16], 1.0, 0.0), "geometry: unpadded size"),
        ((q, k, v, table[:-1], None, geo, 1.0, 0.0), "table: expected shape"),
        ((q, k, v, table.long(), None, geo, 1.0, 0.0), "table: expected a floating dtype"),
        ((q, k, v, table, None, geo, 1.0, 0.5), "seed: required"),
        ((q, k, v, table, None, geo, float("inf"), 0.0), "scale: must be finite"),
        ((q, k, v, table, None, geo, 1.0, 1.0), "dropout_p: must be in"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            emu.window_fwd(*args)
    out, lse = emu.window_fwd(q, k, v, table, None, geo, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=re.escape("lse: expected a float32 tensor")):
        emu.window_bwd(q, k, v, table, None, out, lse[:1], out, geo, 1.0, 0.0, True)
    with pytest.raises(RuntimeError, match=re.escape("dout: expected shape")):
        emu.window_bwd(q, k, v, table, None, out, lse, out[:, :4], geo, 1.0, 0.0, True)
    with pytest.raises(RuntimeError, match="table_needs_grad"):
        emu.window_bwd(q, k, v, None, None, out, lse, out, geo, 1.0, 0.0, True)


def test_emulated_window_strided_inputs_and_table_dtype(emu):  # noqa: F811
    """A strided head dim (copied once by the op) and a float64 table (converted to float32) leave the results
    unchanged; without table_needs_grad dtable is empty."""
    q, k, v, tb, dout = _inputs(1, 8, 8, 2, 16, (4, 4), torch.float16, name="strided")
    geo = [8, 8, 4, 4, 2, 2, 8, 8]
    out, lse = emu.window_fwd(q, k, v, tb, None, geo, 0.25, 0.0)
    grads = emu.window_bwd(q, k, v, tb, None, out, lse, dout, geo, 0.25, 0.0, True)
    strided = torch.zeros(*q.shape[:4], 32, dtype=q.dtype)[..., ::2]
    strided.copy_(q)
    out2, lse2 = emu.window_fwd(strided, k, v, tb.double(), None, geo, 0.25, 0.0)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)
    grads2 = emu.window_bwd(strided, k, v, tb.double(), None, out2, lse2, dout, geo, 0.25, 0.0, True)
    for a, b in zip(grads, grads2):
        assert torch.equal(a, b)
    *grads3, dtable = emu.window_bwd(q, k, v, tb, None, out, lse, dout, geo, 0.25, 0.0, False)
    assert dtable.shape == (0,)
    for a, b in zip(grads[:3], grads3):
        assert torch.equal(a, b)


# ==============================================================================================================
# GPU
# ==============================================================================================================
GPU_CASES = {  # B, H, W, heads, d, window, shift, unpadded
    "swin_t_stage1_w7_shift3": (4, 56, 56, 3, 32, (7, 7), (3, 3), None),
    "w7_no_shift": (2, 28, 28, 6, 32, (7, 7), (0, 0), None),
    "w12_shift6_d64": (2, 24, 24, 4, 64, (12, 12), (6, 6), None),
    "w4x8_shift_one_axis_d128": (2, 16, 32, 2, 128, (4, 8), (0, 3), None),
    "timm_roll_then_pad_d16": (2, 21, 21, 3, 16, (7, 7), (3, 3), (19, 17)),
    "w16_d96": (1, 32, 32, 2, 96, (16, 16), (8, 8), None),
}


def _gpu_check(case, dtype, table=True, dropout_p=0.0, qkv_views=True):
    _cuda_or_skip()
    B, H, W, heads, d, window, shift, unpadded = GPU_CASES[case]
    q, k, v, tb, dout = _inputs(B, H, W, heads, d, window, dtype, device="cuda", table=table, qkv_views=qkv_views,
                                name=case)
    assert window_module._fused_impl(q, k, v, "cuda") == "cuda"
    scale = d ** -0.5
    run = lambda dt, backend: _composite(q, k, v, tb, dout, dt, window, shift, unpadded, scale, dropout_p, backend)
    fast, lowp, ref = run(dtype, "cuda"), run(dtype, "reference"), run(torch.float64, "reference")
    for what, a, b, c in zip(("out", "dq", "dk", "dv", "dtable"), fast, lowp, ref):
        if a is not None:
            assert a.dtype == b.dtype and a.shape == c.shape, what
            assert_close_rule(a, b, c, what)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])  # float32: the CUDA-core kernels
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_gpu_window_attention_matches_composite(case, dtype):
    _gpu_check(case, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("table", [False, True])
def test_gpu_window_dropout_matches_composite_keep_mask(table):
    _gpu_check("swin_t_stage1_w7_shift3", torch.float16, table=table, dropout_p=0.25, qkv_views=False)


@pytest.mark.gpu
def test_gpu_window_more_groups_than_one_grid():
    """1 x 1 windows of a 256 x 257 image: 65792 (batch, window) groups, more than a grid's 65535 along z."""
    _cuda_or_skip()
    q, k, v = (torch.randn(1, 256, 257, 1, 8, device="cuda", dtype=torch.float16) for _ in range(3))
    table = torch.randn(1, 1, device="cuda")
    out, lse = torch.ops.fastattn.window_fwd(q, k, v, table, None, [256, 257, 1, 1, 0, 0, 256, 257], 1.0, 0.0)
    assert torch.equal(out, v) and lse.shape == (256 * 257, 1, 1)  # one token per window: softmax = 1
    torch.testing.assert_close(lse.view(256, 257), (q.float() * k.float()).sum(-1).view(256, 257) + table[0, 0],
                               atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_window_backward_is_deterministic():
    """Bitwise equal gradients run to run, the table's included (its reduction is a gather, no atomics)."""
    _cuda_or_skip()
    B, H, W, heads, d, window, shift, unpadded = GPU_CASES["swin_t_stage1_w7_shift3"]
    q, k, v, tb, dout = _inputs(B, H, W, heads, d, window, torch.bfloat16, device="cuda", qkv_views=True,
                                name="determinism")
    runs = [_composite(q, k, v, tb, dout, torch.bfloat16, window, shift, unpadded, d ** -0.5, 0.1, "cuda")
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _window_op_samples_cuda():
    torch.manual_seed(0)
    q, k, v, tb, _ = _inputs(2, 8, 16, 2, 32, (4, 8), torch.float16, device="cuda", qkv_views=True, name="opcheck")
    seed = torch.tensor([42], dtype=torch.int64)
    geo = [8, 16, 4, 8, 2, 4, 8, 16]
    return [
        (q, k, v, tb, None, geo, 0.3, 0.0),
        (q, k, v, None, seed, [8, 16, 4, 8, 0, 0, 8, 16], 0.3, 0.2),
        (q.bfloat16(), k.bfloat16(), v.bfloat16(), tb.bfloat16(), None, [8, 16, 4, 8, 2, 4, 7, 15], 0.3, 0.0),
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("i", range(3))
def test_gpu_window_opcheck(i):
    _cuda_or_skip()
    ops = torch.ops.fastattn
    args = _window_op_samples_cuda()[i]
    torch.library.opcheck(ops.window_fwd.default, args)
    q, k, v, table, seed, geometry, scale, p = args
    out, lse = ops.window_fwd(*args)
    torch.library.opcheck(ops.window_bwd.default,
                          (q, k, v, table, seed, out, lse, torch.randn_like(out), geometry, scale, p,
                           table is not None))
