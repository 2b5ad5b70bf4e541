"""The reference backend: naive PyTorch attention, written to be read.  It is the oracle of every test.

It materialises the [B, Hq, Lq, Lk] scores, adds the mask, takes the softmax and multiplies by V, exactly
as the formula reads.  Matmuls run in the input dtype (so the reference in fp16 is the "low-precision
reference" of the tolerance rule); the mask addition and the softmax run in float32.  Its backward
recomputes the probabilities and applies the textbook gradient formulas.
"""
from __future__ import annotations

import torch

from ..problem import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT, AttentionProblem
from .base import Backend

# ---------------------------------------------------------------------------------------------------------
# Dropout RNG.  The Triton kernels call Philox-4x32-10 with key = the 64-bit seed and counter =
# (key index n, query index m, b * Hq + h, 0), and keep an element when the top 24 bits of the first output
# word are >= p * 2^24.  This is the same generator written with int64 tensor ops (uint32 values held in
# int64; products wrap mod 2^64, and bits 32..63 of the wrapped product are still the high word).
# ---------------------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57


def _umulhi32(a: int, b: torch.Tensor) -> torch.Tensor:
    return ((b * a) >> 32) & _M32


def philox4x32(seed: torch.Tensor, c0, c1, c2, c3, rounds: int = 10):
    seed = seed.reshape(()).to(torch.int64)
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    for _ in range(rounds):
        c0_old, c2_old = c0, c2
        c0 = _umulhi32(_PHILOX_ROUND_B, c2_old) ^ c1 ^ k0
        c2 = _umulhi32(_PHILOX_ROUND_A, c0_old) ^ c3 ^ k1
        c1 = (c2_old * _PHILOX_ROUND_B) & _M32
        c3 = (c0_old * _PHILOX_ROUND_A) & _M32
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def dropout_threshold(dropout_p: float) -> int:
    """Keep an element iff its 24-bit random number is >= this threshold (so P(keep) = 1 - p)."""
    return int(round(dropout_p * (1 << 24)))


def dropout_keep_mask(seed: torch.Tensor, shape, dropout_p: float, device) -> torch.Tensor:
    """Bool keep-mask of shape [B, Hq, Lq, Lk], identical to the one the Triton kernels generate."""
    B, H, M, N = shape
    i64 = dict(dtype=torch.int64, device=device)
    n = torch.arange(N, **i64).view(1, 1, 1, N)
    m = torch.arange(M, **i64).view(1, 1, M, 1)
    bh = torch.arange(B * H, **i64).view(B, H, 1, 1)
    zero = torch.zeros((), **i64)
    r0, _, _, _ = philox4x32(seed.to(device), n, m, bh, zero)
    return (r0 >> 8) >= dropout_threshold(dropout_p)


# ---------------------------------------------------------------------------------------------------------
# The math.
# ---------------------------------------------------------------------------------------------------------
def causal_allowed(causal: str, len_q: int, len_k: int, device) -> torch.Tensor:
    """[Lq, Lk] bool: True where query i may attend key j."""
    i = torch.arange(len_q, device=device).view(-1, 1)
    j = torch.arange(len_k, device=device).view(1, -1)
    if causal == CAUSAL_TOP_LEFT:
        return j <= i
    if causal == CAUSAL_BOTTOM_RIGHT:
        return j <= i + (len_k - len_q)
    raise ValueError(causal)


def _expand_kv_heads(q, t):
    """GQA/MQA: query head h reads key/value head h // (Hq / Hkv)."""
    group = q.shape[1] // t.shape[1]
    return t.repeat_interleave(group, dim=1) if group > 1 else t


