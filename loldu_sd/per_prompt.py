"""Per-prompt adapters for diffusers Stable Diffusion pipelines: one call renders each prompt with its own concept.

    with loldu_sd.per_prompt_adapters(pipe, ["dog", "cat", None, {"dog": 0.7, "style": 0.5}]):
        images = pipe(prompts, ...).images

Works for every SD 1.x/2.x/XL pipeline (txt2img, img2img, inpaint): the text encoders see one sample per prompt,
and the UNet sees [negatives, positives] under classifier-free guidance, each prompt-major with
num_images_per_prompt samples per prompt (the order diffusers builds), so the unconditional half follows its prompt.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from numbers import Real

import torch

from .batch import Entry, Mix, RowPlan, per_sample_adapters
from .config import bounded_weight
from .library import ResidentLibrary
from .pipeline import (check_outside_per_prompt_block, follow_pipeline_scale, inside_per_prompt_block,
                       pipeline_components)


def unet_rows(pipe) -> RowPlan:
    """The prompt of every sample of a UNet batch of `pipe` (read at call time: guidance is set by pipe(...))."""

    def rows(batch: int, prompts: int) -> torch.Tensor:
        halves = 2 if getattr(pipe, "do_classifier_free_guidance", False) else 1
        if batch % (prompts * halves):
            raise ValueError(f"{prompts} adapter entries for a UNet batch of {batch}"
                             f"{' (two halves under guidance)' if halves == 2 else ''}; pass one entry per prompt")
        return torch.arange(prompts).repeat_interleave(batch // (prompts * halves)).repeat(halves)

    return rows


@contextlib.contextmanager
def per_prompt_adapters(pipe, adapters: Sequence[Entry], library: ResidentLibrary | None = None
                        ) -> Iterator[list[Mix]]:
    """Inside the block, prompt i of every pipe(...) call uses adapters[i]: a name, {name: weight} or None (base).

    Names come from the pipeline's loaded adapters and, if given, `library`. Bad entries raise one ValueError line
    before anything changes; leaving the block restores the previous adapter state exactly.
    """
    comps = pipeline_components(pipe)
    check_outside_per_prompt_block(comps, "per_prompt_adapters")
    for i, entry in enumerate(adapters if isinstance(adapters, Sequence) and not isinstance(adapters, str) else []):
        for name, weight in (entry.items() if isinstance(entry, Mapping) else []):
            if isinstance(weight, Real) and math.isfinite(weight):  # the rest: per_sample_adapters says what is wrong
                bounded_weight(weight, f"per_prompt_adapters: adapter entry {i}: the weight of {name!r}")
    with per_sample_adapters(comps, adapters, library, {"unet": unet_rows(pipe)}, "per_prompt_adapters") as mixes:
        follow_pipeline_scale(pipe)  # the runtime scale reaches library-only layers too (as after a load)
        with inside_per_prompt_block(comps):
            yield mixes


__all__ = ["check_outside_per_prompt_block", "per_prompt_adapters", "unet_rows"]
