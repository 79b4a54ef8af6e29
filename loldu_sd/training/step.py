"""One training step, shared by train_dreambooth and the quality benchmark (eval.quality_run).

A `Trainable` says what a method trains (parameters, the modules in training mode), what runs after every optimizer
step (LoLDU's projection), what must hold after it (finite, bounded values) and which files it ships. `training_step`
is the optimizer step over gradient-accumulation micro-batches. It runs on an accelerate `Accelerator` (the trainer,
one or several processes) or on `OneProcess` (the benchmark, whose processes each train runs of their own).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..model import loldu_parameters, loldu_value_problem, project_loldu_


class NonFiniteStep(ArithmeticError):
    """A step whose loss or resulting values went non-finite (or out of bounds); nothing of it should be kept."""


@dataclass
class Trainable:
    """What one method trains: parameters, modules in training mode, after-step hooks, checks and shipped files."""

    params: list[nn.Parameter] = field(default_factory=list)
    trained: dict[str, nn.Module] = field(default_factory=dict)  # component name -> module (the Conditioner's view)
    after_step: list[Callable[[float], None]] = field(default_factory=list)  # called with the step's learning rate
    savers: list[Callable[[Path], Path]] = field(default_factory=list)  # each writes one file into a folder
    checks: list[Callable[[], str | None]] = field(default_factory=list)  # a problem after the step, or None

    def merge(self, other: Trainable) -> Trainable:
        """Both trained together (e.g. LoLDU plus a token embedding)."""
        return Trainable(self.params + other.params, {**self.trained, **other.trained},
                         self.after_step + other.after_step, self.savers + other.savers, self.checks + other.checks)

    def save(self, folder: Path) -> int:
        """Write the shipped files into `folder`; their total size in bytes."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return sum(saver(folder).stat().st_size for saver in self.savers)

    def problem(self) -> str | None:
        """The first check's complaint after a step, or None."""
        return next((p for p in (check() for check in self.checks) if p), None)


def loldu_trainable(components: dict[str, nn.Module], base_model: str | None = None) -> Trainable:
    """LoLDU adapters already added to `components`: their change (dz, dsigma), projected after each step, checked,
    saved as one file."""
    def save(folder: Path) -> Path:
        from ..pipeline import save_pipeline_adapter

        return save_pipeline_adapter(folder, components, base_model=base_model)

    def bounded() -> str | None:
        problem = loldu_value_problem(components)  # the values themselves: an inf lr gives a finite loss
        return f"layer {problem}" if problem else None

    return Trainable(loldu_parameters(components), dict(components), [lambda lr: project_loldu_(components)],
                     [save], [bounded])


class OneProcess:
    """The part of accelerate's Accelerator that `training_step` uses, for one process training on its own.

    The quality benchmark deals whole runs to its processes, so a run must not gather or synchronise with the
    others; gradient accumulation divides each micro-batch's loss and steps on the last one, as accelerate does.
    """

    optimizer_step_was_skipped = False  # no fp16 grad scaler here

    def __init__(self, gradient_accumulation_steps: int = 1):
        self.steps, self.micro, self.sync_gradients = gradient_accumulation_steps, 0, True

    @contextmanager
    def accumulate(self, *models: nn.Module) -> Iterator[None]:
        """One micro-batch; sync_gradients is True on the last of each step's."""
        self.micro += 1
        self.sync_gradients = self.micro % self.steps == 0
        yield

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """This process's tensor (there are no others to gather from)."""
        return tensor

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the micro-batch's share of the step's loss."""
        (loss / self.steps).backward()

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """torch's gradient clipping."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def training_step(trainable: Trainable, runner, batches: Iterable, loss_of: Callable[[object], torch.Tensor],
                  optimizer, lr_scheduler, max_grad_norm: float) -> float:
    """One optimizer step over the micro-batches, the after-step hooks and checks; the mean loss of its batches.

    `runner` is an Accelerator (optimizer and modules prepared by it) or a OneProcess. Raises NonFiniteStep when a
    loss (on any process) or the values after the step are not finite or out of bounds.
    """
    micro = []
    for batch in batches:
        with runner.accumulate(*trainable.trained.values()):
            loss = loss_of(batch)
            every = runner.gather(loss.detach().float().reshape(1))  # the same verdict on every process
            if not torch.isfinite(every).all():
                raise NonFiniteStep(f"the loss is {float(every[~torch.isfinite(every)][0])}")
            micro.append(float(every.mean()))
            runner.backward(loss)
            if runner.sync_gradients:
                if max_grad_norm > 0:
                    runner.clip_grad_norm_(trainable.params, max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    lr = optimizer.param_groups[0]["lr"]
    if not runner.optimizer_step_was_skipped:  # fp16: skipped when the grad scaler saw inf
        lr_scheduler.step()
    for hook in trainable.after_step:
        hook(lr)
    problem = trainable.problem()
    if problem:
        raise NonFiniteStep(f"after the optimizer step, {problem}")
    return sum(micro) / len(micro)
