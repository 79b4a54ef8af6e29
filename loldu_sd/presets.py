"""Target-module presets: which Linear layers LoLDU adapts in each model family (paper §IV and Table X)."""
from __future__ import annotations

PRESETS: dict[str, list[str] | str] = {
    # diffusers Attention blocks of the UNet, self- and cross-attention (paper Table X: to_q, to_k, to_v, to_out)
    "sd-unet": ["to_q", "to_k", "to_v", "to_out.0"],
    # CLIPTextModel attention (the SD text encoder)
    "clip-text": ["q_proj", "k_proj", "v_proj", "out_proj"],
    # paper's NLU choice: query and value of every self-attention layer
    "roberta": ["attention.self.query", "attention.self.value"],
    "bert": ["attention.self.query", "attention.self.value"],
    # all four attention projections of RoBERTa/BERT
    "roberta-all": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"],
    "bert-all": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"],
    # transformers < 5 names them attention.attention.query/value, transformers 5 attention.q_proj/v_proj
    "vit": ["attention.query", "attention.value", "attention.q_proj", "attention.v_proj"],
    "vit-all": ["attention.query", "attention.key", "attention.value", "attention.output.dense",
                "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"],
    # paper Table VIII: q_proj and v_proj of LLaMA2-7B
    "llama": ["q_proj", "v_proj"],
    "llama-all": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def preset(name: str) -> list[str] | str:
    """Target modules of preset `name` (a copy), with a clear error for unknown names."""
    if name not in PRESETS:
        raise KeyError(f"unknown LoLDU preset {name!r}; choose one of {sorted(PRESETS)}")
    value = PRESETS[name]
    return list(value) if isinstance(value, list) else value
