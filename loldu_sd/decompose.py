"""Top-r LDU with partial pivoting, computed as a panel LU plus one triangular solve.

For W0 (m x n) and r <= min(m, n), the first r steps of Gaussian elimination with row partial pivoting only look at
the first r columns for pivots and multipliers, so they equal an LU of the panel W0[:, :r]. The rest of the first r
rows of U is U12 = L11^-1 (P^T W0)[:r, r:]. Cost O((m + n) r^2) instead of O(m n min(m, n)), and no dense m x m
permutation is ever built: we keep the row order `perm` (m ints) only while factorising.

Result (matches torch.linalg.lu(W0) -> P, L, U to machine precision):
    B  = (P L)[:, :r]                 m x r   multipliers, original row order
    z0 = diag(U)[:r]                  r       pivots
    A  = (diag(z0)^-1 U)[:r]          r x n   unit upper rows
so that B diag(z0) A is the rank-r part of the LDU decomposition.

Portability: partial pivoting picks the largest |value| of each column, so two precision copies of one base (fp32,
fp16, bf16) can pick different rows at a near-tie, and z then multiplies another direction. Passing `pivots` (the
row order an adapter was made with) forces those elimination steps, so the factors of every copy differ only by the
copies' rounding.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


@dataclass
class LDUFactors:
    """Frozen top-r LDU factors of one weight, and what the base check compares (see `fingerprint`)."""

    B: torch.Tensor  # (m, r)
    z0: torch.Tensor  # (r,)
    A: torch.Tensor  # (r, n)
    pivots: torch.Tensor  # (r,) int64: original row index chosen as pivot at each step
    weight_norm: float  # ||every SAMPLE_STRIDE-th row of W0|| * sqrt(stride), ~||W0||: the update-size check's unit
    roundoff: float = 0.0  # unit roundoff of the weight's dtype: how far another copy of this base may differ
    # checksum: sum_i u_i sum_j W_ij over the sampled rows, distinct row weights u_i in [1, 2): negating W0 flips its
    # sign, moving rows moves it; checksum_bound, the same over |W_ij|, bounds what rounding by u moves it (u times)
    checksum: float = 0.0
    checksum_bound: float = 0.0  # the same sum of |terms|: rounding by u moves the checksum by at most u times it
    max_multiplier: float = 1.0  # max |B|: at most 1 where the pivot rows were chosen by partial pivoting


def single_threaded(fn: Callable[[], object]) -> object:
    """fn() with one intra-op torch thread, the caller's thread count untouched: on a private thread.

    The factorisation is many small LAPACK calls and copies: threads gain nothing there, and on a machine whose cores
    are busy, two OpenMP threads made it 10x slower. OpenMP and MKL thread counts are per thread, so the private
    thread sets its own to 1 and back, and no caller sees a change (torch.get_num_threads stays as it was).
    """
    if torch.get_num_threads() == 1:
        return fn()
    out: dict[str, object] = {}

    def run() -> None:
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            out["error"] = e
        finally:
            torch.set_num_threads(old)

    worker = threading.Thread(target=run, name="loldu-factorise", daemon=True)
    worker.start()
    worker.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def leading_factors(factors: LDUFactors, rank: int) -> LDUFactors:
    """The top-`rank` factors inside larger ones (factors are nested); the base-check fields are the weight's."""
    return dataclasses.replace(factors, B=factors.B[:, :rank], z0=factors.z0[:rank], A=factors.A[:rank],
                               pivots=factors.pivots[:rank])


def unit_roundoff(dtype: torch.dtype) -> float:
    """Largest relative rounding error of `dtype` (half its machine epsilon); 0 for non-float dtypes."""
    return torch.finfo(dtype).eps / 2 if dtype.is_floating_point else 0.0


SAMPLE_STRIDE = 16  # the base check reads every 16th row of W0: a full read for ||W0|| was a quarter of init


def _swaps_to_perm(piv: torch.Tensor, m: int) -> np.ndarray:
    """LAPACK's sequential 1-based row swaps -> row order `perm` such that (P^T W)[i] = W[perm[i]]."""
    perm = np.arange(m, dtype=np.int64)  # numpy: no m-element Python list to convert (8 us instead of 83 at m=1280)
    for i, j in enumerate(piv.tolist()):
        j -= 1
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def _lu_no_pivoting_(panel: torch.Tensor) -> None:
    """In-place LU of a (k x c, k >= c) panel in its given row order; recursive halving keeps the op count ~4c."""
    c = panel.shape[1]
    if c == 1:
        panel[1:, 0] /= panel[0, 0]
        return
    h = c // 2
    _lu_no_pivoting_(panel[:, :h])
    panel[:h, h:] = torch.linalg.solve_triangular(panel[:h, :h], panel[:h, h:], upper=False, unitriangular=True)
    panel[h:, h:] -= panel[h:, :h] @ panel[:h, h:]
    _lu_no_pivoting_(panel[h:, h:])


