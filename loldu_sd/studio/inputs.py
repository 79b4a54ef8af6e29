"""What users type and upload: limits, the one-line StudioError, names, images, the Train/Generate/Compare requests."""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from ..images import IMAGE_FORMATS, ImageReadError, read_image  # noqa: F401  (IMAGE_FORMATS: re-exported)

MAX_IMAGE_BYTES = 20 * 2**20
MIN_IMAGES, MAX_IMAGES = 3, 10
MAX_ADAPTER_BYTES = 20 * 2**20  # LoLDU files are kilobytes; anything this big is not one
NAME_MAX = 64
MAX_MIX = 3  # adapter slots in the Generate tab
MAX_COMPARE = 8  # library concepts rendered side by side in one batch by the Compare tab


@dataclass(frozen=True)
class Limits:
    """Accepted ranges of every numeric field (the UI builds its sliders from these)."""

    train_steps: tuple[int, int] = (1, 2000)
    rank: tuple[int, int] = (1, 128)
    learning_rate: tuple[float, float] = (1e-6, 0.1)
    validation_every: tuple[int, int] = (1, 2000)
    gen_steps: tuple[int, int] = (1, 150)
    guidance: tuple[float, float] = (0.0, 30.0)
    num_images: tuple[int, int] = (1, 8)
    seed: tuple[int, int] = (0, 2**32 - 1)
    weight: tuple[float, float] = (-2.0, 2.0)
    batch_size: tuple[int, int] = (1, 16)


LIMITS = Limits()


class StudioError(ValueError):
    """Bad input or state; the message is one line, meant for the UI."""


class StudioBusyError(StudioError):
    """Another training job is running."""


def check_range(what: str, value: Any, bounds: tuple[float, float], integer: bool = False) -> Any:
    """`value` as a number within bounds, or a StudioError naming the field."""
    try:
        num = float(value)
    except (TypeError, ValueError):
        raise StudioError(f"{what} must be a number, got {value!r}") from None
    if num != num or not bounds[0] <= num <= bounds[1]:  # noqa: PLR0124  (num != num: NaN)
        raise StudioError(f"{what} must be between {bounds[0]:g} and {bounds[1]:g}, got {value!r}")
    if integer and num != int(num):
        raise StudioError(f"{what} must be a whole number, got {value!r}")
    return int(num) if integer else num


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sanitize_name(name: str | None) -> str:
    """A safe adapter name: ASCII letters, digits, '-' and '_' only, at most 64 characters."""
    clean = _UNSAFE.sub("_", str(name or "").strip()).strip("_-")[:NAME_MAX].strip("_-")
    if not clean:
        raise StudioError(f"adapter name {name!r} is empty once unsafe characters are removed; "
                          "use letters, digits, '-' or '_'")
    return clean


def renamed(raw: str | None, clean: str) -> str:
    """'' when `clean` is the name the user typed, else a note saying what it became and why (for messages)."""
    if str(raw or "").strip() == clean:
        return ""
    return f" (the name {raw!r} became {clean!r}: names keep only letters A-Z, digits, '-' and '_')"


def suggest_instance_prompt(class_noun: str, token: str = "sks") -> str:
    """The DreamBooth-style prompt `a photo of sks <class>` for a class noun such as 'dog' or 'robot'."""
    noun = " ".join(str(class_noun or "").split()) or "object"
    return f"a photo of {token} {noun}"


def _display(path: str | Path) -> str:
    """Upload paths live in Gradio's cache; messages name the file only."""
    return Path(path).name


def load_images(paths: Sequence[str | Path], minimum: int = MIN_IMAGES, maximum: int = MAX_IMAGES
                ) -> list[Image.Image]:
    """Uploaded images through loldu_sd.images.read_image (content decides, never the extension); StudioError."""
    paths = [p for p in (paths or []) if p]
    if len(paths) < minimum:
        raise StudioError(f"upload at least {minimum} images of the concept (got {len(paths)}); 3-5 work best")
    if len(paths) > maximum:
        raise StudioError(f"upload at most {maximum} images per run (got {len(paths)})")
    try:
        return [read_image(p, name=_display(p), max_bytes=MAX_IMAGE_BYTES) for p in paths]
    except ImageReadError as e:
        raise StudioError(str(e)) from None


