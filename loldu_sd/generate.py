"""`python -m loldu_sd.generate`: text-to-image with one or more LoLDU adapters (the inference half of the quick start).

    python -m loldu_sd.generate --pretrained_model_name_or_path tiny-sd --adapter outputs/robot \
        --prompt "a photo of sks robot on the beach" --output outputs/robot/beach.png
"""
from __future__ import annotations

import argparse
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True, help="Hub id or local diffusers folder.")
    p.add_argument("--adapter", action="append", default=[], help="Adapter file or folder (repeatable to mix).")
    p.add_argument("--adapter_weight", action="append", type=float, default=[], help="Mixing weight per --adapter.")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--num_images", type=int, default=1)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--resolution", type=int, default=None, help="Default: the model's own sample size.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fuse", action="store_true", help="Fuse adapters into the weights first (base-model speed).")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--output", default="loldu_sample.png", help="PNG path; several images get _0, _1, ... suffixes.")
    args = p.parse_args(argv)
    if args.adapter_weight and len(args.adapter_weight) != len(args.adapter):
        p.error(f"got {len(args.adapter_weight)} --adapter_weight for {len(args.adapter)} --adapter")
    return args


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(args: argparse.Namespace) -> list[Path]:
    """Load the pipeline and adapters, generate, save PNGs; returns their paths."""
    import torch

    from loldu_sd.loading import load_pipeline
    from loldu_sd.pipeline import fuse_loldu, load_loldu_weights, set_loldu_adapters

    pipe = load_pipeline(args.pretrained_model_name_or_path, args.device)
    names = [load_loldu_weights(pipe, a, adapter_name=f"adapter{i}") for i, a in enumerate(args.adapter)]
    if names:
        set_loldu_adapters(pipe, names, args.adapter_weight or None)
        if args.fuse:
            fuse_loldu(pipe)
    size = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = pipe(args.prompt, negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images,
                  num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, height=size,
                  width=size, generator=torch.Generator(args.device).manual_seed(args.seed)).images
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out if len(images) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for img, path in zip(images, paths):
        img.save(path)
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main(parse_args())
