"""The fused CPU kernels (csrc/cpu, the `cpu` backend) against the float64 reference.

gradcheck in float64, parity on odd sizes in float32/bfloat16/float16 (the tolerance rule of helpers.py), masks,
GQA, dropout (the same Philox keep-mask as the reference, so compared exactly), LSE and its gradient, strided
layouts, torch.library.opcheck of both ops, a bitwise-deterministic backward, L = 32k in O(L) memory, the BLAS-less
and baseline-ISA code paths, argument errors, and dispatch.  Everything skips, with the reason, when the
extension can neither be imported nor JIT-built here.
"""
import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastattn
from fastattn import _ext, dispatch
from fastattn.problem import make_problem
from helpers import make_qkv, run_with_grads
from test_attention import GRADCHECK_CASES, MASK_KINDS, _mask, check_against_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def _attn(q, k, v, mask=None, **kw):
    return fastattn.attention(q, k, v, attn_mask=mask, **kw)


def _check(dtype, shape, **kw):
    return check_against_reference("cpu", "cpu", dtype, shape, **kw)


# --- gradcheck in float64 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(GRADCHECK_CASES))
def test_gradcheck_float64(ops, case):
    cfg = GRADCHECK_CASES[case]
    B, Hq, Hkv, Lq, Lk, Dqk, Dv = cfg["shape"]
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, Dqk, Dv, dtype=torch.float64)
    inputs = [q, k, v]
    mask = None
    if cfg.get("mask") == "bool":
        mask = torch.rand(B, 1, Lq, Lk) > 0.3
    elif cfg.get("mask") == "float":
        inputs.append(torch.randn(Hq, 1, Lk, dtype=torch.float64, requires_grad=True))

    def f(q, k, v, *m):
        torch.manual_seed(7)  # the same dropout seed for every evaluation
        return fastattn.attention(q, k, v, attn_mask=m[0] if m else mask, causal=cfg.get("causal", False),
                                  dropout_p=cfg.get("dropout_p", 0.0), return_lse=cfg.get("return_lse", False),
                                  backend="cpu")

    assert torch.autograd.gradcheck(f, inputs, atol=1e-7, rtol=1e-5)


def test_gradcheck_float64_gqa_mask_dropout_lse(ops):
    """Everything at once, with two query blocks and two key blocks in the backward (L > 128)."""
    q, k, v = make_qkv(1, 4, 2, 130, 133, 3, 2, dtype=torch.float64)
    bias = torch.randn(1, 4, 1, 133, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, bias):
        torch.manual_seed(3)
        out, lse = fastattn.attention(q, k, v, attn_mask=bias, causal="bottom_right", dropout_p=0.2,
                                      return_lse=True, backend="cpu")
        return out, lse

    assert torch.autograd.gradcheck(f, [q, k, v, bias], atol=1e-7, rtol=1e-5, fast_mode=True)


# --- parity on odd sizes ----------------------------------------------------------------------------------------
LENGTHS = [(1, 1), (7, 7), (97, 129), (129, 97), (1, 129), (129, 1)]
HEAD_DIMS = [24, 40, 80, 96, 160]
CAUSALS = [False, "top_left", "bottom_right"]
ODD = [(lq, lk, d, CAUSALS[i % 3]) for i, ((lq, lk), d) in enumerate(itertools.product(LENGTHS, HEAD_DIMS))]


