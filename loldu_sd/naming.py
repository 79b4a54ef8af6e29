"""Layer names that do not depend on the transformers version, and the LoRA key formats of the export.

transformers 5 loads CLIPTextModel without its `text_model` wrapper (its layers are `encoder.layers.N...`), while
checkpoints, transformers 4, kohya/A1111 files and ComfyUI name them `text_model.encoder.layers.N...`. Adapter files
and kohya exports use the checkpoint names; loading maps them onto whatever the module calls its layers.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

CHECKPOINT_PREFIX = "text_model."
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name, read by load_lora_weights(folder)


def checkpoint_prefix(module: nn.Module) -> str:
    """`text_model.` for a CLIP text model loaded without its text_model wrapper (transformers >= 5), else ''."""
    is_clip_text = type(module).__name__.startswith("CLIPText")
    return CHECKPOINT_PREFIX if is_clip_text and not hasattr(module, "text_model") else ""


def checkpoint_prefixes(components: dict[str, nn.Module]) -> dict[str, str]:
    """{component: prefix} for the components whose checkpoint names carry a prefix their modules lack."""
    return {comp: prefix for comp, module in components.items() if (prefix := checkpoint_prefix(module))}


def kohya_prefixes(components: dict[str, nn.Module]) -> dict[str, str]:
    """kohya's key prefix of each component: lora_unet, and lora_te (SD 1/2) or lora_te1/lora_te2 (SDXL)."""
    two = "text_encoder_2" in components
    return {"unet": "lora_unet", "text_encoder": "lora_te1" if two else "lora_te", "text_encoder_2": "lora_te2"}


def kohya_key(prefix: str, checkpoint_name: str) -> str:
    """kohya/A1111 module key: the prefix, then the checkpoint name with '.' replaced by '_'."""
    return f"{prefix}_{checkpoint_name.replace('.', '_')}"


def lora_output_file(path: str | os.PathLike) -> Path:
    """Where an exported LoRA goes: `path` itself if it ends in .safetensors, else the folder's diffusers file name."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / LORA_WEIGHT_NAME


__all__ = ["CHECKPOINT_PREFIX", "LORA_WEIGHT_NAME", "checkpoint_prefix", "checkpoint_prefixes", "kohya_key",
           "kohya_prefixes", "lora_output_file"]
