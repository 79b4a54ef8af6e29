"""Naive LoLDU, written from the paper's description (arXiv 2410.13618, §III and Algorithm 1), as a benchmark baseline.

This is what a direct reading of the paper gives, to show what loldu_sd's design choices buy:
  - a full `torch.linalg.lu(W0)` of every adapted weight (O(m n min(m, n)) instead of a panel LU, O((m + n) r^2));
  - the dense m x m permutation matrix P kept as a tensor, with L_r = L[:, :r] and U_r = (D^-1 U)[:r] (unit upper);
  - W0 overwritten by the residual RSM = W0 - sigma0 P L_r diag(z0) U_r (so identity at init is only approximate);
  - the weight recomputed through `torch.nn.utils.parametrize` on every forward:
        W = RSM + sigma * P @ L_r @ diag(z) @ U_r
    which makes autograd build the full m x n weight gradient of every adapted layer in each backward.
It is NOT loldu_sd's implementation and is not used outside eval.bench.
"""
from __future__ import annotations

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize


class NaiveLoLDU(nn.Module):
    """Parametrization W(RSM) = RSM + sigma * P L_r diag(z) U_r, holding dense P (m x m), L_r (m x r), U_r (r x n)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float | None = None):
        super().__init__()
        P, L, U = torch.linalg.lu(weight.detach().float())  # W0 = P L U, full decomposition
        d = U.diagonal()  # LDU: D = diag(U), U_unit = D^-1 U
        self.register_buffer("P", P)  # dense m x m permutation
        self.register_buffer("L_r", L[:, :rank].contiguous())
        self.register_buffer("U_r", (U[:rank] / d[:rank, None]).contiguous())
        self.z = nn.Parameter(d[:rank].clone())
        self.sigma = nn.Parameter(torch.tensor((alpha or rank) / rank))
        self.register_buffer("z0", d[:rank].clone())  # to give W0 back on removal
        self.sigma0 = (alpha or rank) / rank

    def dsm(self, initial: bool = False) -> torch.Tensor:
        """Decomposed subspace matrix sigma * P L_r diag(z) U_r (m x n), evaluated left to right as written."""
        sigma, z = (self.sigma0, self.z0) if initial else (self.sigma, self.z)
        return sigma * (self.P @ self.L_r @ torch.diag(z) @ self.U_r)

    def forward(self, rsm: torch.Tensor) -> torch.Tensor:
        return rsm + self.dsm().to(rsm.dtype)


def add_naive_loldu(module: nn.Module, layer_names: list[str], rank: int, alpha: float | None = None) -> nn.Module:
    """Replace each named Linear's weight by RSM and register the NaiveLoLDU parametrization (in place)."""
    for name in layer_names:
        linear = module.get_submodule(name)
        p = NaiveLoLDU(linear.weight, min(rank, *linear.weight.shape), alpha)
        with torch.no_grad():
            linear.weight.data = linear.weight.data - p.dsm().to(linear.weight.dtype)  # RSM replaces W0
        linear.weight.requires_grad_(False)
        parametrize.register_parametrization(linear, "weight", p, unsafe=True)
    return module


def naive_layers(module: nn.Module) -> list[tuple[str, NaiveLoLDU]]:
    """(layer name, parametrization) for every NaiveLoLDU in `module`."""
    out = []
    for name, m in module.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            out += [(name, p) for p in m.parametrizations.weight if isinstance(p, NaiveLoLDU)]
    return out


def naive_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Trainable tensors (z and sigma of every layer)."""
    return [t for _, p in naive_layers(module) for t in (p.z, p.sigma)]


def fuse_naive_loldu(module: nn.Module) -> None:
    """Bake the current weight into each layer and drop the parametrization (one way: W0 is gone)."""
    for name, _ in naive_layers(module):
        parametrize.remove_parametrizations(module.get_submodule(name), "weight", leave_parametrized=True)


def remove_naive_loldu(module: nn.Module) -> None:
    """Drop the parametrizations, putting W0 back as RSM + sigma0 P L_r diag(z0) U_r (up to rounding)."""
    for name, p in naive_layers(module):
        linear = module.get_submodule(name)
        parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
        with torch.no_grad():
            linear.weight.data = linear.weight.data + p.dsm(initial=True).to(linear.weight.dtype)


def bypass_naive_loldu(module: nn.Module) -> list[tuple[nn.Module, NaiveLoLDU]]:
    """Detach every parametrization (weight = RSM, a plain frozen Parameter); returns what restore needs."""
    out = []
    for name, p in naive_layers(module):
        linear = module.get_submodule(name)
        parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
        out.append((linear, p))
    return out


def restore_naive_loldu(bypassed: list[tuple[nn.Module, NaiveLoLDU]]) -> None:
    """Re-attach the parametrizations detached by bypass_naive_loldu (same z and sigma Parameters)."""
    for linear, p in bypassed:
        parametrize.register_parametrization(linear, "weight", p, unsafe=True)


def save_naive_loldu(path: str, module: nn.Module) -> None:
    """What a straightforward implementation saves: z and sigma under per-layer keys (no base check)."""
    tensors = {}
    for name, p in naive_layers(module):
        tensors[f"{name}.z"] = p.z.detach().float().contiguous()
        tensors[f"{name}.sigma"] = p.sigma.detach().float().reshape(1)
    save_file(tensors, path)
