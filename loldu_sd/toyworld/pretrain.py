"""Pretrain the toy world's pipeline on 2 CPU cores: `python -m loldu_sd.toyworld.pretrain --out runs/toyworld`.

Stages (each seeded, each resumable from its own checkpoint in --out):
  vae        AutoencoderKL on rendered scenes (edge-weighted L1 + MSE, SD's KL weight; SD's VAE without a GAN), its
             latent also naming each pixel's object kind, its decoder also drawing from blurred latents
  judges     the instance encoder and the image-text model that `eval --backbones toyworld` uses (see judges.py)
  generator  the UNet under the image-text judge's frozen text tower (as SD under CLIP's), v-prediction with an
             object-weighted loss, 10 % empty captions for classifier-free guidance, EMA weights
  export     fp16 safetensors: <out>/pipeline (StableDiffusionPipeline.from_pretrained) and <out>/judges
The committed copy lives in assets/toyworld; nobody needs to run this to use it.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import GUIDANCE_SCALE, INFERENCE_STEPS, MARKER
from .models import build_unet, build_vae, sample_scheduler, toy_tokenizer, train_scheduler
from .world import KINDS, caption, kind_masks, render, sample_scene


# as SD's VAE: against the edge-weighted per-pixel loss it keeps the latent channels near unit scale
KL_WEIGHT = 1e-6
# the kind head's share of the autoencoder loss: object pixels name their kind 98 % right by step 1,500
KIND_WEIGHT = 0.3
KIND_HEAD_FILE = "vae_kind_head.safetensors"
# the generator's kind loss: the kind its one-step x0 estimate names, against the kind the true latent names
GENERATOR_KIND_WEIGHT = 0.2
IMAGE_TOWER_STEPS = 1500  # the image-text judge's soft-view fine-tune (judges.train_image_tower)
INIT_FILE = "generator_init.json"  # written when the generator starts from an earlier pipeline (--init_from)


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> float tensor [N, 3, H, W] in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def scene_batch(rng: random.Random, n: int) -> tuple[torch.Tensor, list[str]]:
    """n random pretraining scenes as an image tensor and their captions."""
    scenes = [sample_scene(rng) for _ in range(n)]
    return images_to_tensor([render(s) for s in scenes]), [caption(s) for s in scenes]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak at step `total`, and 10 % after it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Log:
    """Loss curve (mean every `every` steps) appended to a JSON-lines file, and a one-line progress print."""

    def __init__(self, path: Path, every: int = 50):
        self.path, self.every, self.buf, self.t0 = path, every, [], time.time()

    def add(self, step: int, loss: float) -> None:
        self.buf.append(loss)
        if (step + 1) % self.every == 0:
            mean = sum(self.buf) / len(self.buf)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step + 1, "loss": round(mean, 5)}) + "\n")
            print(f"{self.path.stem} step {step + 1} loss {mean:.4f} ({time.time() - self.t0:.0f} s)", flush=True)
            self.buf = []


def _save_state(path: Path, step: int, models: dict, opt) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "opt": opt.state_dict(), **{k: m.state_dict() for k, m in models.items()}}, tmp)
    tmp.replace(path)


def _load_state(path: Path, models: dict, opt) -> int:
    if not path.exists():
        return 0
    state = torch.load(path, weights_only=True)  # our own tensors only: never unpickle code
    for k, m in models.items():
        m.load_state_dict(state[k])
    opt.load_state_dict(state["opt"])
    return state["step"]


# ---- stage 1: VAE --------------------------------------------------------------------------------------------------
def train_vae(out: Path, steps: int, batch: int, seed: int) -> None:
    """Train the autoencoder, then store the latent scale (1 / std of latents) in its config.

    Besides reconstructing, the latent must name the kind under each latent pixel (a 1x1 linear head, dropped after
    training), and half of each batch is decoded from blurred latents: the kind becomes a value, as a colour is,
    and a soft latent still decodes to the outline its value names. The generator draws values well, outlines not.
    """
    torch.manual_seed(seed)
    vae = build_vae(seed).train()
    kind_head = torch.nn.Conv2d(vae.config.latent_channels, 1 + len(KINDS), 1)
    params = list(vae.parameters()) + list(kind_head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    ckpt, log = out / "vae_state.pt", Log(out / "vae_loss.jsonl", every=25)
    start = _load_state(ckpt, {"vae": vae, "kind_head": kind_head}, opt)
    for step in range(start, steps):
        rng = random.Random((seed + 1) * 1_000_003 + step)
        scenes = [sample_scene(rng) for _ in range(batch)]
        x = images_to_tensor([render(s) for s in scenes])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 1e-3, 100)
        post = vae.encode(x).latent_dist
        z = post.sample()
        blurred = torch.rand(batch) < 0.5
        z_dec = z.clone()
        if blurred.any():
            z_dec[blurred] = gaussian_blur(z[blurred], rng.uniform(0.5, 1.0))
        rec = vae.decode(z_dec).sample
        # edge weights: with a plain mean loss the wide backgrounds drown the shapes (25 dB, stars drawn as blobs
        # after 1,400 steps); weighted, stars, triangles and crosses keep their outline by 1,250 steps (26.3 dB).
        loss = (edge_weights(x) * ((rec - x).abs() + 0.5 * (rec - x) ** 2)).mean()
        targets = kind_targets(scenes, z.shape[-1])
        loss = loss + KIND_WEIGHT * kind_loss(kind_head(z), targets) + KL_WEIGHT * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.add(step, loss.item())
        if (step + 1) % 250 == 0 or step + 1 == steps:
            _save_state(ckpt, step + 1, {"vae": vae, "kind_head": kind_head}, opt)
    set_latent_scale(vae.eval(), seed)
    vae.save_pretrained(out / "vae")
    save_file(kind_head.state_dict(), out / KIND_HEAD_FILE)  # the generator's kind loss reads latents with it


def kind_targets(scenes, side: int) -> torch.Tensor:
    """[N, 1 + len(KINDS), side, side]: the share of each latent pixel each kind covers; class 0 is no object."""
    masks = np.stack([np.stack([np.asarray(m, dtype=np.float32) for m in kind_masks(s)]) for s in scenes]) / 255
    shares = F.adaptive_avg_pool2d(torch.from_numpy(masks), side)
    targets = torch.cat([(1 - shares.sum(1, keepdim=True)).clamp(min=0), shares], 1)
    return targets / targets.sum(1, keepdim=True)


def kind_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft kind targets, object pixels weighted 5x (objects cover a few latent pixels)."""
    weights = 1 + 4 * (1 - targets[:, 0])
    return (weights * -(targets * F.log_softmax(logits, 1)).sum(1)).mean() / weights.mean()


