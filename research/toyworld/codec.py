"""Stage `vae`: the toy world's autoencoder, trained to carry whatever the renderer can draw.

A UNet adapter can only make latents; what the decoder cannot draw from any latent no fine-tune can learn. So the
codec sees far more than the generator will: besides the pretraining scenes, objects of any kind and colour with up
to two decorations including the rich ones (two-tone, checkers, eye), several at once, and random textures of
arbitrary colours, as SD's autoencoder saw everything. The held-out concepts are such objects; the *generator*
still never sees them. Its latent also names the kind under each latent pixel (a 1x1 head, dropped after training)
and a share of each batch is decoded from blurred latents, so soft latents still decode to outlines (findings
10-12 of docs/toyworld-research.md).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from loldu_sd.toyworld import world as W
from loldu_sd.toyworld.models import build_vae

from .common import (Checkpointer, Log, edge_weights, gaussian_blur, images_to_tensor, lr_at, psnr, resume_step,
                     step_batches)

# as SD's VAE: against the per-pixel loss it keeps the latent channels near unit scale
KL_WEIGHT = 1e-6
# the kind head's share of the loss: the generator's kind loss reads latents with it
KIND_WEIGHT = 0.3
KIND_HEAD_FILE = "vae_kind_head.safetensors"
BLURRED_SHARE = 0.25  # of each batch decoded from blurred latents (0.5 cost the round trip ~1 dB, finding 18)
ALL_DECORATIONS = W.DECORATIONS + W.RICH_DECORATIONS
NO_OBJECT = W.Scene((), "plain", "white")


def codec_scene(rng: random.Random) -> W.Scene:
    """One or two objects of any kind and colour, up to two decorations of any kind (rich ones included)."""
    things: list[W.Thing] = []
    two = rng.random() < 0.25
    for _ in range(2 if two else 1):
        kind, colour = rng.choice(W.KINDS), rng.choice(list(W.COLOURS))
        names = rng.sample(ALL_DECORATIONS, k=rng.choice((0, 1, 1, 2)))
        decorations = tuple((n, rng.choice([c for c in W.COLOURS if c != colour])) for n in names)
        r = rng.uniform(6, 13) if two else rng.uniform(6, 20)
        things.append(W.Thing(kind, colour, decorations, W._free_centre(rng, r, things), r))
    return W.Scene(tuple(things), rng.choice(W.BACKGROUNDS), rng.choice(list(W.COLOURS)))


def texture(rng: random.Random, size: int = W.SIZE) -> Image.Image:
    """Random ellipses, boxes, strokes and polygons of arbitrary colours on an arbitrary colour (drawn at 4x)."""
    side = size * W.SUPERSAMPLE
    img = Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 20)):
        fill = tuple(rng.randrange(256) for _ in range(3))
        x, y, s, shape = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(8, 120), rng.random()
        if shape < 0.3:
            draw.ellipse((x, y, x + s, y + s * rng.uniform(0.3, 1.5)), fill=fill)
        elif shape < 0.6:
            draw.rectangle((x, y, x + s, y + s * rng.uniform(0.2, 1.5)), fill=fill)
        elif shape < 0.8:
            draw.line((x, y, rng.uniform(0, side), rng.uniform(0, side)), fill=fill, width=rng.randint(2, 12))
        else:
            draw.polygon([(rng.uniform(0, side), rng.uniform(0, side)) for _ in range(rng.randint(3, 6))], fill=fill)
    return img.resize((size, size), Image.Resampling.BOX)


def codec_batch(rng: random.Random, n: int) -> tuple[list[Image.Image], list[W.Scene]]:
    """n training images: half rich-object scenes, 30 % pretraining scenes, 20 % textures (scene: no objects)."""
    images, scenes = [], []
    for _ in range(n):
        u = rng.random()
        scene = codec_scene(rng) if u < 0.5 else W.sample_scene(rng) if u < 0.8 else None
        images.append(W.render(scene) if scene else texture(rng))
        scenes.append(scene or NO_OBJECT)
    return images, scenes


def kind_targets(scenes, side: int) -> torch.Tensor:
    """[N, 1 + len(KINDS), side, side]: the share of each latent pixel each kind covers; class 0 is no object."""
    masks = np.stack([np.stack([np.asarray(m, dtype=np.float32) for m in W.kind_masks(s)]) for s in scenes]) / 255
    shares = F.adaptive_avg_pool2d(torch.from_numpy(masks), side)
    targets = torch.cat([(1 - shares.sum(1, keepdim=True)).clamp(min=0), shares], 1)
    return targets / targets.sum(1, keepdim=True)


def kind_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft kind targets, object pixels weighted 5x (objects cover a few latent pixels)."""
    weights = 1 + 4 * (1 - targets[:, 0])
    return (weights * -(targets * F.log_softmax(logits, 1)).sum(1)).mean() / weights.mean()


