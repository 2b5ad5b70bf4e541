"""NaN and inf inputs: every backend and op propagates them the same way.

The rule (fastattn/backends/reference.py `safe_softmax`, as torch's math attention and FlashAttention): a row
whose every score is -inf (fully masked, or a causal row that sees no key) is the 0 row with LSE -inf; any other
row goes through softmax, so a NaN score -- a NaN in the row's query, in a key it sees or in the mask, or an
inf score -- makes the row's output and LSE NaN.  A NaN in a value row reaches every query row that sees that
key.  Rows that see no NaN are unaffected.  (The CPU kernels used to turn a row whose max was not finite into a
0 row, silently: row max skips NaN.)

One exception, in dq only: see `check_dq_nan`.

Each case compares the NaN pattern of the output, the LSE and the gradients with the reference backend in
float64, and the finite values under the tolerance rule.
"""
import pytest
import torch

import fastattn
from fastattn.spacetime import spatial_attention, temporal_attention
from fastattn.window import window_attention
from helpers import assert_close_rule, triton_device

NAN, INF = float("nan"), float("inf")

# (device, backend) pairs: fastattn's kernels -- the compiled CPU ones, Triton (on a GPU, or its interpreter), the
# CUDA C++ ones where a GPU is present -- and torch's CPU SDPA through the sdpa backend, whose behaviour is known:
# its flash kernel turns a row whose scores are all NaN into zeros (its row max skips NaN too), so it is held to
# the rule only where some score of a row is finite.  torch's GPU kernels are not fastattn's to pin down here.
PAIRS = [("cpu", "cpu"), ("cpu", "sdpa"), ("cpu", "triton")]
if torch.cuda.is_available():
    PAIRS += [("cuda", "cuda")]


def _device(device, backend):
    return triton_device() if backend == "triton" else device


def _poison(t, index, value=NAN):
    t = t.detach().clone()
    t[index] = value
    return t


def _dense_case(case, dtype, device):
    """(q, k, v, mask, causal) with one poisoned element; shapes small enough for Triton's interpreter."""
    g = torch.Generator().manual_seed(11)
    B, H, Lq, Lk, D = 2, 2, 37, 45, 24
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for L in (Lq, Lk, Lk))
    mask, causal = None, False
    if case == "query_nan":       # one query row's scores are all NaN
        q = _poison(q, (1, 0, 5, 3))
    elif case == "query_inf":     # scores +inf and -inf in one row: softmax gives NaN (inf - inf)
        q = _poison(q, (0, 1, 30, 0), INF)
    elif case == "key_nan":       # one score of every row of (0, 1) is NaN
        k = _poison(k, (0, 1, 17, 2))
    elif case == "value_nan":     # P V picks up the NaN in every row that gives key 9 a weight
        v = _poison(v, (1, 1, 9, 4))
    elif case == "causal_key_nan":  # only the rows that see key 20 (i >= 20 - (Lk - Lq), bottom-right) are NaN
        k, causal = _poison(k, (1, 0, 20, 0)), "bottom_right"
    elif case == "mask_nan":      # a NaN in an additive mask: one score
        mask = torch.zeros(Lq, Lk, dtype=torch.float64).index_put_((torch.tensor([12]), torch.tensor([40])),
                                                                  torch.tensor(NAN, dtype=torch.float64))
    elif case == "masked_row_beside_nan":  # a fully masked row stays the 0 row next to a NaN row
        mask = torch.ones(Lq, Lk, dtype=torch.bool)
        mask[7] = False
        q = _poison(q, (0, 0, 8, 1))
    else:
        raise AssertionError(case)
    cast = lambda t: t.to(device=device, dtype=dtype)
    if mask is not None:
        mask = mask.to(device) if mask.dtype == torch.bool else cast(mask)
    return cast(q), cast(k), cast(v), mask, causal


DENSE_CASES = ["query_nan", "query_inf", "key_nan", "value_nan", "causal_key_nan", "mask_nan",
               "masked_row_beside_nan"]
ALL_NAN_ROW = {"query_nan", "query_inf", "masked_row_beside_nan"}
# torch's kernels apply a boolean mask by adding -inf to the scores, so a NaN in a key that a row does not see
# still reaches it (NaN + -inf = NaN); the sdpa backend folds bottom-right causal into such a mask.
MASKED_KEY_NAN = {"causal_key_nan"}


