"""fastattn.window_attention (Swin W-MSA / SW-MSA) and fastattn.nn.WindowAttention.

The oracle is written here from the Swin recipe, independently of fastattn/window.py: torch.roll, window
partition by view/permute, the bias looked up by explicit coordinate differences, the region mask from the
2-D ``img_mask`` slice construction, an explicit softmax, all in float64.  timm's SwinTransformerBlock is
the second oracle for the module (skipped if timm is not installed; requirements.txt pins it).
"""
import pytest
import torch
import torch.nn.functional as F

import fastattn
from helpers import triton_device as _triton_device
import fastattn.window as window_mod
from fastattn.nn import WindowAttention
from fastattn.window import pad_to_window, relative_position_index, window_attention

TOL64 = 1e-10


# ---------------------------------------------------------------------------------------------------------
# The naive oracle.
# ---------------------------------------------------------------------------------------------------------
def pair(x):
    return (x, x) if isinstance(x, int) else tuple(x)


def naive_rel_index(wh, ww):
    pos = [(y, x) for y in range(wh) for x in range(ww)]
    return torch.tensor([[(yi - yj + wh - 1) * (2 * ww - 1) + (xi - xj + ww - 1) for (yj, xj) in pos]
                         for (yi, xi) in pos])


def naive_region_mask(H, W, wh, ww, sh, sw):
    """[nW, N, N]: Swin's img_mask construction, literally."""
    img = torch.zeros(H, W)
    cnt = 0
    for hs in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
        for ws in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
            img[hs, ws] = cnt
            cnt += 1
    ids = img.view(H // wh, wh, W // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.where(diff != 0, -100.0, 0.0).double()


def naive_roll(t, shifts, unpadded=None):
    if unpadded is None:
        return torch.roll(t, shifts=shifts, dims=(1, 2))
    uh, uw = unpadded
    out = t.clone()
    out[:, :uh, :uw] = torch.roll(t[:, :uh, :uw], shifts=shifts, dims=(1, 2))
    return out


def naive_window_attention(q, k, v, window_size, shift_size=0, table=None, scale=None, unpadded=None):
    """float64 Swin window attention on [B, H, W, heads, d] inputs (differentiable)."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, W, heads, d = q.shape
    dv = v.shape[-1]
    (wh, ww), (sh, sw) = pair(window_size), pair(shift_size)
    N, nWh, nWw = wh * ww, H // wh, W // ww
    shifted = sh > 0 or sw > 0
    if shifted:
        q, k, v = (naive_roll(t, (-sh, -sw), unpadded) for t in (q, k, v))

    def part(t):
        return t.reshape(B, nWh, wh, nWw, ww, heads, -1).permute(0, 1, 3, 5, 2, 4, 6).reshape(
            B, nWh * nWw, heads, N, t.shape[-1])

    qw, kw, vw = part(q), part(k), part(v)
    s = (qw @ kw.transpose(-2, -1)) * (d ** -0.5 if scale is None else scale)
    if table is not None:
        s = s + table.double()[naive_rel_index(wh, ww).view(-1).to(s.device)].view(N, N, heads).permute(2, 0, 1)
    if shifted:
        s = s + naive_region_mask(H, W, wh, ww, sh, sw)[:, None].to(s.device)
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    o = (p @ vw).view(B, nWh, nWw, heads, wh, ww, dv).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, heads, dv)
    if shifted:
        o = naive_roll(o, (sh, sw), unpadded)
    return o


def make_inputs(B, H, W, heads, d, dv, window_size, dtype=torch.float64, fused=True):
    """q, k, v leaves (and the table); with d == dv and fused, q/k/v are views of one qkv tensor."""
    wh, ww = pair(window_size)
    table = (torch.randn((2 * wh - 1) * (2 * ww - 1), heads, dtype=dtype) * 0.5).requires_grad_()
    if fused and d == dv:
        qkv = torch.randn(B, H, W, 3, heads, d, dtype=dtype, requires_grad=True)
        q, k, v = qkv.unbind(3)
        return (qkv,), (q, k, v), table
    q, k, v = (torch.randn(B, H, W, heads, e, dtype=dtype, requires_grad=True) for e in (d, d, dv))
    return (q, k, v), (q, k, v), table


def grads_of(out, leaves, grad_out):
    return torch.autograd.grad(out, leaves, grad_out)


# ---------------------------------------------------------------------------------------------------------
# The op against the naive oracle.
# ---------------------------------------------------------------------------------------------------------
CASES = {  # B, H, W, heads, d, dv, window, shift
    "w7_14x21_shift0": (2, 14, 21, 3, 16, 16, 7, 0),
    "w7_14x21_shift3": (2, 14, 21, 3, 16, 16, 7, 3),
    "w4x8_8x16_shift0": (2, 8, 16, 2, 8, 12, (4, 8), 0),
    "w4x8_8x16_shift2x4": (2, 8, 16, 2, 8, 12, (4, 8), (2, 4)),
    "w7_14x14_d32_shift3": (1, 14, 14, 2, 32, 32, 7, 3),
    "w4x8_12x16_shift_h_only": (1, 12, 16, 3, 8, 8, (4, 8), (2, 0)),
}


@pytest.mark.parametrize("backend", ["reference", "sdpa", "cpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_naive_float64(case, backend):
    B, H, W, heads, d, dv, window, shift = CASES[case]
    leaves, (q, k, v), table = make_inputs(B, H, W, heads, d, dv, window)
    out = window_attention(q, k, v, window_size=window, shift_size=shift, rel_pos_bias_table=table,
                           backend=backend)
    ref = naive_window_attention(q, k, v, window, shift, table)
    assert out.shape == (B, H, W, heads, dv) and out.is_contiguous()
    assert (out - ref).abs().max().item() <= TOL64
    g = torch.randn_like(ref)
    for got, want in zip(grads_of(out, leaves + (table,), g), grads_of(ref, leaves + (table,), g)):
        assert (got - want).abs().max().item() <= TOL64


@pytest.mark.parametrize("shift", [0, (2, 1)])
def test_no_bias_table_and_explicit_scale(shift):
    leaves, (q, k, v), _ = make_inputs(2, 8, 8, 2, 8, 8, 4, fused=False)
    out = window_attention(q, k, v, window_size=4, shift_size=shift, scale=0.3)
    ref = naive_window_attention(q, k, v, 4, shift, None, scale=0.3)
    assert (out - ref).abs().max().item() <= TOL64
    g = torch.randn_like(ref)
    for got, want in zip(grads_of(out, leaves, g), grads_of(ref, leaves, g)):
        assert (got - want).abs().max().item() <= TOL64


def test_unpadded_size_rolls_within_the_image():
    """timm's roll-then-pad order: the shift wraps within the top-left unpadded region."""
    leaves, (q, k, v), table = make_inputs(1, 14, 14, 2, 8, 8, 7)
    out = window_attention(q, k, v, window_size=7, shift_size=3, rel_pos_bias_table=table, unpadded_size=(13, 10))
    ref = naive_window_attention(q, k, v, 7, 3, table, unpadded=(13, 10))
    assert (out - ref).abs().max().item() <= TOL64
    g = torch.randn_like(ref)
    for got, want in zip(grads_of(out, leaves + (table,), g), grads_of(ref, leaves + (table,), g)):
        assert (got - want).abs().max().item() <= TOL64


def test_geometry_helpers():
    for wh, ww in ((7, 7), (4, 8), (2, 3), (1, 5)):
        assert torch.equal(relative_position_index((wh, ww)), naive_rel_index(wh, ww))
    for H, W, wh, ww, sh, sw in ((14, 21, 7, 7, 3, 3), (8, 16, 4, 8, 2, 4), (12, 16, 4, 8, 2, 0)):
        got = window_mod._region_mask(H, W, wh, ww, sh, sw, torch.float64, "cpu")
        assert torch.equal(got, naive_region_mask(H, W, wh, ww, sh, sw))


def test_composite_passes_broadcast_masks_and_views(monkeypatch):
    """What reaches fastattn.attention: shift 0 -> [B*nW, heads] with the bias as a [1, heads, N, N] view;
    shift > 0 -> [B, nW*heads] with one [1, nW*heads, N, N] mask (never expanded over the batch)."""
    seen = []
    real = window_mod.attention

    def spy(q, k, v, *, attn_mask=None, **kw):
        seen.append((tuple(q.shape), None if attn_mask is None else tuple(attn_mask.shape)))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(window_mod, "attention", spy)
    _, (q, k, v), table = make_inputs(3, 8, 16, 2, 8, 8, (4, 8))
    # backend="sdpa": the composite (on CPU the default is the fused C++ kernels, which never call attention)
    window_attention(q, k, v, window_size=(4, 8), rel_pos_bias_table=table, backend="sdpa")
    window_attention(q, k, v, window_size=(4, 8), shift_size=(2, 4), rel_pos_bias_table=table, backend="sdpa")
    assert seen == [((12, 2, 32, 8), (1, 2, 32, 32)), ((3, 8, 32, 8), (1, 8, 32, 32))]


def test_dropout_is_reproducible_with_the_seed():
    _, (q, k, v), table = make_inputs(1, 8, 8, 2, 8, 8, 4, dtype=torch.float32)
    kw = dict(window_size=4, shift_size=2, rel_pos_bias_table=table, dropout_p=0.3, backend="reference")
    torch.manual_seed(1)
    a = window_attention(q, k, v, **kw)
    torch.manual_seed(1)
    b = window_attention(q, k, v, **kw)
    c = window_attention(q, k, v, **{**kw, "dropout_p": 0.0})
    assert torch.equal(a, b) and not torch.allclose(a, c)


# ---------------------------------------------------------------------------------------------------------
# gradcheck (float64), including the bias table's gradient.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,H,W,window,shift,heads,d", [
    ("reference", 4, 6, (2, 3), (1, 1), 2, 4),
    ("sdpa", 4, 6, (2, 3), 0, 2, 4),
    ("sdpa", 8, 8, 4, 2, 1, 4),          # 4 windows of 16 tokens: checked in gradcheck's fast mode
    ("triton", 2, 4, 2, (1, 1), 1, 2),   # Triton's interpreter on CPU: kept tiny
])
def test_gradcheck(backend, H, W, window, shift, heads, d):
    device = _triton_device() if backend == "triton" else "cpu"
    wh, ww = pair(window)
    f64 = dict(dtype=torch.float64, device=device)
    q, k, v = (torch.randn(1, H, W, heads, d, **f64, requires_grad=True) for _ in range(3))
    table = torch.randn((2 * wh - 1) * (2 * ww - 1), heads, **f64, requires_grad=True)

    def f(q, k, v, table):
        return window_attention(q, k, v, window_size=window, shift_size=shift, rel_pos_bias_table=table,
                                backend=backend)

    fast = H * W > 32  # fast mode: random projections v^T J u instead of the full Jacobian
    assert torch.autograd.gradcheck(f, (q, k, v, table), atol=1e-7, rtol=1e-5, fast_mode=fast)