@pytest.mark.parametrize("lq,lk,d,causal", ODD)
def test_odd_sizes_float32(ops, lq, lk, d, causal):
    _check(torch.float32, (1, 2, 1, lq, lk, d, d), causal=causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lq,lk,d,causal", ODD[::3])
def test_odd_sizes_low_precision(ops, dtype, lq, lk, d, causal):
    _check(dtype, (2, 2, 1, lq, lk, d, d), causal=causal, return_lse=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 4, 2, 300, 700, 64, 64), (1, 6, 1, 130, 77, 40, 96)])
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_several_blocks(ops, dtype, shape, causal):
    """More than one query block (128) and key block (forward 512, backward 128); Dv != Dqk; GQA and MQA."""
    _check(dtype, shape, causal=causal)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_forward_transposed_key_slots(ops, monkeypatch, threads, dtype, causal):
    """The float32 forward on the register tiles transposes each key block once per thread and reuses it for the
    thread's next query blocks (ForwardTile::transposed_keys).  Several query blocks per head (300 rows), key blocks
    the causal limit cuts differently per query block (1100 keys: 512 + 512 + 76), GQA heads that share the keys,
    one or two threads, bf16 inputs on the float32 path (FASTATTN_CPU_AMX=0): a stale or partly filled slot shows
    as an error far above float32 rounding."""
    monkeypatch.setenv("FASTATTN_CPU_AMX", "0")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(dtype, (2, 4, 2, 300, 1100, 64, 48), causal=causal)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_forward_single_key_slot(ops, causal):
    """Above 32 MiB of transposed keys per thread (here 62 key blocks of D = 256) ForwardTile keeps one slot and
    transposes every block again: the float32 forward against the float64 reference."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 1, 140, 256, generator=g)
    k = torch.randn(1, 1, 31300, 256, generator=g)
    v = torch.randn(1, 1, 31300, 32, generator=g)
    out = fastattn.attention(q, k, v, causal=causal, backend="cpu")
    ref = fastattn.attention(q.double(), k.double(), v.double(), causal=causal, backend="reference")
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("keys_major", ["1", "0"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [
    (1, 1, 1, 64, 2100, 261, 261),  # Perceiver's cross-attention: keys split over threads, D not a multiple of 16
    (2, 3, 3, 33, 700, 40, 24),     # Dv != D, a ragged last key block, a last column vector with one query
    (1, 2, 2, 16, 1030, 64, 64),    # the fewest queries: one column vector
    (1, 1, 1, 48, 20, 16, 16),      # one short key block
])
def test_forward_keys_major(ops, monkeypatch, keys_major, threads, dtype, shape):
    """A head's 16..64 queries (float32 on the register tiles, no dropout): the forward
    computes S^T = K Q^T and runs the online softmax down its columns (ForwardTile::step_keys_major).  Both that
    path and the row-major one (FASTATTN_CPU_KEYS_MAJOR=0) against the reference: outputs, LSE and the gradients
    of the backward that reads them."""
    monkeypatch.setenv("FASTATTN_CPU_AMX", "0")
    monkeypatch.setenv("FASTATTN_CPU_KEYS_MAJOR", keys_major)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(dtype, shape, return_lse=True)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("keys_major", ["1", "0"])
def test_forward_keys_major_blhd_layout(ops, monkeypatch, keys_major):
    """[B, L, H, D] storage read in place: key rows 12 heads x 200 floats apart (past small_gemm's far-stride
    limit, so the S^T product packs its K rows), Q^T transposed from strided rows."""
    monkeypatch.setenv("FASTATTN_CPU_KEYS_MAJOR", keys_major)
    _check(torch.float32, (2, 12, 12, 40, 900, 200, 200), return_lse=True, layout="blhd")


def _check_decoding_case(case, mask):
    """A decoding-shaped case (the dot-product and packed-GQA tests) with 2 threads: forward, LSE and backward
    against the reference."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check(case.get("dtype", torch.float32), case["shape"], causal=case.get("causal", False), mask=mask,
               return_lse=True, layout=case.get("layout", "bhld"))
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dot_keys", ["1", "0"])
@pytest.mark.parametrize("case", [
    dict(shape=(1, 4, 4, 1, 4100, 64, 64)),                        # decoding: one query, keys split over threads
    dict(shape=(2, 8, 2, 1, 1030, 40, 24), causal="bottom_right"),   # GQA, a ragged last key block (6 keys)
    dict(shape=(1, 2, 2, 3, 700, 128, 128), mask="bool_key_padding"),
    dict(shape=(1, 3, 3, 8, 520, 24, 24), mask="float_alibi_grad", causal="bottom_right"),  # 8 rows: the most
    dict(shape=(1, 2, 2, 5, 300, 64, 64), dtype=torch.bfloat16),
    dict(shape=(2, 12, 12, 2, 900, 64, 64), layout="blhd"),
])
def test_forward_dot_keys(ops, monkeypatch, dot_keys, case):
    """Query blocks of at most 8 rows (decoding) take their scores as dot products with the keys in place, 16 keys
    per short_nt call, instead of transposing each key block (ForwardTile::run's dot_keys); both paths
    (FASTATTN_CPU_DOT_KEYS=1 / 0) against the reference, forward and backward."""
    monkeypatch.setenv("FASTATTN_CPU_AMX", "0")
    monkeypatch.setenv("FASTATTN_CPU_DOT_KEYS", dot_keys)
    B, Hq, Hkv, Lq, Lk, D, Dv = case["shape"]
    mask = None
    if case.get("mask") == "bool_key_padding":
        mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
        mask[..., Lk - 250:] = False
    elif case.get("mask") == "float_alibi_grad":
        mask = torch.randn(Hq, 1, Lk, dtype=torch.float64).requires_grad_()
    _check_decoding_case(case, mask)