def _accumulate_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def masked_scores(q, k, attn_mask=None, causal=CAUSAL_NONE, scale=1.0):
    """[B, Hq, Lq, Lk] scores = scale * q k^T (matmul in q's dtype) + mask, in float32 (float64 for fp64)."""
    acc_dtype = _accumulate_dtype(q)
    scores = (q @ _expand_kv_heads(q, k).transpose(-2, -1) * scale).to(acc_dtype)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(acc_dtype)
    if causal != CAUSAL_NONE:
        allowed = causal_allowed(causal, q.shape[2], k.shape[2], q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores


def safe_softmax(scores):
    """(probs, lse) of the scores' rows.  A fully masked row (every score -inf) gets probabilities 0 and
    lse -inf, and no NaN in the gradient either (the inner `where` keeps -inf - -inf out of autograd).
    Any other row goes through softmax, so a NaN score (a NaN or inf in q, k or the mask, or an overflowing
    score) makes the row's output and lse NaN: NaN inputs propagate, as in torch's math attention
    (torch._safe_softmax), FlashAttention and every fastattn kernel -- never silently a 0 row."""
    if scores.shape[-1] == 0:  # no key at all (Lk = 0): every row is fully masked, its output 0
        return scores, scores.new_full(scores.shape[:-1], float("-inf"))
    row_alive = scores.amax(dim=-1, keepdim=True) != float("-inf")  # NaN max (a NaN score): alive
    safe = torch.where(row_alive, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    probs = torch.where(row_alive, torch.softmax(safe, dim=-1), 0.0)
    lse = torch.where(row_alive, torch.logsumexp(safe, dim=-1, keepdim=True), float("-inf")).squeeze(-1)
    # An inf score: logsumexp is inf, softmax NaN (inf - inf).  The kernels' lse = m + log(l) is NaN there: so
    # is this one (the LSE is NaN exactly where the output row is).
    lse = torch.where(probs.isnan().any(dim=-1), float("nan"), lse)
    return probs, lse


def reference_attention(q, k, v, attn_mask=None, causal=CAUSAL_NONE, scale=1.0, dropout_p=0.0, seed=None):
    """Returns (out [B,Hq,Lq,Dv] in q's dtype, lse [B,Hq,Lq] in float32/float64).  Differentiable."""
    probs, lse = safe_softmax(masked_scores(q, k, attn_mask, causal, scale))
    if dropout_p > 0.0:
        keep = dropout_keep_mask(seed, probs.shape, dropout_p, q.device)
        probs = probs * keep / (1.0 - dropout_p)
    out = probs.to(v.dtype) @ _expand_kv_heads(q, v)
    return out, lse


def reference_probabilities(q, k, attn_mask=None, causal=CAUSAL_NONE, scale=1.0):
    """The [B, Hq, Lq, Lk] softmax probabilities (no dropout), for need_weights-style callers."""
    return safe_softmax(masked_scores(q, k, attn_mask, causal, scale))[0]


def reference_attention_backward(q, k, v, attn_mask, causal, scale, dropout_p, seed, dout, dlse=None,
                                 mask_needs_grad=False):
    """The textbook attention backward, recomputing the probabilities (no autograd, so it traces):

        P = softmax(S),  Pd = P * keep / (1 - p)      O = Pd V
        dV = Pd^T dO     dPd = dO V^T                 dP = dPd * keep / (1 - p)
        dS = P * (dP - rowsum(P * dP)) + P * dLse     dQ = scale * dS K,  dK = scale * dS^T Q
        dMask = dS, summed over the dimensions the mask was broadcast along.
    Matmuls run in the input dtype, like the forward; the rest in float32 (float64 for float64 inputs).
    """
    dtype, group = q.dtype, q.shape[1] // k.shape[1]
    probs, _ = safe_softmax(masked_scores(q, k, attn_mask, causal, scale))
    probs_dropped = probs
    if dropout_p > 0.0:
        keep = dropout_keep_mask(seed, probs.shape, dropout_p, q.device).to(probs.dtype) / (1.0 - dropout_p)
        probs_dropped = probs * keep
    dv = probs_dropped.to(dtype).transpose(-2, -1) @ dout
    dp = (dout @ _expand_kv_heads(q, v).transpose(-2, -1)).to(probs.dtype)
    if dropout_p > 0.0:
        dp = dp * keep
    ds = probs * (dp - (probs * dp).sum(dim=-1, keepdim=True))
    if dlse is not None:
        ds = ds + probs * dlse.to(probs.dtype).unsqueeze(-1)
    dq = (ds.to(dtype) @ _expand_kv_heads(q, k)) * scale
    dk = (ds.to(dtype).transpose(-2, -1) @ q) * scale
    if group > 1:  # each key/value head collects the gradients of its GROUP query heads
        B, Hq, Lk = k.shape[0], q.shape[1], k.shape[2]
        dk = dk.view(B, Hq // group, group, Lk, -1).sum(dim=2)
        dv = dv.view(B, Hq // group, group, Lk, -1).sum(dim=2)
    dmask = ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype) if mask_needs_grad else None
    return dq.to(dtype), dk.to(dtype), dv.to(dtype), dmask


class ReferenceBackend(Backend):
    name = "reference"
    summary = "naive PyTorch math (materialised scores); the test oracle; any device, dtype and option"

    def reasons(self, p: AttentionProblem):
        return []

    def forward(self, p, seed):
        return reference_attention(p.q, p.k, p.v, p.mask, p.causal, p.scale, p.dropout_p, seed)

    def backward(self, p, seed, out, lse, dout, dlse):
        return reference_attention_backward(p.q, p.k, p.v, p.mask, p.causal, p.scale, p.dropout_p, seed, dout,
                                            dlse, p.mask_needs_grad)