def check_prompt(prompt: str | None) -> str:
    """The stripped prompt, or a StudioError when it is empty."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise StudioError("the prompt is empty; describe the image, e.g. 'a photo of sks robot on the beach'")
    return prompt


@dataclass
class GenerateRequest:
    """One Generate-tab click: a prompt and up to MAX_MIX (adapter, weight) pairs."""

    prompt: str
    adapters: list[tuple[str, float]] = field(default_factory=list)
    negative_prompt: str = ""
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    num_images: int = 1

    def validated(self) -> GenerateRequest:
        """A checked copy (StudioError on the first bad field); weight-0 and empty adapter slots are dropped."""
        prompt = check_prompt(self.prompt)
        mix: dict[str, float] = {}
        for name, weight in self.adapters:
            if not name:
                continue
            name = sanitize_name(name)
            if name in mix:
                raise StudioError(f"adapter {name!r} is picked twice; pick it once and set its weight")
            weight = check_range(f"weight of {name}", weight, LIMITS.weight)
            if weight != 0:
                mix[name] = weight
        if len(mix) > MAX_MIX:
            raise StudioError(f"mix at most {MAX_MIX} adapters")
        return GenerateRequest(
            prompt=prompt, adapters=list(mix.items()), negative_prompt=(self.negative_prompt or "").strip(),
            steps=check_range("steps", self.steps, LIMITS.gen_steps, integer=True),
            guidance=check_range("guidance", self.guidance, LIMITS.guidance),
            seed=check_range("seed", self.seed, LIMITS.seed, integer=True),
            num_images=check_range("number of images", self.num_images, LIMITS.num_images, integer=True))


@dataclass
class CompareRequest:
    """One Compare-tab click: one prompt for up to MAX_COMPARE library concepts (and the base model), one batch."""

    prompt: str
    adapters: list[str] = field(default_factory=list)
    include_base: bool = True
    negative_prompt: str = ""
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0

    def validated(self) -> CompareRequest:
        """A checked copy (StudioError on the first bad field); empty picks are dropped."""
        names = [sanitize_name(n) for n in self.adapters if n]
        if len(set(names)) != len(names):
            raise StudioError("a concept is picked twice; pick each concept once")
        if len(names) > MAX_COMPARE:
            raise StudioError(f"compare at most {MAX_COMPARE} concepts at once (got {len(names)})")
        if not names and not self.include_base:
            raise StudioError("nothing to compare; pick at least one concept or include the base model")
        return CompareRequest(
            prompt=check_prompt(self.prompt), adapters=names, include_base=bool(self.include_base),
            negative_prompt=(self.negative_prompt or "").strip(),
            steps=check_range("steps", self.steps, LIMITS.gen_steps, integer=True),
            guidance=check_range("guidance", self.guidance, LIMITS.guidance),
            seed=check_range("seed", self.seed, LIMITS.seed, integer=True))


class AdapterFolders(Protocol):
    """What a TrainRequest asks of the library (AdapterLibrary is one): the folder an adapter name would get."""

    def path(self, name: str) -> Path: ...


@dataclass
class TrainRequest:
    """One Train-tab click."""

    images: list[str]
    instance_prompt: str
    name: str
    class_prompt: str = ""
    steps: int = 100  # the paper reports concept acquisition in about 100 steps
    rank: int = 32
    learning_rate: float = 5e-4
    seed: int = 42
    validation_every: int = 25
    num_class_images: int = 8  # prior-preservation images generated for the class prompt (few: this is an app)
    requested_name: str = ""  # the name as typed; `name` is its sanitised form once validated
    batch_size: int = 1  # the paper's; the toy world's small model learns at 4

    def validate(self, library: AdapterFolders | None = None) -> list[Image.Image]:
        """Check every field (StudioError on the first problem) and normalise it in place; returns the images."""
        self.instance_prompt = " ".join((self.instance_prompt or "").split())
        if not self.instance_prompt:
            raise StudioError("the instance prompt is empty; use e.g. 'a photo of sks robot' (sks = rare token)")
        self.class_prompt = " ".join((self.class_prompt or "").split())
        self.requested_name, self.name = self.name, sanitize_name(self.name)
        if library is not None and library.path(self.name).exists():
            raise StudioError(f"an adapter named {self.name!r} already exists; pick another name or delete it")
        self.steps = check_range("training steps", self.steps, LIMITS.train_steps, integer=True)
        self.rank = check_range("rank", self.rank, LIMITS.rank, integer=True)
        self.learning_rate = check_range("learning rate", self.learning_rate, LIMITS.learning_rate)
        self.seed = check_range("seed", self.seed, LIMITS.seed, integer=True)
        self.batch_size = check_range("batch size", self.batch_size, LIMITS.batch_size, integer=True)
        self.validation_every = check_range("preview every N steps", self.validation_every,
                                            LIMITS.validation_every, integer=True)
        return load_images(self.images)
