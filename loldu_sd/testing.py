"""Tiny offline Stable Diffusion pipelines for tests, demos and benchmarks.

Every component is a real diffusers/transformers class with a tiny config, built from a seed, so the pipeline
behaves like SD 1.x (or 2.x with `tiny_sd2_pipeline`, SDXL with `tiny_sdxl_pipeline`) without downloading anything:

    pipe = tiny_pipeline(seed=0)                   # 64x64 images; 10 steps take ~0.1-0.5 s on one CPU thread
    save_tiny_pipeline("tiny-sd")                  # or: python -m loldu_sd.testing --save tiny-sd
    StableDiffusionPipeline.from_pretrained("tiny-sd")

The tokenizer is the real CLIP BPE tokenizer (49408 tokens, built from the vocabulary file that ships with
open_clip_torch), so prompts tokenize exactly as with SD 1.5. Another seed gives different weights: a stand-in
for "a different base model". Images are noise-like (the weights are random) but depend on prompt, seed and
every attention layer. diffusers/transformers are imported inside the functions to keep this module light.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only; the imports are slow
    from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTokenizer

CLIP_VOCAB_SIZE = 49408  # 256 byte chars + 256 byte chars with </w> + 48894 merges + 2 special tokens
CLIP_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# SD 1.x/2.x noise schedule (the scheduler config shipped with stable-diffusion-v1-5 and 2-1)
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# ---- tokenizer -----------------------------------------------------------------------------------------------------
def _byte_chars() -> list[str]:
    """The 256 printable stand-ins CLIP uses for bytes: printable latin-1 as itself, the rest shifted past 255."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # '!'..'~', '¡'..'¬', '®'..'ÿ'
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]


def clip_bpe_merges() -> list[str]:
    """The 48894 CLIP BPE merges ("a b" strings) from the vocabulary file shipped with open_clip_torch."""
    spec = importlib.util.find_spec("open_clip")  # finds the package without importing it (slow: torch, timm)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("loldu_sd.testing needs the CLIP vocabulary of open_clip_torch: pip install open_clip_torch")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    return lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a header; CLIP keeps exactly this many merges


def clip_vocab(merges: list[str]) -> dict[str, int]:
    """token -> id in CLIP's order: byte chars, byte chars + </w>, one token per merge, then BOS and EOS."""
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}  # two merges may spell one token: number it once


def clip_tokenizer(merges: list[str], max_length: int, pad_token: str, name: str) -> CLIPTokenizer:
    """A real CLIPTokenizer for BPE `merges` (vocabulary in CLIP's order, see clip_vocab), built offline."""
    from transformers import CLIPTokenizer

    vocab = clip_vocab(merges)
    # vocab.json + merges.txt is the one input every transformers version (4.x slow/fast, 5.x) reads the same way
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tok = CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length, pad_token=pad_token)
    # forget the (deleted) temp dir, so save_pretrained writes a clean tokenizer_config.json
    for key in ("vocab_file", "merges_file", "name_or_path", "is_local", "local_files_only"):
        tok.init_kwargs.pop(key, None)
    tok.name_or_path = name
    return tok


def tiny_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """The real SD 1.x CLIPTokenizer (openai/clip-vit-large-patch14 vocabulary), built offline; SD 2.x pads with "!"."""
    tok = clip_tokenizer(clip_bpe_merges(), CLIP_MAX_LENGTH, pad_token, "loldu-sd/tiny-clip-tokenizer")
    assert len(tok) == CLIP_VOCAB_SIZE, len(tok)
    return tok


# ---- models --------------------------------------------------------------------------------------------------------
def _reinit_(module: torch.nn.Module, out: torch.nn.Module, out_gain: float) -> None:
    """Variance-preserving N(0, 1/fan_in) weights, then scale the output layer so it predicts unit-variance noise.

    Default (kaiming-uniform) init gives a UNet whose output is small and barely depends on its attention layers, so
    the sampler's initial noise decides the whole image. With these weights prompt and attention changes show.
    """
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape) / p[0].numel() ** 0.5)
        out.weight.mul_(out_gain)


def tiny_unet(seed: int = 0, sd2: bool = False) -> UNet2DConditionModel:
    """A 2-level UNet2DConditionModel (~0.8M params, 8x8 latents); 4 transformer blocks, self- and cross-attention."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,  # latent side; x8 VAE -> 64 px images
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        # diffusers' historical name: this is the number of heads (SD 1.x: 8 everywhere; 2.x: per level)
        attention_head_dim=(2, 4) if sd2 else 4,
        use_linear_projection=sd2,  # SD 2.x uses Linear proj_in/proj_out in its transformers, 1.x a 1x1 conv
        norm_num_groups=32,
    )
    _reinit_(unet, unet.conv_out, out_gain=2.0)  # gain 2: output std ~1 on random latents, like a trained model
    return unet


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A 4-level AutoencoderKL (~0.26M params): 64x64x3 images <-> 8x8x4 latents, as SD's x8 VAE."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 16, 32, 32),  # 4 levels = 3 downsamplings = SD's factor 8
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=64,
    )  # scaling_factor keeps SD's 0.18215


def tiny_text_encoder(seed: int = 0, sd2: bool = False) -> CLIPTextModel:
    """A 2-layer, 32-wide CLIPTextModel over the full 49408-token CLIP vocabulary (~1.6M params)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=32,
        hidden_act="gelu" if sd2 else "quick_gelu",  # OpenCLIP ViT-H (SD 2.x) vs OpenAI ViT-L (SD 1.x)
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0 if sd2 else 49407,
    )
    return CLIPTextModel(config).eval()


