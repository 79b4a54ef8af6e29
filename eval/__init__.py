"""Evaluation recipes for loldu-sd.

    python -m eval score ...        DINO / CLIP-I / CLIP-T of a folder of images (eval.scorer, eval.metrics)
    python -m eval dreambooth ...   DreamBooth's protocol on LoLDU adapters (eval.dreambooth, eval.prompts)
    python -m eval.bench            performance benchmark;  python -m eval.glue / eval.vit  paper recipes

Importing `eval` is light: the names below are loaded from their submodules on first use.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "pairwise_similarity": "metrics", "text_image_similarity": "metrics", "Similarity": "metrics",
    "Scorer": "scorer", "load_images": "scorer", "BackboneUnavailableError": "scorer",
    "dreambooth_prompts": "prompts", "clip_t_prompt": "prompts", "SUBJECTS": "prompts",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'eval' has no attribute '{name}'")
