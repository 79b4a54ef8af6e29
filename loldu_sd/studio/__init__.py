"""The logic behind the Gradio studio (app.py): an adapter library on disk, one shared pipeline, training jobs.

Threads: Gradio runs handlers in worker threads, so a Studio holds ONE generation pipeline shared by every session
and guards it with a lock. Adapters are loaded into it once (cached by name + file mtime) and switched with
set_loldu_adapters, which only changes which z/sigma vectors are active: no model reload. Training runs in a
background thread on its own copy of the base model (the trainer loads it), so generation stays safe while another
user trains. That costs the base model twice in memory (nothing for the tiny pipeline; about 2 GB more GPU memory
for the weights of SD 1.5 in fp16), the price of never mutating modules that another thread is running.

Security: uploads are decoded with PIL (never trusted by extension) and re-encoded as PNG; adapter uploads must be
safetensors and are validated by a dry-run load (nothing is unpickled); adapter names are sanitised and every path
is resolved and confined to the library folder.

Modules, read top-down: inputs (limits, errors, names, images, requests) -> library (adapters on disk) -> jobs
(training jobs) -> service (Studio). This package re-exports every public name, so `from loldu_sd.studio import X`
works as before the split.
"""
from .inputs import (
    IMAGE_FORMATS,
    LIMITS,
    MAX_ADAPTER_BYTES,
    MAX_IMAGE_BYTES,
    MAX_COMPARE,
    MAX_IMAGES,
    MAX_MIX,
    MIN_IMAGES,
    NAME_MAX,
    CompareRequest,
    GenerateRequest,
    Limits,
    StudioBusyError,
    StudioError,
    TrainRequest,
    check_range,
    load_images,
    renamed,
    sanitize_name,
    suggest_instance_prompt,
)
from .jobs import JobSnapshot, NothingToSave, TrainingFailed, TrainingJob, run_trainer
from .library import INFO_NAME, SAMPLE_NAME, WEIGHT_NAME, AdapterInfo, AdapterLibrary
from .service import Comparison, Generation, Studio

__all__ = [
    "IMAGE_FORMATS",
    "INFO_NAME",
    "LIMITS",
    "MAX_ADAPTER_BYTES",
    "MAX_COMPARE",
    "MAX_IMAGES",
    "MAX_IMAGE_BYTES",
    "MAX_MIX",
    "MIN_IMAGES",
    "NAME_MAX",
    "SAMPLE_NAME",
    "WEIGHT_NAME",
    "AdapterInfo",
    "AdapterLibrary",
    "CompareRequest",
    "Comparison",
    "GenerateRequest",
    "Generation",
    "JobSnapshot",
    "Limits",
    "NothingToSave",
    "Studio",
    "StudioBusyError",
    "StudioError",
    "TrainRequest",
    "TrainingFailed",
    "TrainingJob",
    "check_range",
    "load_images",
    "renamed",
    "run_trainer",
    "sanitize_name",
    "suggest_instance_prompt",
]