@pytest.mark.parametrize("pack", ["1", "0"])
@pytest.mark.parametrize("case", [
    dict(shape=(1, 8, 2, 1, 700, 64, 64)),  # group 4: the dot-product rows
    dict(shape=(2, 8, 4, 1, 300, 32, 32), mask="bool_key_padding"),
    dict(shape=(1, 6, 2, 1, 520, 24, 24), mask="float_alibi_grad"),  # a per-head mask: its head stride -> rows
    dict(shape=(1, 6, 3, 1, 200, 40, 40), mask="float_head_row_grad"),  # [B, Hq, 1, Lk]
    dict(shape=(1, 4, 1, 1, 200, 64, 48), causal="bottom_right"),  # one query sees every key: packed
    dict(shape=(1, 4, 1, 1, 200, 64, 64), causal="top_left"),  # one query sees key 0 only: not packed
    dict(shape=(1, 32, 2, 1, 1000, 64, 64)),  # group 16: the keys-major rows
    dict(shape=(1, 160, 2, 1, 300, 16, 16)),  # group 80: more rows than a keys-major block
    dict(shape=(1, 8, 2, 1, 600, 64, 64), dtype=torch.bfloat16),
    dict(shape=(2, 12, 4, 1, 900, 64, 64), layout="blhd"),
])
def test_forward_gqa_decoding_packs_query_heads(ops, monkeypatch, pack, case):
    """One query per head with GQA: the group's query heads become the rows of one block (attention_cpu.cpp
    pack_query_heads; FASTATTN_CPU_PACK_GQA=0 switches it off); forward, LSE and backward against the reference."""
    monkeypatch.setenv("FASTATTN_CPU_PACK_GQA", pack)
    B, Hq, Hkv, Lq, Lk, D, Dv = case["shape"]
    mask = None
    if case.get("mask") == "bool_key_padding":
        mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
        mask[1, ..., Lk - 100:] = False
        mask[0, ..., :] = False  # batch 0 sees no key: output 0, LSE -inf
    elif case.get("mask") == "float_alibi_grad":
        mask = torch.randn(Hq, 1, Lk, dtype=torch.float64).requires_grad_()
    elif case.get("mask") == "float_head_row_grad":
        mask = torch.randn(B, Hq, 1, Lk, dtype=torch.float64).requires_grad_()
    _check_decoding_case(case, mask)


def _keys_major_mask(kind, B, H, Lq, Lk):
    g = torch.Generator().manual_seed(8)
    if kind == "bool_key_padding":  # Perceiver's padded inputs: [B, 1, 1, Lk], one video's last keys hidden
        m = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
        m[1, ..., Lk - 700:] = False
        return m
    if kind == "bool_2d_rows_hidden":  # [Lq, Lk], two queries see no key at all
        m = torch.rand(Lq, Lk, generator=g) > 0.3
        m[[3, 40]] = False
        return m
    if kind == "float_head_bias_grad":  # [1, H, Lq, Lk]: read with both strides swapped, gradient summed over B
        return torch.randn(1, H, Lq, Lk, dtype=torch.float64, generator=g).requires_grad_()
    if kind == "float_alibi_grad":  # [H, 1, Lk]: query stride 0
        return torch.randn(H, 1, Lk, dtype=torch.float64, generator=g).requires_grad_()
    return None


@pytest.mark.parametrize("keys_major", ["1", "0"])
@pytest.mark.parametrize("mods", ["bool_key_padding", "bool_2d_rows_hidden", "float_head_bias_grad",
                                  "float_alibi_grad", "top_left", "bottom_right", "bottom_right_bias"])
def test_forward_keys_major_masks_and_causal(ops, monkeypatch, keys_major, mods):
    """The keys-major blocks' score modifications (modify_scores with keys_major): masks read through swapped
    strides, the causal limit per key row; 2 threads, so the keys also split."""
    monkeypatch.setenv("FASTATTN_CPU_KEYS_MAJOR", keys_major)
    B, H, Lq, Lk, D = 2, 3, 50, 1300, 40
    mask = _keys_major_mask("float_head_bias_grad" if mods == "bottom_right_bias" else mods, B, H, Lq, Lk)
    causal = mods.replace("_bias", "") if mods.startswith(("top_left", "bottom_right")) else False
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check(torch.float32, (B, H, H, Lq, Lk, D, D), causal=causal, mask=mask, return_lse=True)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("schedule", ["single", "striped", "two_pass"])
@pytest.mark.parametrize("shape", [(1, 3, 1, 150, 300, 32, 40), (2, 2, 2, 70, 260, 16, 16)])
def test_backward_schedules(ops, schedule, shape, monkeypatch):
    """The three backward schedules of csrc/cpu (choose_backward_schedule; FASTATTN_CPU_BACKWARD forces one)
    against the reference, with GQA, a mask gradient, dropout and the LSE gradient."""
    monkeypatch.setenv("FASTATTN_CPU_BACKWARD", schedule)
    _check(torch.float32, shape, causal="bottom_right", dropout_p=0.2, return_lse=True,
           mask=torch.randn(shape[0], shape[1], shape[3], shape[4], dtype=torch.float64).requires_grad_())


