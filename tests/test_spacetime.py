"""fastattn.spacetime (TimeSformer / ViViT video attention) and its fastattn.nn modules.

The oracles are written here from the papers' recipes, independently of fastattn/spacetime.py, in float64:
permute/reshape to put the attended tokens on one axis + an explicit softmax; TimeSformer's spatial attention
with the cls token literally repeated per frame and concatenated (as TimeSformer's code does); local and
global attention as full attention with an explicit bool mask built from token coordinates.  transformers'
``TimesformerModel`` is the second oracle of the divided space-time module (skipped if transformers is not
installed; requirements.txt pins it).
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import fastattn.spacetime as st
from fastattn.nn import (AxialAttention, DividedSpaceTimeAttention, FactorisedDotProductAttention,
                         LocalGlobalAttention)
from fastattn.spacetime import (axial_attention, factorised_dot_product_attention, global_attention,
                                local_attention, spatial_attention, temporal_attention)
from helpers import assert_close_rule, triton_device as _triton_device

TOL64 = 1e-10
BACKENDS = ["reference", "sdpa"]
f64 = dict(dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------
# Naive float64 oracles.
# ---------------------------------------------------------------------------------------------------------
def naive_softmax_attention(q, k, v, scale=None, allowed=None):
    """[..., Lq, d] x [..., Lk, d] -> [..., Lq, dv], explicit softmax."""
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    return (p / p.sum(-1, keepdim=True)) @ v


def naive_axial(q, k, v, grid, axes, scale=None):
    """Token layout [B, L, heads, d]; attention along the grid axes ``axes`` (indices)."""
    B, L, heads, _ = q.shape
    n = len(grid)
    others = [a for a in range(n) if a not in axes]
    perm = [0] + [1 + a for a in others] + [n + 1] + [1 + a for a in axes] + [n + 2]  # B, others, heads, axes, d

    def to(t):
        g = t.reshape(B, *grid, heads, t.shape[-1]).permute(perm)
        return g.reshape(*g.shape[:2 + len(others)], -1, t.shape[-1])

    o = naive_softmax_attention(to(q), to(k), to(v), scale)
    o = o.reshape(*[B] + [grid[a] for a in others] + [heads] + [grid[a] for a in axes] + [v.shape[-1]])
    inverse = [perm.index(i) for i in range(n + 3)]
    return o.permute(inverse).reshape(B, L, heads, v.shape[-1])


def patch_grid_view(t, T, N, order):
    """[B, T*N, heads, d] patch tokens -> [B, T, N, heads, d] (frame, patch) whatever the token order."""
    B = t.shape[0]
    if order == "nt":
        return t.reshape(B, N, T, *t.shape[2:]).transpose(1, 2)
    return t.reshape(B, T, N, *t.shape[2:])


def patch_tokens(g, order):
    """Inverse of patch_grid_view: [B, T, N, heads, d] -> [B, T*N, heads, d]."""
    B, T, N = g.shape[:3]
    if order == "nt":
        g = g.transpose(1, 2)
    return g.reshape(B, T * N, *g.shape[3:])


def naive_temporal(q, k, v, T, order, scale=None):
    N = q.shape[1] // T
    to = lambda t: patch_grid_view(t, T, N, order).permute(0, 2, 3, 1, 4)  # noqa: E731  [B, N, heads, T, d]
    o = naive_softmax_attention(to(q), to(k), to(v), scale)
    return patch_tokens(o.permute(0, 3, 1, 2, 4), order)


def naive_spatial(q, k, v, T, order, scale=None, cls_token=True):
    """TimeSformer's recipe: cls repeated per frame, concatenated to the frame's patches, attention per
    (frame, head), cls outputs averaged over the frames."""
    B, L, heads, _ = q.shape
    first = 1 if cls_token else 0
    N = (L - first) // T

    def frames(t):  # [B, T, heads, (1+)N, d]
        g = patch_grid_view(t[:, first:], T, N, order).permute(0, 1, 3, 2, 4)
        if cls_token:
            cls = t[:, 0][:, None, :, None, :].repeat(1, T, 1, 1, 1)
            g = torch.cat([cls, g], dim=3)
        return g

    o = naive_softmax_attention(frames(q), frames(k), frames(v), scale)       # [B, T, heads, (1+)N, dv]
    patches = patch_tokens(o[:, :, :, first:].permute(0, 1, 3, 2, 4), order)
    if not cls_token:
        return patches
    return torch.cat([o[:, :, :, 0].mean(1)[:, None], patches], dim=1)


def naive_factorised(q, k, v, grid, scale=None):
    h = q.shape[2] // 2
    t_half = naive_axial(q[:, :, :h], k[:, :, :h], v[:, :, :h], grid, [0], scale)
    s_half = naive_axial(q[:, :, h:], k[:, :, h:], v[:, :, h:], grid, [1, 2], scale)
    return torch.cat([t_half, s_half], dim=2)


def coords(grid):
    return torch.tensor(list(itertools.product(*[range(g) for g in grid])))  # [L, n], row-major


def naive_masked(q, k, v, allowed, scale=None):
    """Full attention over all L tokens with an [L, L] allowed mask."""
    to = lambda t: t.transpose(1, 2)  # noqa: E731
    return naive_softmax_attention(to(q), to(k), to(v), scale, allowed).transpose(1, 2)


def naive_local(q, k, v, grid, window, scale=None):
    block = coords(grid) // torch.tensor(window)
    allowed = (block[:, None, :] == block[None, :, :]).all(-1)
    return naive_masked(q, k, v, allowed, scale)


def naive_global(q, k, v, grid, stride, scale=None):
    keys = (coords(grid) % torch.tensor(stride) == 0).all(-1)
    allowed = keys[None, :].expand(keys.numel(), -1)
    return naive_masked(q, k, v, allowed, scale)


# ---------------------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------------------
def make_qkv(B, L, heads, d, dv=None, dtype=torch.float64, device="cpu"):
    dv = d if dv is None else dv
    return [torch.randn(B, L, heads, e, dtype=dtype, device=device, requires_grad=True) for e in (d, d, dv)]


def grads_of(out, leaves, g):
    return torch.autograd.grad(out, leaves, g)


def assert_matches(out, ref, leaves, tol=TOL64):
    assert out.shape == ref.shape
    assert out.is_contiguous()
    assert (out - ref).abs().max().item() <= tol
    g = torch.randn_like(ref)
    for name, got, want in zip("qkv", grads_of(out, leaves, g.to(out.dtype)), grads_of(ref, leaves, g)):
        assert (got.double() - want).abs().max().item() <= tol, f"grad {name}"


# ---------------------------------------------------------------------------------------------------------
# Ops against the oracles (float64, outputs and input gradients, reference and sdpa backends).
# ---------------------------------------------------------------------------------------------------------
AXIAL = {  # grid, layout, axis (as given), axis indices, heads, d, dv
    "t_3x7x7": ((3, 7, 7), None, "t", [0], 2, 8, 8),
    "h_3x7x7": ((3, 7, 7), None, "h", [1], 2, 8, 8),
    "w_3x7x7": ((3, 7, 7), None, "w", [2], 2, 8, 6),
    "hw_3x7x7": ((3, 7, 7), None, "hw", [1, 2], 2, 8, 8),
    "t_8x1x7": ((8, 1, 7), None, "t", [0], 3, 4, 4),
    "w_1x7x7": ((1, 7, 7), None, "w", [2], 2, 8, 8),
    "th_ints_8x7x1": ((8, 7, 1), None, (0, 1), [0, 1], 2, 4, 4),
    "t_hwt_7x7x3": ((7, 7, 3), "hwt", "t", [2], 2, 8, 8),     # TimeSformer's token order
    "h_hwt_7x7x3": ((7, 7, 3), "hwt", "h", [0], 2, 8, 8),
    "w_hwt_7x7x8": ((7, 7, 8), "hwt", "w", [1], 1, 4, 4),
    "h_2d_7x7": ((7, 7), None, "h", [0], 2, 8, 8),
    "neg_axis_2d": ((7, 1), None, -2, [0], 2, 8, 8),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(AXIAL))
def test_axial_matches_naive(case, backend):
    grid, layout, axis, axes, heads, d, dv = AXIAL[case]
    q, k, v = make_qkv(2, math.prod(grid), heads, d, dv)
    out = axial_attention(q, k, v, grid=grid, axis=axis, layout=layout, backend=backend)
    assert_matches(out, naive_axial(q, k, v, grid, axes), (q, k, v))


def test_axial_grid_shaped_inputs_and_scale():
    q, k, v = make_qkv(2, 3 * 7 * 7, 2, 8)
    grid_shaped = [t.view(2, 3, 7, 7, 2, 8) for t in (q, k, v)]
    out = axial_attention(*grid_shaped, grid=(3, 7, 7), axis="h", scale=0.3)
    assert out.shape == (2, 3, 7, 7, 2, 8) and out.is_contiguous()
    ref = naive_axial(q, k, v, (3, 7, 7), [1], scale=0.3)
    assert_matches(out.view(2, -1, 2, 8), ref, (q, k, v))


@pytest.mark.parametrize("axis", ["t", "h", "w"])
def test_axial_views_of_an_interleaved_qkv(axis):
    """q/k/v views of one [B, L, 3, heads, d] projection: heads do not merge with token axes there, so some
    are copied into the attention layout -- the result is the same."""
    qkv = torch.randn(2, 3 * 7 * 5, 3, 2, 8, **f64, requires_grad=True)
    q, k, v = qkv.unbind(2)
    out = axial_attention(q, k, v, grid=(3, 7, 5), axis=axis)
    ref = naive_axial(q, k, v, (3, 7, 5), ["thw".index(axis)])
    assert (out - ref).abs().max().item() <= TOL64
    g = torch.randn_like(ref)
    assert (grads_of(out, qkv, g)[0] - grads_of(ref, qkv, g)[0]).abs().max().item() <= TOL64


FRAMES_PATCHES = [(T, N) for T in (1, 3, 8) for N in (7, 49)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["nt", "tn"])
@pytest.mark.parametrize("T,N", FRAMES_PATCHES)
def test_temporal_matches_naive(T, N, order, backend):
    q, k, v = make_qkv(2, T * N, 2, 8, 6)
    out = temporal_attention(q, k, v, num_frames=T, token_order=order, backend=backend)
    assert_matches(out, naive_temporal(q, k, v, T, order), (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)   # reference: the LSE merge; sdpa (no LSE): cls concatenated
@pytest.mark.parametrize("order", ["nt", "tn"])
@pytest.mark.parametrize("T,N", FRAMES_PATCHES)
def test_spatial_matches_naive(T, N, order, backend):
    q, k, v = make_qkv(2, 1 + T * N, 2, 8, 6)
    out = spatial_attention(q, k, v, num_frames=T, token_order=order, backend=backend)
    assert_matches(out, naive_spatial(q, k, v, T, order), (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_spatial_without_cls_and_explicit_scale(backend):
    q, k, v = make_qkv(2, 3 * 7, 2, 8)
    out = spatial_attention(q, k, v, num_frames=3, cls_token=False, scale=0.2, backend=backend)
    assert_matches(out, naive_spatial(q, k, v, 3, "nt", scale=0.2, cls_token=False), (q, k, v))
    q, k, v = make_qkv(2, 1 + 3 * 7, 2, 8)
    out = spatial_attention(q, k, v, num_frames=3, scale=0.2, backend=backend)
    assert_matches(out, naive_spatial(q, k, v, 3, "nt", scale=0.2), (q, k, v))


def test_forward_only_196_patches_8_frames():
    """TimeSformer-B's grid (8 frames of 14 x 14 patches), forward only."""
    T, N = 8, 196
    with torch.no_grad():
        q, k, v = (t.detach() for t in make_qkv(1, 1 + T * N, 2, 8))
        for backend in BACKENDS:
            out = spatial_attention(q, k, v, num_frames=T, backend=backend)
            assert (out - naive_spatial(q, k, v, T, "nt")).abs().max().item() <= TOL64
        p = [t[:, 1:] for t in (q, k, v)]
        assert (temporal_attention(*p, num_frames=T) - naive_temporal(*p, T, "nt")).abs().max().item() <= TOL64
        out = axial_attention(*p, grid=(14, 14, 8), layout="hwt", axis="hw", backend="sdpa")
        assert (out - naive_axial(*p, (14, 14, 8), [0, 1])).abs().max().item() <= TOL64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid,heads", [((3, 7, 7), 4), ((8, 7, 1), 2), ((1, 7, 7), 2), ((8, 1, 7), 6)])
