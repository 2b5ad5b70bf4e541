"""The float32 row loops of the CPU kernels (csrc/cpu/row_kernels.cpp), per ISA, through the test hook
torch.ops.fastattn_internal.row_kernel: every variant this CPU can run (the x86-64 baseline, AVX2, AVX-512) on
every row length around its vector widths and register limits, against float64 references, with the columns past
the row's end checked untouched (the tails are masked stores) -- so the AVX2 loops are checked on AVX-512 machines
too, where the attention ops never pick them."""
import math

import pytest
import torch

from fastattn import _ext

pytestmark = pytest.mark.usefixtures("ops")  # skips where the extension is not built

LENGTHS = list(range(0, 20)) + [23, 24, 25, 31, 32, 33, 47, 48, 49, 63, 64, 65, 71, 72, 96, 127, 128, 129, 130,
                                197, 255, 256, 257, 1000]
SENTINEL = 12345.0
PAD = 19  # columns past each row's end, which no loop may write


def isas():
    return list(torch.ops.fastattn_internal.cpu_row_isas()) if _ext.error() is None else ["baseline"]


def rows_of(n, rows=3, seed=0, low=-6.0, high=6.0):
    """[rows, n] float32 scores as a view of a wider buffer whose last PAD columns hold SENTINEL."""
    g = torch.Generator().manual_seed(seed * 1000 + n)
    buf = torch.full((rows, n + PAD), SENTINEL)
    buf[:, :n] = torch.rand(rows, n, generator=g) * (high - low) + low
    return buf, buf[:, :n]


def run(op, x, isa, arg=0.0, y=None):
    return torch.ops.fastattn_internal.row_kernel(x, x if y is None else y, op, isa, arg)


def same_bits(a, b):
    """Bit for bit (NaN included)."""
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def check_padding(buf, n):
    assert (buf[:, n:] == SENTINEL).all(), "a row loop wrote past the row's end"


