"""The tiny offline SD pipelines (loldu_sd.testing) and the sample concept images (assets/)."""
import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
from loldu_sd.testing import (  # noqa: E402
    save_tiny_pipeline,
    sd15_unet_config,
    tiny_pipeline,
    tiny_sd2_pipeline,
    tiny_tokenizer,
)

PROMPT = "a photo of sks dog"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def generate(pipe, seed=0, prompt=PROMPT, steps=2, output_type="pil"):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, generator=g, output_type=output_type).images[0]


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def attention_names(unet):
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(ATTN)]




@pytest.fixture(scope="module")
def pipe():
    p = tiny_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def image(pipe):
    return generate(pipe)


# ---- tokenizer -----------------------------------------------------------------------------------------------------
def test_tokenizer_matches_openai_clip_ids():
    tok = tiny_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 49407
    ids = tok(PROMPT).input_ids
    # ids of openai/clip-vit-large-patch14 (SD 1.x): "a"=320, "photo"=1125, "of"=539, "dog"=1929
    assert ids[:4] == [49406, 320, 1125, 539] and ids[-2:] == [1929, 49407] and len(ids) == 7
    padded = tok(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[7:] == [49407] * 70
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT


def test_tokenizer_agrees_with_open_clip():
    open_clip = pytest.importorskip("open_clip")
    tok = tiny_tokenizer()
    for text in (PROMPT, "Hello, WORLD!! it's a naïve café #42"):
        ids = tok(text).input_ids
        ref = open_clip.tokenize([text])[0]
        assert ids == ref[: int((ref != 0).sum())].tolist(), text


def test_sd2_tokenizer_pads_with_exclamation_mark():
    tok = tiny_tokenizer(pad_token="!")
    assert tok.pad_token_id == 0 and tok(PROMPT, padding="max_length").input_ids[7:] == [0] * 70


# ---- pipeline ------------------------------------------------------------------------------------------------------
def test_same_seed_same_weights_and_image_bytes(pipe, image):
    again = tiny_pipeline(seed=0)
    again.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(pipe, name), getattr(again, name)), name
    assert generate(again).tobytes() == image.tobytes()


def test_other_seed_is_another_base_model(pipe):
    other = tiny_pipeline(seed=1)
    for name in ("unet", "vae", "text_encoder"):
        assert not same_weights(getattr(pipe, name), getattr(other, name)), name


def test_building_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    tiny_pipeline(seed=3)
    assert torch.equal(torch.get_rng_state(), state)


def test_images_are_64px_and_depend_on_prompt_seed_and_attention(pipe, image):
    assert image.size == (64, 64)
    a = torch.from_numpy(generate(pipe, output_type="np"))
    assert a.shape == (64, 64, 3) and a.std() > 0.1  # not a flat image
    assert (a - torch.from_numpy(generate(pipe, prompt="a red car", output_type="np"))).abs().mean() > 0.02
    assert (a - torch.from_numpy(generate(pipe, seed=1, output_type="np"))).abs().mean() > 0.05
    q = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q
    w = q.weight.detach().clone()
    try:
        with torch.no_grad():
            q.weight.mul_(2.0)
        assert (a - torch.from_numpy(generate(pipe, output_type="np"))).abs().mean() > 0.005
    finally:
        with torch.no_grad():
            q.weight.copy_(w)


def test_unet_has_self_and_cross_attention_projections(pipe):
    names = attention_names(pipe.unet)
    assert len(names) == 32 == 4 * len(pipe.unet.attn_processors)
    assert any(".attn1.to_q" in n for n in names) and any(".attn2.to_out.0" in n for n in names)
    to_k = dict(pipe.unet.named_modules())[next(n for n in names if n.endswith("attn2.to_k"))]
    assert to_k.in_features == pipe.text_encoder.config.hidden_size == 32


def test_save_and_from_pretrained_round_trip(pipe, image, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    path = save_tiny_pipeline(tmp_path / "tiny-sd")
    assert path == tmp_path / "tiny-sd" and save_tiny_pipeline(path) == path  # saving again overwrites in place
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    for cls in (StableDiffusionPipeline, DiffusionPipeline):
        loaded = cls.from_pretrained(path)
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded).__name__ == "StableDiffusionPipeline" and loaded.tokenizer(PROMPT).input_ids[2] == 1125
        assert loaded.tokenizer.model_max_length == 77 and loaded.vae_scale_factor == 8
        assert same_weights(loaded.unet, pipe.unet)
        assert generate(loaded).tobytes() == image.tobytes()


def test_pndm_scheduler_option():
    from diffusers import PNDMScheduler

    p = tiny_pipeline(seed=0, scheduler="pndm")
    p.set_progress_bar_config(disable=True)
    assert isinstance(p.scheduler, PNDMScheduler) and generate(p).size == (64, 64)
    with pytest.raises(ValueError, match="unknown scheduler"):
        tiny_pipeline(scheduler="euler?")


def test_sd2_variant():
    p = tiny_sd2_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    assert p.scheduler.config.prediction_type == "v_prediction" and p.unet.config.use_linear_projection
    assert len(attention_names(p.unet)) == 32 and p.tokenizer.pad_token == "!"
    assert generate(p).size == (64, 64)


def test_sd15_unet_config_has_128_attention_projections_and_860m_params():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # shapes only, no memory
        unet = UNet2DConditionModel(**sd15_unet_config())
    assert len(attention_names(unet)) == 128
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


# ---- concept images ------------------------------------------------------------------------------------------------
def test_concept_images_are_small_and_reproducible(tmp_path):
    from PIL import Image

    files = sorted((ASSETS / "concept").glob("*.png"))
    assert [f.name for f in files] == [f"{i:02d}.png" for i in range(5)]
    for f in files:
        assert f.stat().st_size < 30_000 and Image.open(f).size == (256, 256)
    spec = importlib.util.spec_from_file_location("make_concept_images", ASSETS / "make_concept_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path)])
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert [digest(tmp_path / f.name) for f in files] == [digest(f) for f in files]
