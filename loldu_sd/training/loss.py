"""The denoising objective, with the VAE sample, noise and timestep of each sample drawn from its own seed.

Options with diffusers' DreamBooth meanings: Min-SNR weighting (--snr_gamma, arXiv 2303.09556) of the instance loss,
offset noise (--noise_offset: a per-sample, per-channel constant added to the noise) and the text encoder's attention
mask (--text_encoder_use_attention_mask).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..images import to_rgb
from .data import CLASS_NOISE, EVAL, NOISE, crop_center, resize_shorter, seeded_generator, to_tensor


PREDICTION_TYPES = ("epsilon", "v_prediction")


def denoising_loss(model_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """The DreamBooth objective: mean squared error in fp32, optionally weighted per sample."""
    if weights is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    # weights on the elements, one mean over all: weights of exactly 1 then give the plain loss bit for bit
    squared = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    return (squared * weights.view(-1, *[1] * (squared.dim() - 1))).mean()


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights: min(SNR, gamma) / SNR for epsilon targets, / (SNR + 1) for v-prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps).float()
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else clipped / snr


def prediction_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                      ) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon) or the velocity (v_prediction)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    if kind != "epsilon":
        raise ValueError(f"scheduler prediction_type {kind!r}: training supports {' and '.join(PREDICTION_TYPES)}")
    return noise


def _draws(seed: int, stream: int, indices: Sequence[int], shape: tuple, num_timesteps: int):
    """(VAE-sample eps, noise, timestep, noise offset) of each sample, from the generator of (seed, stream, n)."""
    eps, noise, steps, offsets = [], [], [], []
    for n in indices:
        g = seeded_generator(seed, stream, 0, int(n))
        eps.append(torch.randn(shape, generator=g))
        noise.append(torch.randn(shape, generator=g))
        steps.append(torch.randint(0, num_timesteps, (1,), generator=g))
        offsets.append(torch.randn(shape[0], 1, 1, generator=g))  # drawn last: the draws above never change
    return torch.stack(eps), torch.stack(noise), torch.cat(steps), torch.stack(offsets)


def text_encoder_output(text_encoder, tokenizer, prompts: Sequence[str], device: torch.device | None = None,
                        use_attention_mask: bool = False, hidden_states: bool = False):
    """The CLIP text encoder's output for `prompts` (padded to the tokenizer's max length, as SD does; the padding
    masked out with `use_attention_mask`; every layer's hidden states with `hidden_states`)."""
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    device = device or text_encoder.device
    mask = tokens.attention_mask.to(device) if use_attention_mask else None
    return text_encoder(tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=hidden_states)


def encode_prompt(text_encoder, tokenizer, prompts: Sequence[str], device: torch.device | None = None,
                  use_attention_mask: bool = False) -> torch.Tensor:
    """CLIP last hidden states of `prompts`: SD's cross-attention conditioning."""
    return text_encoder_output(text_encoder, tokenizer, prompts, device, use_attention_mask)[0]


def diffusion_loss(unet, vae, noise_scheduler, pixels: torch.Tensor, embeds: torch.Tensor, seed: int,
                   streams: Sequence[tuple[int, Sequence[int]]], snr_gamma: float | None = None,
                   noise_offset: float = 0.0, unet_kwargs: dict | None = None) -> list[torch.Tensor]:
    """Denoising losses of one batch, one per (stream, sample indices) part of `pixels`; noise seeded per sample.

    `snr_gamma` weights the first part (the instance images; the prior-preservation part stays plain, as in diffusers).
    `unet_kwargs` go to the UNet as they are (SDXL's added_cond_kwargs).
    """
    dtype = next(unet.parameters()).dtype
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    draws = [_draws(seed, stream, idx, tuple(dist.mean.shape[1:]), noise_scheduler.config.num_train_timesteps)
             for stream, idx in streams]
    eps, noise, timesteps, offsets = (torch.cat(parts).to(dist.mean.device) for parts in zip(*draws))
    latents = (dist.mean.float() + dist.std.float() * eps) * vae.config.scaling_factor
    if noise_offset:
        noise = noise + noise_offset * offsets
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = prediction_target(noise_scheduler, latents, noise, timesteps)
    pred = unet(noisy.to(dtype), timesteps, embeds.to(dtype), **(unet_kwargs or {})).sample
    sizes = [len(idx) for _, idx in streams]
    weights = [None] * len(sizes)
    if snr_gamma is not None:
        weights[0] = min_snr_weights(noise_scheduler, timesteps[: sizes[0]], snr_gamma)
    return [denoising_loss(p, t, w) for p, t, w in zip(pred.split(sizes), target.split(sizes), weights)]


def batch_loss(args, conditioner, unet, models, batch: dict, device: torch.device, with_class: bool) -> torch.Tensor:
    """The trainer's loss of one micro-batch: instance (and class) samples in one forward pass, as diffusers does.

    `conditioner` maps (prompts, time ids) to the UNet's conditioning (training.conditioning.Conditioner); `models`
    holds the VAE and the training scheduler; `batch` is a DreamBoothDataset batch.
    """
    n, idx = len(batch["index"]), batch["index"].tolist()
    pixels, streams, prompts = batch["instance"], [(NOISE, idx)], [args.instance_prompt] * n
    time_ids = batch["instance_time_ids"]
    if with_class:
        pixels, streams = torch.cat([pixels, batch["class"]]), streams + [(CLASS_NOISE, idx)]
        prompts, time_ids = prompts + [args.class_prompt] * n, torch.cat([time_ids, batch["class_time_ids"]])
    embeds, unet_kwargs = conditioner(prompts, time_ids)
    parts = diffusion_loss(unet, models.vae, models.scheduler, pixels.to(device), embeds, args.seed, streams,
                           args.snr_gamma, args.noise_offset, unet_kwargs)
    return parts[0] + args.prior_loss_weight * parts[1] if with_class else parts[0]


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
