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
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


@dataclass
class LDUFactors:
    """Frozen top-r LDU factors of one weight."""

    B: torch.Tensor  # (m, r)
    z0: torch.Tensor  # (r,)
    A: torch.Tensor  # (r, n)
    pivots: torch.Tensor  # (r,) int64: original row index chosen as pivot at each step
    weight_norm: float  # ||W0||_F of the weight as given (not canonicalised), for the fingerprint


def _swaps_to_perm(piv: torch.Tensor, m: int) -> torch.Tensor:
    """LAPACK's sequential 1-based row swaps -> row order `perm` such that (P^T W)[i] = W[perm[i]]."""
    perm = np.arange(m, dtype=np.int64)  # numpy: no m-element Python list to convert (8 us instead of 83 at m=1280)
    for i, j in enumerate(piv.tolist()):
        j -= 1
        perm[i], perm[j] = perm[j], perm[i]
    return torch.from_numpy(perm)


def _canonicaliser(canonical_dtype: str | None, dtype: torch.dtype):
    """Function rounding a block through `canonical_dtype` (where representable) and casting it to `dtype`."""
    if canonical_dtype is None:
        return lambda t: t.to(dtype)
    cdt = _DTYPES[canonical_dtype]
    limit = torch.finfo(cdt).max

    def cast(t: torch.Tensor) -> torch.Tensor:
        # an overflow would turn weights into inf, so such blocks keep their own precision
        if t.numel() == 0:  # rank == in: no columns right of the panel
            return t.to(dtype)
        lo, hi = torch.aminmax(t)  # one pass, no |t| temporary
        return (t.to(cdt) if max(-float(lo), float(hi)) < limit else t).to(dtype)

    return cast


def top_r_ldu(
    weight: torch.Tensor,
    rank: int,
    factor_dtype: str | torch.dtype = "float32",
    canonical_dtype: str | None = None,
    pivot_eps: float = 1e-6,
    name: str = "weight",
) -> LDUFactors:
    """Top-r LDU factors (B, z0, A) of `weight` (out x in), computed in `factor_dtype` whatever the weight dtype."""
    dtype = _DTYPES[factor_dtype] if isinstance(factor_dtype, str) else factor_dtype
    m, n = weight.shape
    if rank > min(m, n):
        raise ValueError(f"{name}: rank {rank} exceeds min(out, in) = {min(m, n)} of its {m}x{n} weight")
    W = weight.detach()
    # Only the panel and the r pivot rows are read, so only they are canonicalised: O((m + n) r) work.
    cast = _canonicaliser(canonical_dtype, dtype)
    weight_norm = float(torch.linalg.norm(W.to(dtype)))
    if not math.isfinite(weight_norm):
        raise ValueError(f"{name}: weight contains NaN or inf; cannot decompose it")

    # 1. panel LU: P^T W[:, :r] = L_panel U11
    lu, piv, _ = torch.linalg.lu_factor_ex(cast(W[:, :rank]))  # (m, r); info > 0 only flags an exact zero pivot
    perm = _swaps_to_perm(piv.cpu(), m).to(W.device)
    lu = lu.contiguous()  # LAPACK returns column-major; row-major makes tril and the row scatter below fast
    L_panel = torch.tril(lu, diagonal=-1)
    L_panel[:rank].diagonal().fill_(1.0)  # unit lower (m, r)
    U11 = torch.triu(lu[:rank])  # (r, r)

    # 2. the rest of the first r rows of U: U12 = L11^-1 (P^T W)[:r, r:]
    U12 = torch.linalg.solve_triangular(L_panel[:rank], cast(W[perm[:rank], rank:]), upper=False, unitriangular=True)
    U_rows = torch.cat([U11, U12], dim=1)  # (r, n)

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
    B = torch.empty_like(L_panel)
    B[perm] = L_panel
    return LDUFactors(B=B, z0=z0, A=A, pivots=perm[:rank].clone(), weight_norm=weight_norm)


def fingerprint(f: LDUFactors) -> torch.Tensor:
    """Compact float32 fingerprint of a base weight: (||W0||_F, sum|z0|, checksum of the pivot rows)."""
    checksum = float(sum(k * p for k, p in enumerate(f.pivots.tolist(), 1))) % 16777213.0  # exact in float32
    return torch.tensor([f.weight_norm, float(f.z0.abs().sum()), checksum], dtype=torch.float32)