# ---------------------------------------------------------------------------------------------------------
# The Triton backend (Triton's interpreter on CPU; compiled kernels on CUDA).
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [0, 1])
def test_triton_backend(shift):
    device = _triton_device()
    leaves, (q, k, v), table = make_inputs(2, 4, 4, 2, 8, 8, 2, dtype=torch.float32)
    leaves = tuple(t.detach().to(device).requires_grad_() for t in leaves)
    table = table.detach().to(device).requires_grad_()
    q, k, v = leaves[0].unbind(3)
    out = window_attention(q, k, v, window_size=2, shift_size=shift, rel_pos_bias_table=table, backend="triton")
    ref = naive_window_attention(q, k, v, 2, shift, table)
    assert (out.double() - ref).abs().max().item() <= 1e-5
    g = torch.randn_like(ref)
    for got, want in zip(grads_of(out, leaves + (table,), g.float()), grads_of(ref, leaves + (table,), g)):
        assert (got.double() - want).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------------------
# pad_to_window and bad input.
# ---------------------------------------------------------------------------------------------------------
def test_pad_to_window():
    x = torch.randn(2, 13, 10, 5)
    y = pad_to_window(x, (7, 4))
    assert y.shape == (2, 14, 12, 5)
    assert torch.equal(y[:, :13, :10], x) and y[:, 13:].abs().sum() == 0 and y[:, :, 10:].abs().sum() == 0
    z = torch.randn(1, 14, 8, 3)
    assert pad_to_window(z, (7, 4)) is z


