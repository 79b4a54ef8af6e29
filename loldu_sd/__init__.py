"""loldu-sd: kilobyte-sized LoLDU adapters (arXiv 2410.13618) for Stable Diffusion and transformers models.

The core works on any nn.Module; `loldu_sd.pipeline` holds the same operations for diffusers pipelines as plain
functions. Only `import loldu_sd.diffusers` (the documented opt-in) adds `pipe.load_loldu_weights(...)` and friends to
the SD/SDXL pipeline classes; no other import or call of loldu-sd changes another library's classes.
"""
from .config import INITS, LoLDUConfig
from .decompose import LDUFactors, top_r_ldu
from .io import (LOLDU_WEIGHT_NAME, LoadedAdapter, LoLDUBaseMismatchError, LoLDUFormatError, load_loldu,
                 read_adapter_file, save_loldu)
from .layer import LoLDULinear
from .batch import per_sample_adapters
from .library import ResidentLibrary
from .per_prompt import per_prompt_adapters
from .presets import PRESETS, preset
from .model import (
    Components,
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

__all__ = [
    "Components", "INITS", "LOLDU_WEIGHT_NAME", "LDUFactors", "LoLDUBaseMismatchError", "LoLDUConfig",
    "LoLDUFormatError", "LoLDULinear", "LoadedAdapter", "PRESETS", "ResidentLibrary", "add_loldu",
    "cast_loldu_parameters", "count_loldu_parameters", "find_targets", "get_loldu_adapters", "get_loldu_config",
    "load_loldu", "loldu_adapter_names", "loldu_layers", "loldu_parameters", "loldu_scale", "merge_loldu",
    "per_prompt_adapters", "per_sample_adapters", "preset",
    "project_loldu_", "read_adapter_file", "remove_loldu", "save_loldu", "set_loldu_adapters", "top_r_ldu",
    "unmerge_loldu",
]
