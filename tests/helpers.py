"""Shared test utilities: inputs, the float64 oracle and the tolerance rule (../shared/DESIGN.md §4)."""
import torch

import fastattn
from fastattn.backends.reference import reference_attention
from fastattn.problem import make_problem

LOW_PRECISION = (torch.float16, torch.bfloat16)



def make_qkv(B, Hq, Hkv, Lq, Lk, Dqk, Dv, dtype=torch.float32, device="cpu", requires_grad=True):
    q = torch.randn(B, Hq, Lq, Dqk, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, Lk, Dqk, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, Lk, Dv, dtype=dtype, device=device)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def run_with_grads(fn, tensors, grad_out=None, grad_lse=None, **kwargs):
    """Calls fn(*tensors, **kwargs) -> out (or (out, lse)), backprops, returns (out, lse, grads)."""
    tensors = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    res = fn(*tensors, **kwargs)
    out, lse = (res if isinstance(res, tuple) else (res, None))
    if grad_out is None:
        grad_out = torch.randn_like(out)
    outputs, grads = [out], [grad_out.to(out.dtype)]
    if lse is not None and grad_lse is not None:
        outputs.append(lse)
        grads.append(grad_lse.to(lse.dtype))
    needs = [t for t in tensors if t.requires_grad]
    g = torch.autograd.grad(outputs, needs, grads, allow_unused=True) if needs else []
    return out.detach(), (None if lse is None else lse.detach()), [x if x is None else x.detach() for x in g]


def reference64(q, k, v, attn_mask=None, causal=False, scale=None, dropout_p=0.0, seed=None):
    """The oracle: the reference math in float64 on the same inputs."""
    up = lambda t: None if t is None else (t.detach().double() if t.is_floating_point() else t)
    p = make_problem(up(q), up(k), up(v), up(attn_mask), causal, scale, dropout_p)
    return reference_attention(p.q, p.k, p.v, p.mask, p.causal, p.scale, p.dropout_p, seed)


def max_err(a, b):
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite), "non-finite values differ"
    return (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0


def assert_close_rule(fast, ref_lowp, ref64, what="output"):
    """The tolerance rule: fp16/bf16: max|fast - ref64| <= 2 * max|ref_lowp - ref64| + 1e-5.
    fp32 compares with the float64 reference directly: the same rule, with the 1e-5 floor relative to the
    magnitude of the values (a sum of 129 terms of size 20 carries ~1e-5 of fp32 rounding whatever the order).
    fp64: max|fast - ref64| <= 1e-10 * max(1, max|ref64|)."""
    magnitude = max(1.0, ref64.double()[torch.isfinite(ref64)].abs().max().item()) if ref64.numel() else 1.0
    if fast.dtype == torch.float64:
        err = max_err(fast, ref64)
        assert err <= 1e-10 * magnitude, f"{what}: float64 error {err:.3e} > 1e-10 * {magnitude:.3g}"
        return
    err, base = max_err(fast, ref64), max_err(ref_lowp, ref64)
    floor = 1e-5 * (magnitude if fast.dtype == torch.float32 else 1.0)
    assert err <= 2 * base + floor, f"{what}: error {err:.3e} > 2 * reference error {base:.3e} + {floor:.1e}"


def _device_backends():
    """(device, backend) pairs the op tests run: every backend other than the oracle that can run here."""
    pairs = [("cpu", "sdpa"), ("cpu", "reference")]
    if torch.cuda.is_available():
        pairs += [("cuda", "triton"), ("cuda", "sdpa")]
    else:
        pairs += [("cpu", "triton")]  # Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
    return pairs


DEVICES_BACKENDS = _device_backends()


def triton_device():
    """The device the Triton kernels run on here: CUDA, or CPU under the interpreter; else skip the test."""
    import pytest
    from fastattn.backends import triton as triton_backend
    if torch.cuda.is_available():
        return "cuda"
    if triton_backend.interpreting():
        return "cpu"
    pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)")