def test_factorised_matches_naive(grid, heads, backend):
    q, k, v = make_qkv(2, math.prod(grid), heads, 8, 6)
    out = factorised_dot_product_attention(q, k, v, grid=grid, backend=backend)
    assert_matches(out, naive_factorised(q, k, v, grid), (q, k, v))


LOCAL = {  # grid, window -- ragged windows take the gather path, dividing ones the view path
    "ragged_3x7x7_w3x4x4": ((3, 7, 7), (3, 4, 4)),
    "ragged_8x7x7_w8x4x4": ((8, 7, 7), (8, 4, 4)),
    "ragged_3x7x1_w2x3x1": ((3, 7, 1), (2, 3, 1)),
    "divides_8x4x6_w4x2x3": ((8, 4, 6), (4, 2, 3)),
    "divides_3x7x7_w1x7x7": ((3, 7, 7), (1, 7, 7)),   # a block is a whole frame: zero-copy views
    "whole_grid_1x7x7": ((1, 7, 7), 7),                 # a window past the edge spans the axis
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(LOCAL))
def test_local_matches_naive(case, backend):
    grid, window = LOCAL[case]
    q, k, v = make_qkv(2, math.prod(grid), 2, 8, 6)
    out = local_attention(q, k, v, grid=grid, window=window, backend=backend)
    w = window if isinstance(window, tuple) else (window,) * 3
    assert_matches(out, naive_local(q, k, v, grid, w), (q, k, v))


