"""fastattn.attention against the float64 reference: odd sizes, causal alignments, masks, GQA, dropout, LSE.

Each comparison runs forward and backward on the backend under test, the reference in the same dtype and
the reference in float64, and applies the tolerance rule to the output, the LSE and every gradient.
On CPU the Triton kernels run in Triton's interpreter; with a GPU the same tests run on CUDA tensors.
"""
import itertools

import pytest
import torch

import fastattn
from helpers import DEVICES_BACKENDS, assert_close_rule, make_qkv, run_with_grads


def _attention(q, k, v, mask=None, **kw):
    return fastattn.attention(q, k, v, attn_mask=mask, **kw)


def check_against_reference(backend, device, dtype, shape, causal=False, mask=None, dropout_p=0.0,
                            return_lse=False, layout="bhld"):
    """shape = (B, Hq, Hkv, Lq, Lk, Dqk, Dv).  mask: None or a tensor (its requires_grad is honoured)."""
    B, Hq, Hkv, Lq, Lk, Dqk, Dv = shape
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, Dqk, Dv, dtype=torch.float64)
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    g_out = torch.randn(B, Hq, Lq, Dv, dtype=torch.float64)
    g_lse = torch.randn(B, Hq, Lq, dtype=torch.float64) if return_lse else None
    kw = dict(causal=causal, dropout_p=dropout_p, return_lse=return_lse)

    def run(backend_name, run_dtype):
        tensors = [t.detach().to(device=device, dtype=run_dtype if t.is_floating_point() else t.dtype)
                   .requires_grad_(t.requires_grad) for t in inputs]
        if layout == "blhd":  # [B, L, H, D] storage viewed as [B, H, L, D]
            tensors[:3] = [t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in tensors[:3]]
        torch.manual_seed(1234)  # the same dropout seed for every run
        return run_with_grads(_attention, tensors, g_out.to(device), None if g_lse is None else g_lse.to(device),
                              backend=backend_name, **kw)

    fast = run(backend, dtype)
    lowp = run("reference", dtype)
    ref = run("reference", torch.float64)
    assert_close_rule(fast[0], lowp[0], ref[0], "output")
    if return_lse:
        assert fast[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close_rule(fast[1], lowp[1], ref[1], "lse")
    for name, a, b, c in zip(["dq", "dk", "dv", "dmask"], fast[2], lowp[2], ref[2]):
        assert a is not None, f"{name} missing"
        assert a.shape == c.shape, f"{name}: shape {tuple(a.shape)} != {tuple(c.shape)}"
        assert_close_rule(a, b, c, name)
    return fast


# --- odd sizes: every (L, D) pair, the causal alignment rotating through the cases --------------------------
LENGTHS = [(1, 1), (7, 7), (97, 129), (129, 97), (1, 129), (129, 1)]
HEAD_DIMS = [(24, 24), (40, 40), (64, 64), (80, 80), (128, 128), (160, 160), (64, 40), (24, 160)]
CAUSALS = [False, "top_left", "bottom_right"]
GRID = [(lq, lk, dqk, dv, CAUSALS[i % 3])
        for i, ((lq, lk), (dqk, dv)) in enumerate(itertools.product(LENGTHS, HEAD_DIMS))]


@pytest.mark.parametrize("device,backend", DEVICES_BACKENDS)
@pytest.mark.parametrize("lq,lk,dqk,dv,causal", GRID)
def test_odd_sizes(device, backend, lq, lk, dqk, dv, causal):
    check_against_reference(backend, device, torch.float32, (1, 2, 1, lq, lk, dqk, dv), causal=causal)


@pytest.mark.parametrize("device,backend", DEVICES_BACKENDS)
@pytest.mark.parametrize("causal", CAUSALS)
@pytest.mark.parametrize("lq,lk", [(7, 7), (33, 17), (17, 33)])
def test_causal_alignments(device, backend, causal, lq, lk):
    check_against_reference(backend, device, torch.float32, (2, 2, 2, lq, lk, 16, 16), causal=causal)


# --- masks ------------------------------------------------------------------------------------------------
B, H, LQ, LK = 2, 4, 19, 23


def _mask(kind):
    if kind == "bool_2d":
        return torch.rand(LQ, LK) > 0.3
    if kind == "bool_key_padding":  # [B, 1, 1, Lk]
        m = torch.ones(B, 1, 1, LK, dtype=torch.bool)
        m[0, ..., 15:] = False
        return m
    if kind == "bool_4d":
        return torch.rand(B, H, LQ, LK) > 0.3
    if kind == "float_2d":
        return torch.randn(LQ, LK, dtype=torch.float64)
    if kind == "float_neg_inf":
        m = torch.randn(B, 1, LQ, LK, dtype=torch.float64)
        m[:, :, :, ::3] = float("-inf")
        return m
    if kind == "float_head_bias_grad":  # learned per-head bias [1, H, Lq, Lk]: gradient summed over batch
        return torch.randn(1, H, LQ, LK, dtype=torch.float64).requires_grad_()
    if kind == "float_alibi_grad":  # [H, 1, Lk]: broadcast over batch and queries
        return torch.randn(H, 1, LK, dtype=torch.float64).requires_grad_()
    if kind == "float_4d_grad":
        return torch.randn(B, H, LQ, LK, dtype=torch.float64).requires_grad_()
    raise ValueError(kind)


MASK_KINDS = ["bool_2d", "bool_key_padding", "bool_4d", "float_2d", "float_neg_inf", "float_head_bias_grad",
              "float_alibi_grad", "float_4d_grad"]


@pytest.mark.parametrize("device,backend", DEVICES_BACKENDS)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_masks(device, backend, kind, causal):
    check_against_reference(backend, device, torch.float32, (B, H, 2, LQ, LK, 32, 24), causal=causal,
                            mask=_mask(kind))


@pytest.mark.parametrize("device,backend", DEVICES_BACKENDS)
def test_fully_masked_rows_give_zero_output_and_zero_grads(device, backend):
    q, k, v = make_qkv(1, 2, 2, 9, 12, 16, 16, device=device)
    mask = torch.ones(9, 12, dtype=torch.bool, device=device)
    mask[3] = False
    bias = torch.zeros(9, 12, device=device)
    bias[5] = float("-inf")
    for m in (mask, bias):
        out, _, (dq, dk, dv) = run_with_grads(_attention, [q, k, v], mask=m, backend=backend)
        dead = 3 if m.dtype == torch.bool else 5
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in (dq, dk, dv))
        assert (out[:, :, dead] == 0).all()
        assert (dq[:, :, dead] == 0).all()
    # bottom-right causal with Lq > Lk: the first Lq - Lk queries see no key
    out, lse, (dq, dk, dv) = run_with_grads(_attention, [q[:, :, :9], k[:, :, :4], v[:, :, :4]],
                                            causal="bottom_right", backend=backend,
                                            **({"return_lse": True} if backend != "sdpa" else {}))
    assert (out[:, :, :5] == 0).all() and torch.isfinite(out).all()
    assert (dq[:, :, :5] == 0).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    if lse is not None:
        assert torch.isinf(lse[:, :, :5]).all() and (lse[:, :, :5] < 0).all()