def _qkv(shape=(1, 14, 14, 2, 8)):
    return torch.randn(shape), torch.randn(shape), torch.randn(shape)


@pytest.mark.parametrize("make_call,exc,words", [
    (lambda q, k, v: window_attention(q[:, :13], k[:, :13], v[:, :13], window_size=7), ValueError,
     "q: image height 13 is not a multiple of window height 7; pad first (see fastattn.window.pad_to_window)"),
    (lambda q, k, v: window_attention(q, k, v, window_size=(7, 4)), ValueError,
     "q: image width 14 is not a multiple of window width 4"),
    (lambda q, k, v: window_attention(q[:, :4, :4], k[:, :4, :4], v[:, :4, :4], window_size=7), ValueError,
     "window_size: window height 7 is larger than the image height 4"),
    (lambda q, k, v: window_attention(q, k, v, window_size=7, rel_pos_bias_table=torch.zeros(169, 3)),
     ValueError, "rel_pos_bias_table: expected shape [(2*wh-1)*(2*ww-1), heads] = [169, 2]"),
    (lambda q, k, v: window_attention(q, k, v, window_size=7, rel_pos_bias_table=torch.zeros(2, 169)),
     ValueError, "rel_pos_bias_table: expected shape"),
    (lambda q, k, v: window_attention(q, k[:, :7], v, window_size=7), ValueError, "k: shape"),
    (lambda q, k, v: window_attention(q, k, v[..., :1, :], window_size=7), ValueError, "v: shape"),
    (lambda q, k, v: window_attention(q[0], k[0], v[0], window_size=7), ValueError, "q: expected a 5-D tensor"),
    (lambda q, k, v: window_attention(q, k, v, window_size=7, shift_size=7), ValueError, "shift_size: each shift"),
    (lambda q, k, v: window_attention(q, k, v, window_size=7, shift_size=-1), ValueError, "shift_size: each shift"),
    (lambda q, k, v: window_attention(q, k, v, window_size=0), ValueError, "window_size: must be positive"),
    (lambda q, k, v: window_attention(q, k, v, window_size=(7, 7, 7)), TypeError, "window_size: expected"),
    (lambda q, k, v: window_attention(q, k, v, window_size=7, unpadded_size=(15, 14)), ValueError,
     "unpadded_size"),
    (lambda q, k, v: pad_to_window(q, 7), ValueError, "x: expected a 4-D tensor"),
])
def test_bad_input_raises_naming_the_argument(make_call, exc, words):
    with pytest.raises(exc) as info:
        make_call(*_qkv())
    assert words in str(info.value)