def test_local_grid_shaped_ragged():
    q, k, v = make_qkv(1, 3 * 7 * 7, 2, 8)
    out = local_attention(*[t.view(1, 3, 7, 7, 2, 8) for t in (q, k, v)], grid=(3, 7, 7), window=(2, 4, 4))
    assert out.shape == (1, 3, 7, 7, 2, 8)
    assert_matches(out.view(1, -1, 2, 8), naive_local(q, k, v, (3, 7, 7), (2, 4, 4)), (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid,stride", [((3, 7, 7), 2), ((8, 1, 7), 2), ((3, 7, 7), (1, 3, 3)), ((1, 7, 7), 2),
                                         ((8, 7, 7), 2)])
def test_global_matches_naive(grid, stride, backend):
    q, k, v = make_qkv(2, math.prod(grid), 2, 8, 6)
    out = global_attention(q, k, v, grid=grid, stride=stride, backend=backend)
    s = stride if isinstance(stride, tuple) else (stride,) * 3
    assert_matches(out, naive_global(q, k, v, grid, s), (q, k, v))


LOW_PRECISION_OPS = {
    "spatial_lse": (lambda q, k, v: spatial_attention(q, k, v, num_frames=3, backend="reference"),
                    lambda q, k, v: naive_spatial(q, k, v, 3, "nt"), 1 + 3 * 49),
    "spatial_concat": (lambda q, k, v: spatial_attention(q, k, v, num_frames=3, backend="sdpa"),
                       lambda q, k, v: naive_spatial(q, k, v, 3, "nt"), 1 + 3 * 49),
    "temporal": (lambda q, k, v: temporal_attention(q, k, v, num_frames=8),
                 lambda q, k, v: naive_temporal(q, k, v, 8, "nt"), 8 * 49),
    "axial_hw": (lambda q, k, v: axial_attention(q, k, v, grid=(3, 7, 7), axis="hw"),
                 lambda q, k, v: naive_axial(q, k, v, (3, 7, 7), [1, 2]), 3 * 49),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", list(LOW_PRECISION_OPS))
def test_low_precision_tolerance_rule(case, dtype):
    """max|fast - ref64| <= 2 max|ref_lowp - ref64| + 1e-5 (tests/helpers.py), forward."""
    fn, ref_fn, L = LOW_PRECISION_OPS[case]
    q, k, v = (torch.randn(2, L, 4, 16) for _ in range(3))
    low = [t.to(dtype) for t in (q, k, v)]
    out = fn(*low)
    assert out.dtype == dtype
    assert_close_rule(out, ref_fn(*low), ref_fn(*(t.double() for t in (q, k, v))))


# ---------------------------------------------------------------------------------------------------------
# gradcheck (float64, reference backend) for every op; the spatial op on both of its paths.
# ---------------------------------------------------------------------------------------------------------
GRADCHECK = {
    "axial_h": (lambda q, k, v: axial_attention(q, k, v, grid=(2, 3, 2), axis="h", backend="reference"), 12),
    "axial_hw_hwt": (lambda q, k, v: axial_attention(q, k, v, grid=(3, 2, 2), layout="hwt", axis="hw",
                                                     backend="reference"), 12),
    "temporal_nt": (lambda q, k, v: temporal_attention(q, k, v, num_frames=3, backend="reference"), 6),
    "temporal_tn": (lambda q, k, v: temporal_attention(q, k, v, num_frames=3, token_order="tn",
                                                       backend="reference"), 6),
    "spatial_lse": (lambda q, k, v: spatial_attention(q, k, v, num_frames=2, backend="reference"), 7),
    "spatial_tn": (lambda q, k, v: spatial_attention(q, k, v, num_frames=2, token_order="tn",
                                                     backend="reference"), 7),
    "spatial_concat": (lambda q, k, v: spatial_attention(q, k, v, num_frames=2, backend="sdpa"), 7),
    "factorised": (lambda q, k, v: factorised_dot_product_attention(q, k, v, grid=(2, 2, 2), backend="reference"), 8),
    "local_ragged": (lambda q, k, v: local_attention(q, k, v, grid=(2, 3, 2), window=(2, 2, 2),
                                                     backend="reference"), 12),
    "local_divides": (lambda q, k, v: local_attention(q, k, v, grid=(2, 2, 3), window=(1, 2, 3),
                                                      backend="reference"), 12),
    "global": (lambda q, k, v: global_attention(q, k, v, grid=(3, 2, 2), backend="reference"), 12),
}


@pytest.mark.parametrize("case", list(GRADCHECK))
def test_gradcheck(case):
    fn, L = GRADCHECK[case]
    heads = 2 if case == "factorised" else 1
    q, k, v = (torch.randn(1, L, heads, 2, **f64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(fn, (q, k, v), atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The Triton backend (Triton's interpreter on CPU: tiny shapes).
# ---------------------------------------------------------------------------------------------------------
TRITON = {
    "temporal": (lambda q, k, v: temporal_attention(q, k, v, num_frames=2, backend="triton"),
                 lambda q, k, v: naive_temporal(q, k, v, 2, "nt"), 6),
    "spatial_lse": (lambda q, k, v: spatial_attention(q, k, v, num_frames=2, backend="triton"),
                    lambda q, k, v: naive_spatial(q, k, v, 2, "nt"), 7),
    "axial_w": (lambda q, k, v: axial_attention(q, k, v, grid=(2, 2, 3), axis="w", backend="triton"),
                lambda q, k, v: naive_axial(q, k, v, (2, 2, 3), [2]), 12),
}


@pytest.mark.parametrize("case", list(TRITON))
def test_triton_backend(case):
    device = _triton_device()
    fn, ref_fn, L = TRITON[case]
    q, k, v = make_qkv(1, L, 2, 8, dtype=torch.float32, device=device)
    out = fn(q, k, v)
    ref = ref_fn(*(t.double() for t in (q, k, v)))
    assert_matches(out, ref, (q, k, v), tol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Zero copy: what reaches fastattn.attention is a view of the caller's tensors.
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def spy(monkeypatch):
    seen = []
    real = st.attention

    def record(q, k, v, **kw):
        seen.append([(tuple(t.shape), t.stride(), t.data_ptr()) for t in (q, k, v)])
        return real(q, k, v, **kw)

    monkeypatch.setattr(st, "attention", record)
    return seen


B_, T_, H_, W_, HEADS, D = 2, 3, 4, 5, 2, 8
L_ = T_ * H_ * W_
HD = HEADS * D


@pytest.mark.parametrize("axis,shape,stride", [
    ("t", (B_, H_ * W_ * HEADS, T_, D), (L_ * HD, D, H_ * W_ * HD, 1)),
    ("h", (B_ * T_, W_ * HEADS, H_, D), (H_ * W_ * HD, D, W_ * HD, 1)),
    ("w", (B_ * T_ * H_, HEADS, W_, D), (W_ * HD, D, HD, 1)),
    ("hw", (B_ * T_, HEADS, H_ * W_, D), (H_ * W_ * HD, D, HD, 1)),
])
def test_axial_is_zero_copy(spy, axis, shape, stride):
    """Contiguous [B, T*H*W, heads, d] inputs (separate, or slices of one [3, ...] buffer) are read in place."""
    buf = torch.randn(3, B_, L_, HEADS, D)
    q, k, v = buf.unbind(0)
    axial_attention(q, k, v, grid=(T_, H_, W_), axis=axis)
    assert spy == [[(shape, stride, t.data_ptr()) for t in (q, k, v)]]


def test_timesformer_order_axial_is_zero_copy(spy):
    q, k, v = torch.randn(3, B_, L_, HEADS, D).unbind(0)          # grid (H, W, T) = TimeSformer's (h w t)
    for axis in "thw":
        axial_attention(q, k, v, grid=(H_, W_, T_), layout="hwt", axis=axis)
    assert all(call[0][2] == q.data_ptr() and call[1][2] == k.data_ptr() for call in spy)
    assert [call[0][0] for call in spy] == [(B_ * H_ * W_, HEADS, T_, D), (B_, W_ * T_ * HEADS, H_, D),
                                            (B_ * H_, T_ * HEADS, W_, D)]


@pytest.mark.parametrize("order,shape,stride", [
    ("nt", (B_ * 7, HEADS, T_, D), (T_ * HD, D, HD, 1)),
    ("tn", (B_, 7 * HEADS, T_, D), (T_ * 7 * HD, D, 7 * HD, 1)),
])
def test_temporal_is_zero_copy(spy, order, shape, stride):
    q, k, v = torch.randn(3, B_, T_ * 7, HEADS, D).unbind(0)
    temporal_attention(q, k, v, num_frames=T_, token_order=order)
    assert spy == [[(shape, stride, t.data_ptr()) for t in (q, k, v)]]


def test_global_queries_are_zero_copy(spy):
    q, k, v = torch.randn(3, B_, L_, HEADS, D).unbind(0)
    global_attention(q, k, v, grid=(T_, H_, W_))
    (q_shape, q_stride, q_ptr), (k_shape, _, k_ptr), _ = spy[0]
    assert (q_shape, q_stride, q_ptr) == ((B_, HEADS, L_, D), (L_ * HD, D, HD, 1), q.data_ptr())
    assert k_shape == (B_, HEADS, 2 * 2 * 3, D)                  # the stride-2 subsample of (3, 4, 5): copied


def test_spatial_patch_views_are_zero_copy(spy):
    """nt order with a cls token: the patch queries/keys/values are [B, T*heads, N, d] views starting at token 1
    (LSE path); the cls query call reads the same patch key/value views."""
    N = 7
    q, k, v = torch.randn(3, B_, 1 + T_ * N, HEADS, D).unbind(0)
    spatial_attention(q, k, v, num_frames=T_, backend="reference")
    view = ((B_, T_ * HEADS, N, D), ((1 + T_ * N) * HD, D, T_ * HD, 1))
    first = lambda t: t.data_ptr() + HD * t.element_size()  # noqa: E731  token 1
    assert spy[0] == [view + (first(t),) for t in (q, k, v)]
    assert len(spy) == 2 and spy[1][0][0] == (B_, T_ * HEADS, 1, D)
    assert spy[1][1:] == [view + (first(t),) for t in (k, v)]


def test_spatial_path_choice(spy):
    """LSE merge (two calls: patch queries, cls query; N keys each) where the backend dispatch picks returns the
    LSE and the patch views are read in place; the cls concatenated (one call, 1 + N keys) otherwise."""
    q, k, v = torch.randn(3, 2, 1 + 2 * 3, 2, 4).unbind(0)
    spatial_attention(q, k, v, num_frames=2, backend="reference")
    spatial_attention(q, k, v, num_frames=2, backend="sdpa")                        # no LSE
    spatial_attention(q, k, v, num_frames=2, backend="reference", dropout_p=0.5)
    spatial_attention(q, k, v, num_frames=2, backend="reference", token_order="tn")  # patch views: copies
    qkv = torch.randn(2, 1 + 2 * 3, 3, 2, 4)
    spatial_attention(*qkv.unbind(2), num_frames=2, backend="reference")             # interleaved: copies
    assert [call[1][0][2] for call in spy] == [3, 3, 4, 4, 4, 4]


def test_spatial_dropout_is_reproducible():
    q, k, v = (t.detach() for t in make_qkv(1, 1 + 3 * 4, 2, 4))
    kw = dict(num_frames=3, dropout_p=0.3, backend="reference")
    torch.manual_seed(1)
    a = spatial_attention(q, k, v, **kw)
    torch.manual_seed(1)
    b = spatial_attention(q, k, v, **kw)
    assert torch.equal(a, b) and not torch.allclose(a, spatial_attention(q, k, v, num_frames=3))


def test_factorised_space_half_is_zero_copy(spy):
    q, k, v = torch.randn(3, B_, L_, 2 * HEADS, D).unbind(0)
    factorised_dot_product_attention(q, k, v, grid=(T_, H_, W_))
    space = spy[1]
    assert space[0] == ((B_ * T_, HEADS, H_ * W_, D), (H_ * W_ * 2 * HD, D, 2 * HD, 1),
                        q.data_ptr() + HD * q.element_size())


def test_modules_read_their_projection_in_place(spy):
    """Every call of the modules reads q, k and v as views of the one buffer their projection writes: equally
    spaced slices of it (no copy on the way to the attention)."""
    B, T, N, dim = 2, 3, 4, 16
    DividedSpaceTimeAttention(dim, 2, T, backend="reference")(torch.randn(B, 1 + T * N, dim))
    AxialAttention(dim, 2, "h", backend="reference")(torch.randn(B, T, 2, 2, dim))
    FactorisedDotProductAttention(dim, 2, backend="reference")(torch.randn(B, T, 2, 2, dim))
    slab = lambda tokens, channels: B * tokens * channels * 4  # noqa: E731  bytes of one float32 q/k/v slice
    spacing = [slab(T * N, dim), slab(1 + T * N, dim), slab(1 + T * N, dim),   # temporal; spatial; cls query
               slab(T * N, dim), 2 * slab(T * N, dim // 2), 2 * slab(T * N, dim // 2)]  # axial; model 4 halves
    assert len(spy) == len(spacing)
    for i, (call, step) in enumerate(zip(spy, spacing)):
        (_, _, q_ptr), (_, _, k_ptr), (_, _, v_ptr) = call
        assert v_ptr - k_ptr == step, i
        if i != 2:                                                    # call 2: the cls query is materialised
            assert k_ptr - q_ptr == step, i


# ---------------------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------------------
def _q(L=3 * 4 * 4, heads=2):
    return [torch.randn(1, L, heads, 4) for _ in range(3)]


@pytest.mark.parametrize("call,exc,words", [
    (lambda: axial_attention(*_q(47), grid=(3, 4, 4), axis="t"), ValueError, "q: 47 tokens do not match the grid"),
    (lambda: axial_attention(*_q(), grid=(3, 4, 4), axis="x"), ValueError, "axis: expected one of 't', 'h', 'w'"),
    (lambda: axial_attention(*_q(), grid=(3, 4, 4), axis="tt"), ValueError, "axis:"),
    (lambda: axial_attention(*_q(), grid=(3, 4, 4), axis=3), ValueError, "axis: grid axis indices"),
    (lambda: axial_attention(*_q(), grid=(3, 4, 4), axis=None), ValueError, "axis:"),
    (lambda: axial_attention(*_q(), grid=(48,), axis=0), ValueError, "grid: expected (T, H, W) or (H, W)"),
    (lambda: axial_attention(*_q(), grid=(3, 4, 4), axis="t", layout="thx"), ValueError, "layout:"),
    (lambda: axial_attention(*_q(), grid=(3, 0, 4), axis="t"), ValueError, "grid: every value must be positive"),
    (lambda: axial_attention(_q()[0], _q(47)[1], _q()[2], grid=(3, 4, 4), axis="t"), ValueError, "k: shape"),
    (lambda: axial_attention(*_q()[:2], torch.randn(1, 48, 3, 4), grid=(3, 4, 4), axis="t"), ValueError, "v: shape"),
    (lambda: factorised_dot_product_attention(*_q(heads=3), grid=(3, 4, 4)), ValueError,
     "q: the number of heads (3) must be even"),
    (lambda: temporal_attention(*_q(49), num_frames=3), ValueError, "pass x[:, 1:]"),
    (lambda: temporal_attention(*_q(48), num_frames=0), ValueError, "num_frames"),
    (lambda: temporal_attention(*_q(48), num_frames=3, token_order="tnx"), ValueError, "token_order"),
    (lambda: spatial_attention(*_q(48), num_frames=3), ValueError, "q: 48 tokens do not fit num_frames=3"),
    (lambda: spatial_attention(*_q(49), num_frames=3, cls_token=False), ValueError, "q: 49 tokens do not fit"),
    (lambda: local_attention(*_q(), grid=(3, 4, 4), window=(3, 0, 2)), ValueError, "window: every value must be"),
    (lambda: local_attention(*_q(), grid=(3, 4, 4), window=(3, 2)), ValueError, "window: expected 3 values"),
    (lambda: global_attention(*_q(), grid=(3, 4, 4), stride=0), ValueError, "stride: every value must be positive"),
    (lambda: FactorisedDotProductAttention(12, 3), ValueError, "num_heads: must be even"),
    (lambda: DividedSpaceTimeAttention(10, 3, 2), ValueError, "num_heads"),
    (lambda: DividedSpaceTimeAttention(8, 2, 3)(torch.randn(1, 12, 8)), ValueError, "x: 12 tokens do not fit"),
    (lambda: AxialAttention(8, 2, "t")(torch.randn(1, 12, 8)), ValueError, "grid: required"),
    (lambda: AxialAttention(8, 2, "t")(torch.randn(1, 12, 8), (2, 2, 2)), ValueError, "x: 12 tokens do not match"),
    (lambda: LocalGlobalAttention(8, 2, "both"), ValueError, "scope"),
])
def test_bad_input_raises_naming_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    assert words in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Modules against the oracles, with their own weights.
# ---------------------------------------------------------------------------------------------------------
def linear(x, layer):
    return F.linear(x, layer.weight, layer.bias)


def split_qkv(x, layer, heads):
    B, L, _ = x.shape
    return linear(x, layer).view(B, L, 3, heads, -1).unbind(2)


def module_grads_match(out, ref, module, x):
    assert (out - ref).abs().max().item() <= TOL64
    g = torch.randn_like(ref)
    leaves = [x] + list(module.parameters())
    for got, want in zip(grads_of(out, leaves, g), grads_of(ref, leaves, g)):
        assert (got - want).abs().max().item() <= TOL64


@pytest.mark.parametrize("axis,layout,grid", [("t", None, (3, 7, 7)), ("hw", None, (8, 1, 7)),
                                              ("w", "hwt", (7, 7, 3))])
def test_axial_module(axis, layout, grid):
    m = AxialAttention(24, 3, axis, layout=layout, dtype=torch.float64)
    x = torch.randn(2, math.prod(grid), 24, **f64, requires_grad=True)
    q, k, v = split_qkv(x, m.qkv, 3)
    axes = [(layout or "thw").index(c) for c in axis]
    ref = linear(naive_axial(q, k, v, grid, axes).reshape(2, -1, 24), m.proj)
    module_grads_match(m(x, grid), ref, m, x)
    assert m(x.view(2, *grid, 24)).shape == (2, *grid, 24)


def test_factorised_module():
    grid = (3, 7, 7)
    m = FactorisedDotProductAttention(32, 4, dtype=torch.float64)
    x = torch.randn(2, math.prod(grid), 32, **f64, requires_grad=True)
    q, k, v = split_qkv(x, m.qkv, 4)
    ref = linear(naive_factorised(q, k, v, grid).reshape(2, -1, 32), m.proj)
    module_grads_match(m(x, grid), ref, m, x)


@pytest.mark.parametrize("scope,kw,grid", [("local", {}, (3, 7, 7)), ("local", {"window": (1, 2, 7)}, (2, 4, 7)),
                                           ("global", {}, (3, 7, 7)), ("global", {"stride": (2, 3, 1)}, (8, 7, 1))])
def test_local_global_module(scope, kw, grid):
    m = LocalGlobalAttention(16, 2, scope, dtype=torch.float64, **kw)
    x = torch.randn(1, math.prod(grid), 16, **f64, requires_grad=True)
    q, k, v = split_qkv(x, m.qkv, 2)
    if scope == "local":
        window = kw.get("window", (grid[0], -(-grid[1] // 2), -(-grid[2] // 2)))  # paper: F x H/2 x W/2
        o = naive_local(q, k, v, grid, window)
    else:
        stride = kw.get("stride", 2)
        o = naive_global(q, k, v, grid, stride if isinstance(stride, tuple) else (stride,) * 3)
    module_grads_match(m(x, grid), linear(o.reshape(1, -1, 16), m.proj), m, x)


def test_grid_module_parameter_names():
    for m in (AxialAttention(16, 2, "t"), LocalGlobalAttention(16, 2), FactorisedDotProductAttention(16, 2)):
        assert list(m.state_dict()) == ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]
        assert m.qkv.weight.shape == (48, 16) and m.proj.weight.shape == (16, 16)


def naive_divided(m, x, T):
    """DividedSpaceTimeAttention's math from the naive pieces (TimeSformer's recipe)."""
    B, L, C = x.shape
    heads = m.num_heads
    patches = x[:, 1:]
    q, k, v = split_qkv(m.temporal_layernorm(patches), m.temporal_attention.attention.qkv, heads)
    o = naive_temporal(q, k, v, T, m.token_order).reshape(B, L - 1, C)
    o = m.temporal_dense(linear(o, m.temporal_attention.output.dense))
    y = torch.cat([x[:, :1], patches + o], dim=1)
    q, k, v = split_qkv(m.layernorm_before(y), m.attention.attention.qkv, heads)
    o = naive_spatial(q, k, v, T, m.token_order).reshape(B, L, C)
    return y + linear(o, m.attention.output.dense)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["nt", "tn"])
def test_divided_module_matches_naive(order, backend):
    T, N = 3, 7
    m = DividedSpaceTimeAttention(16, 2, T, token_order=order, backend=backend, dtype=torch.float64)
    x = torch.randn(2, 1 + T * N, 16, **f64, requires_grad=True)
    module_grads_match(m(x), naive_divided(m, x, T), m, x)


# ---------------------------------------------------------------------------------------------------------
# Parity with transformers' TimesformerModel (random weights, no download).
# ---------------------------------------------------------------------------------------------------------
def timesformer(T, image, patch, dim=32, heads=4, layers=1):
    transformers = pytest.importorskip("transformers")
    config = transformers.TimesformerConfig(
        image_size=image, patch_size=patch, num_channels=3, num_frames=T, hidden_size=dim,
        num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * dim,
        attention_type="divided_space_time")
    model = transformers.TimesformerModel(config).double().eval()
    with torch.no_grad():  # well away from the initialisation (biases 0, LayerNorms 1/0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


MLP_KEYS = {"layernorm_after.weight", "layernorm_after.bias", "intermediate.dense.weight", "intermediate.dense.bias",
            "output.dense.weight", "output.dense.bias"}


def ours_from(layer, T, backend=None):
    cfg = layer.config
    ours = DividedSpaceTimeAttention(cfg.hidden_size, cfg.num_attention_heads, T, backend=backend,
                                     layer_norm_eps=cfg.layer_norm_eps, dtype=torch.float64)
    theirs = layer.state_dict()
    assert set(theirs) - set(ours.state_dict()) == MLP_KEYS
    ours.load_state_dict({key: val for key, val in theirs.items() if key not in MLP_KEYS}, strict=True)
    return ours


def mlp(layer, y):
    return y + layer.output(layer.intermediate(layer.layernorm_after(y)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 3, 8])
def test_divided_matches_transformers_timesformer_layer(T, backend):
    model = timesformer(T, image=28, patch=4)                     # N = 7 x 7 = 49 patches per frame
    layer = model.encoder.layer[0]
    ours = ours_from(layer, T, backend)
    x = torch.randn(2, 1 + T * 49, 32, **f64, requires_grad=True)
    ref = layer(x)[0]
    out = mlp(layer, ours(x))
    assert (out - ref).abs().max().item() <= TOL64
    g = torch.randn_like(ref)
    names = [n for n, _ in ours.named_parameters()]
    theirs = dict(layer.named_parameters())
    got = grads_of(out, [x] + [p for _, p in ours.named_parameters()], g)
    want = grads_of(ref, [x] + [theirs[n] for n in names], g)
    for name, a, b in zip(["x"] + names, got, want):
        assert (a - b).abs().max().item() <= TOL64, name


def test_divided_matches_transformers_timesformer_model():
    """Two layers end to end: TimesformerModel's output from its embeddings, our attention and its MLPs."""
    T = 3
    model = timesformer(T, image=8, patch=4, layers=2)             # N = 2 x 2
    pixels = torch.randn(2, T, 3, 8, 8, **f64)
    ref = model(pixels).last_hidden_state
    h = model.embeddings(pixels)
    for layer in model.encoder.layer:
        h = mlp(layer, ours_from(layer, T)(h))
    assert (model.layernorm(h) - ref).abs().max().item() <= TOL64
