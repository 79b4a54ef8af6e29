"""What the UNet is conditioned on while training: SD's CLIP hidden states, or SDXL's two text encoders with pooled
embeddings and size/crop time ids, as diffusers' train_dreambooth_lora_sdxl.py builds them.

SDXL: encoder_hidden_states = [penultimate hidden states of text_encoder, of text_encoder_2] (concatenated features),
added_cond_kwargs = {text_embeds: text_encoder_2's projected pooled output, time_ids: original size + crop top-left +
target size of each image}.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .loss import text_encoder_output
from .models import text_encoder_names


class Conditioner:
    """(encoder_hidden_states, UNet keyword arguments) of a batch; frozen text encoders run once per prompt."""

    def __init__(self, models, trained: dict, use_attention_mask: bool, device: torch.device, dtype: torch.dtype):
        names = text_encoder_names(models)
        self.encoders = [trained.get(n, getattr(models, n)) for n in names]
        self.tokenizers = [models.tokenizer, getattr(models, "tokenizer_2", None)][: len(names)]
        self.frozen = not any(n in trained for n in names)
        self.sdxl = len(names) == 2
        self.mask, self.device, self.dtype, self.cache = use_attention_mask, device, dtype, {}

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, pooled embeddings or None) of `prompts`."""
        if not self.sdxl:
            return text_encoder_output(self.encoders[0], self.tokenizers[0], prompts, self.device, self.mask)[0], None
        outputs = [text_encoder_output(enc, tok, prompts, self.device, self.mask, hidden_states=True)
                   for enc, tok in zip(self.encoders, self.tokenizers)]
        return torch.cat([out.hidden_states[-2] for out in outputs], dim=-1), outputs[-1][0]

    def _encode_cached(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.frozen:
            return self.encode(prompts)
        for p in set(prompts) - set(self.cache):
            with torch.no_grad():
                self.cache[p] = self.encode([p])
        parts = [self.cache[p] for p in prompts]
        hidden = torch.cat([h for h, _ in parts])
        return hidden, torch.cat([p for _, p in parts]) if self.sdxl else None

    def __call__(self, prompts: Sequence[str], time_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Conditioning of one batch; `time_ids` (batch, 6) are only used for SDXL."""
        hidden, pooled = self._encode_cached(prompts)
        if not self.sdxl:
            return hidden, {}
        return hidden, {"added_cond_kwargs": {"text_embeds": pooled.to(self.dtype),
                                              "time_ids": time_ids.to(self.device, self.dtype)}}
