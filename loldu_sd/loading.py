"""Loading a base pipeline: a local diffusers folder (the embedded toy world is one) or a Hub repo id, in a dtype.

The one loader of the generation CLI, the studio, evaluation and the toy world, and the one rule telling a local path
from a Hub id (also used for adapters and the trainer's flags). Failures raise PipelineLoadError(path, reason).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import PathError


class PipelineLoadError(PathError):
    """The base pipeline could not be loaded: `path` is what was asked for, `reason` one line saying why."""


def looks_local(spec: str | os.PathLike) -> bool:
    """True when `spec` can only be a local path: Hub repo ids are "name" or "org/name", never ./x, /x, ~/x or a/b/c."""
    text = os.fspath(spec)
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text)


def dtype_kwargs(dtype: torch.dtype | None) -> dict:
    """The from_pretrained keyword for `dtype` ({} for None/fp32): diffusers >= 0.36 renamed torch_dtype to dtype."""
    from diffusers.utils import deprecation_utils

    if dtype is None or dtype == torch.float32:
        return {}
    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def default_dtype(device: str | torch.device | None) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere (CPU kernels for fp16 are slow or missing)."""
    return torch.float16 if torch.device(device or "cpu").type == "cuda" else torch.float32


def load_pipeline(name_or_path: str | os.PathLike, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, **from_pretrained):
    """A diffusers pipeline from a local folder or a Hub id, on `device` (default CPU), progress bar off.

    `dtype` defaults to fp16 on CUDA and fp32 elsewhere; every model is cast to it (the toy world is stored fp16).
    Other keywords (revision, variant, safety_checker=None, ...) go to DiffusionPipeline.from_pretrained.
    """
    from diffusers import DiffusionPipeline

    dtype = dtype or default_dtype(device)
    folder = Path(name_or_path).expanduser()
    if looks_local(name_or_path) or folder.is_dir():
        if not (folder / "model_index.json").is_file():
            why = "no such folder" if not folder.is_dir() else "not a diffusers pipeline folder (no model_index.json)"
            raise PipelineLoadError(name_or_path, f"{why}; pass a diffusers folder or a Hub id such as "
                                    "'stable-diffusion-v1-5/stable-diffusion-v1-5'")
        name_or_path = folder
    try:
        pipe = DiffusionPipeline.from_pretrained(name_or_path, **dtype_kwargs(dtype), **from_pretrained)
    except (OSError, ValueError) as e:  # unknown Hub id, offline, a broken folder: one line, not 80
        reason = (str(e).strip().splitlines() or [""])[0]
        raise PipelineLoadError(name_or_path, f"could not load the pipeline ({type(e).__name__}: {reason})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device or "cpu", dtype=dtype)


__all__ = ["PipelineLoadError", "default_dtype", "dtype_kwargs", "load_pipeline", "looks_local"]
