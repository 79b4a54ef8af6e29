"""The toy world's judges: what DINO and CLIP are to Stable Diffusion, trained here on the toy world.

  instance encoder   a small CNN trained contrastively to tell *instances* apart: two photos of the same object
                     (kind, colour, decorations) on other backgrounds, positions and sizes are positives; an object
                     that shares some of those attributes is a partial match, graded by how many it shares, so the
                     shape counts as much as the colour. Views are blurred and their contrast jittered, as DINO's
                     are. It sees a wider world than the generator (up to two decorations, two-tone, checkers,
                     eyes), as DINO saw more than dogs, but never the held-out concepts themselves. The DINO analogue.
  image-text model   a CNN image tower and a CLIPTextModel text tower trained with CLIP's contrastive loss on
                     captioned scenes. Its image tower is the CLIP-I analogue, image-text cosine the CLIP-T analogue.

    judges = load_judges(JUDGES_DIR)        # trained by research/toyworld/judges.py
    judges.embed_instances(images), judges.embed_images(images), judges.embed_texts(prompts)   # [N, 128] each
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .models import toy_tokenizer

EMBED_DIM = 128
INSTANCE_FILE, IMAGE_TEXT_FILE = "instance_encoder.safetensors", "image_text.safetensors"


class ConvEncoder(nn.Module):
    """64x64 RGB -> EMBED_DIM: a stride-2 stem, three stride-2 conv stages (GroupNorm, SiLU), average pool, linear."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 128), dim: int = EMBED_DIM):
        super().__init__()
        # a stride-2 stem: 32x32 feature maps keep 2-pixel details of a 64x64 image at a quarter of the cost
        layers, c = [nn.Conv2d(3, widths[0], 4, stride=2, padding=1), nn.GroupNorm(8, widths[0]), nn.SiLU()], widths[0]
        for w in widths[1:]:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            c = w
        self.body, self.head = nn.Sequential(*layers), nn.Linear(c, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


class ImageText(nn.Module):
    """CLIP in miniature: a ConvEncoder image tower, a CLIPTextModel text tower, a projection and a learnt scale."""

    def __init__(self, vocab_size: int, bos: int, eos: int, pad: int):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        self.image = ConvEncoder()
        config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=32, bos_token_id=bos,
                                eos_token_id=eos, pad_token_id=pad)
        self.text = CLIPTextModel(config)
        self.text_proj = nn.Linear(128, EMBED_DIM, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_proj(self.text(input_ids).pooler_output)


def to_tensor(images) -> torch.Tensor:
    """PIL images (any size or mode) -> [N, 3, 64, 64] in [-1, 1]."""
    from PIL import Image

    arr = [np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32)
           for im in images]
    return torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2) / 127.5 - 1.0


@dataclass
class Judges:
    """The two trained judges with the tokenizer, as embedding functions (lists in, L2-normalised [N, D] out)."""

    instance: ConvEncoder
    image_text: ImageText
    tokenizer: object

    @torch.no_grad()
    def embed_instances(self, images) -> torch.Tensor:
        return F.normalize(self.instance(to_tensor(images)).float(), dim=-1)

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        return F.normalize(self.image_text.image(to_tensor(images)).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts) -> torch.Tensor:
        ids = self.tokenizer(list(texts), padding="max_length", max_length=32, truncation=True,
                             return_tensors="pt").input_ids
        return F.normalize(self.image_text.encode_text(ids).float(), dim=-1)


def new_image_text(tokenizer) -> ImageText:
    """An untrained ImageText model for the toy tokenizer."""
    return ImageText(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def load_judges(folder: str | Path) -> Judges:
    """Load both judges from a folder written by `train_judges` (safetensors only)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    missing = [f for f in (INSTANCE_FILE, IMAGE_TEXT_FILE) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"toy-world judges: {', '.join(missing)} not found in {folder}")
    tokenizer = toy_tokenizer()
    instance, image_text = ConvEncoder(), new_image_text(tokenizer)
    instance.load_state_dict({k: v.float() for k, v in load_file(folder / INSTANCE_FILE).items()})
    image_text.load_state_dict({k: v.float() for k, v in load_file(folder / IMAGE_TEXT_FILE).items()})
    return Judges(instance.eval(), image_text.eval(), tokenizer)
