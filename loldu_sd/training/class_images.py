"""Prior preservation: the class images in --class_data_dir, topped up by generating the missing ones."""
from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

import torch
from PIL import Image

from .data import CLASS_GEN, load_images, seeded_generator
from .errors import TrainingInputError
from ..loading import load_pipeline
from .models import no_safety_checker

logger = logging.getLogger(__name__)


def generate_class_images(args: argparse.Namespace, accelerator, have: int) -> None:
    """Generate the missing class images into --class_data_dir, split across processes, seeded per image."""
    missing = list(range(have, args.num_class_images))[accelerator.process_index::accelerator.num_processes]
    precision = args.prior_generation_precision or ("fp16" if accelerator.device.type == "cuda" else "fp32")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    pipe = load_pipeline(args.pretrained_model_name_or_path, accelerator.device, dtype, revision=args.revision,
                         variant=args.variant, **no_safety_checker(args))
    folder = Path(args.class_data_dir)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(missing), desc="Generating class images", disable=not accelerator.is_local_main_process)
    for start in range(0, len(missing), args.sample_batch_size):
        batch = missing[start: start + args.sample_batch_size]
        images = pipe([args.class_prompt] * len(batch), height=args.resolution, width=args.resolution,
                      generator=[seeded_generator(args.seed, CLASS_GEN, i) for i in batch]).images
        for i, image in zip(batch, images):
            digest = hashlib.sha1(image.tobytes()).hexdigest()[:12]
            image.save(folder / f"{i:05d}-{digest}.png")
        bar.update(len(batch))
    bar.close()
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def class_images_for(args: argparse.Namespace, accelerator, notes: list[str]) -> list[Image.Image]:
    """Class images for prior preservation: the readable ones in --class_data_dir, topped up by generation."""
    folder = Path(args.class_data_dir)

    def readable() -> list[Image.Image]:
        if not any(p.is_file() and not p.name.startswith(".") for p in folder.iterdir()):
            return []
        try:
            found, warns = load_images(folder, args.resolution, "class")
        except TrainingInputError:
            return []
        notes.extend(w for w in warns if w not in notes)
        return [im for _, im in found]

    have = len(readable())
    if have < args.num_class_images:
        if accelerator.is_main_process:
            logger.info("generating %d class images for %r into %s", args.num_class_images - have, args.class_prompt,
                        folder)
        generate_class_images(args, accelerator, have)
        accelerator.wait_for_everyone()
    return readable()[: args.num_class_images]
