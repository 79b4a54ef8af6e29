"""Flags of train_dreambooth_loldu.py and every check that needs no model (TrainingInputError names the problem)."""
from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import INITS, LoLDUConfig
from ..io import parse_metadata, read_adapter_file
from ..loading import looks_local
from ..presets import PRESETS
from .checkpoints import resolve_checkpoint
from .errors import TrainingInputError, first_line

logger = logging.getLogger(__name__)


DEFAULT_MAX_TRAIN_STEPS = 200  # paper Fig. 5: concept acquired in ~100 steps; 2x margin (see the README)
LR_SCHEDULERS = ("constant_with_warmup", "constant", "linear", "cosine", "cosine_with_restarts", "polynomial")


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
    a("--snr_gamma", type=float, default=None,
      help="Min-SNR loss weighting with this gamma (diffusers recommends 5.0); default: plain MSE.")
    a("--noise_offset", type=float, default=0.0, help="Offset noise scale (e.g. 0.05-0.1: darker darks, brighter "
                                                      "brights); 0: off.")
    a("--text_encoder_use_attention_mask", action="store_true",
      help="Pass the prompt's attention mask to the text encoder (padding masked out).")
    a = p.add_argument_group("memory and speed").add_argument
    a("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
      help="Frozen weights in fp16/bf16, trainable z/sigma in fp32 (default: accelerate's config). CPU: bf16 only.")
    a("--gradient_checkpointing", action="store_true", help="Recompute activations in backward to save memory.")
    a("--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers attention.")
    a("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs (set for the whole process by "
      "train_dreambooth_loldu.py; train_dreambooth() itself never changes it).")
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
        need((args.class_prompt or "").strip(), "--with_prior_preservation needs --class_prompt, e.g. 'a photo of a "
                                                "robot'")
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
    for name in ("learning_rate", "prior_loss_weight", "adam_weight_decay", "max_grad_norm", "adam_epsilon",
                 "adam_beta1", "adam_beta2", "lr_power", "noise_offset"):  # inf passes '>= 0', NaN fails it silently
        need(math.isfinite(getattr(args, name)), f"--{name} must be a finite number, got {getattr(args, name)}")
    need(args.learning_rate > 0, f"--learning_rate must be > 0, got {args.learning_rate}")
    need(args.snr_gamma is None or 0 < args.snr_gamma < math.inf,
         f"--snr_gamma must be finite and > 0, got {args.snr_gamma}")
    need(args.noise_offset >= 0, f"--noise_offset must be >= 0, got {args.noise_offset}")
    need(0 <= args.seed < 2**32, f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    need(0 <= args.adam_beta1 < 1 and 0 <= args.adam_beta2 < 1, "--adam_beta1/--adam_beta2 must lie in [0, 1)")
    need(args.resolution >= 8 and args.resolution % 8 == 0,
         f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {args.resolution}")
    need(args.instance_prompt.strip(), "--instance_prompt is empty; use e.g. 'a photo of sks robot'")
    need(args.validation_prompt is None or args.validation_prompt.strip(),
         "--validation_prompt is empty; leave it out to validate with the instance prompt")
    need(args.report_to in ("tensorboard", "wandb", "comet_ml", "all", "none"),
         f"--report_to must be tensorboard, wandb, comet_ml, all or none, got {args.report_to!r}")
    need(args.resume_from_checkpoint != "", "--resume_from_checkpoint is empty; give a checkpoint folder or 'latest'")
    # "" would be the current folder: its README.md and plots would be overwritten
    need(str(args.output_dir).strip(), "--output_dir is empty; give a folder for the adapter, e.g. --output_dir "
                                       "loldu-dreambooth-model")
    for name in ("alpha", "sigma_max", "z_max_norm"):  # NaN passes every comparison in LoLDUConfig
        value = getattr(args, name)
        need(value is None or (math.isfinite(value) and value > 0),
             f"--{name} must be a finite number > 0, got {value}")
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
    folders = {f: Path(getattr(args, f)).resolve() for f in ("instance_data_dir", "class_data_dir", "output_dir")
               if getattr(args, f)}
    for a, b in (("instance_data_dir", "output_dir"), ("instance_data_dir", "class_data_dir"),
                 ("class_data_dir", "output_dir")):
        if a in folders and folders.get(a) == folders.get(b):  # outputs or class images would become training data
            raise TrainingInputError(f"--{a} and --{b} are the same folder ({folders[a]}); use separate folders")
    for flag in ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "tokenizer_name"):
        spec = getattr(args, flag)
        if spec and looks_local(spec) and not Path(spec).expanduser().is_dir():
            raise TrainingInputError(f"--{flag} {spec}: no such folder (and not a Hub id such as "
                                     "'stable-diffusion-v1-5/stable-diffusion-v1-5')")
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
    from ..io import LOLDU_WEIGHT_NAME

    try:
        path = checkpoint / LOLDU_WEIGHT_NAME
        saved, layers = parse_metadata(path, read_adapter_file(path)[1])
        comps = set(layers)
    except (OSError, ValueError, KeyError) as e:
        raise TrainingInputError(f"--resume_from_checkpoint {checkpoint}: unreadable adapter ({first_line(e)}); "
                                 "this checkpoint is damaged or was edited: resume from an earlier one (delete this "
                                 "one) or start a new run") from None
    if saved != loldu_config(args) or bool(comps - {"unet"}) != bool(args.train_text_encoder):  # SDXL: two encoders
        raise TrainingInputError(f"--resume_from_checkpoint {checkpoint}: trained with other LoLDU flags (rank "
                                 f"{saved.rank}, alpha {saved.alpha:g}, targets {','.join(saved.target_modules)}, "
                                 f"text encoder {'text_encoder' in comps}); resume with the same flags")


def resolve_max_train_steps(args: argparse.Namespace, dataset_len: int, world: int) -> int:
    """--max_train_steps, else --num_train_epochs worth of steps, else DEFAULT_MAX_TRAIN_STEPS."""
    if args.max_train_steps:
        return args.max_train_steps
    if args.num_train_epochs:
        per_step = args.train_batch_size * world * args.gradient_accumulation_steps
        return args.num_train_epochs * math.ceil(dataset_len / per_step)
    return DEFAULT_MAX_TRAIN_STEPS
