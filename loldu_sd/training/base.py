"""Which base pipelines the trainer can train, decided from their config files before any model is loaded."""
from __future__ import annotations

import argparse

from .errors import TrainingInputError, first_line
from .loss import PREDICTION_TYPES

TRAINABLE_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def check_trainable_base(args: argparse.Namespace) -> str:
    """The base's pipeline class, or one TrainingInputError line naming why the trainer cannot train it."""
    from diffusers import DDPMScheduler, DiffusionPipeline

    path, flag = args.pretrained_model_name_or_path, "--pretrained_model_name_or_path"
    try:
        pipeline_class = DiffusionPipeline.load_config(path, revision=args.revision).get("_class_name", "?")
        scheduler = DDPMScheduler.load_config(path, subfolder="scheduler", revision=args.revision)
    except (OSError, ValueError) as e:
        raise TrainingInputError(f"{flag} {path}: cannot read its pipeline config ({first_line(e)})") from None
    if pipeline_class not in TRAINABLE_PIPELINES:
        raise TrainingInputError(f"{flag} {path}: a {pipeline_class}; the trainer trains "
                                 f"{' and '.join(TRAINABLE_PIPELINES)} bases only")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise TrainingInputError(f"{flag} {path}: its scheduler predicts {prediction!r}; the trainer supports "
                                 f"{' and '.join(PREDICTION_TYPES)} targets")
    return pipeline_class
