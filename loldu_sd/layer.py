"""LoLDULinear: an nn.Linear carrying named LoLDU adapters on shared, frozen top-r LDU factors.

    y = W0 x + b + B (s ⊙ (A x)),   s = sum_a w_a * c * (sigma_a z_a - sigma0_a z0_a)   (zero-padded to max rank)

W0 and b are the wrapped layer's own Parameters (shared, never copied or modified until merge), so state-dict keys
and `isinstance(m, nn.Linear)` checks keep working. B (m x R), A (R x n) are non-persistent buffers: the adapter file
stays tiny because loading recomputes them from W0 (the trade-off peft's VeRA documents for its shared matrices).
Factors are nested, so adapters of different ranks share the leading columns/rows of one rank-R decomposition.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import LoLDUConfig
from .decompose import LDUFactors, fingerprint, leading_factors, top_r_ldu


def _init_z(cfg: LoLDUConfig, z0: torch.Tensor) -> torch.Tensor:
    """Trainable z at init (paper Table V); the residual keeps z0, so only 'ldu' is identity at init."""
    if cfg.init == "ldu":
        return z0.clone()
    mean, std = z0.mean(), z0.std() if z0.numel() > 1 else torch.zeros(())
    if cfg.init == "uniform":
        a, b = cfg.init_range
        return torch.empty_like(z0).uniform_(a, b)
    if cfg.init == "uniform_mean":  # U(-mean/2, mean/2)
        half = float(mean.abs()) / 2
        return torch.empty_like(z0).uniform_(-half, half)
    if cfg.init == "normal":
        return torch.randn_like(z0)
    if cfg.init == "normal_stats":
        return torch.randn_like(z0) * std + mean
    if cfg.init == "constant":
        return torch.full_like(z0, float(mean))
    if cfg.init == "zeros":
        return torch.zeros_like(z0)
    return torch.ones_like(z0)  # "ones"


class _MergedLoLDULinear(torch.autograd.Function):
    """y = x (W0 + B diag(s) A)^T + b with W0, B, A frozen: the training path for layers that see many tokens.

    The low-rank path costs 4 skinny (T x r) products per step; here forward and the input gradient use one merged
    weight (2 m n r to build, twice) and only grad s = sum_t (g_t B) * (A x_t) needs rank-r products. Cheaper when
    T (m + n) > 2 m n, e.g. the 320-wide attention projections of the SD UNet at 32x32 latents (about 1.3x faster
    per layer on CPU). Only for float32, where folding the delta into W0 loses nothing that the output keeps.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, B, A, s):
        u = F.linear(x, A)  # (..., r): A x, kept for grad s
        ctx.save_for_backward(u, weight, B, A, s)
        return F.linear(x, torch.addmm(weight, B * s, A), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        u, weight, B, A, s = ctx.saved_tensors
        grad_x = grad @ torch.addmm(weight, B * s, A) if ctx.needs_input_grad[0] else None  # W' recomputed
        grad_s = ((grad @ B) * u).reshape(-1, u.shape[-1]).sum(0) if ctx.needs_input_grad[5] else None
        return grad_x, None, None, None, None, grad_s


class RuntimeScale:
    """The runtime multiplier that every LoLDU layer of one adapted model reads (LoRA's `scale`, 1.0 by default).

    One object per model: a caller (e.g. a forward pre-hook reading `cross_attention_kwargs`) sets `value` once and
    every layer follows. `hooks` holds the handles of such callers, removed with the model's last LoLDU layer.
    """

    def __init__(self) -> None:
        self.value = 1.0
        self.hooks: list = []

    def release(self) -> None:
        """Remove the hooks that drive this scale."""
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()


# A delta beyond 1e4 x ||W0||_F swamps its layer: activations grow by that factor per adapted layer, overflow fp16
# (65504) within a block and saturate softmax, i.e. NaN/inf images. Trained adapters stay far below 1.
MAX_DELTA_RATIO = 1e4


def delta_ratio(s: torch.Tensor, B: torch.Tensor, A: torch.Tensor, weight_norm: float) -> torch.Tensor:
    """Upper bound of ||B diag(s) A||_F / ||W0||_F as a 0-dim float64 tensor (NaN/inf when s is not finite)."""
    r = s.numel()
    # the norms in the factors' dtype (no m x r float64 copies), the r products in float64 (no overflow to inf)
    norms = (B[:, :r].norm(dim=0) * A[:r].norm(dim=1)).double()
    return (s.double().abs() * norms).sum() / max(weight_norm, 1e-30)


def ratio_problem(ratio: float) -> str | None:
    """Why a delta_ratio makes an adapter unusable, or None when it is fine."""
    if not math.isfinite(ratio):
        return "holds NaN/inf values"
    if ratio > MAX_DELTA_RATIO:
        return (f"changes its layer by up to {ratio:.3g} x ||W0|| (limit {MAX_DELTA_RATIO:g}); values this large "
                "give NaN/inf outputs")
    return None


_MODULE_DICT = nn.ModuleDict()  # adapters live in one: its attribute names ("keys", "training", ...) are taken


def adapter_name_problem(name: object) -> str | None:
    """Why `name` cannot name an adapter (empty, has a '.', or a ModuleDict attribute), or None when it can."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if "." in name:
        return "must not contain '.'"
    if hasattr(_MODULE_DICT, name):
        return "is reserved (an attribute of torch's ModuleDict)"
    return None


def check_adapter_name(name: object) -> None:
    """ValueError when adapter_name_problem finds one: raised before any layer is wrapped or changed."""
    problem = adapter_name_problem(name)
    if problem:
        raise ValueError(f"adapter name {name!r} {problem}; pick another name")



def change_diag(dz: torch.Tensor, dsigma: torch.Tensor, z0: torch.Tensor, sigma0: float | torch.Tensor) -> torch.Tensor:
    """s = sigma z - sigma0 z0 from the change (z = z0 + dz, sigma = sigma0 + dsigma), in float32.

    Written as sigma0 dz + dsigma z: the base's own top-r term sigma0 z0 never enters, so what a copy of the base
    rounds differently (z0) only scales with the trained change, never with the base itself.
    """
    dz, z0 = dz.float(), z0.float()
    return sigma0 * dz + dsigma.float() * (z0 + dz)


class LoLDUAdapter(nn.Module):
    """One adapter of one layer: the trained change dz (r) and dsigma of z = z0 + dz, sigma = sigma0 + dsigma.

    Training the change keeps it exact in float32 (a small change is not a rounding of z0), makes weight decay pull
    toward the base, and is what adapter files store.
    """

    def __init__(self, config: LoLDUConfig, factors: LDUFactors):
        super().__init__()
        z0 = factors.z0
        self.config = config
        self.rank = z0.numel()
        self.dz = nn.Parameter(_init_z(config, z0).float() - z0.float())  # exact zeros for init='ldu'
        self.dsigma = nn.Parameter(torch.zeros((), device=z0.device), requires_grad=config.train_sigma)
        # z0 is a buffer so that .to(device) moves it with dz; kept in float32 whatever a later cast does
        self.register_buffer("z0", z0.float().clone(), persistent=False)
        self.register_buffer("pivots", factors.pivots.clone(), persistent=False)
        self.weight_norm = factors.weight_norm
        self.roundoff = factors.roundoff  # of the base weight's dtype: how far another copy of the base may differ
        self.checksum, self.checksum_bound = factors.checksum, factors.checksum_bound
        self.max_multiplier = factors.max_multiplier
        self.mix_weight = 1.0  # set by set_active: this adapter's share in a mix

    @property
    def sigma0(self) -> float:
        """The initial scale alpha / rank."""
        return self.config.sigma0

    @property
    def z(self) -> torch.Tensor:
        """z = z0 + dz (read only: train and set dz)."""
        return self.z0.float() + self.dz.float()

    @property
    def sigma(self) -> torch.Tensor:
        """sigma = sigma0 + dsigma (read only: train and set dsigma)."""
        return self.sigma0 + self.dsigma.float()

    @torch.no_grad()
    def set_(self, z: torch.Tensor | None = None, sigma: float | torch.Tensor | None = None) -> None:
        """Set the absolute z and/or sigma (stored as their change from z0 and sigma0)."""
        if z is not None:
            self.dz.copy_(torch.as_tensor(z, dtype=torch.float32) - self.z0.float())
        if sigma is not None:
            self.dsigma.copy_(torch.as_tensor(sigma, dtype=torch.float32) - self.sigma0)

    def diag(self) -> torch.Tensor:
        """s = sigma z - sigma0 z0 in float32: the diagonal of this adapter's delta."""
        return change_diag(self.dz, self.dsigma, self.z0, self.sigma0)

    def fingerprint(self) -> torch.Tensor:
        """Fingerprint of the base weight this adapter was built on."""
        return fingerprint(LDUFactors(None, self.z0, None, self.pivots, self.weight_norm, self.roundoff,
                                      self.checksum, self.checksum_bound, self.max_multiplier))

    @torch.no_grad()
    def project_(self) -> None:
        """Projected gradient step (eqs. 10-12): sigma into (0, sigma_max], ||z|| <= z_max_norm."""
        if self.config.sigma_max is not None:  # 2^-20 sigma0 stands for the open bound 0 (float32 keeps it > 0)
            self.dsigma.clamp_(min=self.sigma0 * (2**-20 - 1), max=self.config.sigma_max - self.sigma0)
        if self.config.z_max_norm is not None:
            z = self.z
            norm = z.norm()
            if norm > self.config.z_max_norm:
                self.dz.copy_(z * (self.config.z_max_norm / norm) - self.z0)


class LoLDULinear(nn.Linear):
    """nn.Linear with LoLDU adapters; build it with `LoLDULinear.from_linear(linear)`."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale: RuntimeScale | None = None) -> "LoLDULinear":
        """Wrap `linear` without copying: the new layer shares its weight and bias Parameters (and `scale`)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.register_parameter("bias", linear.bias)
        layer._loldu_base_grads = [p.requires_grad for p in (linear.weight, linear.bias) if p is not None]
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        layer.loldu_adapters = nn.ModuleDict()
        layer.register_buffer("loldu_B", None, persistent=False)  # (m, R)
        layer.register_buffer("loldu_A", None, persistent=False)  # (R, n)
        layer.register_buffer("loldu_pivots", None, persistent=False)  # (R,) rows eliminated, in order
        layer.loldu_active: list[str] = []
        layer.loldu_merged: list[str] = []
        layer._loldu_merges: list[tuple[list[str], float]] = []  # (names, scale) per merge call, for unmerge
        layer.loldu_runtime_scale = RuntimeScale() if scale is None else scale
        # (batch, R) per-sample diagonals while loldu_sd.batch binds one; they replace the active adapters
        layer.loldu_sample_diag = None
        # W0 kept while merged, so unmerge is bit-exact; a buffer, so that .to(device/dtype) after a merge moves it too
        layer.register_buffer("_loldu_original_weight", None, persistent=False)
        return layer

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear sharing this layer's (unmerged) weight and bias."""
        self.unmerge()
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight = self.weight
        linear.register_parameter("bias", self.bias)
        for p, grad in zip((p for p in (self.weight, self.bias) if p is not None), self._loldu_base_grads):
            p.requires_grad_(grad)  # frozen for the adapter only: give back the layer as it came
        return linear

    # ---- adapters -------------------------------------------------------------------------------------------
    def max_rank(self) -> int:
        """Largest rank this layer can take: min(out, in)."""
        return min(self.in_features, self.out_features)

    def factorise(self, config: LoLDUConfig, rank: int, name: str = "weight",
                  pivots: torch.Tensor | None = None) -> LDUFactors:
        """Top-`rank` LDU factors of this layer's base weight (W0, unmerged); `pivots` forces the first steps."""
        weight = self._loldu_original_weight if self._loldu_original_weight is not None else self.weight
        return top_r_ldu(weight, rank, config.factor_dtype, config.pivot_eps, name, pivots)

    def pivot_conflict(self, pivots: torch.Tensor) -> bool:
        """Whether `pivots` disagrees with the row order of the factors this layer holds (they must nest)."""
        if self.loldu_pivots is None:
            return False
        k = min(pivots.numel(), self.loldu_pivots.numel())
        return not torch.equal(pivots[:k].cpu(), self.loldu_pivots[:k].cpu())

    def add_adapter(self, name: str, config: LoLDUConfig, factors: LDUFactors | None = None,
                    layer_name: str = "weight") -> LoLDUAdapter:
        """Add adapter `name` (rank clamped to min(out, in)); decomposes W0 unless `factors` are given."""
        if name in self.loldu_adapters:
            raise ValueError(f"{layer_name}: adapter {name!r} already exists")
        check_adapter_name(name)
        rank = min(config.rank, self.max_rank())
        current = 0 if self.loldu_B is None else self.loldu_B.shape[1]
        if factors is None or factors.B.shape[1] < rank:  # the held row order stays: other adapters keep theirs
            factors = self.factorise(config, max(rank, current), layer_name, self.loldu_pivots)
        elif self.pivot_conflict(factors.pivots):
            raise ValueError(f"{layer_name}: adapter {name!r} pivots on other rows than this layer's adapters "
                             f"{list(self.loldu_adapters)}; they cannot share one factorisation")
        self.install_factors(factors)
        adapter = LoLDUAdapter(config, leading_factors(factors, rank))
        self.loldu_adapters[name] = adapter  # built on the factors' device, i.e. the weight's
        self.loldu_active.append(name)
        return adapter

    def install_factors(self, factors: LDUFactors) -> None:
        """Keep the B, A and pivot order of `factors` if they have more columns than the current ones."""
        if self.loldu_B is None or factors.B.shape[1] > self.loldu_B.shape[1]:
            # nested factors: growing R leaves smaller adapters' subspace intact
            self.loldu_B = factors.B.to(self.weight.dtype)
            self.loldu_A = factors.A.to(self.weight.dtype)
            self.loldu_pivots = factors.pivots.clone()

    def adapter_ratios(self) -> dict[str, torch.Tensor]:
        """delta_ratio of every adapter of this layer (tensors: callers sync once for all layers)."""
        return {n: delta_ratio(a.diag().detach(), self.loldu_B, self.loldu_A, a.weight_norm)
                for n, a in self.loldu_adapters.items()}

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` (unmerging it first if needed)."""
        if name in self.loldu_merged:
            self.unmerge([name])
        del self.loldu_adapters[name]
        self.loldu_active = [a for a in self.loldu_active if a != name]

    def set_active(self, names: list[str], weights: list[float] | None = None, missing_ok: bool = False) -> None:
        """Activate `names` with mixing weights (default 1.0 each); `missing_ok` skips names this layer lacks."""
        weights = [1.0] * len(names) if weights is None else weights
        adapters = self.loldu_adapters._modules  # a plain dict: switching is a hot path, allocating next to nothing
        unknown = [] if missing_ok else [n for n in names if n not in adapters]
        if unknown:  # before any change
            raise KeyError(f"no adapter {unknown[0]!r} on this layer; present: {list(adapters)}")
        active = self.loldu_active
        active.clear()  # in place: no nn.Module attribute assignment
        for n, w in zip(names, weights):
            adapter = adapters.get(n)
            if adapter is not None:
                adapter.__dict__["mix_weight"] = float(w)  # a float attribute: nn.Module's checks are moot
                active.append(n)

    # ---- forward / merge ------------------------------------------------------------------------------------
    def combined_diag(self, names: list[str] | None = None, scale: float = 1.0) -> torch.Tensor | None:
        """sum_a w_a * scale * s_a over `names` (default: active, unmerged), zero-padded to the largest rank."""
        if names is None:
            names = [a for a in self.loldu_active if a not in self.loldu_merged]
        if not names:
            return None
        adapters = [self.loldu_adapters[n] for n in names]
        if len(adapters) == 1:
            return adapters[0].diag() * (adapters[0].mix_weight * scale)
        s = torch.zeros(max(a.rank for a in adapters), device=self.weight.device)
        for a in adapters:
            s[: a.rank] += a.diag() * (a.mix_weight * scale)
        return s

    def delta_weight(self, names: list[str] | None = None, scale: float = 1.0) -> torch.Tensor:
        """Delta W = B diag(s) A (out x in, float32) of `names`; zeros when no adapter is selected."""
        s = self.combined_diag(names, scale)
        if s is None:
            return torch.zeros_like(self.weight, dtype=torch.float32)
        r = s.numel()
        return (self.loldu_B[:, :r].float() * s) @ self.loldu_A[:r].float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.loldu_sample_diag is not None:
            return self.per_sample_forward(x, self.loldu_sample_diag * self.loldu_runtime_scale.value)
        s = self.combined_diag(scale=self.loldu_runtime_scale.value)
        if s is None:
            return F.linear(x, self.weight, self.bias)
        r = s.numel()
        B, A, s = self.loldu_B[:, :r], self.loldu_A[:r], s.to(x.dtype)
        low_rank_work = x.numel() // self.in_features * (self.in_features + self.out_features)  # T (m + n)
        if not torch.is_grad_enabled():
            if low_rank_work > self.weight.numel():
                # inference on many tokens: one (m x n x r) weight update beats T (m + n) r extra work
                return F.linear(x, torch.addmm(self.weight, B * s, A), self.bias)
        elif (low_rank_work > 2 * self.weight.numel() and x.dtype == torch.float32
              and not torch.is_autocast_enabled(x.device.type)  # autocast: ops inside pick their own dtypes
              and not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)):
            # training on many tokens: merged forward and input gradient, only grad s needs the rank-r products
            return _MergedLoLDULinear.apply(x, self.weight, self.bias, B, A, s)
        # the low-rank path keeps backward free of any m x n weight gradient
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, A) * s, B)

    def per_sample_forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """y[b] = W0 x[b] + b + B (table[b] ⊙ A x[b]): sample b's own diagonal; a zero row gives the base output."""
        if x.shape[0] != table.shape[0]:
            raise ValueError(f"per-sample adapters: batch of {x.shape[0]} inputs, table of {table.shape[0]} rows")
        base, r = F.linear(x, self.weight, self.bias), table.shape[1]
        if r == 0:  # no sample uses an adapter that reaches this layer
            return base
        s = table.to(x.dtype).reshape(table.shape[0], *[1] * (x.ndim - 2), r)
        u = (F.linear(x, self.loldu_A[:r]) * s).reshape(-1, r)
        # in place into the base output: no second (tokens x out) tensor; a zero row adds exact zeros
        return base.view(-1, self.out_features).addmm_(u, self.loldu_B[:, :r].T).view(base.shape)

    @torch.no_grad()
    def merge(self, names: list[str] | None = None, scale: float = 1.0) -> None:
        """Fold `names` (default: active, unmerged) into W; W0 is kept so that unmerge is bit-exact."""
        names = [a for a in (self.loldu_active if names is None else names) if a not in self.loldu_merged]
        if not names:
            return
        if self._loldu_original_weight is None:
            self._loldu_original_weight = self.weight.data
        merged = self.weight.data.float() + self.delta_weight(names, scale)
        self.weight.data = merged.to(self.weight.dtype)
        self.loldu_merged.extend(names)
        self._loldu_merges.append((names, float(scale)))

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> None:
        """Undo merges of `names` (default all): restores W0 bit-exactly, then re-merges the others as they were."""
        if self._loldu_original_weight is None:
            return
        replay = [] if names is None else [([a for a in group if a not in names], scale)
                                           for group, scale in self._loldu_merges]
        self.weight.data = self._loldu_original_weight
        self._loldu_original_weight = None
        self.loldu_merged, self._loldu_merges = [], []
        for group, scale in replay:  # each remaining merge with its own scale, in its order: exact
            self.merge(group, scale)

    def extra_repr(self) -> str:
        ranks = {n: a.rank for n, a in self.loldu_adapters.items()}
        return f"{super().extra_repr()}, loldu={ranks}, active={self.loldu_active}, merged={self.loldu_merged}"
