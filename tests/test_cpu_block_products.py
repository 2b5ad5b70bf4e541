"""The CPU kernels' block products (csrc/cpu/blas.cpp, csrc/cpu/small_gemm.cpp) one by one, against torch.matmul
in float64, through the test hook torch.ops.fastattn_internal.block_product.

The register tiles (AVX-512, or AVX2 + FMA) run every product of the float32 attention ops on CPUs that have
either, so their edge cases are checked here directly, for each ISA this CPU runs (path "tiles_<isa>": the AVX2
tiles on AVX-512 machines too, where the ops never pick them): every column-panel shape (N = 1..80 covers the
1-, 2-, 3-, 4- and 5-vector panels of both vector widths and their masked tails), row tails, K = 1, operands far
apart (packed) or transposed, alpha/beta (beta = 0 must overwrite NaN), the gap between C's rows left untouched,
and the plain-loop and BLAS paths too.
"""
import itertools
import os

import pytest
import torch

from fastattn import _ext

FORMS = ("nt", "nn", "tn")


@pytest.fixture(scope="module")
def block_product(ops):
    return torch.ops.fastattn_internal.block_product


def _tile_isas():
    """The ISAs whose register tiles this CPU runs (those of the row kernels, less the baseline)."""
    if _ext.error() is not None:
        return []
    return [isa for isa in torch.ops.fastattn_internal.cpu_row_isas() if isa != "baseline"]


TILE_PATHS = [pytest.param(f"tiles_{isa}", id=isa) for isa in ("avx2", "avx512")]


@pytest.fixture(params=TILE_PATHS)
def tiles(request, ops):
    """A tile path ("tiles_avx2", "tiles_avx512"), skipped where this CPU lacks its ISA."""
    if request.param.split("_")[1] not in _tile_isas():
        pytest.skip(f"this CPU cannot run {request.param}")
    return request.param


def _operands(form, M, N, K, row_gap=0, dtype=torch.float32, gen=None):
    """a, b with the layout `form` expects, each a column slice of a wider buffer (row stride = cols + row_gap)."""
    def mat(rows, cols):
        return torch.randn(rows, cols + row_gap, generator=gen, dtype=dtype)[:, :cols]
    if form == "nt":
        return mat(M, K), mat(N, K)
    if form == "nn":
        return mat(M, K), mat(K, N)
    return mat(K, M), mat(K, N)


def _expected(form, a, b, c0, alpha, beta):
    a64, b64 = a.double(), b.double()
    prod = a64 @ b64.T if form == "nt" else a64 @ b64 if form == "nn" else a64.T @ b64
    base = torch.zeros_like(prod) if beta == 0 else beta * c0.double()
    return alpha * prod + base


def _run(block_product, form, path, M, N, K, alpha=1.0, beta=0.0, row_gap=0, c_gap=5, dtype=torch.float32):
    gen = torch.Generator().manual_seed(M * 10007 + N * 101 + K)
    a, b = _operands(form, M, N, K, row_gap, dtype, gen)
    c_buffer = torch.full((M, N + c_gap), float("nan"), dtype=dtype)
    c = c_buffer[:, :N]
    if beta != 0:
        c.copy_(torch.randn(M, N, generator=gen, dtype=dtype))
    c0 = c.clone()
    ran = block_product(a, b, c, form, path, alpha, beta)
    gap_untouched = bool(torch.isnan(c_buffer[:, N:]).all())
    return ran, c, _expected(form, a, b, c0, alpha, beta), gap_untouched


def _close(got, want, K):
    # fp32 sums of K products of N(0,1) numbers: error ~ sqrt(K) * eps * |terms|; a generous fixed bound.
    tol = 1e-5 * (1 + K) ** 0.5 * (1 + want.abs().max().item())
    return (got.double() - want).abs().max().item() <= tol


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("N", list(range(1, 34)) + [47, 48, 49, 63, 64, 65, 79, 80, 196, 197, 208])
def test_tiles_every_panel_shape(block_product, tiles, form, N):
    for M, K in ((1, 1), (5, 7), (13, 64), (49, 32)):
        if form == "nt" and M < 4:
            continue  # declined (a transposed B packed for a few rows): BLAS runs those, checked below
        ran, c, want, gap = _run(block_product, form, tiles, M, N, K)
        assert ran, (form, M, N, K)
        assert gap, "wrote between C's rows"
        assert torch.isfinite(c).all() and _close(c, want, K), (form, M, N, K)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.125, 0.0), (1.0, 1.0), (-0.5, 2.0)])
def test_tiles_alpha_beta_and_attention_shapes(block_product, tiles, form, alpha, beta):
    # ViT-B / TimeSformer scores and P V, a Swin window, a 512-key block, BERT's 128, a long K; Perceiver's P V
    # (B's rows 261 floats apart: the AVX2 tiles run K in chunks, beta on the first only); one row (decoding's
    # P V: the 1-row tiles of up to 8 vectors, then the rest).
    for M, N, K in ((197, 197, 64), (197, 64, 197), (49, 49, 32), (49, 32, 49), (128, 512, 64), (256, 64, 512),
                    (7, 9, 3000), (64, 261, 512), (13, 33, 300), (1, 128, 512), (1, 257, 300), (1, 64, 16)):
        if form == "nt" and M < 4:
            continue  # declined: BLAS runs it
        ran, c, want, gap = _run(block_product, form, tiles, M, N, K, alpha, beta)
        assert ran and gap
        assert _close(c, want, K), (form, M, N, K, alpha, beta)


