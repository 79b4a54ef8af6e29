"""What a finished run leaves behind: samples, a loss plot, a model card, and optionally a Hub upload."""
from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .args import loldu_config
from .checkpoints import LOCK_NAME
from .errors import TrainingError, TrainingInputError, first_line
from ..pipeline import load_loldu_weights
from ..loading import dtype_kwargs
from .models import generate_samples, pipeline_from_args
from .results import TrainingCallbacks, TrainingResult


logger = logging.getLogger(__name__)


def final_outputs(args: argparse.Namespace, accelerator, result: TrainingResult, weight_dtype: torch.dtype,
                   n_values: int, repo_id: str | None, callbacks: TrainingCallbacks) -> None:
    """Main process: samples from the saved file in a fresh pipeline, grid, loss curve, model card, Hub upload."""
    out = result.output_dir
    if args.num_validation_images and not result.cancelled:
        from diffusers import AutoencoderKL

        extra = dtype_kwargs(weight_dtype)
        if args.pretrained_vae_model_name_or_path:
            extra["vae"] = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, **extra)
        pipe = pipeline_from_args(args, **extra).to(accelerator.device)
        load_loldu_weights(pipe, out)  # as users will load it: the file, not the in-memory adapter
        result.images = generate_samples(pipe, args)
        del pipe
        for i, image in enumerate(result.images):
            image.save(out / f"image_{i}.png")
        image_grid(result.images).save(out / "validation_grid.png")
        log_images(accelerator, "test", result.images, result.steps)
        if callbacks.on_validation is not None:
            callbacks.on_validation(result.steps, result.images)
    plot_losses(result.losses, out / "loss_curve.png")
    write_model_card(out, args, steps=result.steps, max_steps=result.max_train_steps, n_values=n_values,
                     n_images=len(result.images), cancelled=result.cancelled, repo_id=repo_id,
                     mixed_precision=accelerator.mixed_precision)
    if repo_id is not None:
        push_to_hub(args, repo_id)


def create_hub_repo(args: argparse.Namespace, accelerator) -> str:
    """Create the Hub repo up front (main process), so that an offline or unauthorised run fails in seconds."""
    from accelerate.utils import broadcast_object_list

    error = repo_id = None
    if accelerator.is_main_process:
        from huggingface_hub import create_repo

        try:
            repo_id = create_repo(args.hub_model_id or Path(args.output_dir).name, exist_ok=True,
                                  token=args.hub_token).repo_id
        except Exception as e:  # offline, no token, no permission: all mean the same to the user
            error = f"--push_to_hub: could not create the Hub repo ({type(e).__name__}: {first_line(e)})"
    error, repo_id = broadcast_object_list([error, repo_id])
    if error:
        raise TrainingInputError(error)
    return repo_id


def tracker_config(args: argparse.Namespace) -> dict:
    """The flags as tracker hyperparameters (scalars only; the Hub token left out)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()
            if k not in ("hub_token",)}


def log_images(accelerator, tag: str, images: list[Image.Image], step: int) -> None:
    """Send images to TensorBoard (other trackers get only scalars)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard" and images:
            tracker.writer.add_images(tag, np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")


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
    from ..io import LOLDU_WEIGHT_NAME

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
import loldu_sd.diffusers  # gives Stable Diffusion pipelines load_loldu_weights & co.
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
                      commit_message="End of training",
                      ignore_patterns=["checkpoint-*", f"{args.logging_dir}/*", LOCK_NAME])
    except Exception as e:
        raise TrainingError(f"--push_to_hub: upload to {repo_id} failed ({type(e).__name__}: {first_line(e)}); "
                            f"everything is saved in {args.output_dir}") from None
    logger.info("pushed %s to https://huggingface.co/%s", args.output_dir, repo_id)
