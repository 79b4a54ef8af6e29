"""loldu-sd: kilobyte-sized LoLDU adapters (arXiv 2410.13618) for Stable Diffusion and transformers models.

Importing the package adds `load_loldu_weights` and friends to diffusers' Stable Diffusion pipelines
(see loldu_sd.diffusers); diffusers itself is only imported when it is installed.
"""
from .config import INITS, LoLDUConfig
from .decompose import LDUFactors, top_r_ldu
from .io import LoadedAdapter, LoLDUBaseMismatchError, LoLDUFormatError, load_loldu, read_adapter_file, save_loldu
from .layer import LoLDULinear
from .presets import PRESETS, preset
from .model import (
    add_loldu,
    cast_loldu_parameters,
    count_loldu_parameters,
    find_targets,
    get_loldu_adapters,
    get_loldu_config,
    loldu_adapter_names,
    loldu_layers,
    loldu_parameters,
    loldu_scale,
    merge_loldu,
    project_loldu_,
    remove_loldu,
    set_loldu_adapters,
    unmerge_loldu,
)

__version__ = "0.1.0"

from .diffusers import (  # noqa: E402  (pipeline methods need the core above)
    LOLDU_WEIGHT_NAME,
    add_loldu_to_text_encoder,
    add_loldu_to_unet,
    export_lora,
    register as _register_pipeline_methods,
)

_register_pipeline_methods()

__all__ = [
    "INITS", "LOLDU_WEIGHT_NAME", "LDUFactors", "LoLDUBaseMismatchError", "LoLDUConfig", "LoLDUFormatError",
    "LoLDULinear", "LoadedAdapter", "PRESETS", "add_loldu", "add_loldu_to_text_encoder", "add_loldu_to_unet",
    "cast_loldu_parameters", "count_loldu_parameters", "export_lora", "find_targets", "get_loldu_adapters",
    "get_loldu_config", "load_loldu", "loldu_adapter_names", "loldu_layers", "loldu_parameters", "loldu_scale",
    "merge_loldu", "preset", "project_loldu_", "read_adapter_file", "remove_loldu", "save_loldu",
    "set_loldu_adapters", "top_r_ldu", "unmerge_loldu",
]
