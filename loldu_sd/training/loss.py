"""The denoising objective, with the VAE sample, noise and timestep of each sample drawn from its own seed."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..images import to_rgb
from .data import EVAL, crop_center, resize_shorter, seeded_generator, to_tensor


def denoising_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The DreamBooth objective: mean squared error in fp32."""
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


def _draws(seed: int, stream: int, indices: Sequence[int], shape: tuple, num_timesteps: int):
    """(VAE-sample eps, noise, timestep) of each sample, from the generator of (seed, stream, n)."""
    eps, noise, steps = [], [], []
    for n in indices:
        g = seeded_generator(seed, stream, 0, int(n))
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
    pixels = torch.stack([to_tensor(crop_center(resize_shorter(to_rgb(im), resolution), resolution)) for im in images])
    embeds = encode_prompt(pipe.text_encoder, pipe.tokenizer, [prompt] * len(images))
    losses = [diffusion_loss(pipe.unet, pipe.vae, scheduler, pixels, embeds, seed,
                             [(EVAL, range(d * len(images), (d + 1) * len(images)))])[0] for d in range(draws)]
    return float(torch.stack(losses).mean())