def gaussian_blur(z: torch.Tensor, sigma: float) -> torch.Tensor:
    """A separable 5-tap Gaussian blur of each channel (replicated edges): soft latents or images."""
    taps = torch.exp(-torch.arange(-2, 3, dtype=z.dtype) ** 2 / (2 * sigma ** 2))
    taps, c = taps / taps.sum(), z.shape[1]
    z = F.conv2d(F.pad(z, (2, 2, 0, 0), mode="replicate"), taps.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(z, (0, 0, 2, 2), mode="replicate"), taps.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)


@torch.no_grad()
def set_latent_scale(vae, seed: int) -> float:
    """Store 1 / std of the latents of 256 scenes as the VAE's scaling_factor, so the UNet sees unit-scale latents."""
    x, _ = scene_batch(random.Random(seed + 7), 256)
    std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    print(f"vae: latent std {std:.4f} -> scaling_factor {1 / std:.5f}", flush=True)
    return std


def edge_weights(x: torch.Tensor, gain: float = 4.0) -> torch.Tensor:
    """Per-pixel loss weights 1 + gain * local contrast: edges and small details count as much as wide backgrounds."""
    gx = F.pad((x[..., :, 1:] - x[..., :, :-1]).abs().sum(1, keepdim=True), (0, 1, 0, 0))
    gy = F.pad((x[..., 1:, :] - x[..., :-1, :]).abs().sum(1, keepdim=True), (0, 0, 0, 1))
    return 1 + gain * (gx + gy).clamp(max=2.0)


