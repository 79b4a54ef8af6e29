"""The global random number generators a training run seeds, handed back to the caller as they were."""
from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def caller_rngs_restored() -> Iterator[None]:
    """Inside the block a run may seed python, numpy and torch (CPU, every CUDA device); after it they are as before.

    Some inits draw from the global RNG and a resumed checkpoint restores it, so a run must set it; a caller that
    trains in-process (the studio, a notebook) keeps its own sequence.
    """
    python, numpy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)
