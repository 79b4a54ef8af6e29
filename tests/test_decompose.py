"""top_r_ldu: the panel LU + triangular solve equals torch.linalg.lu's top-r factors; nesting; canonical rounding;
rank-deficient weights."""
from __future__ import annotations

import pytest
import torch

from loldu_sd import LoLDUConfig, top_r_ldu
from loldu_sd.decompose import fingerprint

SHAPES = [  # (out m, in n, r): square, m < n, m > n, r = 1, r = min(m, n) both ways
    (20, 20, 5), (12, 30, 4), (30, 12, 4), (16, 9, 1), (9, 16, 1), (10, 17, 10), (17, 10, 10), (9, 9, 9)]


def full_lu_top_r(W: torch.Tensor, r: int):
    """Reference: (P L)[:, :r], diag(U)[:r], (D^-1 U)[:r], P and U[:r] from a full torch.linalg.lu."""
    P, L, U = torch.linalg.lu(W)
    d = U.diagonal()
    return (P @ L)[:, :r], d[:r], (U / d[:, None])[:r], P, U[:r]


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_panel_lu_equals_full_lu_float64(m, n, r):
    W = torch.randn(m, n, dtype=torch.float64)
    f = top_r_ldu(W, r, factor_dtype="float64", canonical_dtype=None)
    B, z0, A, P, U_r = full_lu_top_r(W, r)
    assert (f.B.dtype, f.z0.dtype, f.A.dtype) == (torch.float64,) * 3
    torch.testing.assert_close(f.B, B, rtol=0, atol=1e-12)
    torch.testing.assert_close(f.z0, z0, rtol=0, atol=1e-12)
    torch.testing.assert_close(f.A, A, rtol=0, atol=1e-12)
    # pivots are the original rows picked at each step: (P^T W)[:r] == W[pivots]
    assert torch.equal(f.pivots, (P.T @ torch.arange(m, dtype=torch.float64)).round().long()[:r])
    # and B diag(z0) A is the rank-r part of the LU product
    torch.testing.assert_close(f.B * f.z0 @ f.A, B @ U_r, rtol=0, atol=1e-12)


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_outputs_are_compact_no_dense_permutation(m, n, r):
    f = top_r_ldu(torch.randn(m, n), r)
    assert f.B.shape == (m, r) and f.z0.shape == (r,) and f.A.shape == (r, n)
    assert f.pivots.shape == (r,) and f.pivots.dtype == torch.int64
    assert len(set(f.pivots.tolist())) == r and 0 <= int(f.pivots.min()) and int(f.pivots.max()) < m
    assert f.B.dtype == f.z0.dtype == f.A.dtype == torch.float32


@pytest.mark.parametrize("m,n", [(24, 24), (14, 30), (30, 14)])
def test_factors_are_nested(m, n):
    W = torch.randn(m, n, dtype=torch.float64)
    big = top_r_ldu(W, min(m, n), factor_dtype="float64", canonical_dtype=None)
    for r in (1, 3, 7, min(m, n)):
        f = top_r_ldu(W, r, factor_dtype="float64", canonical_dtype=None)
        torch.testing.assert_close(f.B, big.B[:, :r], rtol=0, atol=1e-12)
        torch.testing.assert_close(f.z0, big.z0[:r], rtol=0, atol=1e-12)
        torch.testing.assert_close(f.A, big.A[:r], rtol=0, atol=1e-12)
        assert torch.equal(f.pivots, big.pivots[:r])


def test_default_canonical_fp16_gives_identical_factors_for_fp32_and_fp16_copies():
    assert LoLDUConfig().canonical_dtype == "float16"
    W32 = torch.randn(40, 24) * 0.05
    for r in (1, 8, 24):
        a = top_r_ldu(W32, r, canonical_dtype="float16")
        b = top_r_ldu(W32.half(), r, canonical_dtype="float16")
        for x, y in ((a.B, b.B), (a.z0, b.z0), (a.A, b.A), (a.pivots, b.pivots)):
            assert torch.equal(x, y)
        assert a.B.dtype == b.B.dtype == torch.float32  # factor dtype whatever the weight dtype
    # without canonical rounding the two copies are (slightly) different inputs
    assert not torch.equal(top_r_ldu(W32, 8).A, top_r_ldu(W32.half(), 8).A)


def test_canonicalisation_skips_blocks_that_overflow_fp16():
    W = torch.randn(10, 10)
    W[3, 0] = 1e6  # beyond fp16's range: rounding would give inf
    f = top_r_ldu(W, 4, canonical_dtype="float16")
    assert all(torch.isfinite(t).all() for t in (f.B, f.z0, f.A))


def test_rank_above_min_dim_and_non_finite_weights_are_refused():
    with pytest.raises(ValueError, match=r"layer\.x: rank 9 exceeds min\(out, in\) = 8"):
        top_r_ldu(torch.randn(8, 12), 9, name="layer.x")
    W = torch.randn(8, 12)
    W[2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        top_r_ldu(W, 4)


def _rank_deficient(kind: str) -> torch.Tensor:
    W = torch.randn(16, 12)
    if kind == "zero_first_column":
        W[:, 0] = 0
    elif kind == "zero_panel":  # all r = 4 panel columns zero, the rest not: every pivot is 0
        W[:, :4] = 0
    elif kind == "all_zero":
        W.zero_()
    elif kind == "low_rank":  # rank 2 < r
        W = torch.randn(16, 2) @ torch.randn(2, 12)
    return W


# (an exactly low-rank weight is not low-rank any more once rounded through fp16, so that case runs unrounded only)
@pytest.mark.parametrize("kind,canonical", [(k, c) for k in ("zero_first_column", "zero_panel", "all_zero")
                                            for c in (None, "float16")] + [("low_rank", None)])
def test_rank_deficient_weights_warn_clamp_and_stay_bounded(kind, canonical):
    W = _rank_deficient(kind)
    with pytest.warns(UserWarning, match=r"lay: \d+ of 4 pivots are below .*rank-deficient"):
        f = top_r_ldu(W, 4, canonical_dtype=canonical, name="lay")
    assert all(torch.isfinite(t).all() for t in (f.B, f.z0, f.A))
    assert (f.z0 != 0).all()  # nothing divides by zero
    assert f.A.abs().max() <= 1e3  # still representable once cast to fp16
    # B diag(z0) A is still the top-4 LU product of the (canonicalised) weight
    Wc = W if canonical is None else W.half().float()
    P, L, U = torch.linalg.lu(Wc)
    torch.testing.assert_close(f.B * f.z0 @ f.A, (P @ L)[:, :4] @ U[:4], rtol=0, atol=1e-5)


def test_fingerprint_is_stable_and_tells_bases_apart():
    W = torch.randn(20, 16)
    fp = fingerprint(top_r_ldu(W, 6))
    assert fp.shape == (3,) and fp.dtype == torch.float32
    assert torch.equal(fp, fingerprint(top_r_ldu(W.clone(), 6)))
    assert not torch.allclose(fp, fingerprint(top_r_ldu(torch.randn(20, 16), 6)), rtol=1e-3)