def test_the_cpu_runs_the_baseline_and_reports_its_isas():
    assert "baseline" in isas()
    with pytest.raises(RuntimeError, match="isa"):
        run("row_max", torch.zeros(1, 4), "sse9")


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("n", LENGTHS)
def test_row_max_and_scale_row_max(isa, n):
    buf, x = rows_of(n)
    x[1, n // 2:] = float("nan")  # NaN is skipped by the max
    x[2] = float("-inf")
    want = torch.tensor([x[r][~x[r].isnan()].max().item() if (~x[r].isnan()).any() else float("-inf")
                         for r in range(3)])
    assert torch.equal(run("row_max", x, isa)[:, 0], want)
    before = x.clone()
    got = run("scale_row_max", x, isa, 0.125)[:, 0]
    torch.testing.assert_close(x, before * 0.125, rtol=0, atol=0, equal_nan=True)  # an exact product
    assert torch.equal(got, want * 0.125)
    check_padding(buf, n)


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("n", LENGTHS)
def test_exp_shift_sum(isa, n):
    buf, x = rows_of(n, low=-100.0, high=0.0)  # the softmax's arguments, past the -87 underflow limit too
    if n:
        x[0, 0] = float("-inf")
        x[1, -1] = 0.0
        x[2, n // 2] = -87.5
    ref = torch.exp(x.double() - 0.0)
    got = run("exp_shift_sum", x, isa, 0.0)[:, 0]
    # about 1 ulp where exp(x) is a normal float; exactly 0 below the -87 cut (denormals flushed to 0)
    normal = ref > 1.0e-37
    assert torch.allclose(x.double()[normal], ref[normal], rtol=4e-7, atol=0)
    assert (x.double()[~normal] <= 1.0e-37).all()
    assert (x[ref == 0] == 0).all()
    assert torch.allclose(got.double(), ref.sum(1), rtol=2e-6, atol=1e-37)
    check_padding(buf, n)


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("normalize", [False, True])
def test_max_exp_sum_is_one_softmax_step(isa, n, normalize):
    op = "max_exp_sum_normalize" if normalize else "max_exp_sum"
    for m_in in (float("-inf"), 2.5, 7.0):  # no running max yet / one below the row's max / one above it
        buf, x = rows_of(n, low=-6.0, high=6.0, seed=int(m_in) if math.isfinite(m_in) else 9)
        x64 = x.double().clone()
        res = run(op, x, isa, m_in)
        for r in range(3):
            if n == 0:
                continue
            m = max(m_in, x64[r].max().item())
            e = torch.exp(x64[r] - m)
            assert res[r, 1].item() == m  # the max of float32 values: exact
            assert res[r, 0].double().item() == pytest.approx(e.sum().item(), rel=2e-6)
            want = e / e.sum() if normalize else e
            assert torch.allclose(x[r].double(), want, rtol=2e-6, atol=1e-30)
        check_padding(buf, n)


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("n", [1, 7, 8, 9, 49, 64, 65, 200])
def test_max_exp_sum_on_rows_that_see_no_key_or_hold_nan(isa, n):
    buf, x = rows_of(n)
    x[0] = float("-inf")             # a fully masked row: zeros, sum 0, the running max stays -inf
    x[1, n // 2] = float("nan")      # a NaN score: the row's sum is NaN and the NaN stays
    x[2] = float("-inf")
    x[2, n - 1] = float("nan")       # NaN among masked keys only
    res = run("max_exp_sum", x, isa, float("-inf"))
    assert res[0, 0] == 0 and res[0, 1] == float("-inf") and (x[0] == 0).all()
    assert res[1, 0].isnan() and x[1, n // 2].isnan()
    assert res[2, 0].isnan() and x[2, n - 1].isnan() and (x[2, :n - 1] == 0).all()
    check_padding(buf, n)


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("n", LENGTHS)
def test_dot(isa, n):
    buf, x = rows_of(n)
    _, y = rows_of(n, seed=5)
    got = run("dot", x, isa, y=y)[:, 0]
    want = (x.double() * y.double()).sum(1)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * math.sqrt(max(n, 1)))
    check_padding(buf, n)


@pytest.mark.parametrize("op", ["row_max", "exp_shift_sum", "max_exp_sum_normalize", "dot"])
def test_every_isa_agrees_and_repeats_itself_bit_for_bit(op):
    """Each variant is reproducible run to run; the variants agree to float32 rounding (their sums differ only in
    the order of the lanes)."""
    results = {}
    for isa in isas():
        outs = []
        for _ in range(2):
            _, x = rows_of(333, rows=4, low=-20.0, high=0.0)
            res = run(op, x, isa, -1.0)
            outs.append((res, x.clone()))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), isa
        results[isa] = outs[0]
    base_res, base_x = results["baseline"]
    for isa, (res, x) in results.items():
        assert torch.allclose(res, base_res, rtol=2e-6, atol=0), isa
        assert torch.allclose(x, base_x, rtol=2e-6, atol=1e-37), isa


# --- the keys-major column loops: St [keys, ld], query columns r < rows, the columns [rows, ld) scratch ----------
COLUMN_ROWS = [1, 5, 8, 9, 16, 17, 31, 32, 33, 40, 63, 64]


def column_tile(keys, rows, ld, seed):
    """[keys + 2, ld] float32 buffer: the tile St in its first `keys` rows (scores in [-8, 8], column 0 all -inf,
    a NaN in the last column where there are keys), the last two rows SENTINEL (no loop may touch them)."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.full((keys + 2, ld), SENTINEL)
    buf[:keys] = torch.rand(keys, ld, generator=g) * 16 - 8
    buf[:keys, 0] = float("-inf")
    if keys and rows > 2:
        buf[keys // 2, rows - 1] = float("nan")
    return buf, buf[:keys]


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("rows", COLUMN_ROWS)
@pytest.mark.parametrize("keys", [0, 1, 7, 130])
def test_column_max_exp_sum(isa, rows, keys):
    ld = (rows + 15) // 16 * 16 + 16  # a stride past round16(rows), as the kernels' scratch columns
    buf, st = column_tile(keys, rows, ld, seed=rows * 7 + keys)
    g = torch.Generator().manual_seed(rows)
    m_old = torch.rand(1, rows, generator=g) * 20 - 10  # some below every score of their column, some above
    m_old[0, ::3] = float("-inf")                       # and columns without a running max yet
    before = st.double().clone()
    res = run("column_max_exp_sum", st, isa, float(rows), y=m_old)
    for r in range(rows):
        col = before[:, r]
        seen = col[~col.isnan()]
        m = max([m_old[0, r].item()] + ([seen.max().item()] if len(seen) else []))
        shift = m if m != float("-inf") else 0.0
        e = torch.exp(col - shift)
        assert res[r, 1].item() == m
        torch.testing.assert_close(st[:, r].double(), e, rtol=2e-6, atol=1e-30, equal_nan=True)
        got_sum, want_sum = res[r, 0].item(), e.sum().item()
        assert (math.isnan(got_sum) and math.isnan(want_sum)) or got_sum == pytest.approx(want_sum, rel=2e-6, abs=0)
    assert (buf[keys:] == SENTINEL).all()


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("rows", COLUMN_ROWS)
@pytest.mark.parametrize("keys", [1, 9, 130])
def test_column_exp_shift(isa, rows, keys):
    ld = (rows + 15) // 16 * 16
    buf, st = column_tile(keys, rows, ld, seed=rows + keys)
    g = torch.Generator().manual_seed(rows + 1)
    shift = torch.rand(1, rows, generator=g) * 4 + 8  # an LSE: above each column's scores
    shift[0, ::4] = float("-inf")                     # a row that saw no key: its probabilities are 0
    before = st.double().clone()
    run("column_exp_shift", st, isa, float(rows), y=shift)
    for r in range(rows):
        s = shift[0, r].item()
        want = torch.zeros_like(before[:, r]) if s == float("-inf") else torch.exp(before[:, r] - s)
        if s == float("-inf"):
            want[before[:, r].isnan()] = float("nan")
        torch.testing.assert_close(st[:, r].double(), want, rtol=2e-6, atol=1e-30, equal_nan=True)
    assert (buf[keys:] == SENTINEL).all()


@pytest.mark.parametrize("op", ["column_max_exp_sum", "column_exp_shift"])
def test_column_loops_agree_across_isas_bit_for_bit_run_to_run(op):
    results = {}
    for isa in isas():
        outs = []
        for _ in range(2):
            _, st = column_tile(200, 40, 48, seed=3)
            res = run(op, st, isa, 40.0, y=torch.full((1, 40), 9.0))
            outs.append((res, st[:, :40].clone()))
        assert same_bits(outs[0][0], outs[1][0]) and same_bits(outs[0][1], outs[1][1]), isa
        results[isa] = outs[0]
    base_res, base_st = results["baseline"]
    for isa, (res, st) in results.items():
        torch.testing.assert_close(res, base_res, rtol=2e-6, atol=0, equal_nan=True)
        torch.testing.assert_close(st, base_st, rtol=2e-6, atol=1e-37, equal_nan=True)