def codec_example(seed: int, step: int, batch: int, side: int) -> dict:
    """One step's batch, from its step number alone: images, kind targets at latent size `side`, noise seed, blur."""
    rng = random.Random((seed + 1) * 1_000_003 + step)
    images, scenes = codec_batch(rng, batch)
    return {"x": images_to_tensor(images), "targets": kind_targets(scenes, side),
            "noise_seed": rng.randrange(2**63), "blur": rng.uniform(0.5, 1.0)}


def codec_loss(vae, kind_head, example: dict) -> torch.Tensor:
    """Edge-weighted L1 + MSE of the reconstruction (a share decoded from blurred latents), kind head, KL."""
    device = vae.device
    x, targets = example["x"].to(device), example["targets"].to(device)
    gen = torch.Generator(device).manual_seed(example["noise_seed"])  # per step: a resumed run draws the same
    post = vae.encode(x).latent_dist
    z = post.sample(generator=gen)
    blurred = torch.rand(len(x), generator=gen, device=device).cpu() < BLURRED_SHARE
    z_dec = z.clone()
    if blurred.any():
        z_dec[blurred] = gaussian_blur(z[blurred], example["blur"])
    rec = vae.decode(z_dec).sample
    # edge weights: with a plain mean loss the wide backgrounds drown the shapes and their decorations
    loss = (edge_weights(x) * ((rec - x).abs() + 0.5 * (rec - x) ** 2)).mean()
    return loss + KIND_WEIGHT * kind_loss(kind_head(z), targets) + KL_WEIGHT * post.kl().mean()


def train_vae(out: Path, steps: int, batch: int, seed: int, latent_channels: int | None = None,
              device: str = "cpu", resume: bool = False, lr: float = 1e-3, checkpoint_every: int = 250,
              workers: int = 0) -> None:
    """Train the autoencoder (resumable), then store the latent scale and the kind head beside it."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vae = build_vae(seed, latent_channels).to(device).train()
    kind_head = torch.nn.Conv2d(vae.config.latent_channels, 1 + len(W.KINDS), 1).to(device)
    params = list(vae.parameters()) + list(kind_head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    models = {"vae": vae, "kind_head": kind_head}
    path, log = out / "vae_state.safetensors", Log(out / "vae_loss.jsonl", every=25)
    start, saver = resume_step(path, models, opt, resume), Checkpointer(path, models, opt, checkpoint_every)
    side = W.SIZE // 2 ** (len(vae.config.block_out_channels) - 1)

    def make(step: int) -> dict:
        return codec_example(seed, step, batch, side)

    for step, example in enumerate(step_batches(make, start, steps, workers), start):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 100)
        loss = codec_loss(vae, kind_head, example)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.add(step, loss.item())
        saver.maybe_save(step, steps)
    vae = vae.eval().cpu()
    set_latent_scale(vae, seed)
    vae.save_pretrained(out / "vae")
    save_file({k: v.cpu() for k, v in kind_head.state_dict().items()}, out / KIND_HEAD_FILE)


@torch.no_grad()
def set_latent_scale(vae, seed: int) -> float:
    """Store 1 / std of the latents of 256 scenes as the VAE's scaling_factor, so the UNet sees unit-scale latents."""
    rng = random.Random(seed + 7)
    x = images_to_tensor([W.render(W.sample_scene(rng)) for _ in range(256)])
    std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    print(f"vae: latent std {std:.4f} -> scaling_factor {1 / std:.5f}", flush=True)
    return std


@torch.no_grad()
def round_trip_psnr(vae, images) -> torch.Tensor:
    """Per-image PSNR (dB) of vae.decode(vae.encode(x).mode()) against x: what the codec keeps of each image."""
    x = images_to_tensor([im.convert("RGB") for im in images], vae.device).to(vae.dtype)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    return psnr(x, rec).cpu()


def load_kind_head(out: Path, channels: int) -> torch.nn.Conv2d | None:
    """The autoencoder's frozen kind head (None for an autoencoder trained without one)."""
    path = out / KIND_HEAD_FILE
    if not path.is_file():
        print(f"generator: no {KIND_HEAD_FILE} in {out}; training without the kind loss", flush=True)
        return None
    head = torch.nn.Conv2d(channels, 1 + len(W.KINDS), 1)
    head.load_state_dict(load_file(path))
    return head.eval().requires_grad_(False)