@pytest.mark.parametrize("key_slots", ["1", "0"])
@pytest.mark.parametrize("schedule", ["single", "striped"])
@pytest.mark.parametrize("dtype,shape,causal", [
    (torch.float32, (1, 3, 1, 150, 300, 32, 40), "bottom_right"),  # GQA: one kv head's slots serve 3 query heads
    (torch.float32, (2, 2, 2, 300, 1100, 64, 48), False),  # 3 query x 9 key blocks, the last key block short
    (torch.float32, (1, 2, 2, 260, 140, 24, 24), "top_left"),  # keys past the causal limit of early query blocks
    (torch.bfloat16, (1, 2, 1, 200, 333, 64, 64), "bottom_right"),  # bf16 keys converted before the transpose
    # 118 key blocks of d 256 + 256: 35 MB of slots per single-stripe item, over the 32 MB cap (mm_nt instead)
    (torch.float32, (2, 2, 1, 8, 15000, 256, 256), False),
])
def test_backward_key_slots(ops, monkeypatch, key_slots, schedule, dtype, shape, causal):
    """The row-major backward on the register tiles transposes each work item's key and value blocks once into
    per-thread slots (BackwardKeySlots) that all its query blocks reuse; FASTATTN_CPU_BWD_KEY_SLOTS=0 transposes
    them per pair (mm_nt).  Both against the reference, with stripes (a slot per stripe block), GQA, dropout, a
    mask gradient and the LSE gradient: a slot holding another block's keys shows far above rounding."""
    monkeypatch.setenv("FASTATTN_CPU_BWD_KEY_SLOTS", key_slots)
    monkeypatch.setenv("FASTATTN_CPU_BACKWARD", schedule)
    monkeypatch.setenv("FASTATTN_CPU_AMX", "0")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check(dtype, shape, causal=causal, dropout_p=0.1, return_lse=True,
               mask=torch.randn(shape[0], shape[1], shape[3], shape[4], dtype=torch.float64).requires_grad_())
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_masks(ops, kind, causal):
    from test_attention import B, H, LK, LQ
    _check(torch.float32, (B, H, 2, LQ, LK, 32, 24), causal=causal, mask=_mask(kind))


@pytest.mark.parametrize("mask_dtype", [torch.bfloat16, torch.float64])
def test_float_mask_of_another_dtype(ops, mask_dtype):
    """A float mask in another dtype than q is read as is (no conversion copy) and gets its gradient."""
    q, k, v = make_qkv(2, 2, 2, 20, 30, 16, 16)
    mask = torch.randn(2, 1, 20, 30).to(mask_dtype).requires_grad_()
    g = torch.randn(2, 2, 20, 16)
    got = run_with_grads(_attn, [q, k, v, mask], g, backend="cpu")
    want = run_with_grads(_attn, [q, k, v, mask], g, backend="reference")
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(got[2], want[2]):
        assert a.dtype == b.dtype
        tol = dict(atol=1e-2, rtol=1.6e-2) if a.dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a, b, **tol)


def test_fully_masked_rows(ops):
    q, k, v = make_qkv(1, 2, 2, 9, 12, 16, 16)
    mask = torch.ones(9, 12, dtype=torch.bool)
    mask[3] = False
    bias = torch.zeros(9, 12)
    bias[5] = float("-inf")
    for m, dead in ((mask, 3), (bias, 5)):
        out, lse, (dq, dk, dv) = run_with_grads(_attn, [q, k, v], mask=m, backend="cpu",
                                                return_lse=True, grad_lse=torch.randn(1, 2, 9))
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in (dq, dk, dv))
        assert (out[:, :, dead] == 0).all() and (dq[:, :, dead] == 0).all()
        assert torch.isneginf(lse[:, :, dead]).all()
    # bottom-right causal with Lq > Lk: the first Lq - Lk queries see no key
    _check(torch.float32, (1, 2, 2, 40, 30, 16, 16), causal="bottom_right", return_lse=True)
    # no keys at all: every row is dead
    q, k, v = (t.detach() for t in make_qkv(1, 2, 1, 9, 0, 16, 8))
    out, lse = ops.attention_fwd(q, k, v, None, None, 0, 0.25, 0.0)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("hq,hkv", [(4, 2), (6, 1), (8, 8)])
def test_gqa(ops, hq, hkv):
    _check(torch.float32, (2, hq, hkv, 21, 26, 32, 32), causal=True)


def test_return_lse_and_its_gradient(ops):
    _check(torch.float32, (2, 2, 1, 13, 30, 16, 24), causal="bottom_right", return_lse=True,
           mask=torch.randn(2, 1, 30, dtype=torch.float64).requires_grad_())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dropout_matches_reference_rng(ops, dtype):
    """The kernels regenerate the reference's Philox keep-mask, so dropout compares like everything else."""
    _check(dtype, (2, 2, 1, 21, 600, 16, 16), dropout_p=0.3, causal="top_left",
           mask=torch.randn(2, 1, 600, dtype=torch.float64).requires_grad_())