def _row_order(m: int, pivots: torch.Tensor, name: str) -> np.ndarray:
    """Rows `pivots` first (in their order), then the others: the order forcing those elimination steps."""
    p = pivots.detach().cpu().numpy().astype(np.int64)
    if p.ndim != 1 or len(np.unique(p)) != len(p) or (len(p) and (p.min() < 0 or p.max() >= m)):
        raise ValueError(f"{name}: pivot order must list distinct rows in [0, {m}), got {p.tolist()[:8]}")
    rest = np.ones(m, dtype=bool)
    rest[p] = False
    return np.concatenate([p, np.flatnonzero(rest)])


def _forced_panel_lu(panel: torch.Tensor, forced: int) -> tuple[torch.Tensor, np.ndarray]:
    """LU of `panel` (m x r) eliminating its first `forced` rows first, in order, then pivoting partially.

    Returns (row-major packed LU of the reordered panel, row order relative to the panel)."""
    m = panel.shape[0]
    lu = panel.clone()
    _lu_no_pivoting_(lu[:, :forced])
    lu[:forced, forced:] = torch.linalg.solve_triangular(lu[:forced, :forced], lu[:forced, forced:], upper=False,
                                                         unitriangular=True)
    lu[forced:, forced:] -= lu[forced:, :forced] @ lu[:forced, forced:]
    tail, piv_tail, _ = torch.linalg.lu_factor_ex(lu[forced:, forced:])
    perm_tail = _swaps_to_perm(piv_tail.cpu(), m - forced)
    lu[forced:, :forced] = lu[forced:, :forced][torch.from_numpy(perm_tail).to(lu.device)]
    lu[forced:, forced:] = tail
    return lu.contiguous(), np.concatenate([np.arange(forced), forced + perm_tail])


