"""The toy world's pipeline components: real diffusers/transformers classes with small configs.

    tokenizer = toy_tokenizer()        # CLIPTokenizer whose BPE merges spell the world's words (~1k tokens)
    build_unet(), build_vae(), train_scheduler(), sample_scheduler()   (the text encoder is the image-text
    judge's text tower, see judges.py)

Images are 64x64; the VAE downsamples by 4 to 16x16x8 latents (SD downsamples 512 by 8 to 64x64x4). Words outside
the world's vocabulary (such as the identifier "sks") fall apart into byte-level tokens that pretraining never
trains: exactly what DreamBooth wants from a rare identifier.
"""
from __future__ import annotations

from ..testing import EOS, clip_tokenizer
from .world import BACKGROUNDS, COLOURS, DECORATIONS, KINDS, PLURALS, POSITIONS, RICH_DECORATIONS, SIZES

MAX_LENGTH = 32
# 8 latent channels: room for the kind code the autoencoder learns (see pretrain.train_vae) beside the colours
LATENT_CHANNELS = 8
# DDPM's linear schedule, not SD's scaled-linear one: at 16x16 latents SD's last step keeps so much signal in the
# noise's spatial mean (SNR ~1 for a background colour) that the model learnt to read the background off the starting
# noise and ignored the caption; here that SNR is ~0.01, so the caption has to decide it
# v-prediction: an epsilon objective weighs each step's x0 error by its SNR, so the high-noise steps, where only the
# caption can say what the background and shape are, taught the model almost nothing
BETAS = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
             prediction_type="v_prediction")
EXTRA_WORDS = ("a an of the photo two with and on in background half", "dog cat robot toy thing shape object")


def vocabulary_words() -> list[str]:
    """Every whole word the tokenizer spells as one token (the world's caption words plus a few common ones)."""
    words = set(" ".join(EXTRA_WORDS).split())
    words |= set(KINDS) | set(PLURALS.values()) | set(COLOURS) | set(SIZES) | set(BACKGROUNDS)
    words |= set(DECORATIONS) | {w for d in RICH_DECORATIONS for w in d.split("-")}
    words |= {w for p in POSITIONS for w in p.split()} | {"striped", "gradient", "plain", "dot", "dots", "outline"}
    return sorted(words)


def bpe_merges(words: list[str]) -> list[str]:
    """BPE learnt on the word list: merge the most frequent adjacent pair until every word is one token.

    Learnt merges applied by rank reproduce the learnt segmentation, so each listed word becomes one token.
    """
    pieces = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for p in pieces:
            for pair in zip(p, p[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = max(counts, key=lambda pair: (counts[pair], pair))  # ties broken by the pair itself: deterministic
        merges.append(" ".join(best))
        pieces = [_merge(p, best) for p in pieces]


def _merge(piece: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(piece):
        if i + 1 < len(piece) and (piece[i], piece[i + 1]) == pair:
            out.append(piece[i] + piece[i + 1])
            i += 2
        else:
            out.append(piece[i])
            i += 1
    return out


def toy_tokenizer():
    """A real CLIPTokenizer (CLIP's byte-level BPE, lower-casing, </w> ends) with the toy world's small vocabulary."""
    return clip_tokenizer(bpe_merges(vocabulary_words()), MAX_LENGTH, EOS, "loldu-sd/toyworld-tokenizer")


def build_unet(seed: int = 0, latent_channels: int | None = None):
    """A 3-level UNet2DConditionModel on 16x16 latents; self- and cross-attention at 16x16, 8x8 and 4x4."""
    import torch
    from diffusers import UNet2DConditionModel

    channels = latent_channels or LATENT_CHANNELS
    with torch.random.fork_rng(devices=[]):  # seeded weights without moving the caller's random state
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=16, in_channels=channels, out_channels=channels, layers_per_block=1,
            block_out_channels=(64, 128, 128),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=128, attention_head_dim=4, norm_num_groups=32)


def build_vae(seed: int = 0, latent_channels: int | None = None):
    """A 3-level AutoencoderKL: 64x64x3 images <-> 16x16 latents (x4 downsampling)."""
    import torch
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):  # seeded weights without moving the caller's random state
        torch.manual_seed(seed)
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels or LATENT_CHANNELS,
                             block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                             up_block_types=("UpDecoderBlock2D",) * 3,
                             layers_per_block=1, norm_num_groups=32, sample_size=64)


def train_scheduler():
    """DDPM on the toy world's schedule (the trainer reads the same schedule from the pipeline folder)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**BETAS)


def sample_scheduler():
    """DPM-Solver++ (2nd order) on the same schedule: sharp samples in 20 steps."""
    from diffusers import DPMSolverMultistepScheduler

    # steps_offset=1 is what StableDiffusionPipeline sets (with a warning) when it loads; linspace spacing ignores it
    return DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver++", solver_order=2, steps_offset=1)
