"""The `sdpa` backend: torch's own F.scaled_dot_product_attention, where it fits.

torch picks its own kernel underneath (flash / memory-efficient / cuDNN / math) and differentiates it with
its own autograd (``differentiable = True``: fastattn calls it directly, not through AttentionFunction, so
nothing is recomputed).  It cannot return the log-sum-exp, so `return_lse=True` goes elsewhere.  Causal
alignments other than SDPA's own top-left, or causal together with a mask, are folded into one mask that
broadcasts over batch and heads.  Dropout uses torch's RNG (torch.manual_seed makes it reproducible; the
dropout mask differs from the Triton kernels' Philox stream).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..problem import CAUSAL_NONE, CAUSAL_TOP_LEFT, AttentionProblem
from .base import Backend
from .reference import causal_allowed


class SdpaBackend(Backend):
    name = "sdpa"
    summary = "torch.nn.functional.scaled_dot_product_attention (torch picks flash/mem-efficient/cuDNN/math)"
    differentiable = True

    def reasons(self, p: AttentionProblem):
        why = []
        if p.return_lse:
            why.append("sdpa cannot return the log-sum-exp (return_lse=True)")
        return why

    def forward(self, p, seed=None):
        mask = p.mask
        is_causal = p.causal == CAUSAL_TOP_LEFT and mask is None
        if p.causal != CAUSAL_NONE and not is_causal:
            allowed = causal_allowed(p.causal, p.len_q, p.len_k, p.device)
            if mask is None:
                mask = allowed
            elif mask.dtype == torch.bool:
                mask = mask & allowed
            else:
                mask = mask.masked_fill(~allowed, float("-inf"))
        if mask is not None and mask.dtype != torch.bool and mask.dtype != p.dtype:
            mask = mask.to(p.dtype)
        kwargs = dict(attn_mask=mask, dropout_p=p.dropout_p, is_causal=is_causal, scale=p.scale)
        if p.heads_q != p.heads_kv:
            kwargs["enable_gqa"] = True
        return F.scaled_dot_product_attention(p.q, p.k, p.v, **kwargs), None
