"""The `sdpa` backend: torch's own F.scaled_dot_product_attention, where it fits.

torch picks its own kernel underneath (flash / memory-efficient / cuDNN / math).  It cannot return the
log-sum-exp, so `return_lse=True` goes elsewhere.  Causal alignments other than SDPA's own top-left, or
causal together with a mask, are folded into one [Lq, Lk]-broadcast mask.  Dropout runs under a forked
RNG seeded from the op's seed, so the backward (which recomputes the forward under autograd) sees the same
dropout mask.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from ..problem import CAUSAL_NONE, CAUSAL_TOP_LEFT, AttentionProblem
from .base import Backend
from .reference import causal_allowed



def _sdpa_call(p: AttentionProblem, q, k, v, mask, seed):
    is_causal = p.causal == CAUSAL_TOP_LEFT and mask is None
    if p.causal != CAUSAL_NONE and not is_causal:
        allowed = causal_allowed(p.causal, p.len_q, p.len_k, q.device)
        if mask is None:
            mask = allowed
        elif mask.dtype == torch.bool:
            mask = mask & allowed
        else:
            mask = mask.masked_fill(~allowed, float("-inf"))
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    kwargs = dict(attn_mask=mask, dropout_p=p.dropout_p, is_causal=is_causal, scale=p.scale)
    if p.heads_q != p.heads_kv:
        kwargs["enable_gqa"] = True
    if p.dropout_p > 0.0:
        devices = [q.device] if q.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=q.device.type):
            torch.manual_seed(int(seed.item()))
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


class SdpaBackend(Backend):
    name = "sdpa"
    summary = "torch.nn.functional.scaled_dot_product_attention (torch picks flash/mem-efficient/cuDNN/math)"

    def reasons(self, p: AttentionProblem):
        why = []
        if p.return_lse:
            why.append("sdpa cannot return the log-sum-exp (return_lse=True)")
        return why

    def forward(self, p, seed):
        return _sdpa_call(p, p.q, p.k, p.v, p.mask, seed), None

    def backward(self, p, seed, out, lse, dout, dlse):
        mask_needs_grad = p.mask_needs_grad
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_() for t in (p.q, p.k, p.v))
            mask = None if p.mask is None else p.mask.detach().requires_grad_(mask_needs_grad)
            o = _sdpa_call(p, q, k, v, mask, seed)
            inputs = [q, k, v] + ([mask] if mask_needs_grad else [])
            g = torch.autograd.grad([o], inputs, [dout], allow_unused=True)
        dq, dk, dv = [torch.zeros_like(t) if gi is None else gi for gi, t in zip(g[:3], (q, k, v))]
        return dq, dk, dv, (g[3] if mask_needs_grad else None)