# ---- stage 2: the UNet --------------------------------------------------------------------------------------------
def train_generator(out: Path, steps: int, batch: int, seed: int, lr: float, decay_steps: int | None = None,
                    init_from: Path | None = None, kind_weight: float = GENERATOR_KIND_WEIGHT) -> None:
    """Train the UNet on captioned scenes under the frozen text tower of the image-text judge; keep an EMA copy.

    As SD conditions on CLIP's contrastively trained text tower, kept frozen: the judge's tower (trained on captions
    with kind-swapped hard negatives) separates two captions that differ in one word 4-5x more than a random
    encoder does. A text encoder trained jointly from scratch collapsed within 500 steps. With `init_from` (a
    pipeline folder) a fresh run starts from that pipeline's UNet: a second cycle of the learning-rate schedule.
    """
    from diffusers import AutoencoderKL

    init_weights, init_cycles = pipeline_unet(Path(init_from)) if init_from is not None else (None, [])
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(out / "vae").eval().requires_grad_(False)
    tokenizer = toy_tokenizer()
    unet, text_encoder = build_unet(seed).train(), judge_text_encoder(out / "judges")
    ema_unet = copy.deepcopy(unet).eval()
    kind_head = load_kind_head(out, vae.config.latent_channels)
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = train_scheduler()
    # the frozen text encoder is stored once, under the key export reads
    models = {"unet": unet, "ema_unet": ema_unet, "ema_te": text_encoder}
    ckpt, log = out / "generator_state.pt", Log(out / "generator_loss.jsonl")
    start = _load_state(ckpt, models, opt)
    if start == 0 and init_weights is not None:
        unet.load_state_dict(init_weights)
        ema_unet.load_state_dict(init_weights)
        (out / INIT_FILE).write_text(json.dumps({"from": str(init_from), "cycles": init_cycles}) + "\n")
    for step in range(start, steps):
        rng = random.Random(seed * 1_000_003 + 500_000 + step)
        x, captions = scene_batch(rng, batch)
        captions = ["" if rng.random() < 0.1 else c for c in captions]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
            embeds = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        noisy = scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, embeds).sample
        loss = object_weighted_mse(pred, scheduler.get_velocity(latents, noise, t), x)
        if kind_head is not None:
            x0 = predicted_x0(scheduler, noisy, pred, t) / vae.config.scaling_factor
            loss = loss + kind_weight * kind_agreement(kind_head, x0, latents / vae.config.scaling_factor)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, decay_steps or steps, lr, 300)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _ema_update(ema_unet, unet, step)
        log.add(step, loss.item())
        if (step + 1) % 250 == 0 or step + 1 == steps:
            _save_state(ckpt, step + 1, models, opt)


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


def load_kind_head(out: Path, channels: int) -> torch.nn.Conv2d | None:
    """The autoencoder's frozen kind head (None for an autoencoder trained without one)."""
    path = out / KIND_HEAD_FILE
    if not path.is_file():
        print(f"generator: no {KIND_HEAD_FILE} in {out}; training without the kind loss", flush=True)
        return None
    head = torch.nn.Conv2d(channels, 1 + len(KINDS), 1)
    head.load_state_dict(load_file(path))
    return head.eval().requires_grad_(False)


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