def tiny_scheduler(name: str = "ddim", prediction_type: str = "epsilon") -> DDIMScheduler | PNDMScheduler:
    """SD's noise schedule in a DDIM (default) or PNDM scheduler (PNDM is what stable-diffusion-v1-5 ships)."""
    from diffusers import DDIMScheduler, PNDMScheduler

    common = dict(SD_BETAS, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=False)
    if name == "pndm":
        return PNDMScheduler(**common, skip_prk_steps=True)
    raise ValueError(f"tiny_scheduler: unknown scheduler {name!r}; use 'ddim' or 'pndm'")


def _pipeline(seed: int, scheduler: str, sd2: bool) -> StableDiffusionPipeline:
    from diffusers import StableDiffusionPipeline

    # fork_rng: building a pipeline must not move the caller's global RNG
    with torch.random.fork_rng(devices=[]):
        unet, vae = tiny_unet(seed, sd2), tiny_vae(seed)
        text_encoder = tiny_text_encoder(seed, sd2)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(pad_token="!" if sd2 else EOS),
        unet=unet,
        scheduler=tiny_scheduler(scheduler, "v_prediction" if sd2 else "epsilon"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_pipeline(seed: int = 0, scheduler: str = "ddim") -> StableDiffusionPipeline:
    """A seeded SD 1.x-style StableDiffusionPipeline with tiny real components; 64x64 images.

    DDIM by default rather than SD 1.5's PNDM: same noise schedule, but each DDIM step (eta=0) depends only on the
    current latent, not on a history of earlier steps, so it is sound at the 2-10 steps tests use.
    scheduler="pndm" gives SD 1.5's exact scheduler config.
    """
    return _pipeline(seed, scheduler, sd2=False)


def tiny_sd2_pipeline(seed: int = 0, scheduler: str = "ddim") -> StableDiffusionPipeline:
    """A seeded SD 2.x-style pipeline: per-level head counts, linear projections, GELU CLIP, v-prediction."""
    return _pipeline(seed, scheduler, sd2=True)


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A seeded SDXL-style pipeline: two CLIP text encoders (the second with a projection, as OpenCLIP bigG), their
    hidden states concatenated for cross-attention, and the pooled embedding + size/crop ids as added conditioning."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),  # SDXL: no attention at the top level
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=64,  # 32 + 32: both encoders' hidden states side by side
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 size/crop ids x 8 + the pooled text embedding
            norm_num_groups=32,
        )
        _reinit_(unet, unet.conv_out, out_gain=2.0)
        vae = tiny_vae(seed)
        text_encoder = tiny_text_encoder(seed)
        config = tiny_text_encoder(seed + 1, sd2=True).config
        torch.manual_seed(seed + 1)
        text_encoder_2 = CLIPTextModelWithProjection(config).eval()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=tiny_scheduler("ddim"),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def save_tiny_pipeline(path: str | Path, seed: int = 0, sd2: bool = False, sdxl: bool = False) -> Path:
    """Save the tiny pipeline (safetensors, tokenizer included) so `from_pretrained(path)` works offline."""
    path = Path(path)
    pipe = tiny_sdxl_pipeline(seed) if sdxl else tiny_sd2_pipeline(seed) if sd2 else tiny_pipeline(seed)
    pipe.save_pretrained(path, safe_serialization=True)  # overwrites an earlier save in place
    return path


# ---- portability checks --------------------------------------------------------------------------------------------
def update_errors(made: torch.nn.Module, loaded: torch.nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """||B diag(s) A (loaded) - B diag(s) A (made)||_F / ||W0||_F for each LoLDU layer, both in float32."""
    from .model import loldu_layers

    theirs = dict(loldu_layers(loaded))
    with torch.no_grad():
        return {name: float((theirs[name].delta_weight([adapter_name]) - layer.delta_weight([adapter_name])).norm()
                            / layer.weight.float().norm())
                for name, layer in loldu_layers(made) if adapter_name in layer.loldu_adapters}


# ---- the real SD 1.5 UNet shape ------------------------------------------------------------------------------------
def sd15_unet_config() -> dict:
    """The UNet2DConditionModel config of Stable Diffusion v1.5 (859,520,964 params; 128 attention projections)."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    }


def main(argv: list[str] | None = None) -> None:
    """CLI: python -m loldu_sd.testing --save tiny-sd [--seed 0] [--sd2]."""
    parser = argparse.ArgumentParser(description="Save a tiny offline Stable Diffusion pipeline.")
    parser.add_argument("--save", required=True, metavar="DIR", help="output folder (from_pretrained-loadable)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed; another seed = another base model")
    parser.add_argument("--sd2", action="store_true", help="SD 2.x-style (v-prediction, linear projections)")
    args = parser.parse_args(argv)
    print(save_tiny_pipeline(args.save, args.seed, args.sd2))


if __name__ == "__main__":
    main()