def _outputs_and_grads(fn, tensors, grad_seed=3):
    tensors = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*tensors)
    out, lse = out if isinstance(out, tuple) else (out, None)
    g = torch.Generator().manual_seed(grad_seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, [t for t in tensors if t.requires_grad], dout)
    return [x.detach() for x in (out, lse, *grads) if x is not None]


def check_dq_nan(dq, dq_ref64, nan_rows):
    """dq = dS K: a masked score's dS is exactly 0, but 0 * NaN is NaN, so a NaN key reaches the dq of rows that
    do not see it wherever the product is formed -- every row in the (dense) reference, the rows of the key's
    tile in a kernel that skips the tiles a row cannot see.  So the rule for dq: NaN in every row that sees a
    NaN, and nowhere the float64 reference is finite."""
    assert torch.isnan(dq)[nan_rows].all(), "dq: a row that sees a NaN has finite dq entries"
    extra = torch.isnan(dq) & ~torch.isnan(dq_ref64)
    assert not extra.any(), f"dq: NaN at {extra.sum().item()} elements where the float64 reference is finite"


def _compare(run, tensors64, dtype, device, names):
    """run(backend_name, *tensors) on the backend under test and on the reference in the same dtype (the
    tolerance rule's yardstick) and in float64 (the oracle): the same NaN and inf positions as the oracle, and
    the finite values under the tolerance rule.  `run` closes over the backend under test as "fast"."""
    low = [t.to(device=device, dtype=dtype) for t in tensors64]
    fast = _outputs_and_grads(lambda *t: run("fast", *t), low)
    lowp = _outputs_and_grads(lambda *t: run("reference", *t), low)
    ref = _outputs_and_grads(lambda *t: run("reference", *t), tensors64)
    assert len(fast) == len(ref) == len(names)
    nan_rows = torch.isnan(ref[0].cpu()).any(-1)  # the output rows that see a NaN
    for name, a, b, c in zip(names, fast, lowp, ref):
        a, b, c = a.cpu(), b.cpu(), c.cpu()
        if name == "dq":
            check_dq_nan(a, c, nan_rows)
            a, b = a.where(~torch.isnan(c), NAN), b.where(~torch.isnan(c), NAN)
        for what, x in (("backend", a), ("low-precision reference", b)):
            assert torch.equal(torch.isnan(x), torch.isnan(c)), (
                f"{name}: the {what} has NaN at {torch.isnan(x).sum().item()} elements, "
                f"the float64 reference at {torch.isnan(c).sum().item()}")
            assert torch.equal(torch.isinf(x), torch.isinf(c)), f"{name}: the {what}'s infinities differ"
        finite = torch.isfinite(c)
        assert_close_rule(a.where(finite, 0), b.where(finite, 0), c.where(finite, 0), name)
    return fast


@pytest.mark.parametrize("case", DENSE_CASES)
@pytest.mark.parametrize("device,backend", PAIRS)
def test_dense_nan_propagates_as_the_reference(device, backend, case):
    if backend == "sdpa" and case in ALL_NAN_ROW:
        pytest.skip("torch's CPU flash kernel zeros a row whose scores are all NaN (see PAIRS)")
    if backend == "sdpa" and case in MASKED_KEY_NAN:
        pytest.skip("torch adds the folded causal mask to the scores: a masked NaN key reaches every row")
    device = _device(device, backend)
    q, k, v, mask, causal = _dense_case(case, torch.float64, device)
    lse = backend != "sdpa"

    def run(backend_name, q_, k_, v_):
        m = mask.to(q_.dtype) if mask is not None and mask.is_floating_point() else mask
        return fastattn.attention(q_, k_, v_, attn_mask=m, causal=causal, return_lse=lse,
                                  backend=backend if backend_name == "fast" else backend_name)

    fast = _compare(run, (q, k, v), torch.float32, device,
                    ["out", "lse", "dq", "dk", "dv"] if lse else ["out", "dq", "dk", "dv"])
    out = fast[0]
    # the shape of the rule itself, not only agreement with the reference:
    nan_rows = torch.isnan(out).any(-1)
    assert nan_rows.any(), "the poisoned input did not reach the output"
    assert not nan_rows.all(), "the NaN spread beyond the rows that see it"
    if case == "masked_row_beside_nan":
        assert torch.equal(out[:, :, 7].cpu(), torch.zeros_like(out[:, :, 7]).cpu())
        if lse:
            assert torch.isneginf(fast[1][:, :, 7]).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", ["query_nan", "key_nan", "causal_key_nan"])