def judge_text_encoder(judges_dir: Path):
    """The image-text judge's CLIPTextModel, frozen: the generator's text encoder."""
    from .judges import load_judges

    return load_judges(judges_dir).image_text.text.eval().requires_grad_(False)


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


# ---- export --------------------------------------------------------------------------------------------------------
def export_pipeline(out: Path, dest: Path, seed: int) -> Path:
    """Write the EMA generator with the VAE, tokenizer and DPM-Solver++ as an fp16 StableDiffusionPipeline folder."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    tokenizer, unet = toy_tokenizer(), build_unet(seed)
    text_encoder = judge_text_encoder(out / "judges")
    state = torch.load(out / "generator_state.pt", weights_only=True)
    # a later cycle (--init_from) also counts the steps of the cycles before it
    earlier = json.loads((out / INIT_FILE).read_text())["cycles"] if (out / INIT_FILE).is_file() else []
    marker = {"world": "loldu-sd toy world", "generator_steps": sum(earlier) + state["step"], "seed": seed,
              "guidance_scale": GUIDANCE_SCALE, "num_inference_steps": INFERENCE_STEPS}
    if earlier:
        marker["cycles"] = earlier + [state["step"]]
    unet.load_state_dict(state["ema_unet"])
    text_encoder.load_state_dict(state["ema_te"])
    pipe = StableDiffusionPipeline(vae=AutoencoderKL.from_pretrained(out / "vae"), text_encoder=text_encoder,
                                   tokenizer=tokenizer, unet=unet, scheduler=sample_scheduler(), safety_checker=None,
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


def plot_losses(out: Path, dest: Path) -> Path:
    """One panel per training stage: the logged loss curves of <out>/*_loss.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = sorted(out.glob("*_loss.jsonl"))
    fig, axes = plt.subplots(1, len(logs), figsize=(4 * len(logs), 3), squeeze=False)
    for ax, path in zip(axes[0], logs):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        curve = {r["step"]: r["loss"] for r in rows}  # a resumed stage logs its last steps again: keep the latest
        ax.plot(list(curve), list(curve.values()))
        ax.set_title(path.stem.replace("_loss", "").replace("_", " "))
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(dest, dpi=80)
    plt.close(fig)
    return dest


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/toyworld", help="working folder (checkpoints, loss curves, exports)")
    p.add_argument("--stage", choices=["vae", "generator", "judges", "export", "all"], default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae_steps", type=int, default=1500)
    p.add_argument("--vae_batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5000, help="generator steps")
    p.add_argument("--decay_steps", type=int, default=5000,
                   help="generator steps of cosine decay; the rest run at its final 10 %% learning rate")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--init_from", default=None,
                   help="pipeline folder whose UNet a fresh generator stage starts from (a second schedule cycle)")
    p.add_argument("--kind_weight", type=float, default=GENERATOR_KIND_WEIGHT,
                   help="weight of the generator's kind loss (its x0 estimate read by the autoencoder's kind head)")
    p.add_argument("--judge_steps", type=int, default=1500)
    p.add_argument("--image_tower_steps", type=int, default=IMAGE_TOWER_STEPS,
                   help="then fine-tune the image-text judge's image tower on soft views (text tower frozen), once")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal activations late in training slow CPU kernels by orders of magnitude
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("vae", "all"):
        train_vae(out, args.vae_steps, args.vae_batch, args.seed)
    if args.stage in ("judges", "all"):  # the generator conditions on the image-text judge's text tower
        from .judges import train_judges

        train_judges(out, args.judge_steps, args.seed, image_tower_steps=args.image_tower_steps)
    if args.stage in ("generator", "all"):
        train_generator(out, args.steps, args.batch, args.seed, args.lr, args.decay_steps, args.init_from,
                        args.kind_weight)
    if args.stage in ("export", "all"):
        print(export_pipeline(out, out / "pipeline", args.seed))
        print(plot_losses(out, out / "pretraining_loss.png"))


if __name__ == "__main__":
    main()
