"""Stage `generator`: the UNet under its own frozen text encoder, and `export` to a StableDiffusionPipeline folder.

As SD conditions on CLIP's contrastively trained text tower, kept frozen, the generator conditions on a frozen
CLIPTextModel of its own (by default the committed pipeline's, which began as the image-text judge's tower: it
separates captions that differ in one word 4-5x more than a random encoder; a text encoder trained jointly from
scratch collapsed within 500 steps). Owning it lets the judges be retrained without moving the generator.
v-prediction with an object-weighted loss, 10 % empty captions for classifier-free guidance, EMA weights, and a
kind loss: the kind the x0 estimate names (read by the autoencoder's kind head) against the true latent's.
"""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from loldu_sd.toyworld import GUIDANCE_SCALE, INFERENCE_STEPS, MARKER, PIPELINE_DIR
from loldu_sd.toyworld.models import build_unet, sample_scheduler, toy_tokenizer, train_scheduler
from loldu_sd.toyworld.world import caption, render, sample_scene

from .codec import kind_loss, load_kind_head
from .common import (Checkpointer, Log, checkpoint_step, edge_weights, images_to_tensor, lr_at, model_tensors,
                     resume_step, step_batches)

GENERATOR_KIND_WEIGHT = 0.2
INIT_FILE = "generator_init.json"  # written when the generator starts from an earlier pipeline (--init_from)
TEXT_ENCODER_DIR = "text_encoder"  # the run's copy of the generator's frozen text encoder
STATE_FILE = "generator_state.safetensors"


def scene_batch(rng: random.Random, n: int) -> tuple[torch.Tensor, list[str]]:
    """n random pretraining scenes as an image tensor and their captions."""
    scenes = [sample_scene(rng) for _ in range(n)]
    return images_to_tensor([render(s) for s in scenes]), [caption(s) for s in scenes]


def generator_text_encoder(out: Path, source: str | Path | None):
    """The run's frozen CLIPTextModel: <out>/text_encoder, copied there from `source` on the first call."""
    from transformers import CLIPTextModel

    own = out / TEXT_ENCODER_DIR
    if not (own / "config.json").is_file():
        src = Path(source) if source is not None else PIPELINE_DIR / "text_encoder"
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"--text_encoder {src}: no CLIPTextModel folder (config.json) there")
        CLIPTextModel.from_pretrained(src, torch_dtype=torch.float32).save_pretrained(own)
    return CLIPTextModel.from_pretrained(own, torch_dtype=torch.float32).eval().requires_grad_(False)


def train_generator(out: Path, steps: int, batch: int, seed: int, lr: float, decay_steps: int | None = None,
                    init_from: Path | None = None, kind_weight: float = GENERATOR_KIND_WEIGHT,
                    text_encoder: str | Path | None = None, device: str = "cpu", resume: bool = False,
                    workers: int = 0) -> None:
    """Train the UNet on captioned scenes under the frozen text encoder; keep an EMA copy (resumable).

    With `init_from` (a pipeline folder) a fresh run starts from that pipeline's UNet: another cycle of the
    learning-rate schedule.
    """
    from diffusers import AutoencoderKL

    init_weights, init_cycles = pipeline_unet(Path(init_from)) if init_from is not None else (None, [])
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(out / "vae").to(device).eval().requires_grad_(False)
    tokenizer, encoder = toy_tokenizer(), generator_text_encoder(out, text_encoder).to(device)
    unet = build_unet(seed, vae.config.latent_channels).to(device).train()
    ema_unet = copy.deepcopy(unet).eval()
    kind_head = load_kind_head(out, vae.config.latent_channels)
    kind_head = kind_head.to(device) if kind_head is not None else None
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    scheduler = train_scheduler()
    models, path = {"unet": unet, "ema_unet": ema_unet}, out / STATE_FILE
    start, saver = resume_step(path, models, opt, resume), Checkpointer(path, models, opt)
    if start == 0 and init_weights is not None:
        unet.load_state_dict(init_weights)
        ema_unet.load_state_dict(init_weights)
        (out / INIT_FILE).write_text(json.dumps({"from": str(init_from), "cycles": init_cycles}) + "\n")
    log = Log(out / "generator_loss.jsonl")

    def make(step: int) -> dict:
        return generator_example(tokenizer, seed, step, batch)

    for step, example in enumerate(step_batches(make, start, steps, workers), start):
        x, ids = example["x"].to(device), example["ids"].to(device)
        gen = torch.Generator(device).manual_seed(example["noise_seed"])  # per step: a resumed run draws the same
        for g in opt.param_groups:
            g["lr"] = lr_at(step, decay_steps or steps, lr, 300)
        loss = generator_loss(unet, vae, encoder, kind_head, scheduler, x, ids, kind_weight, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        _ema_update(ema_unet, unet, step)
        log.add(step, loss.item())
        saver.maybe_save(step, steps)


def generator_example(tokenizer, seed: int, step: int, batch: int) -> dict:
    """One step's batch from its step number alone: images, token ids (10 % empty captions), a noise seed."""
    rng = random.Random(seed * 1_000_003 + 500_000 + step)
    x, captions = scene_batch(rng, batch)
    captions = ["" if rng.random() < 0.1 else c for c in captions]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return {"x": x, "ids": ids, "noise_seed": rng.randrange(2**63)}


def generator_loss(unet, vae, encoder, kind_head, scheduler, x, ids, kind_weight: float,
                   gen: torch.Generator) -> torch.Tensor:
    """Object-weighted v-prediction MSE, plus the kind loss on the one-step x0 estimate."""
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.sample(generator=gen) * vae.config.scaling_factor
        embeds = encoder(ids)[0]
    noise = torch.randn(latents.shape, generator=gen, device=x.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x),), generator=gen, device=x.device)
    noisy = scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, embeds).sample
    loss = object_weighted_mse(pred, scheduler.get_velocity(latents, noise, t), x)
    if kind_head is not None and kind_weight:
        x0 = predicted_x0(scheduler, noisy, pred, t) / vae.config.scaling_factor
        loss = loss + kind_weight * kind_agreement(kind_head, x0, latents / vae.config.scaling_factor)
    return loss


