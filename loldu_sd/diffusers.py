"""The one opt-in that touches diffusers: `import loldu_sd.diffusers` gives SD/SDXL pipelines the LoLDU methods.

Importing this module calls `enable_pipeline_methods()`, which sets the functions of `loldu_sd.pipeline` as methods
(`pipe.load_loldu_weights(...)` & co.) of the Stable Diffusion 1.x/2.x and SDXL pipeline classes and their img2img,
inpaint and ControlNet variants: the pipelines with a UNet and CLIP text encoders. Nothing else in loldu-sd imports
this module, so no library call ever adds methods; every function also works as `loldu_sd.pipeline.f(pipe, ...)`.
"""
from __future__ import annotations

import diffusers as _diffusers

from .per_prompt import per_prompt_adapters
from .pipeline import (ADAPTED_COMPONENTS, LOLDU_WEIGHT_NAME, TEXT_ENCODERS, LoLDUFormatError, add_loldu_to_pipeline,
                       add_loldu_to_text_encoder, add_loldu_to_unet, delete_loldu_adapters, export_lora,
                       export_lora_state_dict, fuse_loldu, get_loldu_adapters, list_loldu_adapters,
                       load_loldu_weights, pipeline_components, read_adapter_file, resolve_adapter_file,
                       save_loldu_weights, save_pipeline_adapter, set_loldu_adapters, unet_target_layers,
                       unfuse_loldu, unload_loldu_weights)

# Pipelines whose models are a UNet and CLIP text encoders (what the methods assume); named, never found by base
# class: diffusers' LoRA loader mixins are shared by AnimateDiff, Kandinsky, IF, PAG and a hundred others.
PIPELINE_CLASSES = tuple(f"StableDiffusion{xl}{kind}Pipeline" for xl in ("", "XL")
                         for kind in ("", "Img2Img", "Inpaint", "ControlNet", "ControlNetImg2Img", "ControlNetInpaint"))
PIPELINE_METHODS = (load_loldu_weights, save_loldu_weights, set_loldu_adapters, get_loldu_adapters,
                    list_loldu_adapters, delete_loldu_adapters, fuse_loldu, unfuse_loldu, unload_loldu_weights,
                    per_prompt_adapters)


def enable_pipeline_methods() -> list[type]:
    """Attach the LoLDU pipeline functions as methods of the SD/SDXL pipeline classes; returns the classes."""
    classes = [c for c in (getattr(_diffusers, n, None) for n in PIPELINE_CLASSES) if isinstance(c, type)]
    for cls in classes:
        for fn in PIPELINE_METHODS:
            setattr(cls, fn.__name__, fn)
    return classes


enable_pipeline_methods()

__all__ = ["ADAPTED_COMPONENTS", "LOLDU_WEIGHT_NAME", "LoLDUFormatError", "PIPELINE_CLASSES", "TEXT_ENCODERS",
           "add_loldu_to_pipeline", "add_loldu_to_text_encoder", "add_loldu_to_unet", "delete_loldu_adapters",
           "enable_pipeline_methods", "export_lora", "export_lora_state_dict", "fuse_loldu", "get_loldu_adapters",
           "list_loldu_adapters", "load_loldu_weights", "per_prompt_adapters", "pipeline_components",
           "read_adapter_file", "resolve_adapter_file", "save_loldu_weights", "save_pipeline_adapter",
           "set_loldu_adapters", "unet_target_layers", "unfuse_loldu", "unload_loldu_weights"]