@pytest.mark.parametrize("form", FORMS)
def test_tiles_far_apart_rows_are_packed(block_product, tiles, form):
    # Rows 24 KiB apart (TimeSformer-B's `nt` token order) and 8 KiB apart: the kernels copy such operands.
    for row_gap in (6144 - 64, 2048 - 64, 1):
        for M, N, K in ((197, 197, 64), (197, 64, 197), (9, 17, 64)):
            ran, c, want, gap = _run(block_product, form, tiles, M, N, K, row_gap=row_gap)
            assert ran and gap and _close(c, want, K), (form, row_gap, M, N, K)


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (-0.5, 2.0)])
def test_tiles_short_nt_dot_products(block_product, tiles, alpha, beta):
    # mm_nt with N <= 16 runs dot products on B's rows in place (small_gemm.cpp short_nt, 8 or 16 per row): any
    # M (one row too), K with a tail (1, 7, 100) or whole vectors, rows far apart.
    for N in (1, 2, 7, 8, 9, 15, 16):
        for M, K in ((1, 64), (2, 7), (3, 1), (8, 64), (13, 100), (8, 256)):
            for row_gap in (0, 6144 - K):
                ran, c, want, gap = _run(block_product, "nt", tiles, M, N, K, alpha, beta, row_gap=row_gap)
                assert ran and gap, (M, N, K, row_gap)
                assert _close(c, want, K), (M, N, K, row_gap, alpha, beta)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_tiles_empty_sum(block_product, tiles, form, beta):
    """K = 0: C = beta C, and beta = 0 still overwrites C's NaN (the panel path used to skip C altogether)."""
    for M, N in ((1, 5), (5, 20), (13, 64), (7, 9)):
        if form == "nt" and M < 4:
            continue
        ran, c, want, gap = _run(block_product, form, tiles, M, N, 0, 1.3, beta)
        assert ran and gap, (form, M, N)
        assert torch.equal(c.double(), want), (form, M, N, beta)


def test_tiles_decline_what_they_are_not_for(block_product, tiles):
    ran, c, _, _ = _run(block_product, "nt", tiles, 2, 64, 64)  # transposed B for 2 rows
    assert not ran and torch.isnan(c).all(), "declined, but wrote C"
    ran, c, _, _ = _run(block_product, "nn", tiles, 4, 16, 5000)  # K beyond the tuned range
    assert not ran and torch.isnan(c).all()


def test_tiles_are_deterministic(block_product, tiles):
    gen = torch.Generator().manual_seed(0)
    a, b = _operands("nn", 197, 64, 197, gen=gen)
    outs = []
    for _ in range(3):
        c = torch.empty(197, 64)
        assert block_product(a, b, c, "nn", tiles, 1.0, 0.0)
        outs.append(c)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_tiles_path_runs_the_widest_isa(block_product):
    # path "tiles" is what the ops call: the widest ISA's tiles (FASTATTN_CPU_ISA unset), bit for bit.
    isas = _tile_isas()
    if not isas or os.environ.get("FASTATTN_CPU_ISA"):
        pytest.skip("no register tiles here (or FASTATTN_CPU_ISA is set)")
    gen = torch.Generator().manual_seed(1)
    a, b = _operands("nt", 49, 49, 32, gen=gen)
    outs = []
    for path in ("tiles", f"tiles_{isas[-1]}"):
        c = torch.empty(49, 49)
        assert block_product(a, b, c, "nt", path, 0.5, 0.0)
        outs.append(c)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("path", ["loops", "blas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", FORMS)
def test_loops_and_blas(block_product, path, dtype, form):
    for (M, N, K), (alpha, beta) in itertools.product(((1, 1, 1), (2, 64, 64), (13, 17, 19), (49, 49, 32)),
                                                      ((1.0, 0.0), (0.5, 1.0))):
        ran, c, want, gap = _run(block_product, form, path, M, N, K, alpha, beta, row_gap=3, dtype=dtype)
        assert ran and gap and _close(c, want, K), (path, dtype, form, M, N, K, alpha, beta)


def test_bad_arguments_are_named(block_product):
    a, b, c = torch.randn(4, 8), torch.randn(5, 8), torch.empty(4, 5)
    with pytest.raises(RuntimeError, match="form must be"):
        block_product(a, b, c, "tt", "blas", 1.0, 0.0)
    with pytest.raises(RuntimeError, match="path must be"):
        block_product(a, b, c, "nt", "mkl", 1.0, 0.0)
    with pytest.raises(RuntimeError, match="path must be"):
        block_product(a, b, c, "nt", "tiles_sse2", 1.0, 0.0)
    with pytest.raises(RuntimeError, match="shapes of a, b, c"):
        block_product(a, b, c, "nn", "blas", 1.0, 0.0)
    with pytest.raises(RuntimeError, match="one dtype"):
        block_product(a.double(), b, c, "nt", "blas", 1.0, 0.0)
    with pytest.raises(RuntimeError, match="unit column stride"):
        block_product(a.T, b, c, "nt", "blas", 1.0, 0.0)
