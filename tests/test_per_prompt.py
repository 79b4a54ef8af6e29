"""Per-prompt adapters on the tiny SD 1.x and SDXL pipelines: each image equals the one rendered alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import loldu_sd
import loldu_sd.diffusers  # SD pipelines get the LoLDU methods
from loldu_sd import LoLDUConfig, ResidentLibrary

pytest.importorskip("diffusers")
from loldu_sd.testing import tiny_pipeline, tiny_sdxl_pipeline  # noqa: E402

PROMPTS = ["a photo of sks dog", "a cat", "a red car", "a painting"]
NEGATIVES = ["blurry", "", "ugly", "dark"]
ENTRIES = ["dog", "cat", None, {"dog": 0.7, "style": -0.5}]
TOLERANCE = 1 / 255


def randomise(module, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in loldu_sd.loldu_parameters(module, name):
            if p.ndim:
                p.add_(torch.randn(p.shape, generator=g) * 0.3 * 0.1)  # dz starts at 0


def add_concepts(pipe):
    """dog (UNet + every text encoder), cat (UNet only, rank 2) and style (text encoders only); none active."""
    encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    loldu_sd.diffusers.add_loldu_to_pipeline(pipe, LoLDUConfig(rank=4), "dog", text_encoders=True)
    loldu_sd.diffusers.add_loldu_to_unet(pipe.unet, LoLDUConfig(rank=2), "cat")
    for encoder in encoders:
        loldu_sd.diffusers.add_loldu_to_text_encoder(encoder, LoLDUConfig(rank=4), "style")
    for seed, name in enumerate(["dog", "cat", "style"]):
        for i, module in enumerate([pipe.unet, *encoders]):
            randomise(module, name, 10 * i + seed)
    pipe.set_loldu_adapters([])


def with_concepts(pipe):
    pipe.set_progress_bar_config(disable=True)
    add_concepts(pipe)
    return pipe


@pytest.fixture(scope="module")
def sd():
    return with_concepts(tiny_pipeline(seed=0))


@pytest.fixture(scope="module")
def sdxl():
    return with_concepts(tiny_sdxl_pipeline(seed=0))


def render(pipe, prompts, seeds, negatives=None, nipp=1, **kw):
    kw.setdefault("num_inference_steps", 2)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(prompts, negative_prompt=negatives, num_images_per_prompt=nipp, generator=generators,
               output_type="np", **kw)
    return out.images


def render_alone(pipe, entries, prompts, negatives=None, nipp=1, per_prompt=None, **kw):
    """Prompt by prompt, with its adapter set the ordinary way (None: every adapter off)."""
    images = []
    for i, entry in enumerate(entries):
        mix = {} if entry is None else {entry: 1.0} if isinstance(entry, str) else entry
        pipe.set_loldu_adapters(list(mix), list(mix.values()))
        seeds = range(i * nipp, (i + 1) * nipp)
        own = {k: v[i: i + 1] for k, v in (per_prompt or {}).items()}
        images.append(render(pipe, prompts[i], seeds, None if negatives is None else negatives[i], nipp, **own, **kw))
    pipe.set_loldu_adapters([])
    return np.concatenate(images)


def check_equivalence(pipe, entries=ENTRIES, prompts=PROMPTS, negatives=None, nipp=1, per_prompt=None, **kw):
    """`per_prompt`: {argument: one value per prompt}, e.g. init images (diffusers samples their VAE latents with
    the generator of the image's index, so an image shared by all prompts would get another sample alone)."""
    alone = render_alone(pipe, entries, prompts, negatives, nipp, per_prompt, **kw)
    with loldu_sd.per_prompt_adapters(pipe, entries):
        batch = render(pipe, prompts[: len(entries)], range(len(entries) * nipp), negatives, nipp,
                       **(per_prompt or {}), **kw)
    assert np.abs(batch - alone).max() <= TOLERANCE
    others = np.abs(alone[:, None] - alone[None]).reshape(len(alone), len(alone), -1).max(-1)
    assert (others[~np.eye(len(alone), dtype=bool)] > 10 * TOLERANCE).all()  # the images really differ
    return batch


def test_sd_guidance_negative_prompts_and_images_per_prompt(sd):
    check_equivalence(sd, negatives=NEGATIVES, nipp=2, guidance_scale=7.5)


def test_sd_without_guidance_with_runtime_scale(sd):
    check_equivalence(sd, guidance_scale=1.0, cross_attention_kwargs={"scale": 0.6})


def test_sdxl_guidance_and_negative_prompts(sdxl):
    check_equivalence(sdxl, ENTRIES[:3], negatives=NEGATIVES[:3], guidance_scale=5.0)


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_img2img_and_inpaint(sd, kind):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    if kind == "img2img":
        pipe, extra = StableDiffusionImg2ImgPipeline(**sd.components), {"image": [image] * 3}
    else:
        mask = Image.fromarray(np.tile((np.arange(64) < 32).astype(np.uint8) * 255, (64, 1)))
        pipe, extra = StableDiffusionInpaintPipeline(**sd.components), {"image": [image] * 3, "mask_image": [mask] * 3}
    pipe.set_progress_bar_config(disable=True)
    check_equivalence(pipe, ENTRIES[:3], per_prompt=extra, num_inference_steps=3, strength=0.8)


def test_leaving_restores_the_adapter_state(sd):
    sd.set_loldu_adapters(["dog", "cat"], [0.5, 1.0])
    before = sd.get_loldu_adapters(), render(sd, PROMPTS[0], [0]), list(sd.unet._forward_pre_hooks)
    with sd.per_prompt_adapters([None, "cat"]):
        render(sd, PROMPTS[:2], [0, 1])
    assert sd.get_loldu_adapters() == before[0] and np.array_equal(render(sd, PROMPTS[0], [0]), before[1])
    assert list(sd.unet._forward_pre_hooks) == before[2]
    sd.set_loldu_adapters([])


@pytest.mark.parametrize("entries, message", [
    (["dog", "cat", "nope"], "unknown LoLDU adapter 'nope'"),
    (["dog", {"cat": float("nan")}], "must be a finite number"),
    (["dog"] * 3, "3 adapter entries for a batch of 2"),
    (["dog", {"cat": 1e30}], r"adapter entry 1: the weight of 'cat' must be a number between -100 and 100"),
])
def test_bad_input_fails_before_any_denoising_step_and_leaves_the_pipeline_unchanged(sd, entries, message):
    steps = []
    before = render(sd, PROMPTS[:2], [0, 1])
    with pytest.raises(ValueError, match=message) as e:
        with loldu_sd.per_prompt_adapters(sd, entries):
            render(sd, PROMPTS[:2], [0, 1], callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw)
    assert "\n" not in str(e.value) and steps == []
    assert sd.get_loldu_adapters() == {} and np.array_equal(render(sd, PROMPTS[:2], [0, 1]), before)


def test_nesting_a_block_or_fusing_inside_one_is_refused_and_changes_nothing(sd):
    alone = render_alone(sd, ["dog", "cat"], PROMPTS[:2])
    with sd.per_prompt_adapters(["dog", "cat"]):
        with pytest.raises(ValueError, match=r"^per_prompt_adapters inside a per_prompt_adapters block") as e:
            with sd.per_prompt_adapters(["cat", None]):  # its exit made the outer block render the active adapters
                pass
        with pytest.raises(ValueError, match=r"^fuse_loldu inside a per_prompt_adapters block"):
            sd.fuse_loldu(adapter_names=["dog"])  # the fused dog would have been added once more per prompt
        assert np.allclose(render(sd, PROMPTS[:2], [0, 1]), alone, atol=TOLERANCE)
    assert "\n" not in str(e.value) and sd.get_loldu_adapters() == {}
    with sd.per_prompt_adapters(["dog", "cat"]):  # a block after a refused one works
        assert np.allclose(render(sd, PROMPTS[:2], [0, 1]), alone, atol=TOLERANCE)


def test_resident_library_serves_files_in_one_batch(sd, tmp_path):
    from loldu_sd.testing import tiny_pipeline as fresh_pipeline

    paths = [sd.save_loldu_weights(tmp_path / n, adapter_name=n) for n in ("dog", "cat")]
    pipe = fresh_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    library = ResidentLibrary.for_pipeline(pipe)
    for name, path in zip(("dog", "cat"), paths):
        library.load(path, name)
    with loldu_sd.per_prompt_adapters(pipe, ["dog", None, "cat"], library=library):
        batch = render(pipe, PROMPTS[:3], [0, 1, 2])
    assert np.abs(batch - render_alone(sd, ["dog", None, "cat"], PROMPTS)).max() <= TOLERANCE
    other = ResidentLibrary.for_pipeline(fresh_pipeline(seed=1))
    with pytest.raises(loldu_sd.LoLDUBaseMismatchError):
        other.load(paths[0])