def test_dropout_threshold_rounding(ops):
    """round(p * 2^24) ties to even, like the reference (p = 2^-25 -> 0.5 -> 0; p = 3 * 2^-25 -> 1.5 -> 2)."""
    for p in (2.0 ** -25, 3 * 2.0 ** -25, 0.1, 0.5):
        q, k, v = make_qkv(1, 1, 1, 3, 5, 4, 4, requires_grad=False)
        seed = torch.tensor([12345], dtype=torch.int64)
        from fastattn.backends.reference import reference_attention
        got, _ = ops.attention_fwd(q, k, v, None, seed, 0, 0.5, p)
        want, _ = reference_attention(q, k, v, None, "none", 0.5, p, seed)
        torch.testing.assert_close(got, want)


def test_layouts(ops):
    # [B, L, H, D] storage viewed as [B, H, L, D]: read in place, outputs in the same memory order
    _check(torch.float32, (2, 3, 3, 17, 20, 40, 40), layout="blhd")
    q, k, v = make_qkv(2, 3, 3, 17, 20, 40, 40, requires_grad=False)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    out = fastattn.attention(q_t, k, v, backend="cpu")
    assert out.stride() == q_t.stride()
    # a strided head dim, and key rows that overlap (an expanded single key): copied once, still correct
    q_s = torch.randn(2, 3, 17, 80)[..., ::2]
    k_e = torch.randn(2, 3, 1, 40).expand(2, 3, 20, 40)
    got = fastattn.attention(q_s, k_e, v, backend="cpu")
    want = fastattn.attention(q_s, k_e, v, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- key splits of the forward (few query blocks against many keys: Perceiver's latents, decoding) ----------------
@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("lq,lk,causal,masked,dropout_p", [
    (64, 2100, False, False, 0.0),       # Perceiver-like: one query block, five key blocks
    (5, 1500, "bottom_right", True, 0.2),  # decoding-like, with a mask hiding whole splits of some rows
    (128, 1100, "top_left", False, 0.0),   # top-left causal: the later splits see no key of any row
])
def test_forward_key_splits(ops, threads, lq, lk, causal, masked, dropout_p):
    """With fewer (batch, head, query block) items than threads the forward splits the keys and merges the
    splits by their LSE; float64 against the reference (outputs, LSE and -- through the backward -- gradients)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(lq + lk)
        q, k, v = (torch.randn(1, 1, n, 24, dtype=torch.float64, generator=g, requires_grad=True)
                   for n in (lq, lk, lk))
        mask = None
        if masked:
            mask = torch.randn(1, 1, lq, lk, dtype=torch.float64, generator=g)
            mask[:, :, ::2, : lk // 2] = float("-inf")  # even rows: the first half of the keys hidden
        res = {}
        for name in ("cpu", "reference"):
            torch.manual_seed(11)
            out, lse = fastattn.attention(q, k, v, attn_mask=mask, causal=causal, dropout_p=dropout_p,
                                          return_lse=True, backend=name)
            grads = torch.autograd.grad((out * out).sum() + lse.sum(), (q, k, v))
            res[name] = (out, lse, *grads)
        for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], res["cpu"], res["reference"]):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)
    finally:
        torch.set_num_threads(previous)


# --- op-level checks ----------------------------------------------------------------------------------------------
def _op_samples():
    torch.manual_seed(0)
    q, k, v = (t.detach() for t in make_qkv(2, 4, 2, 13, 21, 16, 8))
    seed = torch.tensor([42], dtype=torch.int64)
    fmask = torch.randn(1, 4, 1, 21).expand(2, 4, 13, 21)
    bmask = (torch.rand(2, 1, 13, 21) > 0.2).expand(2, 4, 13, 21)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    return [
        (q, k, v, None, None, 0, 0.25, 0.0),
        (q_t, k, v, fmask, None, 1, 0.25, 0.0),
        (q, k, v, bmask, seed, 2, 0.3, 0.2),
        (q.double(), k.double(), v.double(), None, seed, 1, 0.25, 0.1),
        (q.bfloat16(), k.bfloat16(), v.bfloat16(), fmask, None, 2, 0.25, 0.0),
    ]


@pytest.mark.parametrize("i", range(5))
def test_opcheck(ops, i):
    q, k, v, mask, seed, causal, scale, p = _op_samples()[i]
    torch.library.opcheck(ops.attention_fwd.default, (q, k, v, mask, seed, causal, scale, p))
    out, lse = ops.attention_fwd(q, k, v, mask, seed, causal, scale, p)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if i % 2 else None
    needs = mask is not None and mask.dtype != torch.bool
    torch.library.opcheck(ops.attention_bwd.default,
                          (q, k, v, mask, seed, out, lse, dout, dlse, causal, scale, p, needs))
    grads = [torch.empty_like(t) for t in (q, k, v)]
    torch.library.opcheck(ops.attention_bwd_into.default,
                          (q, k, v, mask, seed, out, lse, dout, dlse, causal, scale, p, needs, *grads))


@pytest.mark.parametrize("batch,schedule", [(2, "auto"), (1, "auto"), (1, "two_pass")])
def test_backward_is_deterministic(ops, batch, schedule, monkeypatch):
    """Bitwise equal gradients run to run (no atomics; each gradient element has one writer and a fixed order),
    with each backward schedule (B * Hkv = 1 on several threads stripes the keys)."""
    monkeypatch.setenv("FASTATTN_CPU_BACKWARD", schedule)
    torch.manual_seed(1)
    q, k, v = make_qkv(batch, 4, 2 // batch, 333, 517, 64, 48)
    bias = torch.randn(1, 4, 333, 517, requires_grad=True)
    g_out, g_lse = torch.randn(batch, 4, 333, 48), torch.randn(batch, 4, 333)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(run_with_grads(_attn, [q, k, v, bias], g_out, g_lse, causal=True, dropout_p=0.1,
                                   return_lse=True, backend="cpu"))
    (o1, l1, g1), (o2, l2, g2) = runs
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_argument_errors_name_the_argument(ops):
    q, k, v = (t.detach() for t in make_qkv(1, 2, 1, 5, 6, 8, 8))
    with pytest.raises(RuntimeError, match="k: head dim"):
        ops.attention_fwd(q, k[..., :4], v, None, None, 0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="seed: required"):
        ops.attention_fwd(q, k, v, None, None, 0, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="mask: expected size"):
        ops.attention_fwd(q, k, v, torch.zeros(5, 6), None, 0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="causal"):
        ops.attention_fwd(q, k, v, None, None, 3, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="k, v: dtypes"):
        ops.attention_fwd(q, k.double(), v, None, None, 0, 1.0, 0.0)
    out, lse = ops.attention_fwd(q, k, v, None, None, 0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="lse: expected"):
        ops.attention_bwd(q, k, v, None, None, out, lse.double(), out, None, 0, 1.0, 0.0, False)


# --- q, k, v cut from one tensor: the packed path (fastattn.functional.PackedAttentionFunction) --------------------
def _graph_names(t):
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(f.name())
        stack += [n for n, _ in f.next_functions]
    return names


def _packed_and_unpacked(make_base, split, dtype=torch.float32, **kw):
    """Output and gradients through the packed path, and through AttentionFunction on copies of the same q, k, v
    (the dropout seed fixed); returns both and the names of the packed graph's nodes."""
    results = []
    for packed in (True, False):
        torch.manual_seed(7)
        base = make_base(dtype)
        q, k, v = split(base)
        if not packed:
            q, k, v = (t.clone() for t in (q, k, v))
        res = fastattn.attention(q, k, v, backend="cpu", **kw)
        outs = res if isinstance(res, tuple) else (res,)
        g = torch.Generator().manual_seed(3)
        douts = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
        leaves = [base] + ([kw["attn_mask"]] if kw.get("attn_mask") is not None and kw["attn_mask"].requires_grad
                           else [])
        grads = torch.autograd.grad(outs, leaves, douts)
        results.append(([o.detach() for o in outs], grads, _graph_names(outs[0])))
    return results


def _leaf(shape):
    return lambda dtype: torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(0)).requires_grad_()


PACKED_LAYOUTS = {
    # timm's Attention: qkv.reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    "timm_unbind": (_leaf((2, 37, 3 * 4 * 16)),
                    lambda x: x.view(2, 37, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)),
    # q, k, v = linear(x).chunk(3, dim=-1), then split into heads
    "chunk_last_dim": (_leaf((2, 19, 3 * 24)),
                       lambda x: [t.view(2, 19, 3, 8).transpose(1, 2) for t in x.chunk(3, dim=-1)]),
    # a packed [3, B, H, L, D] tensor indexed
    "leading_three": (_leaf((3, 1, 2, 130, 8)), lambda x: (x[0], x[1], x[2])),
}


