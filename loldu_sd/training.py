"""DreamBooth training of a LoLDU adapter: the logic behind train_dreambooth_loldu.py and the studio's Train tab.

    args = parse_args(["--pretrained_model_name_or_path", "tiny-sd", "--instance_data_dir", "assets/concept",
                       "--instance_prompt", "a photo of sks robot", "--output_dir", "out"])
    result = train_dreambooth(args, TrainingCallbacks(on_step=print, should_stop=lambda: False))

Flags follow diffusers' examples/dreambooth/train_dreambooth_lora.py. Everything the user can get wrong (flags,
folders, images) is checked before any model is loaded, and reported as one line (TrainingInputError).
Randomness that shapes the run (data order, crop, flip, VAE sample, noise, timestep) is drawn from generators seeded
by (seed, stream, global sample index), so a resumed run and a multi-process run see exactly the samples that one
uninterrupted process would: sample n is the n-th sample of the run, whichever process or restart computes it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .config import INITS, LoLDUConfig
from .io import loldu_state_dict, read_adapter_file
from .model import cast_loldu_parameters, loldu_layers, loldu_parameters, project_loldu_
from .presets import PRESETS

logger = logging.getLogger(__name__)

DEFAULT_MAX_TRAIN_STEPS = 200  # paper Fig. 5: concept acquired in ~100 steps; 2x margin (see the README)
LR_SCHEDULERS = ("constant_with_warmup", "constant", "linear", "cosine", "cosine_with_restarts", "polynomial")
STATE_NAME = "training_state.json"  # written last into a checkpoint: its presence marks the checkpoint complete
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# independent random streams, each indexed by the global sample counter
DATA, NOISE, CLASS_DATA, CLASS_NOISE, CLASS_GEN, EVAL = range(6)


class TrainingInputError(ValueError):
    """A flag, folder or image is unusable; raised before any model is loaded."""


class TrainingError(RuntimeError):
    """Training stopped (e.g. a NaN loss); the last checkpoint on disk is intact."""


# ---- flags ---------------------------------------------------------------------------------------------------------
def _float_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of train_dreambooth_loldu.py (flag names and meanings as in diffusers' DreamBooth LoRA)."""
    p = argparse.ArgumentParser(description="DreamBooth with a kilobyte LoLDU adapter (arXiv 2410.13618).")
    a = p.add_argument_group("model").add_argument
    a("--pretrained_model_name_or_path", required=True, help="Hub id or local diffusers folder of the base model.")
    a("--revision", default=None, help="Revision of the base model on the Hub.")
    a("--variant", default=None, help="Variant of the model files, e.g. fp16.")
    a("--tokenizer_name", default=None, help="Tokenizer name or path, if not the base model's.")
    a("--pretrained_vae_model_name_or_path", default=None, help="Another VAE (the paper used sd-vae-ft-mse).")
    a = p.add_argument_group("data").add_argument
    a("--instance_data_dir", required=True, help="Folder with the 3-5 images of your subject.")
    a("--instance_prompt", required=True, help="Prompt naming the subject with a rare token: 'a photo of sks dog'.")
    a("--class_data_dir", default=None, help="Folder of class images for prior preservation (generated if short).")
    a("--class_prompt", default=None, help="Prompt of the subject's class: 'a photo of a dog'.")
    a("--with_prior_preservation", action="store_true", help="Add the prior-preservation loss on class images.")
    a("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss.")
    a("--num_class_images", type=int, default=100, help="Class images wanted; missing ones are generated.")
    a("--sample_batch_size", type=int, default=4, help="Batch size (per device) for generating class images.")
    a("--prior_generation_precision", choices=["no", "fp32", "fp16", "bf16"], default=None,
      help="Precision of class-image generation (default fp16 on GPU, fp32 on CPU).")
    a("--resolution", type=int, default=512, help="Training images are resized and cropped to this size.")
    a("--center_crop", action="store_true", help="Center crop (default: random crop).")
    a("--random_flip", action="store_true", help="Randomly flip images horizontally.")
    a("--train_batch_size", type=int, default=1, help="Batch size per device (paper: 1).")
    a("--dataloader_num_workers", type=int, default=0, help="Data-loading subprocesses (0: main process).")
    a = p.add_argument_group("LoLDU").add_argument
    a("--rank", type=int, default=32, help="r: LDU pivots kept per layer; r+1 trainable values per layer.")
    a("--alpha", type=float, default=None, help="sigma0 = alpha / rank; default: alpha = rank (paper: 32 at rank 32).")
    a("--init", choices=INITS, default="ldu", help="Initialisation of z (paper Table V).")
    a("--train_sigma", action=argparse.BooleanOptionalAction, default=True, help="Train the per-layer scale sigma.")
    a("--sigma_max", type=_float_or_none, default=1.0, help="Projection bound 0 < sigma <= sigma_max ('none': off).")
    a("--z_max_norm", type=_float_or_none, default=None, help="Projection radius ||z|| <= eps ('none': off).")
    a("--target_modules", default=",".join(PRESETS["sd-unet"]), help="Comma-separated Linear names in attention.")
    a("--train_text_encoder", action="store_true", help="Also adapt the text encoder (q/k/v/out_proj).")
    a = p.add_argument_group("optimisation").add_argument
    a("--learning_rate", type=float, default=5e-4, help="Learning rate after warmup (paper: 5e-4).")
    a("--scale_lr", action="store_true", help="Multiply the lr by processes x batch size x accumulation steps.")
    a("--lr_scheduler", choices=LR_SCHEDULERS, default="constant_with_warmup",
      help="'constant_with_warmup' honours --lr_warmup_steps; diffusers' 'constant' ignores it.")
    a("--lr_warmup_steps", type=int, default=15, help="Warmup steps (paper: 15).")
    a("--lr_num_cycles", type=int, default=1, help="Restarts of cosine_with_restarts.")
    a("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    a("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (pointless here: the state is kilobytes).")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay (paper: 0.01).")
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0: off).")
    a("--max_train_steps", type=int, default=None,
      help=f"Optimizer steps; overrides --num_train_epochs (default {DEFAULT_MAX_TRAIN_STEPS}).")
    a("--num_train_epochs", type=int, default=None, help="Epochs, used when --max_train_steps is not given.")
    a("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    a("--seed", type=int, default=42, help="Seed of everything random (paper: 42).")
    a = p.add_argument_group("memory and speed").add_argument
    a("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
      help="Frozen weights in fp16/bf16, trainable z/sigma in fp32 (default: accelerate's config). CPU: bf16 only.")
    a("--gradient_checkpointing", action="store_true", help="Recompute activations in backward to save memory.")
    a("--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers attention.")
    a("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    a = p.add_argument_group("checkpoints").add_argument
    a("--output_dir", default="loldu-dreambooth-model", help="Where the adapter, card, plots and checkpoints go.")
    a("--checkpointing_steps", type=int, default=100, help="Save a resumable checkpoint-N/ every N steps.")
    a("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    a("--resume_from_checkpoint", default=None, help="A checkpoint-N folder, or 'latest'.")
    a = p.add_argument_group("validation and logging").add_argument
    a("--validation_prompt", default=None, help="Prompt of the validation images (default: the instance prompt).")
    a("--num_validation_images", type=int, default=4, help="Validation images per validation (0: none).")
    a("--validation_steps", type=int, default=100, help="Validate every N steps (and at the end).")
    a("--validation_inference_steps", type=int, default=25, help="Sampler steps of each validation image.")
    a("--report_to", default="tensorboard", help="'tensorboard' (default), 'wandb', 'all' or 'none'.")
    a("--logging_dir", default="logs", help="TensorBoard folder, relative to --output_dir.")
    a("--push_to_hub", action="store_true", help="Upload the output folder to the Hugging Face Hub.")
    a("--hub_model_id", default=None, help="Hub repo id (default: the output folder's name).")
    a("--hub_token", default=None, help="Hub token (default: the cached login).")
    a("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # torch.distributed.launch passes it
    return p


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags (sys.argv when None) and check their combination; TrainingInputError names the problem."""
    args = build_parser().parse_args(input_args)
    check_args(args)
    return args


def loldu_config(args: argparse.Namespace) -> LoLDUConfig:
    """The LoLDUConfig the flags describe."""
    targets = [t.strip() for t in str(args.target_modules).split(",") if t.strip()]
    return LoLDUConfig(rank=args.rank, alpha=args.alpha, target_modules=targets, init=args.init,
                       train_sigma=args.train_sigma, sigma_max=args.sigma_max, z_max_norm=args.z_max_norm)


def check_args(args: argparse.Namespace) -> None:
    """Reject contradictory or out-of-range flags (no file-system access, no model)."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise TrainingInputError(message)

    if args.with_prior_preservation:
        need(args.class_data_dir, "--with_prior_preservation needs --class_data_dir (class images are read or "
                                  "generated there)")
        need(args.class_prompt, "--with_prior_preservation needs --class_prompt, e.g. 'a photo of a robot'")
    elif args.class_data_dir or args.class_prompt:
        logger.warning("--class_data_dir/--class_prompt are ignored without --with_prior_preservation")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps",
                 "validation_inference_steps", "sample_batch_size", "rank", "lr_num_cycles"):
        need(getattr(args, name) >= 1, f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_train_steps", "num_train_epochs", "checkpoints_total_limit"):
        value = getattr(args, name)
        need(value is None or value >= 1, f"--{name} must be >= 1, got {value}")
    for name in ("num_class_images", "num_validation_images", "lr_warmup_steps", "dataloader_num_workers",
                 "prior_loss_weight", "adam_weight_decay", "max_grad_norm", "adam_epsilon"):
        need(getattr(args, name) >= 0, f"--{name} must be >= 0, got {getattr(args, name)}")
    need(args.learning_rate > 0, f"--learning_rate must be > 0, got {args.learning_rate}")
    need(0 <= args.adam_beta1 < 1 and 0 <= args.adam_beta2 < 1, "--adam_beta1/--adam_beta2 must lie in [0, 1)")
    need(args.resolution >= 8 and args.resolution % 8 == 0,
         f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {args.resolution}")
    need(args.instance_prompt.strip(), "--instance_prompt is empty; use e.g. 'a photo of sks robot'")
    need(args.report_to in ("tensorboard", "wandb", "comet_ml", "all", "none"),
         f"--report_to must be tensorboard, wandb, comet_ml, all or none, got {args.report_to!r}")
    need(args.resume_from_checkpoint != "", "--resume_from_checkpoint is empty; give a checkpoint folder or 'latest'")
    try:
        cfg = loldu_config(args)
    except ValueError as e:
        raise TrainingInputError(f"LoLDU flags: {e}") from None
    need(cfg.target_modules, "--target_modules is empty; default: to_q,to_k,to_v,to_out.0")


def preflight(args: argparse.Namespace) -> None:
    """Environment and file-system checks that need no model: optional packages, device, output folder, resume."""
    import importlib.util

    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise TrainingInputError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (or drop the flag; "
                                 "LoLDU's optimizer state is only kilobytes anyway)")
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise TrainingInputError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers "
                                 "(or drop the flag; PyTorch's SDPA attention is used by default)")
    package = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml"}.get(args.report_to)
    if package and importlib.util.find_spec(package) is None:
        raise TrainingInputError(f"--report_to {args.report_to} needs {package}: pip install {package} "
                                 "(or pass --report_to none)")
    mixed = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    on_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if mixed == "fp16" and on_cpu:
        raise TrainingInputError("--mixed_precision fp16 needs a CUDA GPU; on CPU use --mixed_precision bf16 or no")
    if args.push_to_hub:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise TrainingInputError("--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set; "
                                     "drop --push_to_hub or go online")
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TrainingInputError(f"--output_dir {out}: not writable ({e.strerror or e})") from None
    spec = args.resume_from_checkpoint
    found = resolve_checkpoint(out, spec) if spec else None
    if spec and spec != "latest" and found is None:
        raise TrainingInputError(f"--resume_from_checkpoint {spec}: no such checkpoint folder (looked in . and {out}); "
                                 "use 'latest' or a checkpoint-N folder")
    if found is not None:
        check_resumable(found, args)


def check_resumable(checkpoint: Path, args: argparse.Namespace) -> None:
    """The checkpoint's adapter must have been trained with the same LoLDU flags as this run."""
    from .diffusers import LOLDU_WEIGHT_NAME

    try:
        _, meta = read_adapter_file(checkpoint / LOLDU_WEIGHT_NAME)
        saved, comps = LoLDUConfig.from_dict(json.loads(meta["config"])), set(json.loads(meta["layers"]))
    except (OSError, ValueError, KeyError) as e:
        raise TrainingInputError(f"--resume_from_checkpoint {checkpoint}: unreadable adapter "
                                 f"({_first_line(e)})") from None
    if saved != loldu_config(args) or comps != ({"unet", "text_encoder"} if args.train_text_encoder else {"unet"}):
        raise TrainingInputError(f"--resume_from_checkpoint {checkpoint}: trained with other LoLDU flags (rank "
                                 f"{saved.rank}, alpha {saved.alpha:g}, targets {','.join(saved.target_modules)}, "
                                 f"text encoder {'text_encoder' in comps}); resume with the same flags")


# ---- images and data -----------------------------------------------------------------------------------------------
def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of any PIL image: transparency goes onto white, CMYK/grayscale/palette/16-bit are converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale down to 8 bits first
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_images(directory: str | Path, resolution: int | None = None, what: str = "instance"
                ) -> tuple[list[tuple[Path, Image.Image]], list[str]]:
    """Read every image of a folder as RGB (EXIF rotation applied); returns (path, image) pairs and warnings.

    Unreadable files are skipped with a warning naming each; images smaller than `resolution` get a warning.
    No readable image at all is a TrainingInputError.
    """
    folder = Path(directory)
    flag = f"--{what}_data_dir"
    if not folder.exists():
        raise TrainingInputError(f"{flag} {folder}: no such folder")
    if not folder.is_dir():
        raise TrainingInputError(f"{flag} {folder}: is a file, not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise TrainingInputError(f"{flag} {folder}: is empty; put 3-5 photos of your subject in it")
    images, notes = [], []
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()  # decode fully now: truncated files fail here, not in the middle of training
                image = to_rgb(ImageOps.exif_transpose(im))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            notes.append(f"{path}: skipped, not a readable image ({e})")
            continue
        if resolution and min(image.size) < resolution:
            notes.append(f"{path}: {image.width}x{image.height} is smaller than --resolution {resolution}; "
                            "it is upscaled and will look soft")
        images.append((path, image))
    if not images:
        raise TrainingInputError(f"{flag} {folder}: holds no readable image ({len(files)} file(s) skipped)")
    return images, notes


def sample_seed(seed: int, *keys: int) -> int:
    """A seed for the random stream (seed, *keys): independent streams per purpose and per sample."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _generator(seed: int, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, *keys))


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side is `size` (aspect kept), as diffusers' Resize(size) does."""
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    return image.resize((w, h), Image.BILINEAR)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float tensor in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance (and class) images indexed by the run's global sample counter n, not by file.

    Sample n is image perm_e[n mod N] of epoch e = n // N (perm_e seeded by (seed, e)), with its crop and flip drawn
    from (seed, n): the same on every process and after every resume. len() is one epoch, as in diffusers.
    """

    def __init__(self, instance_images: Sequence[Image.Image], size: int, seed: int, center_crop: bool = False,
                 random_flip: bool = False, class_images: Sequence[Image.Image] | None = None):
        self.size, self.seed, self.center_crop, self.random_flip = size, seed, center_crop, random_flip
        self.instance = [resize_shorter(im, size) for im in instance_images]
        self.classes = [resize_shorter(im, size) for im in class_images or []]

    def __len__(self) -> int:
        return max(len(self.instance), len(self.classes))

    def _pick(self, pool: list[Image.Image], n: int, stream: int) -> Image.Image:
        epoch, i = divmod(n, len(pool))
        return pool[int(torch.randperm(len(pool), generator=_generator(self.seed, stream, 1, epoch))[i])]

    def _augment(self, image: Image.Image, g: torch.Generator) -> torch.Tensor:
        s, (w, h) = self.size, image.size
        if self.center_crop:
            left, top = (w - s) // 2, (h - s) // 2
        else:
            left, top = (int(torch.randint(0, d - s + 1, (1,), generator=g)) for d in (w, h))
        image = image.crop((left, top, left + s, top + s))
        if self.random_flip and float(torch.rand(1, generator=g)) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(image)

    def __getitem__(self, n: int) -> dict[str, torch.Tensor | int]:
        example = {"index": n, "instance": self._augment(self._pick(self.instance, n, DATA),
                                                         _generator(self.seed, DATA, 0, n))}
        if self.classes:
            example["class"] = self._augment(self._pick(self.classes, n, CLASS_DATA),
                                             _generator(self.seed, CLASS_DATA, 0, n))
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


def generate_class_images(args: argparse.Namespace, accelerator, have: int) -> None:
    """Generate the missing class images into --class_data_dir, split across processes, seeded per image."""
    from diffusers import DiffusionPipeline

    missing = list(range(have, args.num_class_images))[accelerator.process_index::accelerator.num_processes]
    precision = args.prior_generation_precision or ("fp16" if accelerator.device.type == "cuda" else "fp32")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    pipe = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision,
                                             variant=args.variant, **_no_safety_checker(args),
                                             **diffusers_dtype(dtype))
    pipe.to(accelerator.device).set_progress_bar_config(disable=True)
    folder = Path(args.class_data_dir)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(missing), desc="Generating class images", disable=not accelerator.is_local_main_process)
    for start in range(0, len(missing), args.sample_batch_size):
        batch = missing[start: start + args.sample_batch_size]
        images = pipe([args.class_prompt] * len(batch), height=args.resolution, width=args.resolution,
                      generator=[_generator(args.seed, CLASS_GEN, i) for i in batch]).images
        for i, image in zip(batch, images):
            digest = hashlib.sha1(image.tobytes()).hexdigest()[:12]
            image.save(folder / f"{i:05d}-{digest}.png")
        bar.update(len(batch))
    bar.close()
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _no_safety_checker(args: argparse.Namespace) -> dict:
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision)
    return {"safety_checker": None} if "safety_checker" in config else {}


# ---- checkpoints ---------------------------------------------------------------------------------------------------
def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint-N folders, oldest first; temp folders of interrupted saves are ignored."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and (p / STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: str | Path, spec: str) -> Path | None:
    """The checkpoint `spec` names: 'latest', a path, or a folder name inside output_dir (None if there is none)."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    for candidate in (Path(spec), Path(output_dir) / spec):
        if (candidate / STATE_NAME).is_file():
            return candidate
    return None


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _clean_interrupted_saves(output_dir: Path) -> None:
    """Remove temp folders of killed saves; put back a checkpoint whose replacement was interrupted mid-rename."""
    for path in output_dir.glob("checkpoint-*.*-*"):
        name, _, kind = path.name.partition(".")
        if kind.startswith("old-") and not (output_dir / name).exists():
            path.rename(output_dir / name)
        elif kind.startswith(("tmp-", "old-")):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(accelerator, output_dir: Path, step: int, state: dict, total_limit: int | None = None) -> Path:
    """accelerator.save_state into checkpoint-N.tmp-XXXX, then one rename: a kill never leaves a half checkpoint."""
    from accelerate.utils import broadcast_object_list

    token = broadcast_object_list([secrets.token_hex(4)])[0]  # the same temp name on every process
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"{final.name}.tmp-{token}"
    accelerator.save_state(str(tmp))  # every process: RNG states; main: adapter (hook), optimizer, scheduler
    if accelerator.is_main_process:
        (tmp / STATE_NAME).write_text(json.dumps(state))  # last file: marks the checkpoint complete
        _fsync_tree(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        old = final.rename(output_dir / f"{final.name}.old-{token}") if final.exists() else None
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old)
        checkpoints = list_checkpoints(output_dir)
        for stale in checkpoints[: max(0, len(checkpoints) - (total_limit or len(checkpoints)))]:
            shutil.rmtree(stale)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def load_adapter_values_(path: str | Path, components: dict[str, torch.nn.Module], config: LoLDUConfig,
                         adapter_name: str = "default") -> None:
    """Copy z and sigma from an adapter file into the adapter being trained (resume); the layout must match."""
    tensors, meta = read_adapter_file(path)
    _, layers = loldu_state_dict(components, adapter_name)
    if json.loads(meta["layers"]) != layers or LoLDUConfig.from_dict(json.loads(meta["config"])) != config:
        raise TrainingInputError(f"{path}: this checkpoint was trained with other LoLDU flags (--rank, --alpha, "
                                 "--target_modules, --train_text_encoder ...); resume with the same flags")
    with torch.no_grad():
        for comp, module in components.items():
            z, sigma = tensors[f"{comp}.loldu.z"], tensors[f"{comp}.loldu.sigma"]
            offset = 0
            for i, (_, layer) in enumerate(loldu_layers(module)):
                adapter = layer.loldu_adapters[adapter_name]
                adapter.z.copy_(z[offset: offset + adapter.rank])
                adapter.sigma.copy_(sigma[i])
                offset += adapter.rank


def adapter_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Short sha256 of an adapter's trained values (z and sigma), to compare processes and files."""
    keys = sorted(k for k in tensors if k.endswith(("loldu.z", "loldu.sigma")))
    flat = torch.cat([tensors[k].detach().float().reshape(-1).cpu() for k in keys])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


# ---- the training run ----------------------------------------------------------------------------------------------
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


def denoising_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The DreamBooth objective: mean squared error in fp32."""
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


def _draws(seed: int, stream: int, indices: Sequence[int], shape: tuple, num_timesteps: int):
    """(VAE-sample eps, noise, timestep) of each sample, from the generator of (seed, stream, n)."""
    eps, noise, steps = [], [], []
    for n in indices:
        g = _generator(seed, stream, 0, int(n))
        eps.append(torch.randn(shape, generator=g))
        noise.append(torch.randn(shape, generator=g))
        steps.append(torch.randint(0, num_timesteps, (1,), generator=g))
    return torch.stack(eps), torch.stack(noise), torch.cat(steps)


def encode_prompt(text_encoder, tokenizer, prompts: Sequence[str], device: torch.device | None = None
                  ) -> torch.Tensor:
    """CLIP hidden states of `prompts` (padded to the tokenizer's max length, as SD does)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(device or text_encoder.device))[0]


def diffusion_loss(unet, vae, noise_scheduler, pixels: torch.Tensor, embeds: torch.Tensor, seed: int,
                   streams: Sequence[tuple[int, Sequence[int]]]) -> list[torch.Tensor]:
    """Denoising losses of one batch, one per (stream, sample indices) part of `pixels`; noise seeded per sample."""
    dtype = next(unet.parameters()).dtype
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    draws = [_draws(seed, stream, idx, tuple(dist.mean.shape[1:]), noise_scheduler.config.num_train_timesteps)
             for stream, idx in streams]
    eps, noise, timesteps = (torch.cat(parts).to(dist.mean.device) for parts in zip(*draws))
    latents = (dist.mean.float() + dist.std.float() * eps) * vae.config.scaling_factor
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy.to(dtype), timesteps, embeds.to(dtype)).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    sizes = [len(idx) for _, idx in streams]
    return [denoising_loss(p, t) for p, t in zip(pred.split(sizes), target.split(sizes))]


@torch.no_grad()
def evaluate_denoising_loss(pipe, images: Sequence[Image.Image], prompt: str, resolution: int, seed: int = 0,
                            draws: int = 4) -> float:
    """Mean denoising loss of `pipe` on center-cropped `images` with fixed noise and timesteps (lower: learnt)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pixels = torch.stack([to_tensor(_center(resize_shorter(to_rgb(im), resolution), resolution)) for im in images])
    embeds = encode_prompt(pipe.text_encoder, pipe.tokenizer, [prompt] * len(images))
    losses = [diffusion_loss(pipe.unet, pipe.vae, scheduler, pixels, embeds, seed,
                             [(EVAL, range(d * len(images), (d + 1) * len(images)))])[0] for d in range(draws)]
    return float(torch.stack(losses).mean())


def _center(image: Image.Image, size: int) -> Image.Image:
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def resolve_max_train_steps(args: argparse.Namespace, dataset_len: int, world: int) -> int:
    """--max_train_steps, else --num_train_epochs worth of steps, else DEFAULT_MAX_TRAIN_STEPS."""
    if args.max_train_steps:
        return args.max_train_steps
    if args.num_train_epochs:
        per_step = args.train_batch_size * world * args.gradient_accumulation_steps
        return args.num_train_epochs * math.ceil(dataset_len / per_step)
    return DEFAULT_MAX_TRAIN_STEPS


def diffusers_dtype(dtype: torch.dtype) -> dict:
    """The from_pretrained keyword for `dtype` ({} for fp32): diffusers >= 0.36 renamed torch_dtype to dtype."""
    from diffusers.utils import deprecation_utils

    if dtype == torch.float32:
        return {}
    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def load_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """Tokenizer, text encoder, VAE, UNet (frozen, on `device` in `dtype`) and the DDPM training scheduler."""
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from types import SimpleNamespace

    path, hub = args.pretrained_model_name_or_path, {"revision": args.revision}
    if args.tokenizer_name:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer_name, **hub)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **hub)
    arch = transformers.AutoConfig.from_pretrained(path, subfolder="text_encoder", **hub).architectures[0]
    text_encoder = getattr(transformers, arch).from_pretrained(path, subfolder="text_encoder", variant=args.variant,
                                                               **hub)
    cast = diffusers_dtype(dtype)  # frozen weights in the mixed-precision dtype
    if args.pretrained_vae_model_name_or_path:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, **cast)
    else:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, **hub, **cast)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=args.variant, **hub, **cast)
    text_encoder.to(dtype=dtype)
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False).to(device)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **hub)
    return SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler=scheduler)


def _accelerator(args: argparse.Namespace):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    # in-process callers (the studio) train many times: forget the previous run's mixed precision and trackers
    AcceleratorState._reset_state()
    GradientState._reset_state()
    out = Path(args.output_dir)
    # torchrun on a machine without GPU: accelerate only sets up gloo DDP when told to use the CPU
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=cpu_ddp,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / args.logging_dir)),
        # LoLDU's B/A buffers are recomputed identically on every process: broadcasting them each step is waste
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _create_repo(args: argparse.Namespace, accelerator) -> str:
    """Create the Hub repo up front (main process), so that an offline or unauthorised run fails in seconds."""
    from accelerate.utils import broadcast_object_list

    error = repo_id = None
    if accelerator.is_main_process:
        from huggingface_hub import create_repo

        try:
            repo_id = create_repo(args.hub_model_id or Path(args.output_dir).name, exist_ok=True,
                                  token=args.hub_token).repo_id
        except Exception as e:  # offline, no token, no permission: all mean the same to the user
            error = f"--push_to_hub: could not create the Hub repo ({type(e).__name__}: {_first_line(e)})"
    error, repo_id = broadcast_object_list([error, repo_id])
    if error:
        raise TrainingInputError(error)
    return repo_id


def _class_images(args: argparse.Namespace, accelerator, notes: list[str]) -> list[Image.Image]:
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


def _tracker_config(args: argparse.Namespace) -> dict:
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()
            if k not in ("hub_token",)}


def _log_images(accelerator, tag: str, images: list[Image.Image], step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard" and images:
            tracker.writer.add_images(tag, np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")


def generate_samples(pipe, args: argparse.Namespace) -> list[Image.Image]:
    """--num_validation_images images of the validation prompt (DPM-Solver, seeded by --seed)."""
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(args.validation_prompt or args.instance_prompt, num_images_per_prompt=args.num_validation_images,
                num_inference_steps=args.validation_inference_steps, height=args.resolution, width=args.resolution,
                generator=torch.Generator().manual_seed(args.seed)).images


def _pipeline(args: argparse.Namespace, **components):
    from diffusers import DiffusionPipeline

    kwargs = {**_no_safety_checker(args), **components}
    return DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision,
                                             variant=args.variant, **kwargs)


def _rank_digests(accelerator, components: dict[str, torch.nn.Module]) -> list[str]:
    """adapter_digest of every process's adapter (the adapter is kilobytes: gathering all of it is cheap)."""
    tensors, _ = loldu_state_dict(components)
    keys = sorted(k for k in tensors if k.endswith(("loldu.z", "loldu.sigma")))
    sizes = [tensors[k].numel() for k in keys]
    flat = torch.cat([tensors[k].reshape(-1) for k in keys]).to(accelerator.device)
    rows = accelerator.gather(flat).reshape(accelerator.num_processes, -1).cpu()
    return [adapter_digest(dict(zip(keys, row.split(sizes)))) for row in rows]


def _models_with_adapters(args: argparse.Namespace, accelerator):
    """Frozen base models in the mixed-precision dtype with LoLDU adapters whose z/sigma stay fp32."""
    from .diffusers import add_loldu_to_text_encoder, add_loldu_to_unet

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    m = load_models(args, accelerator.device, weight_dtype)
    config = loldu_config(args)
    components = {"unet": add_loldu_to_unet(m.unet, config)}
    if args.train_text_encoder:
        components["text_encoder"] = add_loldu_to_text_encoder(m.text_encoder, config)
    for module in components.values():
        cast_loldu_parameters(module, torch.float32)
    if args.enable_xformers_memory_efficient_attention:
        m.unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        m.unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            kw = {"use_reentrant": False}  # reentrant checkpointing drops the grads of frozen-input blocks
            if hasattr(m.text_encoder, "activation_checkpointing_enable"):  # transformers >= 5 name
                m.text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                m.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return m, components, weight_dtype


def _final_outputs(args: argparse.Namespace, accelerator, result: TrainingResult, weight_dtype: torch.dtype,
                   n_values: int, repo_id: str | None, callbacks: TrainingCallbacks) -> None:
    """Main process: samples from the saved file in a fresh pipeline, grid, loss curve, model card, Hub upload."""
    out = result.output_dir
    if args.num_validation_images and not result.cancelled:
        from diffusers import AutoencoderKL

        extra = diffusers_dtype(weight_dtype)
        if args.pretrained_vae_model_name_or_path:
            extra["vae"] = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, **extra)
        pipe = _pipeline(args, **extra).to(accelerator.device)
        pipe.load_loldu_weights(out)  # as users will load it: the file, not the in-memory adapter
        result.images = generate_samples(pipe, args)
        del pipe
        for i, image in enumerate(result.images):
            image.save(out / f"image_{i}.png")
        image_grid(result.images).save(out / "validation_grid.png")
        _log_images(accelerator, "test", result.images, result.steps)
        if callbacks.on_validation is not None:
            callbacks.on_validation(result.steps, result.images)
    plot_losses(result.losses, out / "loss_curve.png")
    write_model_card(out, args, steps=result.steps, max_steps=result.max_train_steps, n_values=n_values,
                     n_images=len(result.images), cancelled=result.cancelled, repo_id=repo_id,
                     mixed_precision=accelerator.mixed_precision)
    if repo_id is not None:
        push_to_hub(args, repo_id)


def train_dreambooth(args: argparse.Namespace, callbacks: TrainingCallbacks | None = None) -> TrainingResult:
    """Train a LoLDU adapter on --instance_data_dir; write it, checkpoints, samples, plots and a model card."""
    started = time.time()
    callbacks = callbacks or TrainingCallbacks()
    check_args(args)
    preflight(args)
    instance, notes = load_images(args.instance_data_dir, args.resolution, "instance")
    if args.with_prior_preservation:
        class_dir = Path(args.class_data_dir)
        if class_dir.exists() and not class_dir.is_dir():
            raise TrainingInputError(f"--class_data_dir {class_dir}: is a file, not a folder")
        try:
            class_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainingInputError(f"--class_data_dir {class_dir}: cannot create it ({e.strerror or e})") from None
    accelerator = _accelerator(args)
    try:
        return _train(args, accelerator, callbacks, [im for _, im in instance], notes, started)
    finally:
        accelerator.end_training()


def _train(args, accelerator, callbacks: TrainingCallbacks, instance: list[Image.Image], notes: list[str],
           started: float) -> TrainingResult:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from .diffusers import LOLDU_WEIGHT_NAME, save_pipeline_adapter

    out, main = Path(args.output_dir), accelerator.is_main_process
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        raise TrainingInputError("--mixed_precision fp16 needs a CUDA GPU; on CPU use --mixed_precision bf16 or no")
    repo_id = _create_repo(args, accelerator) if args.push_to_hub else None
    if main:
        _clean_interrupted_saves(out)
    accelerator.wait_for_everyone()
    resume = resolve_checkpoint(out, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if args.resume_from_checkpoint == "latest" and resume is None and main:
        logger.warning("--resume_from_checkpoint latest: no checkpoint in %s yet; starting a new run", out)
    class_images = _class_images(args, accelerator, notes) if args.with_prior_preservation else []
    if main:
        for w in notes:
            logger.warning(w)
    set_seed(args.seed)  # only init="uniform"/"normal*" draw from the global RNG; data and noise have their own

    m, components, weight_dtype = _models_with_adapters(args, accelerator)
    config = loldu_config(args)
    params = [p for module in components.values() for p in loldu_parameters(module)]

    # ---- data, optimizer, schedule
    world, accum, bs = accelerator.num_processes, args.gradient_accumulation_steps, args.train_batch_size
    dataset = DreamBoothDataset(instance, args.resolution, args.seed, args.center_crop, args.random_flip,
                                class_images or None)
    max_steps = resolve_max_train_steps(args, len(dataset), world)
    lr = args.learning_rate * (bs * accum * world if args.scale_lr else 1)
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    optimizer = optimizer_class(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                                weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    # not accelerator.prepare'd: accelerate would step it once per process; here it counts optimizer steps
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_steps, num_cycles=args.lr_num_cycles, power=args.lr_power)
    names = list(components)
    with warnings.catch_warnings():  # torch >= 2.10 renames broadcast_buffers; the meaning we want is the same
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated")
        *prepared, optimizer = accelerator.prepare(*components.values(), optimizer)
    trained = dict(zip(names, prepared))
    for module in prepared:
        module.train()  # from_pretrained returns eval-mode models; checkpointing (CLIP) only acts in train mode

    def save_hook(models, weights, folder):
        if accelerator.is_main_process:  # the adapter file instead of the full frozen UNet
            save_pipeline_adapter(folder, components, base_model=args.pretrained_model_name_or_path)
        weights.clear()

    def load_hook(models, folder):
        models.clear()  # nothing for accelerate to load: the adapter is all the model state there is
        load_adapter_values_(Path(folder) / LOLDU_WEIGHT_NAME, components, config)

    hooks = [accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)]
    accelerator.register_for_checkpointing(lr_scheduler)

    global_step, losses, last_checkpoint = 0, [], None
    if resume is not None:
        accelerator.load_state(str(resume))
        state = json.loads((resume / STATE_NAME).read_text())
        global_step, losses, last_checkpoint = state["global_step"], [tuple(x) for x in state["losses"]], resume
        if main:
            logger.info("resumed from %s at step %d", resume, global_step)

    if not args.train_text_encoder:  # frozen text encoder: encode the two prompts once
        with torch.no_grad():
            instance_embeds = encode_prompt(m.text_encoder, m.tokenizer, [args.instance_prompt])
            class_embeds = encode_prompt(m.text_encoder, m.tokenizer, [args.class_prompt]) if class_images else None
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=bs, sampler=SampleStream(global_step * accum, world, accelerator.process_index, bs),
        num_workers=args.dataloader_num_workers)
    accelerator.init_trackers("dreambooth-loldu", config=_tracker_config(args))
    if main:
        logger.info("training %d LoLDU values (%s) for %d steps, %d per batch on %d process(es), lr %.2g",
                    sum(p.numel() for p in params), ", ".join(names), max_steps, bs * world * accum, world, lr)

    def batch_loss(batch) -> torch.Tensor:
        idx = batch["index"].tolist()
        pixels, streams = batch["instance"], [(NOISE, idx)]
        prompts = [args.instance_prompt] * len(idx)
        if class_images:  # one forward pass for instance and class samples, as diffusers does
            pixels, streams = torch.cat([pixels, batch["class"]]), streams + [(CLASS_NOISE, idx)]
            prompts += [args.class_prompt] * len(idx)
        if args.train_text_encoder:
            embeds = encode_prompt(trained["text_encoder"], m.tokenizer, prompts, accelerator.device)
        else:
            embeds = torch.cat([instance_embeds.expand(len(idx), -1, -1)]
                               + ([class_embeds.expand(len(idx), -1, -1)] if class_images else []))
        parts = diffusion_loss(trained["unet"], m.vae, m.scheduler, pixels.to(accelerator.device), embeds,
                               args.seed, streams)
        return parts[0] + args.prior_loss_weight * parts[1] if class_images else parts[0]

    def stop_requested() -> bool:
        if main and callbacks.should_stop is not None and callbacks.should_stop():
            accelerator.set_trigger()
        return accelerator.check_trigger()

    def checkpoint() -> Path:
        state = {"global_step": global_step, "losses": losses, "max_train_steps": max_steps}
        return save_checkpoint(accelerator, out, global_step, state, args.checkpoints_total_limit)

    progress = tqdm(total=max_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    data, cancelled, images = iter(loader), False, []
    try:
        while global_step < max_steps:
            if stop_requested():
                cancelled = True
                break
            micro = []
            for _ in range(accum):
                batch = next(data)
                with accelerator.accumulate(*prepared):
                    loss = batch_loss(batch)
                    every = accelerator.gather(loss.detach().float().reshape(1))  # the same verdict on every process
                    if not torch.isfinite(every).all():
                        where = last_checkpoint or "none (no checkpoint saved yet)"
                        raise TrainingError(
                            f"step {global_step + 1}: the loss is {float(every[~torch.isfinite(every)][0])}; "
                            f"training stopped before updating the adapter. Last good checkpoint: {where}. "
                            "Lower --learning_rate, or use --mixed_precision bf16/no")
                    micro.append(float(every.mean()))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            if not accelerator.optimizer_step_was_skipped:  # fp16: skipped when the grad scaler saw inf
                lr_scheduler.step()
            for module in components.values():
                project_loldu_(module)  # projected gradient descent (eqs. 10-12), after every optimizer step
            global_step += 1
            loss_value, lr_now = sum(micro) / len(micro), lr_scheduler.get_last_lr()[0]
            losses.append((global_step, loss_value))
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_now:.2e}")
            accelerator.log({"loss": loss_value, "lr": lr_now}, step=global_step)
            if main and callbacks.on_step is not None:
                callbacks.on_step(global_step, loss_value)
            if global_step % args.checkpointing_steps == 0:
                last_checkpoint = checkpoint()
            if (args.num_validation_images and global_step % args.validation_steps == 0
                    and global_step < max_steps and main):
                pipe = _pipeline(args, unet=accelerator.unwrap_model(trained["unet"]), vae=m.vae,
                                 text_encoder=accelerator.unwrap_model(trained.get("text_encoder", m.text_encoder)),
                                 tokenizer=m.tokenizer)
                images = generate_samples(pipe, args)
                del pipe
                _log_images(accelerator, "validation", images, global_step)
                if callbacks.on_validation is not None:
                    callbacks.on_validation(global_step, images)
    finally:
        progress.close()
    if cancelled and global_step > 0 and getattr(last_checkpoint, "name", "") != f"checkpoint-{global_step}":
        last_checkpoint = checkpoint()  # cancelled: keep a resumable checkpoint of exactly this step

    # ---- every process must hold the same adapter; the main process writes it
    accelerator.wait_for_everyone()
    digests = _rank_digests(accelerator, components)
    if len(set(digests)) > 1:
        raise TrainingError(f"processes ended with different adapters (digests {digests}); please report this")
    if main:
        logger.info("adapter digest per process: %s", " ".join(digests))
    result = TrainingResult(out, None, global_step, max_steps, losses, last_checkpoint, cancelled, [], notes)
    if global_step == 0:
        return result  # cancelled before the first step: nothing to save
    n_values = sum(p.numel() for p in params)
    adapter_path = out / LOLDU_WEIGHT_NAME
    if main:
        save_pipeline_adapter(out, components, base_model=args.pretrained_model_name_or_path, metadata={
            "instance_prompt": args.instance_prompt, "training_steps": str(global_step),
            "trainer": "loldu_sd.training.train_dreambooth"})
    result.adapter_path = adapter_path
    for hook in hooks:  # they hold the training models: let those go before the fresh pipeline loads
        hook.remove()
    del optimizer, prepared, trained, components, m
    accelerator.free_memory()

    if main:
        _final_outputs(args, accelerator, result, weight_dtype, n_values, repo_id, callbacks)
    accelerator.wait_for_everyone()
    result.seconds = time.time() - started
    return result


# ---- outputs -------------------------------------------------------------------------------------------------------
def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Images side by side in a grid (at most 4 per row by default)."""
    cols = cols or min(4, len(images))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def plot_losses(losses: Sequence[tuple[int, float]], path: str | Path) -> Path:
    """Loss per step and its moving average, as a PNG (matplotlib's Agg canvas: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if losses:
        steps, values = zip(*losses)
        ax.plot(steps, values, lw=0.8, alpha=0.45, label="loss")
        ema, smooth = values[0], []
        for v in values:
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax.plot(steps, smooth, lw=1.8, label="moving average (0.9)")
        ax.legend()
    ax.set(xlabel="step", ylabel="denoising loss (MSE)", title="LoLDU DreamBooth training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def write_model_card(output_dir: str | Path, args: argparse.Namespace, steps: int, max_steps: int, n_values: int,
                     n_images: int, cancelled: bool = False, repo_id: str | None = None,
                     mixed_precision: str | None = None) -> Path:
    """README.md with YAML front matter (base model, instance prompt, tags, sample images) and the settings."""
    from .diffusers import LOLDU_WEIGHT_NAME

    out = Path(output_dir)
    size_kb = (out / LOLDU_WEIGHT_NAME).stat().st_size / 1024
    prompt = args.validation_prompt or args.instance_prompt
    q = json.dumps  # a JSON string is a valid YAML scalar, whatever the prompt contains
    widget = "".join(f"- text: {q(prompt)}\n  output:\n    url: image_{i}.png\n" for i in range(n_images))
    front = (f"---\nbase_model: {q(args.pretrained_model_name_or_path)}\ninstance_prompt: {q(args.instance_prompt)}\n"
             "library_name: diffusers\ntags:\n- loldu\n- text-to-image\n- diffusers\n- stable-diffusion\n"
             "- dreambooth\n- diffusers-training\n" + (f"widget:\n{widget}" if widget else "") + "---\n")
    settings = {
        "adapter size": f"{size_kb:.1f} KB ({n_values:,} trained values)",
        "steps": f"{steps} of {max_steps}" + (" (cancelled)" if cancelled else ""),
        "rank / alpha": f"{args.rank} / {loldu_config(args).alpha:g}",
        "target modules": args.target_modules + (" + text encoder q/k/v/out_proj" if args.train_text_encoder else ""),
        "init / train sigma / sigma_max / z_max_norm": f"{args.init} / {args.train_sigma} / {args.sigma_max} / "
                                                       f"{args.z_max_norm}",
        "learning rate / schedule / warmup": f"{args.learning_rate:g} / {args.lr_scheduler} / {args.lr_warmup_steps}",
        "optimizer": f"AdamW{'8bit' if args.use_8bit_adam else ''} (betas {args.adam_beta1}, {args.adam_beta2}, "
                     f"weight decay {args.adam_weight_decay:g})",
        "batch size x accumulation": f"{args.train_batch_size} x {args.gradient_accumulation_steps}",
        "resolution": str(args.resolution),
        "prior preservation": (f"{args.class_prompt!r}, {args.num_class_images} images, weight "
                               f"{args.prior_loss_weight:g}") if args.with_prior_preservation else "no",
        "mixed precision": str(mixed_precision or args.mixed_precision or "no"),
        "seed": str(args.seed),
    }
    table = "\n".join(f"| {k} | {v} |" for k, v in settings.items())
    samples = (f"Samples for {prompt!r} (seed {args.seed}), generated from the saved file after training:\n\n"
               "![samples](validation_grid.png)\n\n") if n_images else ""
    source = repo_id or str(out)
    body = f"""
# LoLDU DreamBooth adapter for {args.pretrained_model_name_or_path}

A {size_kb:.1f} KB [LoLDU](https://arxiv.org/abs/2410.13618) adapter that teaches
`{args.pretrained_model_name_or_path}` the subject of `{args.instance_prompt}`, trained with
[DreamBooth](https://dreambooth.github.io/) by `train_dreambooth_loldu.py` (loldu-sd).

{samples}## Use it

```python
import loldu_sd  # adds load_loldu_weights to diffusers pipelines
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained({q(args.pretrained_model_name_or_path)})
pipe.load_loldu_weights({q(source)})
pipe({q(prompt)}).images[0].save("sample.png")
```

## Training settings

| setting | value |
|---|---|
{table}

![training loss](loss_curve.png)
"""
    path = out / "README.md"
    path.write_text(front + body, encoding="utf-8")
    return path


def push_to_hub(args: argparse.Namespace, repo_id: str) -> None:
    """Upload the adapter, card and images (not checkpoints or logs) to the Hub repo."""
    from huggingface_hub import upload_folder

    try:
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, token=args.hub_token,
                      commit_message="End of training", ignore_patterns=["checkpoint-*", f"{args.logging_dir}/*"])
    except Exception as e:
        raise TrainingError(f"--push_to_hub: upload to {repo_id} failed ({type(e).__name__}: {_first_line(e)}); "
                            f"everything is saved in {args.output_dir}") from None
    logger.info("pushed %s to https://huggingface.co/%s", args.output_dir, repo_id)
