"""Images and the DreamBooth dataset: sample n of the run is drawn from generators seeded by (seed, stream, n)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..images import ImageReadError, read_folder
from .errors import TrainingInputError


# independent random streams, each indexed by the global sample counter
DATA, NOISE, CLASS_DATA, CLASS_NOISE, CLASS_GEN, EVAL = range(6)


def load_images(directory: str | Path, resolution: int | None = None, what: str = "instance"
                ) -> tuple[list[tuple[Path, Image.Image]], list[str]]:
    """Every image of a folder (loldu_sd.images.read_folder) and warnings; TrainingInputError naming the flag.

    Skipped files and images smaller than `resolution` get a warning each; fewer than 3 instance images, one more.
    """
    flag = f"--{what}_data_dir"
    try:
        images, notes = read_folder(directory)
    except ImageReadError as e:
        empty = str(e).endswith(("is empty", "holds only subfolders or links"))
        hint = "; put 3-5 photos of your subject in it" if empty and what == "instance" else ""
        raise TrainingInputError(f"{flag} {e}{hint}") from None
    for path, image in images:
        if resolution and min(image.size) < resolution:
            notes.append(f"{path}: {image.width}x{image.height} is smaller than --resolution {resolution}; "
                         "it is upscaled and will look soft")
    if what == "instance" and len(images) < 3:
        notes.append(f"{flag} {directory}: only {len(images)} image(s); DreamBooth needs 3-5 photos of the subject "
                     "(from several angles) to learn it rather than copy one picture. Training anyway")
    return images, notes


def sample_seed(seed: int, *keys: int) -> int:
    """A seed for the random stream (seed, *keys): independent streams per purpose and per sample."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seeded_generator(seed: int, *keys: int) -> torch.Generator:
    """A torch.Generator for the random stream (seed, *keys)."""
    return torch.Generator().manual_seed(sample_seed(seed, *keys))


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side is `size` (aspect kept), as diffusers' Resize(size) does."""
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    return image.resize((w, h), Image.BILINEAR)


def crop_center(image: Image.Image, size: int) -> Image.Image:
    """The central size x size square of an image at least that large."""
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float tensor in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance (and class) images indexed by the run's global sample counter n, not by file.

    Sample n is image perm_e[n mod N] of epoch e = n // N (perm_e seeded by (seed, e)), with its crop and flip drawn
    from (seed, n): the same on every process and after every resume. len() is one epoch, as in diffusers.
    Each image also comes with SDXL's size conditioning: (original height, width, crop top, left, size, size).
    """

    def __init__(self, instance_images: Sequence[Image.Image], size: int, seed: int, center_crop: bool = False,
                 random_flip: bool = False, class_images: Sequence[Image.Image] | None = None):
        self.size, self.seed, self.center_crop, self.random_flip = size, seed, center_crop, random_flip
        self.instance = [(resize_shorter(im, size), (im.height, im.width)) for im in instance_images]
        self.classes = [(resize_shorter(im, size), (im.height, im.width)) for im in class_images or []]

    def __len__(self) -> int:
        return max(len(self.instance), len(self.classes))

    def _pick(self, pool: list, n: int, stream: int) -> tuple[Image.Image, tuple[int, int]]:
        epoch, i = divmod(n, len(pool))
        return pool[int(torch.randperm(len(pool), generator=seeded_generator(self.seed, stream, 1, epoch))[i])]

    def _augment(self, picked: tuple[Image.Image, tuple[int, int]], g: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels, SDXL time ids) of one resized image and its original (height, width)."""
        image, original = picked
        s, (w, h) = self.size, image.size
        if self.center_crop:
            left, top = (w - s) // 2, (h - s) // 2
        else:
            left, top = (int(torch.randint(0, d - s + 1, (1,), generator=g)) for d in (w, h))
        image = image.crop((left, top, left + s, top + s))
        if self.random_flip and float(torch.rand(1, generator=g)) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(image), torch.tensor([*original, top, left, s, s], dtype=torch.float32)

    def __getitem__(self, n: int) -> dict[str, torch.Tensor | int]:
        example = {"index": n}
        example["instance"], example["instance_time_ids"] = self._augment(self._pick(self.instance, n, DATA),
                                                                          seeded_generator(self.seed, DATA, 0, n))
        if self.classes:
            example["class"], example["class_time_ids"] = self._augment(
                self._pick(self.classes, n, CLASS_DATA), seeded_generator(self.seed, CLASS_DATA, 0, n))
        return example


class SampleStream(torch.utils.data.Sampler):
    """Endless global sample counters of one process: micro-batch m holds n = (m * world + rank) * batch + i."""

    def __init__(self, start_micro_batch: int, world: int, rank: int, batch_size: int):
        self.start, self.world, self.rank, self.batch = start_micro_batch, world, rank, batch_size

    def __iter__(self):
        m = self.start
        while True:
            first = (m * self.world + self.rank) * self.batch
            yield from range(first, first + self.batch)
            m += 1