def test_module_bad_input():
    m = WindowAttention(16, 2, 7)
    with pytest.raises(ValueError, match="x: expected a 4-D tensor"):
        m(torch.randn(1, 14, 14, 8))
    with pytest.raises(ValueError, match="shift_size"):
        m(torch.randn(1, 14, 14, 16), shift_size=7)
    with pytest.raises(ValueError, match="num_heads: must be positive"):
        WindowAttention(16, 0, 7)


# ---------------------------------------------------------------------------------------------------------
# The module.
# ---------------------------------------------------------------------------------------------------------
def module_reference(m, x, shift, roll_before_pad):
    """The module's math from the naive pieces: pad the features, project, naive window attention, crop."""
    B, H, W, C = x.shape
    wh, ww = m.window_size
    xp = F.pad(x, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))
    qkv = F.linear(xp, m.qkv.weight, m.qkv.bias).view(B, xp.shape[1], xp.shape[2], 3, m.num_heads, -1)
    q, k, v = qkv.unbind(3)
    unpadded = (H, W) if roll_before_pad and xp.shape[1:3] != x.shape[1:3] else None
    o = naive_window_attention(q, k, v, (wh, ww), shift, m.relative_position_bias_table, unpadded=unpadded)
    return F.linear(o[:, :H, :W].reshape(B, H, W, -1), m.proj.weight, m.proj.bias)


@pytest.mark.parametrize("roll_before_pad", [True, False])
@pytest.mark.parametrize("H,W,window,shift", [(14, 14, 7, 3), (13, 17, 7, 3), (13, 17, 7, 0), (6, 13, (4, 8), (2, 4))])
def test_module_matches_naive(H, W, window, shift, roll_before_pad):
    m = WindowAttention(24, 3, window, roll_before_pad=roll_before_pad, dtype=torch.float64)
    with torch.no_grad():
        m.relative_position_bias_table.normal_()
    x = torch.randn(2, H, W, 24, dtype=torch.float64, requires_grad=True)
    out, ref = m(x, shift), module_reference(m, x, shift, roll_before_pad)
    assert (out - ref).abs().max().item() <= TOL64
    g = torch.randn_like(ref)
    params = [x] + list(m.parameters())
    for got, want in zip(grads_of(out, params, g), grads_of(ref, params, g)):
        assert (got - want).abs().max().item() <= TOL64


