"""The fused Swin window kernels (Triton, window layout): against the reference composite.

The shift, the partition and their reverse are the kernels' index math on the image layout; the bias table
is read by coordinate difference and the region mask computed from coordinates; the table's gradient comes
from the kernels' score gradient.  On CPU the kernels run in Triton's interpreter (tests/conftest.py)."""
import pytest
import torch

import fastattn
from fastattn.backends import triton as triton_backend
from fastattn.nn import WindowAttention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(bool(triton_backend.device_reasons(torch.device(DEVICE))),
                                reason="the Triton kernels cannot run here")

CASES = {  # B, H, W, heads, d, dv, window, shift, unpadded  (small: the interpreter is slow on CPU)
    "w7_shift0": (1, 7, 14, 1, 8, 8, (7, 7), (0, 0), None),
    "w7_shift3": (1, 14, 14, 1, 8, 8, (7, 7), (3, 3), None),
    "w4x8_shift": (2, 8, 16, 2, 8, 8, (4, 8), (2, 4), None),
    "shift_h_only_dv": (1, 8, 8, 1, 8, 12, (4, 4), (2, 0), None),
    "timm_roll_then_pad": (1, 8, 8, 1, 8, 8, (4, 4), (2, 2), (7, 6)),
}


def _inputs(B, H, W, heads, d, dv, window, dtype):
    q = torch.randn(B, H, W, heads, d, dtype=dtype, device=DEVICE)
    k = torch.randn(B, H, W, heads, d, dtype=dtype, device=DEVICE)
    v = torch.randn(B, H, W, heads, dv, dtype=dtype, device=DEVICE)
    table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads, dtype=dtype, device=DEVICE)
    return [t.requires_grad_() for t in (q, k, v, table)]


def _run(backend, tensors, window, shift, unpadded, grad):
    q, k, v, table = [t.detach().clone().requires_grad_() for t in tensors]
    out = fastattn.window_attention(q, k, v, window_size=window, shift_size=shift, rel_pos_bias_table=table,
                                    unpadded_size=unpadded, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v, table), grad)
    return out, grads


@pytest.mark.parametrize("case,dtype", [(c, torch.float64) for c in sorted(CASES)] + [("w7_shift3", torch.float32)])
def test_fused_window_attention_matches_composite(case, dtype):
    B, H, W, heads, d, dv, window, shift, unpadded = CASES[case]
    tensors = _inputs(B, H, W, heads, d, dv, window, dtype)
    grad = torch.randn(B, H, W, heads, dv, dtype=dtype, device=DEVICE)
    fused = _run("triton", tensors, window, shift, unpadded, grad)
    ref = _run("reference", tensors, window, shift, unpadded, grad)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name, a, b in zip(["out", "dq", "dk", "dv", "dtable"], [fused[0], *fused[1]], [ref[0], *ref[1]]):
        assert a.shape == b.shape, name
        err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
        assert err <= tol, f"{name}: relative error {err:.3e}"


def test_fused_window_attention_gradcheck():
    q, k, v, table = _inputs(1, 4, 6, 1, 4, 3, (2, 3), torch.float64)

    def f(q, k, v, table):
        return fastattn.window_attention(q, k, v, window_size=(2, 3), shift_size=(1, 1), rel_pos_bias_table=table,
                                         backend="triton")

    assert torch.autograd.gradcheck(f, (q, k, v, table))


def test_fused_path_makes_no_copies_and_skips_the_composite(monkeypatch):
    """The kernels receive the caller's strided views of one qkv tensor; fastattn.attention is never called."""
    from fastattn.kernels import triton_attention as kernels
    seen = {}
    orig = kernels.attention_forward

    def spy(q, k, v, *args, **kwargs):
        seen.update(q_ptr=q.data_ptr(), q_stride=q.stride(), window=kwargs.get("window"))
        return orig(q, k, v, *args, **kwargs)

    monkeypatch.setattr(kernels, "attention_forward", spy)
    monkeypatch.setattr(fastattn.window, "attention", lambda *a, **k: pytest.fail("composite path used"))
    B, H, W, heads, d = 1, 8, 8, 1, 8
    qkv = torch.randn(B, H, W, 3, heads, d, device=DEVICE)
    q, k, v = qkv.unbind(3)
    fastattn.window_attention(q, k, v, window_size=4, shift_size=2, backend="triton")
    assert seen["q_ptr"] == qkv.data_ptr() and seen["q_stride"] == q.stride()
    assert seen["window"].shift_h == 2 and seen["window"].num_windows == 4


def test_fused_dropout_is_seeded():
    q, k, v, table = [t.detach() for t in _inputs(1, 8, 8, 1, 8, 8, (4, 4), torch.float32)]
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(fastattn.window_attention(q, k, v, window_size=4, shift_size=2, rel_pos_bias_table=table,
                                              dropout_p=0.3, backend="triton"))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_window_module_fused_equals_composite():
    torch.manual_seed(0)
    m = WindowAttention(8, 1, 4).double().to(DEVICE)
    x = torch.randn(1, 7, 6, 8, dtype=torch.float64, device=DEVICE)  # padded to 8 x 8 inside
    ref = m(x, shift_size=2)
    m.backend = "triton"
    torch.testing.assert_close(m(x, shift_size=2), ref, atol=1e-10, rtol=1e-10)
