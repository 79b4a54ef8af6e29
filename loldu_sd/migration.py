"""Adapter file formats 1 and 2, read as they always were and converted to the change that format 3 stores.

Format 2 stores the absolute z and sigma, and the fingerprint (||W0||_F, sum|z0|, unit roundoff of W0's dtype).
Format 1 has no pivot order: it chose pivots on the panel rounded through fp16 (or the config's canonical dtype), and
its fingerprint's third column is a checksum of those pivots. Both apply sigma z - sigma0 z0 with z0 recomputed on
the loaded copy; `legacy_change` gives the (dz, dsigma) with exactly that update, so a loaded old file trains, saves
(as format 3) and mixes like any other adapter.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from .decompose import LDUFactors, legacy_pivots, unit_roundoff

LEGACY_CANONICAL = "float16"  # version 1 chose pivots on W0 rounded through this dtype (unless its config said None)
# Base checks of formats 1-2, relative, in units of (roundoff of the file's base + roundoff of the loaded base)
NORM_UNITS, Z0_UNITS, MULTIPLIER_UNITS = 1.0, 8.0, 64.0
NORM_FLOOR, Z0_FLOOR, MULTIPLIER_FLOOR = 1e-6, 1e-5, 1e-4
VALUE_KEYS = {1: ("loldu.z", "loldu.sigma"), 2: ("loldu.z", "loldu.sigma")}  # absolute z and sigma
FINGERPRINT_COLUMNS = {1: 3, 2: 3}


def legacy_change(z: torch.Tensor, sigma: torch.Tensor, z0: torch.Tensor, sigma0: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dz, dsigma) of an absolute (z, sigma) over the loaded copy's z0: sigma z - sigma0 z0 as formats 1-2 applied."""
    return z.float() - z0.float().cpu(), sigma.float() - sigma0


def legacy_layer_pivots(path: Path, where: str, weight: torch.Tensor, rank: int, stored: torch.Tensor,
                        canonical: str | None, error: Callable[[str], Exception], current: int
                        ) -> tuple[torch.Tensor, float]:
    """Format 1: the pivots it chose, if this copy still picks them, and the roundoff of its canonical dtype."""
    legacy = legacy_pivots(weight, rank, canonical)
    if float(sum(k * p for k, p in enumerate(legacy.tolist(), 1))) % 16777213.0 != float(stored[2]):
        raise error(
            f"a format version 1 file made on another precision copy of this base (layer {where} pivots "
            "on other rows here); load it on the copy it was made on and re-save it with save_loldu / "
            f"pipe.save_loldu_weights to get format version {current}, which loads on fp32, fp16 and bf16 alike")
    return legacy, unit_roundoff(getattr(torch, canonical or "float32"))


def check_legacy_base(head: str, factors: LDUFactors, stored: torch.Tensor, units: float, weight: torch.Tensor,
                      error: Callable[[str], Exception]) -> None:
    """Formats 1-2: ||W0|| (a full read of the weight, as those formats stored it) and sum|z0| within rounding."""
    norm = float(torch.linalg.norm(weight.detach(), dtype=torch.float32))
    if not math.isclose(norm, stored[0], rel_tol=NORM_UNITS * units + NORM_FLOOR):
        raise error(f"{head} has ||W0|| {norm:.6g} here vs {float(stored[0]):.6g} in the file, more than the two "
                    "copies' rounding explains")
    sum_z0 = float(factors.z0.abs().sum())
    if not math.isclose(sum_z0, stored[1], rel_tol=Z0_UNITS * units + Z0_FLOOR):
        raise error(f"{head} has sum|z0| {sum_z0:.6g} here vs {float(stored[1]):.6g} in the file, more than the two "
                    "copies' rounding explains")
