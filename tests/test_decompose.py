"""top_r_ldu: the panel LU + triangular solve equals torch.linalg.lu's top-r factors; nesting; forced pivot orders
(portability across precision copies); rank-deficient weights."""
from __future__ import annotations

import threading

import pytest
import torch

import loldu_sd
from loldu_sd import LoLDUConfig, top_r_ldu
from loldu_sd.decompose import fingerprint, legacy_pivots

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
    f = top_r_ldu(W, r, factor_dtype="float64")
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
    big = top_r_ldu(W, min(m, n), factor_dtype="float64")
    for r in (1, 3, 7, min(m, n)):
        f = top_r_ldu(W, r, factor_dtype="float64")
        torch.testing.assert_close(f.B, big.B[:, :r], rtol=0, atol=1e-12)
        torch.testing.assert_close(f.z0, big.z0[:r], rtol=0, atol=1e-12)
        torch.testing.assert_close(f.A, big.A[:r], rtol=0, atol=1e-12)
        assert torch.equal(f.pivots, big.pivots[:r])


def eliminate(W: torch.Tensor, r: int, forced: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Reference: r steps of textbook Gaussian elimination in float64, rows `forced` first, then partial pivoting."""
    S, rows, L, U = W.double().clone(), list(range(W.shape[0])), torch.zeros(W.shape[0], r, dtype=torch.float64), []
    order = []
    for k in range(r):
        p = forced[k] if k < len(forced) else max(rows, key=lambda i: abs(float(S[i, k])))
        rows.remove(p)
        order.append(p)
        U.append(S[p].clone())
        L[p, k] = 1.0
        for i in rows:
            L[i, k] = S[i, k] / S[p, k]
            S[i] -= L[i, k] * S[p]
    return L, torch.stack(U), order


@pytest.mark.parametrize("n_forced", [1, 3, 6])
def test_forced_pivot_rows_match_textbook_elimination(n_forced):
    g = torch.Generator().manual_seed(n_forced)
    W = torch.randn(14, 11, generator=g, dtype=torch.float64)
    forced = torch.randperm(14, generator=g)[:n_forced]  # arbitrary rows: LAPACK's own order would differ
    f = top_r_ldu(W, 6, factor_dtype="float64", pivots=forced)
    L, U, order = eliminate(W, 6, forced.tolist())
    assert f.pivots.tolist() == order
    torch.testing.assert_close(f.B, L, rtol=0, atol=1e-10)
    torch.testing.assert_close(f.z0, U.diagonal(), rtol=0, atol=1e-10)
    torch.testing.assert_close(f.A, U / U.diagonal()[:, None], rtol=0, atol=1e-10)


def test_forcing_a_copys_own_pivots_changes_nothing():
    W = torch.randn(40, 24)
    free = top_r_ldu(W, 12)
    forced = top_r_ldu(W, 12, pivots=free.pivots)
    for x, y in ((free.B, forced.B), (free.z0, forced.z0), (free.A, forced.A), (free.pivots, forced.pivots)):
        assert torch.equal(x, y)


def near_tie(seed: int = 0) -> torch.Tensor:
    """A weight whose first pivot is row 1 in fp32 and fp16 but row 0 in bf16 (1.002 rounds to 1.0 there)."""
    W = torch.randn(24, 16, generator=torch.Generator().manual_seed(seed)) * 0.1
    W[0, 0], W[1, 0] = 1.0, 1.002
    return W


def test_pivot_order_of_one_copy_makes_another_copy_factor_alike():
    W = near_tie()
    made = top_r_ldu(W, 8)
    assert made.pivots[0] == 1 and top_r_ldu(W.bfloat16(), 8).pivots[0] == 0  # free pivoting diverges
    loaded = top_r_ldu(W.bfloat16(), 8, pivots=made.pivots)
    assert torch.equal(loaded.pivots, made.pivots) and loaded.B.dtype == torch.float32
    u = 2.0**-8  # bf16 unit roundoff: the factors differ by a few of them, not by a different direction
    assert float((loaded.B - made.B).abs().max()) < 16 * u
    assert float(((loaded.B * loaded.z0) @ loaded.A - (made.B * made.z0) @ made.A).norm()) < 16 * u * float(W.norm())
    assert float(loaded.B.abs().max()) <= 1 + 4 * u  # the forced rows still (nearly) dominate their columns


def test_legacy_pivots_round_the_panel_through_the_canonical_dtype():
    W = near_tie()
    assert legacy_pivots(W, 4, "float16")[0] == 1 and legacy_pivots(W, 4, "bfloat16")[0] == 0
    assert torch.equal(legacy_pivots(W, 4, None), top_r_ldu(W, 4).pivots)
    W[3, 0] = 1e6  # beyond fp16's range: that panel keeps its own precision instead of turning into inf
    assert legacy_pivots(W, 4, "float16")[0] == 3


def test_bad_pivot_orders_are_refused():
    for bad in ([1, 1], [0, 24], [-1]):
        with pytest.raises(ValueError, match="lay: pivot order must list distinct rows"):
            top_r_ldu(torch.randn(24, 16), 4, name="lay", pivots=torch.tensor(bad))


def test_decomposing_leaves_the_thread_count_alone():
    before = torch.get_num_threads()
    net = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 16))
    loldu_sd.add_loldu(net, LoLDUConfig(rank=4, target_modules=["0", "1"]))
    assert torch.get_num_threads() == before  # a library never changes process-wide settings
    seen = []  # nor those of threads started afterwards (torch seeds a new thread's count from the last one set)
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [before]


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


@pytest.mark.parametrize("kind", ["zero_first_column", "zero_panel", "all_zero", "low_rank"])
def test_rank_deficient_weights_warn_clamp_and_stay_bounded(kind):
    W = _rank_deficient(kind)
    with pytest.warns(UserWarning, match=r"lay: \d+ of 4 pivots are below .*rank-deficient"):
        f = top_r_ldu(W, 4, name="lay")
    assert all(torch.isfinite(t).all() for t in (f.B, f.z0, f.A))
    assert (f.z0 != 0).all()  # nothing divides by zero
    assert f.A.abs().max() <= 1e3  # still representable once cast to fp16
    # B diag(z0) A is still the top-4 LU product of the weight
    P, L, U = torch.linalg.lu(W)
    torch.testing.assert_close(f.B * f.z0 @ f.A, (P @ L)[:, :4] @ U[:4], rtol=0, atol=1e-5)


def test_fingerprint_is_stable_and_tells_bases_apart():
    W = torch.randn(20, 16)
    fp = fingerprint(top_r_ldu(W, 6))
    assert fp.shape == (5,) and fp.dtype == torch.float32
    assert torch.equal(fp, fingerprint(top_r_ldu(W.clone(), 6)))
    assert not torch.allclose(fp, fingerprint(top_r_ldu(torch.randn(20, 16), 6)), rtol=1e-3)