# --- GQA, layouts, LSE, dtypes ---------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICES_BACKENDS)
@pytest.mark.parametrize("hq,hkv", [(4, 2), (6, 1), (8, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_mqa(device, backend, hq, hkv, causal):
    check_against_reference(backend, device, torch.float32, (2, hq, hkv, 21, 26, 32, 32), causal=causal)


@pytest.mark.parametrize("device,backend", DEVICES_BACKENDS)
def test_blhd_layout_strided_inputs(device, backend):
    check_against_reference(backend, device, torch.float32, (2, 3, 3, 17, 20, 40, 40), layout="blhd")


@pytest.mark.parametrize("device,backend", [db for db in DEVICES_BACKENDS if db[1] != "sdpa"])
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_return_lse_and_its_gradient(device, backend, causal):
    check_against_reference(backend, device, torch.float32, (2, 2, 1, 13, 30, 16, 24), causal=causal,
                            return_lse=True, mask=torch.randn(2, 1, 30, dtype=torch.float64).requires_grad_())


@pytest.mark.parametrize("device,backend", DEVICES_BACKENDS)
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_wide_heads_perceiver(device, backend, causal):
    """Head dims 257..512 (Perceiver's 261 Fourier-feature channels; Dv differs): the Triton kernels' d512 tiles,
    on the split-KV path (few latents, many inputs), in float32 (float64 stops at 256 on Triton)."""
    check_against_reference(backend, device, torch.float32, (1, 1, 1, 9, 300, 261, 300), causal=causal,
                            mask=torch.randn(1, 1, 1, 300, dtype=torch.float64).requires_grad_())


@pytest.mark.parametrize("device,backend", DEVICES_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decode_single_query(device, backend, dtype):
    check_against_reference(backend, device, dtype, (3, 4, 2, 1, 77, 64, 64), causal="bottom_right")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,causal", [((2, 4, 2, 128, 128, 64, 64), False), ((1, 3, 3, 257, 511, 128, 128), True),
                                          ((2, 2, 1, 97, 129, 80, 80), "bottom_right"),
                                          ((1, 2, 2, 64, 200, 256, 256), False),
                                          ((2, 1, 1, 128, 3000, 261, 261), False),
                                          ((1, 2, 2, 300, 300, 40, 160), True)])
def test_low_precision_tolerance_rule_gpu(backend, dtype, shape, causal):
    check_against_reference(backend, "cuda", dtype, shape, causal=causal,
                            mask=None if causal else _rand_bias(shape))


def _rand_bias(shape):
    B_, Hq, _, Lq, Lk, _, _ = shape
    return torch.randn(1, Hq, Lq, Lk, dtype=torch.float64).requires_grad_()


# --- dropout ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", [db for db in DEVICES_BACKENDS if db[1] != "sdpa"])
def test_dropout_matches_reference_rng(device, backend):
    """The reference backend regenerates the kernels' Philox stream, so dropout is compared exactly."""
    check_against_reference(backend, device, torch.float32, (2, 2, 1, 21, 37, 16, 16), dropout_p=0.3,
                            causal="top_left", mask=torch.randn(2, 1, 37, dtype=torch.float64).requires_grad_())


@pytest.mark.parametrize("device,backend", DEVICES_BACKENDS)
def test_dropout_seeding(device, backend):
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, 16, device=device, requires_grad=False)
    v = torch.ones_like(v)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(fastattn.attention(q, k, v, dropout_p=0.5, backend=backend))
    assert torch.equal(runs[0], runs[1]), "same seed must give the same result"
    assert not torch.equal(runs[0], runs[2]), "different seeds must give different masks"
    # with v = 1 every output element is sum_j P_ij * keep_ij / (1 - p); its mean is 1
    assert abs(runs[0].mean().item() - 1.0) < 0.1
    torch.manual_seed(0)
    no_drop = fastattn.attention(q, k, v, dropout_p=0.0, backend=backend)
    assert torch.allclose(no_drop, torch.ones_like(no_drop), atol=1e-5)


# --- gradcheck in float64 --------------------------------------------------------------------------------
GRADCHECK_CASES = {
    "plain": dict(shape=(1, 2, 2, 5, 6, 4, 3)),
    "causal_top_left": dict(shape=(1, 2, 1, 6, 5, 4, 4), causal=True),
    "causal_bottom_right": dict(shape=(1, 2, 1, 6, 4, 3, 5), causal="bottom_right"),
    "bool_mask": dict(shape=(2, 2, 2, 4, 6, 4, 4), mask="bool"),
    "float_mask_grad": dict(shape=(2, 2, 1, 4, 5, 4, 4), mask="float"),
    "dropout": dict(shape=(1, 2, 2, 5, 6, 4, 4), dropout_p=0.25),
    "lse": dict(shape=(1, 2, 1, 5, 7, 4, 4), return_lse=True, mask="float"),
}


@pytest.mark.parametrize("device,backend", DEVICES_BACKENDS)
@pytest.mark.parametrize("case", sorted(GRADCHECK_CASES))
def test_gradcheck_float64(device, backend, case):
    cfg = GRADCHECK_CASES[case]
    if backend == "sdpa" and (cfg.get("return_lse") or cfg.get("dropout_p")):
        pytest.skip("sdpa: no LSE output; its dropout RNG is torch's, checked in test_dropout_seeding")
    B_, Hq, Hkv, Lq, Lk, Dqk, Dv = cfg["shape"]
    q, k, v = make_qkv(B_, Hq, Hkv, Lq, Lk, Dqk, Dv, dtype=torch.float64, device=device)
    inputs = [q, k, v]
    if cfg.get("mask") == "bool":
        mask = torch.rand(B_, 1, Lq, Lk, device=device) > 0.3
    elif cfg.get("mask") == "float":
        mask = torch.randn(Hq, 1, Lk, dtype=torch.float64, device=device, requires_grad=True)
        inputs.append(mask)
    else:
        mask = None

    def f(q, k, v, *m):
        torch.manual_seed(7)  # fixed dropout mask across gradcheck's evaluations
        res = fastattn.attention(q, k, v, attn_mask=m[0] if m else mask, causal=cfg.get("causal", False),
                                 dropout_p=cfg.get("dropout_p", 0.0), return_lse=cfg.get("return_lse", False),
                                 backend=backend)
        return res

    assert torch.autograd.gradcheck(f, inputs, atol=1e-7, rtol=1e-5)


# --- split-KV (flash-decoding) ----------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", [db for db in DEVICES_BACKENDS if db[1] == "triton"])
@pytest.mark.parametrize("splits", ["auto", "3", "64"])
@pytest.mark.parametrize("case", ["perceiver", "decode_gqa", "causal_mask_dropout", "all_rows_dead_in_a_split"])
def test_split_kv_matches_reference(device, backend, splits, case, monkeypatch):
    """Keys split across programs, partial results merged by their LSE: forward, LSE and gradients."""
    if splits != "auto":
        monkeypatch.setenv("FASTATTN_NUM_SPLITS", splits)
    if case == "perceiver":      # latents vs a long input, v head dim != qk head dim
        check_against_reference(backend, device, torch.float32, (1, 1, 1, 8, 1000, 40, 24), return_lse=True)
    elif case == "decode_gqa":   # one new query against a KV cache
        check_against_reference(backend, device, torch.float32, (2, 4, 2, 1, 300, 64, 64), causal="bottom_right")
    elif case == "causal_mask_dropout":
        check_against_reference(backend, device, torch.float32, (1, 2, 1, 20, 257, 16, 16), causal=True,
                                dropout_p=0.2, mask=torch.randn(2, 1, 257, dtype=torch.float64).requires_grad_())
    else:                        # bottom-right with Lq > Lk: whole rows see no key in any split
        check_against_reference(backend, device, torch.float32, (1, 2, 2, 40, 30, 16, 16),
                                causal="bottom_right", return_lse=True)


def test_split_kv_is_chosen_from_the_shapes():
    from fastattn.kernels.triton_attention import choose_num_splits
    assert choose_num_splits(programs=4, len_k=50176, block_n=64, sms=132) == 66   # Perceiver: ~2 waves
    assert choose_num_splits(programs=4096, len_k=4096, block_n=64, sms=132) == 1  # the GPU is full
    assert choose_num_splits(programs=8, len_k=200, block_n=64, sms=132) == 1      # too few keys to split