def test_cpu_kernels_other_dtypes(case, dtype):
    """float64 (the scalar row loops) and bfloat16 (converted to float32 -- or AMX tiles where present)."""
    q, k, v, mask, causal = _dense_case(case, dtype, "cpu")
    fast = fastattn.attention(q, k, v, attn_mask=mask, causal=causal, backend="cpu", return_lse=True)
    ref = fastattn.attention(*(t.double() for t in (q, k, v)), attn_mask=mask, causal=causal,
                             backend="reference", return_lse=True)
    for a, b in zip(fast, ref):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        assert torch.isnan(a).any() and not torch.isnan(a).all()


@pytest.mark.parametrize("case", ["query_nan", "key_nan", "key_nan_in_one_split"])
def test_cpu_split_keys_merge_keeps_nan(case):
    """Few query rows and many keys: the CPU forward splits the keys and merges by LSE.  A split that saw only
    NaN scores has m = -inf and l = NaN; the merge must not skip it."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, L, 16, generator=g) for L in (3, 2100, 2100))
    if case == "query_nan":
        q[0, 0, 1, :] = NAN  # every score of row 1 NaN: m = -inf in every split
    elif case == "key_nan":
        k[0, 0, 5, 0] = NAN
    else:
        k[0, 0, 2000, :] = NAN
    out, lse = fastattn.attention(q, k, v, backend="cpu", return_lse=True)
    ref, ref_lse = fastattn.attention(q.double(), k.double(), v.double(), backend="reference", return_lse=True)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(torch.isnan(lse), torch.isnan(ref_lse))
    finite = torch.isfinite(ref)
    assert (out.double() - ref)[finite].abs().max().item() < 1e-5 if finite.any() else True
    expected_nan_rows = [1] if case == "query_nan" else [0, 1, 2]
    assert torch.isnan(out[0, 0]).any(-1).nonzero().flatten().tolist() == expected_nan_rows


WINDOW_PAIRS = [("cpu", "cpu"), ("cpu", "triton")]


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("device,backend", WINDOW_PAIRS)
def test_window_nan_stays_in_its_window(device, backend, shift):
    device = _device(device, backend)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 8, 8, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    q[0, 1, 1, 0, 0] = NAN   # one token's query row (window (0, 0), head 0)
    k[0, 6, 5, 1, 3] = NAN   # one key (window (1, 1), head 1): every row of its window (and region) sees it
    table = torch.randn(7 * 7, 2, generator=g, dtype=torch.float64)
    run = lambda backend_name, q_, k_, v_, table_: window_attention(
        q_, k_, v_, window_size=4, shift_size=shift, rel_pos_bias_table=table_,
        backend=backend if backend_name == "fast" else backend_name)
    fast = _compare(run, (q, k, v, table), torch.float32, device, ["out", "dq", "dk", "dv", "dtable"])
    nan_tokens = torch.isnan(fast[0]).any(-1).any(-1)
    assert 1 < nan_tokens.sum().item() < 64


@pytest.mark.parametrize("op", ["temporal", "spatial"])
@pytest.mark.parametrize("device,backend", WINDOW_PAIRS)
def test_spacetime_nan_rows(device, backend, op):
    """A NaN in one head's query and in one patch key of another head: the NaN stays in its head (the spatial
    op's cls-key scores once spread it to every head, 0 * NaN) and in the rows that see the key."""
    device = _device(device, backend)
    g = torch.Generator().manual_seed(6)
    T, N = 4, 9
    L = T * N + (1 if op == "spatial" else 0)
    q, k, v = (torch.randn(2, L, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    q[1, 5, 0, 2] = NAN
    k[0, 12, 1, 0] = NAN
    op_fn = temporal_attention if op == "temporal" else spatial_attention
    run = lambda backend_name, *t: op_fn(*t, num_frames=T, backend=backend if backend_name == "fast" else backend_name)
    fast = _compare(run, (q, k, v), torch.float32, device, ["out", "dq", "dk", "dv"])
    nan_heads = torch.isnan(fast[0]).any(-1).cpu()   # [B, L, heads]
    assert nan_heads[1, :, 1].sum() == 0 and nan_heads[0, :, 0].sum() == 0, "a NaN crossed into another head"
    assert nan_heads[1, 5, 0] and nan_heads[0, :, 1].any()
