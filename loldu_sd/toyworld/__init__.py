"""The embedded toy world: a genuinely pretrained text-to-image pipeline, its judges and held-out concepts.

Everything here was trained by `python -m research.toyworld.pretrain` (in the repository, not installed) and is
committed under loldu_sd/toyworld/assets (fp16 safetensors, package data), so it loads offline:

    from loldu_sd.toyworld import GUIDANCE_SCALE, load_pipeline
    pipe = load_pipeline()                       # a real StableDiffusionPipeline, 64x64 images
    pipe("a photo of a red star on a blue background", guidance_scale=GUIDANCE_SCALE).images[0]

Modules: world (scenes, rendering, captions), concepts (held-out DreamBooth subjects), models (component configs),
judges (instance encoder and image-text model for `eval --backbones toyworld`).
"""
from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"  # package data: a wheel installs it with the code
PIPELINE_DIR = ASSETS_DIR / "pipeline"
JUDGES_DIR = ASSETS_DIR / "judges"
CONCEPTS_DIR = ASSETS_DIR / "concepts"
# measured best for the toy model (docs/toyworld-research.md, finding 13); SD's 7.5 washes out its shapes
GUIDANCE_SCALE = 2.0
INFERENCE_STEPS = 20
# LoLDU settings for a concept on this small model (eval.before_after runs picked them; see docs/toyworld.md)
LEARNING_RATE = 1e-3
TRAIN_STEPS = 400
TRAIN_BATCH_SIZE = 4
SAMPLE_CONCEPT = "star"


MARKER = "toyworld.json"  # written by the pretraining export into the pipeline folder


def is_toyworld(pretrained_model_name_or_path) -> bool:
    """True when the path is a toy-world pipeline folder (its settings differ from Stable Diffusion's)."""
    try:
        return (Path(pretrained_model_name_or_path) / MARKER).is_file()
    except (OSError, TypeError):
        return False


def sample_concept_files(name: str = SAMPLE_CONCEPT) -> list[str]:
    """The instance photos of a held-out concept, as paths (what the studio's sample-concept button uploads)."""
    return [str(p) for p in sorted((CONCEPTS_DIR / name).glob("*.png"))]


def load_pipeline(path: str | Path = PIPELINE_DIR, dtype=None):
    """The pretrained toy-world StableDiffusionPipeline (fp32 unless `dtype`), progress bar off."""
    import torch

    from ..loading import load_pipeline as load

    return load(path, dtype=dtype or torch.float32)  # stored fp16, loads fp32
