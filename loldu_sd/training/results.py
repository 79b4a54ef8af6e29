"""What a training run reports: the callbacks an in-process caller passes and the result it gets back."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


@dataclass
class TrainingCallbacks:
    """Hooks for in-process callers (the studio); all run on the main process only."""

    on_step: Callable[[int, float], None] | None = None  # (step, loss) after every optimizer step
    on_validation: Callable[[int, list[Image.Image]], None] | None = None  # (step, images)
    should_stop: Callable[[], bool] | None = None  # True: checkpoint this step, save the adapter, return


@dataclass
class TrainingResult:
    """What train_dreambooth produced."""

    output_dir: Path
    adapter_path: Path | None  # None when cancelled before the first step
    steps: int
    max_train_steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    cancelled: bool = False
    images: list[Image.Image] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def size_kb(self) -> float:
        """Adapter file size in kilobytes (0 when there is none)."""
        return self.adapter_path.stat().st_size / 1024 if self.adapter_path else 0.0
