#!/usr/bin/env python
"""DreamBooth with a kilobyte LoLDU adapter (arXiv 2410.13618): teach Stable Diffusion a subject from 3-5 images.

Launch it as diffusers' examples are launched (flags match examples/dreambooth/train_dreambooth_lora.py):

    accelerate launch train_dreambooth_loldu.py \
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --instance_data_dir assets/concept --instance_prompt "a photo of sks robot" \
      --mixed_precision fp16 --output_dir outputs/robot

`python train_dreambooth_loldu.py ...` and `torchrun --nproc_per_node N train_dreambooth_loldu.py ...` work too.
The output folder gets pytorch_loldu_weights.safetensors (load it with `pipe.load_loldu_weights(output_dir)`),
a model card, validation samples, a loss curve, checkpoint-N/ folders and TensorBoard logs.
The training logic lives in the loldu_sd/training/ package, which the Gradio studio calls in-process.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from loldu_sd.training import TrainingError, TrainingInputError, TrainingResult, parse_args, train_dreambooth

__all__ = ["main", "parse_args"]


def main(args: argparse.Namespace) -> TrainingResult:
    """Train, then print where the adapter went."""
    import torch

    if args.allow_tf32 and torch.cuda.is_available():  # process-wide: the front end sets it, never the library
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    result = train_dreambooth(args)
    if result.adapter_path is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"{'cancelled at' if result.cancelled else 'trained'} {result.steps} steps in {result.seconds:.0f} s: "
              f"{result.adapter_path} ({result.size_kb:.1f} KB)")
    return result


def _setup_logging() -> None:
    main_process = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if main_process else logging.WARNING)
    for noisy in ("diffusers", "transformers", "accelerate", "huggingface_hub"):  # keep their INFO chatter out
        logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":
    _setup_logging()
    try:
        main(parse_args())
    except (TrainingInputError, TrainingError) as e:
        if int(os.environ.get("RANK", "0")) == 0:  # one line, once, even under torchrun
            print(f"train_dreambooth_loldu.py: error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, TrainingInputError) else 1)
