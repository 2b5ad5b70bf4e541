"""Shared checks for the model tests (tests/models/): backends agree under the tolerance rule, weights load.

The oracle for a model is the same model in float64 on the ``reference`` backend.  A fused backend's float32
run must satisfy the tolerance rule of ../shared/DESIGN.md §4 with float32 as the "low precision":
``max|fast32 - ref64| <= 2 * max|ref32 - ref64| + floor``, for the output and for every parameter gradient.
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/ for helpers.py

import fastattn  # noqa: E402
from helpers import triton_device  # noqa: E402,F401  (re-exported for the model tests)


def fused_backends():
    """The non-oracle backends a model test runs here: Triton (CUDA or the interpreter) and sdpa."""
    return ["triton", "sdpa"]


def _run(model, inputs, backend, loss_fn):
    model.zero_grad(set_to_none=True)
    with fastattn.use_backend(backend):
        out = model(*inputs)
        loss = loss_fn(out)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif isinstance(out, dict):
        out = next(iter(out.values()))
    return out.detach(), grads


def _default_loss(out):
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        out = out[0]
    # A fixed pseudo-random projection: every output element gets a different weight.
    w = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    return (out * w).sum()


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_backends_agree(model: torch.nn.Module, inputs, backends=None, loss_fn=_default_loss,
                          train: bool = False, atol_floor: float = 1e-5):
    """Runs ``model(*inputs)`` forward and backward on the float64 reference (oracle), the float32 reference and
    each fused backend in float32; asserts the tolerance rule on the output and on every parameter gradient.
    Floating-point ``inputs`` are cast; integer inputs (token ids, masks) are passed unchanged.
    ``train``: run in train mode (the model should have dropout/drop-path rates of 0 for a deterministic run)."""
    backends = backends or fused_backends()
    # The fused backends run where their kernels run: CUDA when there is a GPU (then without TF32, which would
    # not be float32 arithmetic), else CPU (Triton under its interpreter).  The oracles run on CPU.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    def cast(xs, dt, dev="cpu"):
        return [x.to(dev, dt) if isinstance(x, torch.Tensor) and x.is_floating_point()
                else (x.to(dev) if isinstance(x, torch.Tensor) else x) for x in xs]
    model = model.cpu()
    m64 = copy.deepcopy(model).double().train(train)
    m32 = copy.deepcopy(model).float().train(train)
    torch.manual_seed(0)
    out64, g64 = _run(m64, cast(inputs, torch.float64), "reference", loss_fn)
    torch.manual_seed(0)
    out32, g32 = _run(m32, cast(inputs, torch.float32), "reference", loss_fn)
    assert set(g32) == set(g64)
    m32 = m32.to(device)
    for backend in backends:
        torch.manual_seed(0)
        outb, gb = _run(m32, cast(inputs, torch.float32, device), backend, loss_fn)
        outb, gb = outb.cpu(), {n: g.cpu() for n, g in gb.items()}
        assert set(gb) == set(g64), f"{backend}: gradients of {set(g64) ^ set(gb)} differ in presence"
        scale = max(1.0, out64.abs().max().item())
        err, base = _err(outb, out64), _err(out32, out64)
        assert err <= 2 * base + atol_floor * scale, \
            f"{backend}: output error {err:.3e} > 2 * reference-fp32 error {base:.3e} + {atol_floor * scale:.1e}"
        for name in g64:
            scale = max(1.0, g64[name].abs().max().item())
            err, base = _err(gb[name], g64[name]), _err(g32[name], g64[name])
            assert err <= 2 * base + atol_floor * scale, \
                f"{backend}: grad of {name}: error {err:.3e} > 2 * {base:.3e} + {atol_floor * scale:.1e}"


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_same_outputs(ours, theirs, atol=1e-5, rtol=1e-4, what="output"):
    """Float32 outputs of two implementations of the same model on the same weights."""
    ours, theirs = ours.detach().double(), theirs.detach().double()
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