def pipeline_unet(pipeline: Path) -> tuple[dict, list[int]]:
    """A pipeline folder's UNet weights (fp32) and the generator steps of each cycle its marker records."""
    weights = pipeline / "unet" / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"--init_from {pipeline}: no unet/diffusion_pytorch_model.safetensors there")
    marker = pipeline / MARKER
    recorded = json.loads(marker.read_text()) if marker.is_file() else {}
    steps = recorded.get("generator_steps", 0)
    cycles = recorded.get("cycles", [steps] if steps else [])
    return {k: v.float() for k, v in load_file(weights).items()}, cycles


def predicted_x0(scheduler, noisy: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean latent a v-prediction implies in one step: sqrt(a) x_t - sqrt(1 - a) v."""
    a = scheduler.alphas_cumprod.to(noisy.device)[t].view(-1, 1, 1, 1)
    return a.sqrt() * noisy - (1 - a).sqrt() * v


def kind_agreement(kind_head: torch.nn.Conv2d, x0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy of the kind map read off the x0 estimate against the one read off the true latent.

    In plain MSE the outline that tells a star from a blob is a small share of a few latent pixels; the kind head
    turns it into a per-pixel class. The target is the true latent's own reading, so the loss asks for no more
    certainty than real latents carry.
    """
    return kind_loss(kind_head(x0), F.softmax(kind_head(z), 1))


def object_weighted_mse(pred: torch.Tensor, target: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """MSE with each latent pixel weighted by the image's local contrast (edge_weights pooled to latent size).

    Plain MSE is mostly background: a kind-swapped caption raised the loss by 1.5 % where a colour-swapped one raised
    it by 21 %, so the shapes, a few latent pixels each, taught the model little.
    """
    w = F.adaptive_avg_pool2d(edge_weights(images), pred.shape[-2:])
    return (w * (pred - target) ** 2).mean() / w.mean()


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float = 0.999) -> None:
    d = min(decay, (1 + step) / (10 + step))  # short memory early, when the weights move fast
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - d)


def export_pipeline(out: Path, dest: Path, seed: int) -> Path:
    """Write the EMA generator with the VAE, text encoder, tokenizer and DPM-Solver++ as an fp16 pipeline folder."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    vae = AutoencoderKL.from_pretrained(out / "vae")
    unet = build_unet(seed, vae.config.latent_channels)
    unet.load_state_dict(model_tensors(out / STATE_FILE, "ema_unet"))
    # a later cycle (--init_from) also counts the steps of the cycles before it
    earlier = json.loads((out / INIT_FILE).read_text())["cycles"] if (out / INIT_FILE).is_file() else []
    steps = checkpoint_step(out / STATE_FILE)
    marker = {"world": "loldu-sd toy world", "generator_steps": sum(earlier) + steps, "seed": seed,
              "guidance_scale": GUIDANCE_SCALE, "num_inference_steps": INFERENCE_STEPS}
    if earlier:
        marker["cycles"] = earlier + [steps]
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=generator_text_encoder(out, None), tokenizer=toy_tokenizer(),
                                   unet=unet, scheduler=sample_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(dest, safe_serialization=True)
    # fp16 on disk keeps the folder small; the config asks transformers to load it as fp32 (as diffusers does), so a
    # plain from_pretrained gives one dtype throughout
    config_path = dest / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    (dest / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return dest
