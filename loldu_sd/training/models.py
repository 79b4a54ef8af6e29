"""Loading the frozen base models, adding the trainable adapters, and the accelerator that runs them."""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

import torch
from PIL import Image

from ..loading import dtype_kwargs
from ..model import cast_loldu_parameters
from ..pipeline import (ADAPTED_COMPONENTS, TEXT_ENCODERS, add_loldu_to_text_encoder, add_loldu_to_unet,
                        unet_target_layers)
from .args import loldu_config
from .errors import TrainingInputError, first_line


def no_safety_checker(args: argparse.Namespace) -> dict:
    """from_pretrained kwargs that skip the safety checker when the pipeline has one."""
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision)
    return {"safety_checker": None} if "safety_checker" in config else {}


def _text_encoder(args: argparse.Namespace, subfolder: str):
    """The text encoder in `subfolder` of the base, as the class its config names."""
    import transformers

    path, hub = args.pretrained_model_name_or_path, {"revision": args.revision}
    arch = transformers.AutoConfig.from_pretrained(path, subfolder=subfolder, **hub).architectures[0]
    return getattr(transformers, arch).from_pretrained(path, subfolder=subfolder, variant=args.variant, **hub)


def load_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """Tokenizer(s), text encoder(s) (two for SDXL), VAE, UNet (frozen, on `device` in `dtype`) and the DDPM
    training scheduler."""
    from types import SimpleNamespace

    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

    path, hub = args.pretrained_model_name_or_path, {"revision": args.revision}
    if args.tokenizer_name:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer_name, **hub)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **hub)
    text_encoder, tokenizer_2, text_encoder_2 = _text_encoder(args, "text_encoder"), None, None
    if (DiffusionPipeline.load_config(path, **hub).get("text_encoder_2") or [None])[0] is not None:  # SDXL
        tokenizer_2 = transformers.AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", **hub)
        text_encoder_2 = _text_encoder(args, "text_encoder_2").to(dtype=dtype)
    cast = dtype_kwargs(dtype)  # frozen weights in the mixed-precision dtype
    if args.pretrained_vae_model_name_or_path:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, **cast)
    else:  # SDXL's own VAE overflows in fp16: float32, as diffusers' SDXL scripts keep it unless a fixed VAE is given
        vae_cast = dtype_kwargs(torch.float32) if text_encoder_2 is not None else cast
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, **hub, **vae_cast)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=args.variant, **hub, **cast)
    text_encoder.to(dtype=dtype)
    for model in (text_encoder, text_encoder_2, vae, unet):
        if model is not None:
            model.requires_grad_(False).to(device)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **hub)
    return SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer_2,
                           text_encoder_2=text_encoder_2, vae=vae, unet=unet, scheduler=scheduler)


def text_encoder_names(models) -> list[str]:
    """The text encoders the loaded base has: text_encoder, and text_encoder_2 for SDXL."""
    return [name for name in TEXT_ENCODERS if getattr(models, name, None) is not None]


def pipeline_components(m, trained: dict, unwrap) -> dict:
    """Pipeline components of the run: the adapted models (the trained ones unwrapped), the VAE and tokenizer(s)."""
    adapted = {n: unwrap(trained.get(n, getattr(m, n))) for n in ADAPTED_COMPONENTS if getattr(m, n) is not None}
    return {**adapted, **{n: getattr(m, n) for n in ("vae", "tokenizer", "tokenizer_2") if getattr(m, n) is not None}}


def pipeline_from_args(args: argparse.Namespace, **components):
    """The base pipeline of --pretrained_model_name_or_path, with `components` swapped in."""
    from diffusers import DiffusionPipeline

    kwargs = {**no_safety_checker(args), **components}
    return DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision,
                                             variant=args.variant, **kwargs)


def make_accelerator(args: argparse.Namespace):
    """A fresh Accelerator for this run (mixed precision, trackers, CPU DDP under torchrun)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, is_initialized
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    # accelerate keeps one mixed precision per process; a second in-process run (the studio) must use the same one
    if is_initialized() and args.mixed_precision not in (None, AcceleratorState().mixed_precision):
        raise TrainingInputError(f"--mixed_precision {args.mixed_precision}: this process already trained with "
                                 f"{AcceleratorState().mixed_precision} (accelerate keeps one per process); use "
                                 "that, or train in a new process")
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


def models_with_adapters(args: argparse.Namespace, accelerator):
    """Frozen base models in the mixed-precision dtype with LoLDU adapters whose z/sigma stay fp32."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    try:
        m = load_models(args, accelerator.device, weight_dtype)
    except (OSError, ValueError) as e:  # not a diffusers folder, unknown Hub id, offline: one line, not 80
        raise TrainingInputError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: could not "
                                 f"load the base model ({type(e).__name__}: {first_line(e)})") from None
    config = loldu_config(args)
    try:
        check_rank_fits(m.unet, config)
        components = {"unet": add_loldu_to_unet(m.unet, config)}
        if args.train_text_encoder:  # every text encoder: SDXL's two, as diffusers' SDXL script does
            for name in text_encoder_names(m):
                components[name] = add_loldu_to_text_encoder(getattr(m, name), config)
    except TrainingInputError:
        raise
    except ValueError as e:
        raise TrainingInputError(f"--target_modules {args.target_modules}: {first_line(e)}") from None
    for module in components.values():
        cast_loldu_parameters(module, torch.float32)
    if args.enable_xformers_memory_efficient_attention:
        m.unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        m.unet.enable_gradient_checkpointing()
        kw = {"use_reentrant": False}  # reentrant checkpointing drops the grads of frozen-input blocks
        for name in text_encoder_names(m) if args.train_text_encoder else []:
            encoder = getattr(m, name)
            if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5 name
                encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    return m, components, weight_dtype


def check_rank_fits(unet, config) -> None:
    """--rank must fit every targeted UNet layer: a smaller one would keep fewer pivots than the metadata records."""
    from ..model import find_targets

    targets = config.target_modules
    names = find_targets(unet, targets) if isinstance(targets, str) else unet_target_layers(unet, targets)
    modules = dict(unet.named_modules())
    name = min(names, key=lambda n: min(modules[n].in_features, modules[n].out_features), default=None)
    kept = min(modules[name].in_features, modules[name].out_features) if name else config.rank
    if config.rank > kept:
        raise TrainingInputError(f"--rank {config.rank} is larger than the UNet's {name} allows "
                                 f"({modules[name].out_features}x{modules[name].in_features}: at most {kept}); "
                                 f"use --rank {kept} or less")


def generate_samples(pipe, args: argparse.Namespace) -> list[Image.Image]:
    """--num_validation_images images of the validation prompt (DPM-Solver, seeded by --seed)."""
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    # SDXL's float32 VAE under mixed precision decodes half-precision latents under autocast, as diffusers' scripts do
    mixed = pipe.vae.dtype != pipe.unet.dtype
    with torch.autocast(pipe.device.type, dtype=pipe.unet.dtype) if mixed else contextlib.nullcontext():
        return pipe(args.validation_prompt or args.instance_prompt, num_images_per_prompt=args.num_validation_images,
                    num_inference_steps=args.validation_inference_steps, height=args.resolution,
                    width=args.resolution, generator=torch.Generator().manual_seed(args.seed)).images
