"""fastattn.nn.CrossAttention (Perceiver): against a naive float64 composition, on every backend here."""
import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.nn import CrossAttention
from helpers import DEVICES_BACKENDS


def naive_cross_attention(m: CrossAttention, latents, inputs, input_mask=None):
    H = m.num_heads
    x = F.layer_norm(inputs, inputs.shape[-1:], m.norm_inputs.weight, m.norm_inputs.bias, m.norm_inputs.eps)
    lat = F.layer_norm(latents, latents.shape[-1:], m.norm_latents.weight, m.norm_latents.bias, m.norm_latents.eps)
    q = F.linear(lat, m.q_proj.weight, m.q_proj.bias).unflatten(-1, (H, -1)).transpose(1, 2)
    k = F.linear(x, m.k_proj.weight, m.k_proj.bias).unflatten(-1, (H, -1)).transpose(1, 2)
    v = F.linear(x, m.v_proj.weight, m.v_proj.bias).unflatten(-1, (H, -1)).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if input_mask is not None:
        scores = scores.masked_fill(~input_mask[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
    out = F.linear(out, m.out_proj.weight, m.out_proj.bias)
    return out + latents if m.query_residual else out


@pytest.mark.parametrize("device,backend", DEVICES_BACKENDS)
@pytest.mark.parametrize("heads,qk,v", [(1, 261, 96), (2, 64, 32)])
@pytest.mark.parametrize("masked", [False, True])
def test_cross_attention_matches_naive(device, backend, heads, qk, v, masked):
    """Latents 8 vs inputs 1000 (the issue's odd sizes): qk channels 261 (Perceiver's Fourier features)."""
    torch.manual_seed(0)
    m = CrossAttention(48, 261, num_heads=heads, qk_channels=qk, v_channels=v, backend=backend).double().to(device)
    latents = torch.randn(2, 8, 48, dtype=torch.float64, device=device, requires_grad=True)
    inputs = torch.randn(2, 1000, 261, dtype=torch.float64, device=device, requires_grad=True)
    mask = (torch.rand(2, 1000, device=device) > 0.2) if masked else None
    if backend == "triton" and qk // heads > 256:  # float64 head dims above 256 are outside the kernels' range
        with pytest.raises(RuntimeError, match="q: head dim 261 exceeds"):
            m(latents, inputs, mask)
        return
    out = m(latents, inputs, mask)
    ref = naive_cross_attention(m, latents, inputs, mask)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (latents, inputs, m.k_proj.weight), g)
    exp = torch.autograd.grad(ref, (latents, inputs, m.k_proj.weight), g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_cross_attention_bad_input():
    m = CrossAttention(16, 8)
    with pytest.raises(ValueError, match="input_mask"):
        m(torch.randn(2, 4, 16), torch.randn(2, 9, 8), torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="inputs: batch size"):
        m(torch.randn(2, 4, 16), torch.randn(3, 9, 8))
    with pytest.raises(ValueError, match="v_channels"):
        CrossAttention(16, 8, num_heads=3, qk_channels=12, v_channels=10)
    with pytest.raises(ValueError, match="inputs: expected 8 channels, got 7"):
        m(torch.randn(2, 4, 16), torch.randn(2, 9, 7))
    with pytest.raises(ValueError, match="latents: expected 16 channels"):
        m(torch.randn(2, 4, 15), torch.randn(2, 9, 8))
    with pytest.raises(TypeError, match="latents: expected a torch.Tensor"):
        m([[0.0]], torch.randn(2, 9, 8))
