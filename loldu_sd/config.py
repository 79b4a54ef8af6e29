"""LoLDUConfig: every knob of a LoLDU adapter, validated, and serialisable into the adapter file."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

# |mixing weight| and |scale| accepted by the pipeline calls: far beyond any useful strength, small enough that
# images stay finite (1e30 gave all-NaN images)
MAX_WEIGHT = 100.0
INITS = ("ldu", "uniform", "uniform_mean", "normal", "normal_stats", "constant", "zeros", "ones")


def bounded_weight(value: object, what: str) -> float:
    """`value` as a float within +-MAX_WEIGHT, or a one-line ValueError naming `what` (NaN and inf included)."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not abs(number) <= MAX_WEIGHT:  # also False for NaN
        raise ValueError(f"{what} must be a number between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}, got {value!r}")
    return number


@dataclass
class LoLDUConfig:
    """Configuration of one LoLDU adapter (paper: arXiv 2410.13618, eqs. 6-12)."""

    rank: int = field(default=32, metadata={"help": "r: number of LDU pivots kept; r+1 trainable values per layer."})
    alpha: float | None = field(default=None, metadata={"help": "sigma0 = alpha / rank; None means alpha = rank."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Linear layers to adapt: a list of name suffixes (peft-style) or one regex (full match)."},
    )
    init: str = field(default="ldu", metadata={"help": f"z initialisation, one of {INITS} (paper Table V)."})
    init_range: tuple[float, float] = field(default=(-1.0, 1.0), metadata={"help": "(a, b) for init='uniform'."})
    train_sigma: bool = field(default=True, metadata={"help": "Train the per-layer scale sigma (else r per layer)."})
    sigma_max: float | None = field(default=1.0, metadata={"help": "Projection bound 0 < sigma <= sigma_max (eq. 11)."})
    z_max_norm: float | None = field(default=None, metadata={"help": "Projection radius eps: ||z||_2 <= eps (eq. 12)."})
    factor_dtype: str = field(default="float32", metadata={"help": "Precision of the decomposition: float32|float64."})
    pivot_eps: float = field(default=1e-6, metadata={"help": "Pivots below pivot_eps*max|pivot| are clamped."})

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.init_range = tuple(self.init_range)  # JSON round-trips give lists
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoLDUConfig: rank must be a positive integer, got {self.rank!r}")
        if self.alpha is None:
            self.alpha = float(self.rank)
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoLDUConfig: alpha must be > 0, got {self.alpha}")
        if self.init not in INITS:
            raise ValueError(f"LoLDUConfig: init must be one of {INITS}, got {self.init!r}")
        if self.factor_dtype not in ("float32", "float64"):
            raise ValueError(f"LoLDUConfig: factor_dtype must be 'float32' or 'float64', got {self.factor_dtype!r}")
        if self.sigma_max is not None and not (0 < self.sigma0 <= self.sigma_max):
            raise ValueError(
                f"LoLDUConfig: sigma0 = alpha/rank = {self.sigma0:g} lies outside (0, sigma_max={self.sigma_max:g}]; "
                "the first projection would change the model. Lower alpha or raise sigma_max (None disables it)."
            )
        if self.z_max_norm is not None and self.z_max_norm <= 0:
            raise ValueError(f"LoLDUConfig: z_max_norm must be > 0, got {self.z_max_norm}")

    @property
    def sigma0(self) -> float:
        """Initial scale sigma0 = alpha / rank."""
        return float(self.alpha) / self.rank

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of the config."""
        d = asdict(self)
        d["init_range"] = list(self.init_range)
        return d

    def to_json(self) -> str:
        """Compact JSON string, as stored in adapter files."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoLDUConfig":
        """Build from a dict, ignoring unknown keys written by newer versions."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)
