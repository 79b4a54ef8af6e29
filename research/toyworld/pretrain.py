"""Pretrain the toy world: `python -m research.toyworld.pretrain --out runs/toyworld [--device cuda] [--resume]`.

Stages (each seeded; each saves a safetensors checkpoint in --out every few minutes and continues from it with
--resume):
  vae        the autoencoder (codec.py): rich objects, pretraining scenes and random textures; a kind-naming latent
  judges     the instance encoder and the image-text model that `eval --backbones toyworld` uses (judges.py)
  generator  the UNet under its own frozen text encoder (generator.py), v-prediction, EMA weights
  export     fp16 safetensors: <out>/pipeline (StableDiffusionPipeline.from_pretrained) and <out>/judges
The committed copy lives in loldu_sd/toyworld/assets; nobody needs to run this to use it. docs/toyworld.md has the
recipes (CPU and GPU) and what each stage reached.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .codec import train_vae
from .generator import GENERATOR_KIND_WEIGHT, export_pipeline, train_generator
from .judges import train_judges

IMAGE_TOWER_STEPS = 1500  # the image-text judge's soft-view fine-tune (judges.train_image_tower)


def plot_losses(out: Path, dest: Path) -> Path | None:
    """One panel per training stage: the logged loss curves of <out>/*_loss.jsonl (None when nothing was logged)."""
    logs = sorted(out.glob("*_loss.jsonl"))
    if not logs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def build_parser() -> argparse.ArgumentParser:
    """The pretraining command's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/toyworld", help="working folder (checkpoints, loss curves, exports)")
    p.add_argument("--stage", choices=["vae", "generator", "judges", "export", "all"], default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device for every stage: cpu, cuda, cuda:1 ...")
    p.add_argument("--resume", action="store_true", help="continue each stage from its checkpoint in --out")
    p.add_argument("--vae_steps", type=int, default=1500)
    p.add_argument("--vae_batch", type=int, default=16)
    p.add_argument("--latent_channels", type=int, default=None, help="the autoencoder's latent channels")
    p.add_argument("--steps", type=int, default=5000, help="generator steps")
    p.add_argument("--decay_steps", type=int, default=5000,
                   help="generator steps of cosine decay; the rest run at its final 10 %% learning rate")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--init_from", default=None,
                   help="pipeline folder whose UNet a fresh generator stage starts from (a second schedule cycle)")
    p.add_argument("--text_encoder", default=None,
                   help="CLIPTextModel folder the generator conditions on, frozen (default: the committed pipeline's)")
    p.add_argument("--kind_weight", type=float, default=GENERATOR_KIND_WEIGHT,
                   help="weight of the generator's kind loss (its x0 estimate read by the autoencoder's kind head)")
    p.add_argument("--judge_steps", type=int, default=1500)
    p.add_argument("--image_tower_steps", type=int, default=IMAGE_TOWER_STEPS,
                   help="then fine-tune the image-text judge's image tower on soft views (text tower frozen), once")
    p.add_argument("--workers", type=int, default=0,
                   help="processes rendering batches ahead of the training step (use several with --device cuda)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (this command's process only)")
    return p


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: run the chosen stages in order."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal activations late in training slow CPU kernels by orders of magnitude
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("vae", "all"):
        train_vae(out, args.vae_steps, args.vae_batch, args.seed, args.latent_channels, args.device, args.resume,
                  workers=args.workers)
    if args.stage in ("judges", "all"):
        train_judges(out, args.judge_steps, args.seed, image_tower_steps=args.image_tower_steps, device=args.device,
                     resume=args.resume)
    if args.stage in ("generator", "all"):
        train_generator(out, args.steps, args.batch, args.seed, args.lr, args.decay_steps, args.init_from,
                        args.kind_weight, args.text_encoder, args.device, args.resume, args.workers)
    if args.stage in ("export", "all"):
        print(export_pipeline(out, out / "pipeline", args.seed))
        print(plot_losses(out, out / "pretraining_loss.png"))


if __name__ == "__main__":
    main()