def _panel_lu(panel: torch.Tensor, pivots: torch.Tensor | None, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed LU of the panel in elimination order, and that order (original row indices)."""
    m = panel.shape[0]
    lu, piv, _ = torch.linalg.lu_factor_ex(panel)  # info > 0 only flags an exact zero pivot
    perm = torch.from_numpy(_swaps_to_perm(piv.cpu(), m)).to(panel.device)
    forced = 0 if pivots is None else pivots.numel()
    if forced == 0 or torch.equal(perm[:forced].cpu(), pivots.cpu().long()):
        return lu, perm
    # a near-tie made partial pivoting choose other rows on this copy: force the given ones
    order = torch.from_numpy(_row_order(m, pivots, name)).to(panel.device)
    lu, sub = _forced_panel_lu(panel[order], forced)
    return lu, order[torch.from_numpy(sub).to(panel.device)]


def _column_major(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A column-major `dtype` copy in one pass: LAPACK's layout, so lu_factor and solve_triangular copy nothing."""
    return torch.empty((t.shape[1], t.shape[0]), dtype=dtype, device=t.device).copy_(t.T).T


def _row_weights(m: int, device: torch.device) -> torch.Tensor:
    """Weights of the sampled rows of an m-row weight: distinct (golden-ratio steps in [1, 2)), so moving a row
    moves the checksum."""
    index = np.arange(0, m, SAMPLE_STRIDE, dtype=np.float64)
    return torch.from_numpy(np.modf(index * 0.6180339887498949)[0] + 1.0).to(device)


def _clamp_tiny_pivots(z0: torch.Tensor, U_rows: torch.Tensor, floor: float, name: str) -> torch.Tensor:
    """z0 with pivots below `floor` replaced by +-max(|row of U|, floor), with a warning naming the layer.

    A clamped pivot takes its row's max |u|: A's row then stays within [-1, 1] (a bare floor would give entries
    ~1e6..1e37, inf once cast to fp16), and B diag(z0) A is still exactly the top-r LU product.
    """
    tiny = z0.abs() < floor
    warnings.warn(f"{name}: {int(tiny.sum())} of {z0.numel()} pivots are below {floor:.3g} (rank-deficient weight); "
                  f"clamped to +-max(|row of U|, {floor:.3g}). Consider a smaller rank for this layer.", stacklevel=3)
    sign = torch.where(z0 < 0, -1.0, 1.0).to(z0.dtype)
    return torch.where(tiny, sign * U_rows.abs().amax(dim=1).clamp(min=floor), z0)


def top_r_ldu(
    weight: torch.Tensor,
    rank: int,
    factor_dtype: str | torch.dtype = "float32",
    pivot_eps: float = 1e-6,
    name: str = "weight",
    pivots: torch.Tensor | None = None,
) -> LDUFactors:
    """Top-r LDU factors (B, z0, A) of `weight` (out x in), computed in `factor_dtype` whatever the weight dtype.

    `pivots` (up to `rank` row indices) forces the first elimination steps to those rows, as stored in adapter files.
    Few, large tensor operations and one device sync per weight: their count, not their flops, sets the time.
    """
    dtype = _DTYPES[factor_dtype] if isinstance(factor_dtype, str) else factor_dtype
    m, n = weight.shape
    if rank > min(m, n):
        raise ValueError(f"{name}: rank {rank} exceeds min(out, in) = {min(m, n)} of its {m}x{n} weight")
    forced = 0 if pivots is None else pivots.numel()
    if forced > rank:
        raise ValueError(f"{name}: {forced} forced pivots for rank {rank}")
    W = weight.detach()
    # 1. panel LU: P^T W[:, :r] = L_panel U11 (the forced rows first)
    lu, perm = _panel_lu(_column_major(W[:, :rank], dtype), pivots, name)
    L_panel = torch.tril(lu, diagonal=-1)
    L_panel[:rank].diagonal().fill_(1.0)  # unit lower (m, r)
    # 2. the first r rows of U: L11^-1 (P^T W)[:r]; their first r columns are the LU's own U11
    U_rows = torch.linalg.solve_triangular(L_panel[:rank], W[perm[:rank]].to(dtype), upper=False, unitriangular=True)
    U_rows[:, :rank] = torch.triu(lu[:rank])
    z0 = U_rows.diagonal().clone()
    # 3. everything the checks need, in one sync: the row sample (weight_checksum), finiteness, pivots, multipliers
    rows = W[::SAMPLE_STRIDE].to(dtype)
    (min_z0, max_z0), (l_min, l_max), u = torch.aminmax(z0.abs()), torch.aminmax(L_panel), _row_weights(m, W.device)
    u = u.to(dtype)
    stats = torch.stack([rows.norm(), u @ rows.sum(dim=1), u @ torch.linalg.vector_norm(rows, 1, dim=1),
                         U_rows.sum(), min_z0, max_z0, l_min, l_max]).tolist()
    sample_norm, checksum, bound, u_sum, min_z0, max_z0, l_min, l_max = stats
    l_sum, max_multiplier = l_min + l_max, max(-l_min, l_max)  # NaN/inf in L shows in its extremes
    if not all(map(math.isfinite, (sample_norm, bound, u_sum, l_sum))):
        raise ValueError(f"{name}: weight contains NaN or inf; cannot decompose it")
    floor = max(pivot_eps * max_z0, torch.finfo(dtype).tiny)
    if min_z0 < floor:  # (near-)zero pivots would divide by zero
        z0 = _clamp_tiny_pivots(z0, U_rows, floor, name)
    # 4. multipliers back in original row order: B = P L_panel
    B = torch.empty((m, rank), dtype=dtype, device=W.device)
    B[perm] = L_panel
    return LDUFactors(B=B, z0=z0, A=U_rows.div_(z0[:, None]), pivots=perm[:rank].clone(),
                      weight_norm=max(sample_norm * SAMPLE_STRIDE**0.5, float(z0.abs().max())),
                      roundoff=unit_roundoff(W.dtype), checksum=checksum, checksum_bound=bound,
                      max_multiplier=max_multiplier)


def legacy_pivots(weight: torch.Tensor, rank: int, canonical_dtype: str | None) -> torch.Tensor:
    """Pivot rows as format version 1 chose them: partial pivoting on the panel rounded through `canonical_dtype`."""
    panel = weight.detach()[:, :rank].float()
    if canonical_dtype is not None and float(panel.abs().max()) < torch.finfo(_DTYPES[canonical_dtype]).max:
        panel = panel.to(_DTYPES[canonical_dtype]).float()
    _, piv, _ = torch.linalg.lu_factor_ex(panel)
    return torch.from_numpy(_swaps_to_perm(piv.cpu(), panel.shape[0])[:rank])


FINGERPRINT_FIELDS = ("weight_scale", "sum_abs_z0", "roundoff", "checksum", "first_pivot")


def fingerprint(f: LDUFactors) -> torch.Tensor:
    """Compact float32 fingerprint of a base weight, FINGERPRINT_FIELDS: W0's scale, sum|z0|, the unit roundoff of
    W0's dtype, the signed row checksum (weight_checksum) and the signed first pivot (negating W0 flips both)."""
    first = float(f.z0[0]) if f.z0.numel() else 0.0
    return torch.tensor([f.weight_norm, float(f.z0.abs().sum()), f.roundoff, f.checksum, first], dtype=torch.float32)
