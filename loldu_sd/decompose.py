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

import math
import warnings
import dataclasses
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
    weight_norm: float  # scale of W0 (weight_checksum): the unit of the update-size check
    roundoff: float = 0.0  # unit roundoff of the weight's dtype: how far another copy of this base may differ
    checksum: float = 0.0  # signed, row-position-weighted sum of sampled rows of W0 (weight_checksum)
    checksum_bound: float = 0.0  # the same sum of |terms|: rounding by u moves the checksum by at most u times it


def leading_factors(factors: LDUFactors, rank: int) -> LDUFactors:
    """The top-`rank` factors inside larger ones (factors are nested); the base-check fields are the weight's."""
    return dataclasses.replace(factors, B=factors.B[:, :rank], z0=factors.z0[:rank], A=factors.A[:rank],
                               pivots=factors.pivots[:rank])


def unit_roundoff(dtype: torch.dtype) -> float:
    """Largest relative rounding error of `dtype` (half its machine epsilon); 0 for non-float dtypes."""
    return torch.finfo(dtype).eps / 2 if dtype.is_floating_point else 0.0


SAMPLE_STRIDE = 16  # the base check reads every 16th row of W0: a full read for ||W0|| was a quarter of init


def weight_checksum(weight: torch.Tensor) -> tuple[float, float, float]:
    """(scale, checksum, bound) of W0 from every SAMPLE_STRIDE-th row: cheap, sign- and row-order-sensitive.

    scale: ||sampled rows||_F * sqrt(stride), an estimate of ||W0||_F. checksum: sum_i u_i sum_j W_ij over the sampled
    rows, with distinct row weights u_i in [1, 2), so negating W0 flips its sign and moving rows moves it. bound: the
    same sum over |W_ij|; a copy rounded with unit roundoff u moves the checksum by at most u * bound.
    """
    rows = weight.detach()[::SAMPLE_STRIDE].float()
    index = torch.arange(0, weight.shape[0], SAMPLE_STRIDE, device=rows.device, dtype=torch.float64)
    u = (torch.frac(index * 0.6180339887498949) + 1.0).float()  # golden-ratio steps: no two rows weigh alike
    stats = torch.stack([rows.norm() * SAMPLE_STRIDE**0.5, u @ rows.sum(dim=1), u @ rows.abs().sum(dim=1)])
    scale, checksum, bound = stats.tolist()  # one device sync
    return scale, checksum, bound


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


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """A column-major copy: LAPACK's layout, so lu_factor and solve_triangular copy nothing more (and, on a busy
    machine, start no threads for those copies)."""
    return t.T.contiguous().T


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
    """
    dtype = _DTYPES[factor_dtype] if isinstance(factor_dtype, str) else factor_dtype
    m, n = weight.shape
    if rank > min(m, n):
        raise ValueError(f"{name}: rank {rank} exceeds min(out, in) = {min(m, n)} of its {m}x{n} weight")
    forced = 0 if pivots is None else pivots.numel()
    if forced > rank:
        raise ValueError(f"{name}: {forced} forced pivots for rank {rank}")
    W = weight.detach()
    scale, checksum, bound = weight_checksum(W)
    panel = _column_major(W[:, :rank].to(dtype))
    if not (math.isfinite(scale) and math.isfinite(bound) and bool(torch.isfinite(panel).all())):
        raise ValueError(f"{name}: weight contains NaN or inf; cannot decompose it")  # in what the factors read

    # 1. panel LU: P^T W[:, :r] = L_panel U11 (the forced rows first)
    lu, perm = _panel_lu(panel, pivots, name)
    L_panel = torch.tril(lu, diagonal=-1)
    L_panel[:rank].diagonal().fill_(1.0)  # unit lower (m, r)
    U11 = torch.triu(lu[:rank])  # (r, r)

    # 2. the rest of the first r rows of U: U12 = L11^-1 (P^T W)[:r, r:]
    U12 = torch.linalg.solve_triangular(L_panel[:rank], _column_major(W[perm[:rank], rank:].to(dtype)), upper=False,
                                        unitriangular=True)
    U_rows = torch.cat([U11, U12], dim=1)  # (r, n)
    if not bool(torch.isfinite(U12).all()):
        raise ValueError(f"{name}: weight contains NaN or inf; cannot decompose it")  # in a pivot row

    # 3. pivots; a (near-)zero pivot would divide by zero, so clamp it (documented in README). A clamped pivot
    # takes its row's max |u| (at least the floor): A's row then stays within [-1, 1] (a bare floor would give
    # entries ~1e6..1e37, inf once cast to fp16), and B diag(z0) A is still exactly the top-r LU product.
    z0 = U11.diagonal().clone()
    floor = max(pivot_eps * float(z0.abs().max()), torch.finfo(dtype).tiny)
    tiny = z0.abs() < floor
    if tiny.any():
        warnings.warn(
            f"{name}: {int(tiny.sum())} of {rank} pivots are below {floor:.3g} (rank-deficient weight); clamped to "
            f"+-max(|row of U|, {floor:.3g}). Consider a smaller rank for this layer.",
            stacklevel=2,
        )
        sign = torch.where(z0 < 0, -1.0, 1.0).to(dtype)
        z0 = torch.where(tiny, sign * U_rows.abs().amax(dim=1).clamp(min=floor), z0)
    A = U_rows / z0[:, None]

    # 4. multipliers back in original row order: B = P L_panel
    B = torch.empty_like(L_panel, memory_format=torch.contiguous_format)
    B[perm] = L_panel
    return LDUFactors(B=B, z0=z0, A=A, pivots=perm[:rank].clone(), weight_norm=max(scale, float(panel.norm())),
                      roundoff=unit_roundoff(W.dtype), checksum=checksum, checksum_bound=bound)


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