def test_module_parameters_and_init():
    m = WindowAttention(32, 4, (4, 8), qkv_bias=False)
    assert list(m.state_dict()) == ["relative_position_bias_table", "qkv.weight", "proj.weight", "proj.bias"]
    assert m.relative_position_bias_table.shape == (7 * 15, 4) and m.qkv.weight.shape == (96, 32)
    assert torch.equal(m.relative_position_index, naive_rel_index(4, 8))
    t = m.relative_position_bias_table
    assert t.abs().max() <= 2.0 and 0.01 < t.std().item() < 0.03


# ---------------------------------------------------------------------------------------------------------
# Parity with timm's Swin block on the same random weights (no download).
# ---------------------------------------------------------------------------------------------------------
def timm_block(dim, H, W, heads, window, shift, always_partition=False):
    swin = pytest.importorskip("timm.models.swin_transformer")
    blk = swin.SwinTransformerBlock(dim, (H, W), num_heads=heads, window_size=window, shift_size=shift,
                                    always_partition=always_partition).double()
    with torch.no_grad():  # random weights everywhere (biases non-zero, table well away from 0)
        for p in blk.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return swin, blk


@pytest.mark.parametrize("H,W,window,shift,always_partition", [
    (14, 14, 7, 0, False), (14, 14, 7, 3, False),  # multiples of the window
    (13, 17, 7, 0, False), (13, 17, 7, 3, False),  # padded (timm: roll, then pad)
    (10, 19, (4, 8), (2, 4), False),               # non-square window, padded on both axes
    (5, 9, 7, 3, False),                           # timm clamps the window to (5, 7) and the shift to (0, 2)
    (5, 9, 7, 3, True),                            # always_partition: window 7 and shift 3 kept, heavy padding
])
def test_module_matches_timm_swin_block(H, W, window, shift, always_partition):
    dim, heads = 32, 4
    swin, blk = timm_block(dim, H, W, heads, window, shift, always_partition)
    ours = WindowAttention(dim, heads, blk.window_size, dtype=torch.float64)
    ours.load_state_dict(blk.attn.state_dict(), strict=True)
    assert torch.equal(ours.relative_position_index, blk.attn.relative_position_index)
    if any(blk.shift_size):  # the region mask is timm's
        Hp, Wp = -(-H // blk.window_size[0]) * blk.window_size[0], -(-W // blk.window_size[1]) * blk.window_size[1]
        mask = window_mod._region_mask(Hp, Wp, *blk.window_size, *blk.shift_size, torch.float64, "cpu")
        assert torch.equal(mask, blk.attn_mask)

    x = torch.randn(2, H, W, dim, dtype=torch.float64, requires_grad=True)
    ref = blk._attn(x)          # the block's attention branch: shift, pad, partition, attention, reverse, crop
    out = ours(x, blk.shift_size)
    assert (out - ref).abs().max().item() <= TOL64
    g = torch.randn_like(ref)
    theirs = dict(blk.attn.named_parameters())
    names = [n for n, _ in ours.named_parameters()]
    got = grads_of(out, [x] + [p for _, p in ours.named_parameters()], g)
    want = grads_of(ref, [x] + [theirs[n] for n in names], g)
    for name, a, b in zip(["x"] + names, got, want):
        assert (a - b).abs().max().item() <= TOL64, name


@pytest.mark.parametrize("window,qkv_bias", [(7, True), ((4, 8), False)])
def test_state_dict_round_trip_with_timm(window, qkv_bias):
    swin = pytest.importorskip("timm.models.swin_transformer")
    theirs = swin.WindowAttention(48, num_heads=3, window_size=window, qkv_bias=qkv_bias)
    ours = WindowAttention(48, 3, window, qkv_bias=qkv_bias)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert dict(ours.named_buffers()).keys() == dict(theirs.named_buffers()).keys()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)
    fresh = swin.WindowAttention(48, num_heads=3, window_size=window, qkv_bias=qkv_bias)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
