"""The trainer's frozen models: SDXL's VAE stays float32 under mixed precision unless a fixed VAE is given."""
from __future__ import annotations

import pytest
import torch

from loldu_sd.testing import save_tiny_pipeline
from loldu_sd.training.args import build_parser
from loldu_sd.training.models import load_models


def flags(base, *extra):
    return build_parser().parse_args(["--pretrained_model_name_or_path", str(base), "--instance_data_dir", "x",
                                      "--instance_prompt", "a photo of sks dog", *extra])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdxl_vae_stays_float32_under_mixed_precision_unless_a_fixed_vae_is_given(dtype, tmp_path):
    sdxl = save_tiny_pipeline(tmp_path / "tiny-sdxl", seed=0, sdxl=True)
    models = load_models(flags(sdxl), torch.device("cpu"), dtype)
    assert models.vae.dtype == torch.float32 and models.unet.dtype == dtype
    fixed = load_models(flags(sdxl, "--pretrained_vae_model_name_or_path", str(sdxl / "vae")), torch.device("cpu"),
                        dtype)
    assert fixed.vae.dtype == dtype  # a fixed VAE (e.g. madebyollin/sdxl-vae-fp16-fix) runs in the training dtype
    sd = save_tiny_pipeline(tmp_path / "tiny-sd", seed=0)
    assert load_models(flags(sd), torch.device("cpu"), dtype).vae.dtype == dtype  # SD 1.x/2.x: as before


def test_validation_images_of_an_sdxl_run_decode_with_the_float32_vae(tmp_path):
    from loldu_sd.training.models import generate_samples, pipeline_components, pipeline_from_args

    sdxl = save_tiny_pipeline(tmp_path / "tiny-sdxl", seed=0, sdxl=True)
    args = flags(sdxl, "--num_validation_images", "1", "--validation_inference_steps", "1", "--resolution", "64")
    models = load_models(args, torch.device("cpu"), torch.bfloat16)
    pipe = pipeline_from_args(args, **pipeline_components(models, {"unet": models.unet}, lambda m: m))
    images = generate_samples(pipe, args)
    assert len(images) == 1 and images[0].size == (64, 64) and pipe.vae.dtype == torch.float32
