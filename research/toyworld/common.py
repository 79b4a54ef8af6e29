"""What every pretraining stage shares: tensors from renders, the learning-rate schedule, the loss log, blur and
edge weights, and resumable safetensors checkpoints (model and optimizer state; nothing is pickled)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

CHECKPOINT_SECONDS = 180.0  # a stage saves at least this often, so an interrupted run loses minutes, not hours


def images_to_tensor(images, device: str | torch.device = "cpu") -> torch.Tensor:
    """PIL images -> float tensor [N, 3, H, W] in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return (torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0).to(device)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak at step `total`, and 10 % after it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Log:
    """Loss curve (mean every `every` steps) appended to a JSON-lines file, and a one-line progress print."""

    def __init__(self, path: Path, every: int = 50):
        self.path, self.every, self.buf, self.t0 = path, every, [], time.time()

    def add(self, step: int, loss: float, **extra) -> None:
        self.buf.append(loss)
        if (step + 1) % self.every == 0:
            mean = sum(self.buf) / len(self.buf)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step + 1, "loss": round(mean, 5), **extra}) + "\n")
            print(f"{self.path.stem} step {step + 1} loss {mean:.4f} ({time.time() - self.t0:.0f} s)", flush=True)
            self.buf = []


def gaussian_blur(z: torch.Tensor, sigma: float) -> torch.Tensor:
    """A separable 5-tap Gaussian blur of each channel (replicated edges): soft latents or images."""
    taps = torch.exp(-torch.arange(-2, 3, dtype=z.dtype, device=z.device) ** 2 / (2 * sigma ** 2))
    taps, c = taps / taps.sum(), z.shape[1]
    z = F.conv2d(F.pad(z, (2, 2, 0, 0), mode="replicate"), taps.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(z, (0, 0, 2, 2), mode="replicate"), taps.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)


def edge_weights(x: torch.Tensor, gain: float = 4.0) -> torch.Tensor:
    """Per-pixel loss weights 1 + gain * local contrast: edges and small details count as much as wide backgrounds."""
    gx = F.pad((x[..., :, 1:] - x[..., :, :-1]).abs().sum(1, keepdim=True), (0, 1, 0, 0))
    gy = F.pad((x[..., 1:, :] - x[..., :-1, :]).abs().sum(1, keepdim=True), (0, 0, 0, 1))
    return 1 + gain * (gx + gy).clamp(max=2.0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of two [N, 3, H, W] batches in [-1, 1]."""
    mse = ((a.float() - b.float()) / 2).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(1 / mse)


# ---- data ------------------------------------------------------------------------------------------------------------
class _StepData(torch.utils.data.Dataset):
    """Item i is `make(start + i)`: each step's batch depends on its step number only, so workers may prefetch."""

    def __init__(self, make, start: int, steps: int):
        self.make, self.start, self.steps = make, start, steps

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __getitem__(self, i: int):
        return self.make(self.start + i)


def step_batches(make, start: int, steps: int, workers: int = 0):
    """Iterate `make(step)` for step in [start, steps), rendered by `workers` processes ahead of the training step.

    Rendering runs on the CPU (PIL); on a GPU it would otherwise leave the device idle most of each step.
    """
    data = _StepData(make, start, steps)
    return torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=workers,
                                       prefetch_factor=4 if workers else None, persistent_workers=False)


# ---- checkpoints ---------------------------------------------------------------------------------------------------
def save_state(path: Path, step: int, models: dict, opt: torch.optim.Optimizer) -> None:
    """Write models and optimizer state as one safetensors file (atomically: a crash leaves the previous one)."""
    tensors = {f"model.{name}.{k}": v.detach().cpu().contiguous() for name, m in models.items()
               for k, v in m.state_dict().items()}
    opt_state = opt.state_dict()
    for idx, state in opt_state["state"].items():
        for k, v in state.items():
            tensors[f"opt.{idx}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    meta = {"step": str(step), "param_groups": json.dumps(opt_state["param_groups"])}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=meta)
    tmp.replace(path)


def load_state(path: Path, models: dict, opt: torch.optim.Optimizer | None = None) -> int:
    """Restore what `save_state` wrote into `models` (and `opt`); the step it was saved at, 0 without a file."""
    if not path.is_file():
        return 0
    with safe_open(path, "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    for name, m in models.items():
        prefix = f"model.{name}."
        device = next(m.parameters()).device
        m.load_state_dict({k[len(prefix):]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)})
    if opt is not None:
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return int(meta["step"])


def model_tensors(path: Path, name: str) -> dict:
    """One model's weights from a `save_state` checkpoint."""
    prefix = f"model.{name}."
    with safe_open(path, "pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def checkpoint_step(path: Path) -> int:
    """The step a `save_state` checkpoint was written at."""
    with safe_open(path, "pt") as f:
        return int(f.metadata()["step"])


class Checkpointer:
    """Save a stage's state every `every` steps, at least every CHECKPOINT_SECONDS, and at its last step."""

    def __init__(self, path: Path, models: dict, opt, every: int = 250, seconds: float = CHECKPOINT_SECONDS):
        self.path, self.models, self.opt, self.every, self.seconds = path, models, opt, every, seconds
        self.last = time.time()

    def maybe_save(self, step: int, total: int) -> None:
        done = step + 1
        if done % self.every == 0 or done == total or time.time() - self.last > self.seconds:
            save_state(self.path, done, self.models, self.opt)
            self.last = time.time()


def resume_step(path: Path, models: dict, opt, resume: bool) -> int:
    """The step a stage starts from: its checkpoint's with --resume; refuse to overwrite one without it."""
    if path.is_file() and not resume:
        raise SystemExit(f"{path} exists: pass --resume to continue that run, or use another --out")
    return load_state(path, models, opt) if resume else 0
