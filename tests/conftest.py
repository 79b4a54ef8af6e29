"""Shared pytest fixtures: a fixed seed for every test and a tiny attention-style model with named Linear layers."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

# Tiny models: one thread is faster than two (no sync overhead) and immune to a busy machine's oversubscription.
# The env var reaches the subprocesses the end-to-end tests start (accelerate launch, torchrun, the CLIs).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    """Each test is a new process to accelerate, which keeps one mixed precision per process (the library never
    resets it); the reset is accelerate's own test-suite helper, so it lives here, not in loldu_sd."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()


class TinyAttention(nn.Module):
    """Self-attention with diffusers-style names: to_q, to_k, to_v (no bias) and to_out.0 (bias)."""

    def __init__(self, dim: int, bias: bool = False):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=bias) for _ in range(3))
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.to_out(att @ v)


class TinyBlock(nn.Module):
    """Attention plus a non-square feed-forward (dim -> hidden -> dim)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.attn = TinyAttention(dim)
        self.ff = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.ff(x)


class TinyNet(nn.Module):
    """proj_in (in_dim -> dim), n_blocks TinyBlocks, proj_out (dim -> out_dim): every Linear shape kind, ~1k params."""

    def __init__(self, in_dim: int = 6, dim: int = 8, hidden: int = 12, out_dim: int = 5, n_blocks: int = 2):
        super().__init__()
        self.in_dim = in_dim
        self.proj_in = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(TinyBlock(dim, hidden) for _ in range(n_blocks))
        self.proj_out = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        for block in self.blocks:
            h = block(h)
        return self.proj_out(h)


@pytest.fixture
def tiny_net():
    """Factory: tiny_net(seed=0, dtype=torch.float32, **sizes) -> a seeded TinyNet (same seed, same weights)."""

    def make(seed: int = 0, dtype: torch.dtype = torch.float32, **sizes) -> TinyNet:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return TinyNet(**sizes).to(dtype)

    return make