@pytest.mark.parametrize("layout", sorted(PACKED_LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_packed_qkv_gradients_equal_the_unpacked_path(ops, layout, dtype):
    """The packed path writes dq, dk, dv into one gradient buffer (no UnbindBackward's stack); its outputs and
    gradients equal AttentionFunction's on copies of the same inputs bit for bit (the same kernels run)."""
    make, split = PACKED_LAYOUTS[layout]
    (o1, g1, names1), (o2, g2, names2) = _packed_and_unpacked(make, split, dtype, causal=True)
    assert "PackedAttentionFunctionBackward" in names1 and "UnbindBackward0" not in names1
    assert "AttentionFunctionBackward" in names2
    for a, b in zip(o1 + list(g1), o2 + list(g2)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_packed_qkv_with_mask_gradient_dropout_and_lse(ops):
    bias = torch.randn(1, 4, 37, 37, requires_grad=True)
    make, split = PACKED_LAYOUTS["timm_unbind"]
    (o1, g1, names1), (o2, g2, _) = _packed_and_unpacked(make, split, attn_mask=bias, dropout_p=0.2,
                                                         return_lse=True)
    assert "PackedAttentionFunctionBackward" in names1
    assert len(g1) == 2  # the base and the mask
    for a, b in zip(o1 + list(g1), o2 + list(g2)):
        assert torch.equal(a, b)


def test_packed_qkv_gradcheck_float64(ops):
    x = torch.randn(1, 6, 3 * 2 * 4, dtype=torch.float64, requires_grad=True)

    def f(x):
        q, k, v = x.view(1, 6, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        return fastattn.attention(q, k, v, causal="bottom_right", backend="cpu")
    assert "PackedAttentionFunctionBackward" in _graph_names(f(x))
    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("case", ["gqa", "partial_cover", "k_detached", "separate_tensors", "no_grad_base"])
def test_packed_path_falls_back_where_it_does_not_apply(ops, case):
    """Views that do not cover their base exactly, or that autograd must treat separately, take
    AttentionFunction -- with the same gradients as on copies."""
    x = torch.randn(2, 11, 4, 3, 8, requires_grad=True)  # four slots: q, k, v and one more
    q, k, v = x[:, :, 0].transpose(1, 2), x[:, :, 1].transpose(1, 2), x[:, :, 2].transpose(1, 2)
    if case == "gqa":
        k, v = k[:, :1], v[:, :1]
    elif case == "k_detached":
        k = k.detach()
    elif case == "separate_tensors":
        k = torch.randn(2, 3, 11, 8, requires_grad=True)
    elif case == "no_grad_base":
        x = x.detach()
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fastattn.attention(q, k, v, backend="cpu")
    names = _graph_names(out)
    assert "PackedAttentionFunctionBackward" not in names and "AttentionFunctionBackward" in names
    leaves = [t for t in (x, q, k, v) if t.requires_grad and t.grad_fn is None]
    got = torch.autograd.grad(out, leaves, torch.ones_like(out))
    copies = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = fastattn.attention(*copies, backend="cpu")
    dq, dk, dv = torch.autograd.grad(ref, copies, torch.ones_like(ref))
    if case in ("partial_cover", "k_detached"):  # x's gradient: q's slot as on copies; no gradient in slot 3
        assert torch.equal(got[0][:, :, 0], dq.transpose(1, 2))
        assert not got[0][:, :, 3].any()
        if case == "k_detached":
            assert not got[0][:, :, 1].any()
        else:
            assert torch.equal(got[0][:, :, 1], dk.transpose(1, 2))
    else:
        assert all(torch.isfinite(g).all() for g in got)


@pytest.mark.parametrize("watch", ["retain_grad", "hook"])
@pytest.mark.parametrize("entry", ["attention", "temporal_attention"])
def test_packed_path_stands_aside_for_hooks_on_q_k_v(ops, watch, entry):
    """The packed path takes q, k, v out of the graph; with retain_grad() or a hook on one of them it is not taken,
    so they see their gradients."""
    x = torch.randn(2, 12, 3, 2, 8, requires_grad=True)
    q, k, v = x.unbind(2) if entry == "temporal_attention" else x.permute(2, 0, 3, 1, 4).unbind(0)
    seen = []
    if watch == "retain_grad":
        k.retain_grad()
    else:
        k.register_hook(lambda g: seen.append(g.clone()))
    if entry == "attention":
        out = fastattn.attention(q, k, v, backend="cpu")
    else:
        out = fastattn.temporal_attention(q, k, v, num_frames=3, backend="cpu")
    assert "PackedAttentionFunctionBackward" not in _graph_names(out)
    out.sum().backward()
    got = k.grad if watch == "retain_grad" else seen[0]
    want = x.grad[:, :, 1] if entry == "temporal_attention" else x.grad[:, :, 1].transpose(1, 2)
    assert got is not None and torch.equal(got, want)


def test_packed_path_switched_off_by_the_environment(ops, monkeypatch):
    x = torch.randn(2, 12, 3, 2, 8, requires_grad=True)
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
    assert "PackedAttentionFunctionBackward" in _graph_names(fastattn.attention(q, k, v, backend="cpu"))
    monkeypatch.setenv("FASTATTN_PACKED_QKV", "0")
    assert "PackedAttentionFunctionBackward" not in _graph_names(fastattn.attention(q, k, v, backend="cpu"))


def test_attention_bwd_into_errors_name_the_argument(ops):
    q, k, v = (t.detach() for t in make_qkv(1, 2, 1, 5, 6, 8, 8))
    out, lse = ops.attention_fwd(q, k, v, None, None, 0, 1.0, 0.0)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    with pytest.raises(RuntimeError, match="dk: expected a CPU Float tensor of size"):
        ops.attention_bwd_into(q, k, v, None, None, out, lse, out, None, 0, 1.0, 0.0, False, dq, dk[..., :4], dv)
    with pytest.raises(RuntimeError, match="dv: expected a CPU Float tensor"):
        ops.attention_bwd_into(q, k, v, None, None, out, lse, out, None, 0, 1.0, 0.0, False, dq, dk, dv.double())
    with pytest.raises(RuntimeError, match="dq: its last dimension must be contiguous"):
        ops.attention_bwd_into(q, k, v, None, None, out, lse, out, None, 0, 1.0, 0.0, False,
                               torch.empty(1, 2, 8, 5).transpose(2, 3), dk, dv)


# --- long sequences, other code paths (in a child process: its own peak memory, its own environment) ------------
def _run_child(code: str, env_extra=None, timeout=600):
    env = dict(os.environ, **(env_extra or {}))
    env["FASTATTN_NO_JIT"] = "1" if _ext.how_loaded() == "prebuilt fastattn._C" else env.get("FASTATTN_NO_JIT", "0")
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_long_sequence_32k_runs_in_linear_memory(ops):
    """L = 32k, D = 64, fp32 forward: an [L, L] float32 buffer would be 4 GiB; the kernels need a few MB."""
    res = _run_child("""
        import json, resource, torch, fastattn
        from fastattn.backends.reference import reference_attention
        torch.manual_seed(0)
        L, D = 32768, 64
        q, k, v = (torch.randn(1, 1, L, D) for _ in range(3))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out, lse = fastattn.attention(q, k, v, causal=True, return_lse=True, backend="cpu")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # causal: row i sees keys <= i; compare a few rows with the reference, each on its own
        err = 0.0
        for i in (0, 1, 4097, L - 1):
            r, _ = reference_attention(q[:, :, i:i + 1].double(), k[:, :, :i + 1].double(), v[:, :, :i + 1].double(),
                                       None, "none", D ** -0.5)
            err = max(err, (out[0, 0, i].double() - r[0, 0, 0]).abs().max().item())
        print(json.dumps({"extra_mib": (peak - base) / 1024, "err": err, "finite": bool(torch.isfinite(out).all())}))
    """)
    assert res["finite"] and res["err"] < 1e-4, res
    assert res["extra_mib"] < 1024, f"the 32k forward grew the peak RSS by {res['extra_mib']:.0f} MiB"


def test_fallback_paths_without_blas_tiles_or_vector_isa(ops):
    """FASTATTN_CPU_BLAS=0 (the plain-loop products of a torch without BLAS symbols), FASTATTN_CPU_GEMM=blas (the
    float32 products in BLAS instead of the register tiles), the AVX2 row loops and tiles (FASTATTN_CPU_ISA=avx2:
    what AVX2-only CPUs run, checked on AVX-512 machines too) and the x86-64 baseline row loops
    (FASTATTN_CPU_ISA=baseline, which also turns the tiles off) give the reference's results too."""
    code = """
        import json, torch, fastattn
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 2, 150, 40, requires_grad=True) for _ in range(3))
        bias = torch.randn(1, 2, 150, 150, requires_grad=True)
        res = {}
        for name in ("cpu", "reference"):
            torch.manual_seed(1)  # the same dropout seed
            out = fastattn.attention(q, k, v, attn_mask=bias, causal=True, dropout_p=0.1, backend=name)
            grads = torch.autograd.grad(out, (q, k, v, bias), torch.ones_like(out))
            res[name] = [out] + list(grads)
        err = max((a - b).abs().max().item() for a, b in zip(res["cpu"], res["reference"]))
        print(json.dumps({"err": err}))
    """
    for env in ({"FASTATTN_CPU_BLAS": "0"}, {"FASTATTN_CPU_GEMM": "blas"}, {"FASTATTN_CPU_ISA": "avx2"},
                {"FASTATTN_CPU_ISA": "baseline"}):
        res = _run_child(code, env)
        assert res["err"] < 1e-4, (env, res)


# --- dispatch ------------------------------------------------------------------------------------------------------
def test_dispatch_picks_cpu_when_built(ops, monkeypatch):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        q, k, v = make_qkv(1, 2, 2, 8, 8, 16, 16, dtype=dtype)
        p = make_problem(q, k, v, causal=True, return_lse=True)
        assert dispatch.select(p).name == "cpu"
        assert "chosen: cpu" in fastattn.explain(q, k, v)


def test_dispatch_explains_when_not_built(monkeypatch):
    monkeypatch.setitem(_ext._state, "done", True)
    monkeypatch.setitem(_ext._state, "ok", False)
    monkeypatch.setitem(_ext._state, "error", "the C++ extension is not available: (test) " + _ext.BUILD_HINT)
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, 16)
    p = make_problem(q, k, v)
    assert dispatch.select(p).name == "sdpa"
    text = fastattn.explain(q, k, v)
    assert "cpu: rejected: the C++ extension is not available" in text and "pip install" in text
    with pytest.raises(RuntimeError, match="cpu: the C\\+\\+ extension is not available"):
        fastattn.attention(q, k, v, backend="cpu")
    # other devices: declined without touching the extension
    meta = [t.detach().to("meta") for t in (q, k, v)]
    from fastattn.backends import BACKENDS
    assert BACKENDS["cpu"].reasons(make_problem(*meta)) == ["runs on CPU tensors only, got meta tensors"]
