"""The attainable ceiling of subject fidelity: a concept's photos passed through the pipeline's own autoencoder.

A personalisation method changes what the UNet denoises to, never the decoder, so no adapter, LoRA or fine-tune can
draw detail the autoencoder's round trip loses. Scoring the round-tripped photos against the photos, as a method's
samples are scored, gives the best subject fidelity any of them can reach on this pipeline:

    from eval.ceiling import codec_ceiling
    codec_ceiling(pipe, "star", toyworld_scorer())   # {"dino": ..., "clip_i": ..., "fidelity": ..., "psnr": ...}

"Gap closed" = (method - base) / (ceiling - base); the photos against each other stay a separate reference row.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


@torch.no_grad()
def codec_round_trip(vae, images: list[Image.Image]) -> list[Image.Image]:
    """vae.decode(vae.encode(x).latent_dist.mode()) of each image, at its own size (a multiple of 8)."""
    pixels = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(vae.device, vae.dtype)
    decoded = vae.decode(vae.encode(x).latent_dist.mode()).sample  # the mode: the codec's own best, no sampling
    out = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in out]


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB between two same-size RGB images (inf when identical)."""
    diff = np.asarray(a.convert("RGB"), dtype=np.float64) - np.asarray(b.convert("RGB"), dtype=np.float64)
    mse = float(np.mean(diff ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def gap_closed(base: float, method: float, ceiling: float) -> float:
    """(method - base) / (ceiling - base): the share of the attainable gain a method reached (nan without a gap)."""
    return (method - base) / (ceiling - base) if ceiling != base else float("nan")


def codec_ceiling(pipe_or_vae, concept_name: str, scorer) -> dict:
    """DINO*, CLIP-I*, subject fidelity (their mean) and mean PSNR of the concept's round-tripped photos.

    `pipe_or_vae`: a diffusers pipeline (its .vae is used) or an AutoencoderKL. The round trips are scored against
    the concept's five photos with `scorer` (e.g. eval.toyworld.toyworld_scorer()), every pair counted, exactly as
    the benchmark scores a method's samples.
    """
    from loldu_sd.toyworld.concepts import concept_photos

    vae = getattr(pipe_or_vae, "vae", pipe_or_vae)
    photos = concept_photos(concept_name)
    trips = codec_round_trip(vae, photos)
    scores = scorer.score(trips, photos)
    dino, clip_i = round(scores["dino"], 4), round(scores["clip_i"], 4)
    return {"dino": dino, "clip_i": clip_i, "fidelity": round((dino + clip_i) / 2, 4),
            "psnr": round(float(np.mean([psnr(a, b) for a, b in zip(photos, trips)])), 2)}
