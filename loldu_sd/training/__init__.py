"""DreamBooth training of a LoLDU adapter: the logic behind train_dreambooth_loldu.py and the studio's Train tab.

    args.py         flags and every check that needs no model
    base.py         which base pipelines can be trained (read from their configs)
    data.py         images, the seeded dataset and sample stream, class images
    models.py       frozen base models + trainable adapters, the accelerator
    conditioning.py what the UNet is conditioned on: SD's text encoder, or SDXL's two plus pooled embeds and time ids
    loss.py         the denoising objective and its options (Min-SNR, offset noise, attention mask), batch_loss
    optim.py        the optimizer and learning-rate schedule the flags describe
    step.py         Trainable and training_step: the one optimizer step (also the quality benchmark's)
    checkpoints.py  atomic, resumable checkpoint-N folders
    loop.py         train_dreambooth: the optimizer-step loop
    outputs.py      samples, loss plot, model card, Hub upload

    args = parse_args(["--pretrained_model_name_or_path", "tiny-sd", "--instance_data_dir", "assets/concept",
                       "--instance_prompt", "a photo of sks robot", "--output_dir", "out"])
    result = train_dreambooth(args, TrainingCallbacks(on_step=print, should_stop=lambda: False))

Flags follow diffusers' examples/dreambooth/train_dreambooth_lora.py. Everything the user can get wrong (flags,
folders, images) is checked before any model is loaded, and reported as one line (TrainingInputError).
Randomness that shapes the run (data order, crop, flip, VAE sample, noise, timestep) is drawn from generators seeded
by (seed, stream, global sample index), so a resumed run and a multi-process run see exactly the samples that one
uninterrupted process would: sample n is the n-th sample of the run, whichever process or restart computes it.
"""
from .args import (DEFAULT_MAX_TRAIN_STEPS, LR_SCHEDULERS, build_parser, check_args, loldu_config, parse_args,
                   preflight, resolve_max_train_steps)
from .checkpoints import STATE_NAME, adapter_digest, list_checkpoints, resolve_checkpoint, save_checkpoint
from ..images import to_rgb
from .data import DreamBoothDataset, SampleStream, load_images, sample_seed
from .errors import TrainingError, TrainingInputError
from .loop import train_dreambooth
from .results import TrainingCallbacks, TrainingResult
from .loss import diffusion_loss, encode_prompt, evaluate_denoising_loss
from .models import load_models
from .outputs import image_grid, plot_losses, write_model_card
from .step import NonFiniteStep, OneProcess, Trainable, training_step

__all__ = [
    "DEFAULT_MAX_TRAIN_STEPS", "LR_SCHEDULERS", "STATE_NAME", "DreamBoothDataset", "NonFiniteStep", "OneProcess",
    "SampleStream", "Trainable", "TrainingCallbacks", "TrainingError", "TrainingInputError", "TrainingResult",
    "adapter_digest", "build_parser", "check_args",
    "diffusion_loss", "encode_prompt", "evaluate_denoising_loss", "image_grid", "list_checkpoints", "load_images",
    "load_models", "loldu_config", "parse_args", "plot_losses", "preflight", "resolve_checkpoint",
    "resolve_max_train_steps", "sample_seed", "save_checkpoint", "to_rgb", "train_dreambooth", "training_step",
    "write_model_card",
]
