"""The personalisation methods of the quality benchmark, as parts added to the trainer's frozen models.

Each part changes the loaded models in place and says what to train, what to do after every optimizer step, and
what a user would ship (written by `save`, measured in bytes):

    loldu    our LoLDU adapter on the UNet attention projections (loldu_sd; the trainer's own flags and file)
    lora     LoRA through peft as diffusers' train_dreambooth_lora.py adds it (unet.add_adapter), its LoRA file
    ti       textual inversion: one new token "<sks>" whose embedding row alone is trained, its embedding file
    full     full fine-tuning of the attention projections, the changed weights' file
    svdiff   SVDiff's spectral shifts (arXiv 2303.11305): W = U diag(relu(s + delta)) V^T, only delta trained
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from loldu_sd.model import find_targets
from loldu_sd.toyworld.concepts import IDENTIFIER, Concept

TI_TOKEN = "<sks>"


@dataclass
class Trainable:
    """What one method trains: parameters, modules in training mode, after-step hooks and the files it ships."""

    params: list[nn.Parameter] = field(default_factory=list)
    trained: dict[str, nn.Module] = field(default_factory=dict)  # the trainer's "trained components" (Conditioner)
    after_step: list[Callable[[], None]] = field(default_factory=list)
    savers: list[Callable[[Path], Path]] = field(default_factory=list)

    def merge(self, other: Trainable) -> Trainable:
        """Both parts trained together (LoLDU plus a token embedding)."""
        return Trainable(self.params + other.params, {**self.trained, **other.trained},
                         self.after_step + other.after_step, self.savers + other.savers)

    def save(self, folder: Path) -> int:
        """Write the shipped files into `folder`; their total size in bytes."""
        folder.mkdir(parents=True, exist_ok=True)
        return sum(saver(folder).stat().st_size for saver in self.savers)


def targets(args: argparse.Namespace) -> list[str]:
    """The trainer's --target_modules (to_q, to_k, to_v, to_out.0 by default): every method adapts the same layers."""
    return [t.strip() for t in args.target_modules.split(",") if t.strip()]


def add_loldu(models, args: argparse.Namespace, concept: Concept) -> Trainable:
    """LoLDU on the UNet, built as the trainer builds it (loldu_config of the flags), saved as the trainer saves it."""
    from loldu_sd.diffusers import add_loldu_to_unet, save_pipeline_adapter
    from loldu_sd.model import cast_loldu_parameters, loldu_parameters, project_loldu_
    from loldu_sd.training import loldu_config

    components = {"unet": add_loldu_to_unet(models.unet, loldu_config(args))}
    cast_loldu_parameters(components, torch.float32)
    return Trainable(loldu_parameters(components), components, [lambda: project_loldu_(components)],
                     [lambda folder: save_pipeline_adapter(folder, components,
                                                           base_model=args.pretrained_model_name_or_path)])


def add_lora(models, args: argparse.Namespace, concept: Concept, rank: int = 4) -> Trainable:
    """LoRA r=4, alpha=4, gaussian init on the same projections, exactly as train_dreambooth_lora.py configures it."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = models.unet
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets(args)))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # diffusers' cast_training_params: LoRA weights train in fp32 under mixed precision
        p.data = p.data.float()

    def save(folder: Path) -> Path:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers)
        return folder / "pytorch_lora_weights.safetensors"

    return Trainable(params, {"unet": unet}, [], [save])


def add_token(models, args: argparse.Namespace, concept: Concept) -> Trainable:
    """Textual inversion: TI_TOKEN added to the tokenizer, its row initialised to the class noun's embedding."""
    tokenizer, encoder = models.tokenizer, models.text_encoder
    if tokenizer.add_tokens(TI_TOKEN) != 1:
        raise ValueError(f"the tokenizer already has {TI_TOKEN!r}; textual inversion needs a new token")
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = encoder.get_input_embeddings().weight
    new = tokenizer.convert_tokens_to_ids(TI_TOKEN)
    init = tokenizer(concept.class_noun, add_special_tokens=False).input_ids  # one token in the toy world's BPE
    with torch.no_grad():
        weight[new] = weight[init].mean(0)
    frozen, others = weight.detach().clone(), torch.arange(len(tokenizer)) != new
    weight.requires_grad_(True)
    # the other rows get gradients too (the prompt uses them): zero them, so clipping sees the new row alone
    weight.register_hook(lambda grad: grad.masked_fill(others[:, None], 0.0))

    def restore() -> None:
        with torch.no_grad():  # AdamW's decoupled weight decay moves every row; put the others back
            weight[others] = frozen[others]

    def save(folder: Path) -> Path:
        path = folder / "learned_embeds.safetensors"  # diffusers' textual-inversion file: {token: embedding}
        save_file({TI_TOKEN: weight[new].detach().clone().contiguous()}, str(path))
        return path

    return Trainable([weight], {"text_encoder": encoder}, [restore], [save])


def _linear_layers(unet: nn.Module, args: argparse.Namespace) -> dict[str, nn.Linear]:
    """The target Linear layers of the UNet by name (the layers LoLDU and LoRA adapt)."""
    return {name: unet.get_submodule(name) for name in find_targets(unet, targets(args))}


def add_full(models, args: argparse.Namespace, concept: Concept) -> Trainable:
    """Full fine-tuning of the attention projections (weights and biases): DreamBooth's upper bound."""
    layers = _linear_layers(models.unet, args)
    params = [p.requires_grad_(True) for layer in layers.values() for p in layer.parameters()]

    def save(folder: Path) -> Path:
        path = folder / "attention_weights.safetensors"
        save_file({f"{n}.{k}": v.detach().contiguous() for n, layer in layers.items()
                   for k, v in layer.state_dict().items()}, str(path))
        return path

    return Trainable(params, {"unet": models.unet}, [], [save])


class SpectralShiftLinear(nn.Module):
    """SVDiff's layer: W_delta = U diag(relu(s + delta)) V^T with W = U diag(s) V^T, only delta trained.

    Computed as W + U diag(relu(s + delta) - s) V^T: the same function, and exactly W at delta = 0 (rebuilding W
    from its SVD would differ from it by round-off).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.base = linear
        u, s, vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
        dtype = linear.weight.dtype
        self.register_buffer("u", u.to(dtype), persistent=False)
        self.register_buffer("s", s.to(dtype), persistent=False)
        self.register_buffer("vh", vh.to(dtype), persistent=False)
        self.delta = nn.Parameter(torch.zeros_like(s, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        change = (self.u * (F.relu(self.s + self.delta) - self.s).to(self.u.dtype)) @ self.vh
        return F.linear(x, self.base.weight + change, self.base.bias)


def add_svdiff(models, args: argparse.Namespace, concept: Concept) -> Trainable:
    """Spectral shifts on the attention projections; ships the shifts (min(out, in) values per layer)."""
    shifted = {}
    for name, layer in _linear_layers(models.unet, args).items():
        parent, _, child = name.rpartition(".")
        shifted[name] = SpectralShiftLinear(layer)
        setattr(models.unet.get_submodule(parent) if parent else models.unet, child, shifted[name])

    def save(folder: Path) -> Path:
        path = folder / "spectral_shifts.safetensors"
        save_file({f"{n}.delta": m.delta.detach().contiguous() for n, m in shifted.items()}, str(path))
        return path

    return Trainable([m.delta for m in shifted.values()], {"unet": models.unet}, [], [save])


Part = Callable[[object, argparse.Namespace, Concept], Trainable]


@dataclass(frozen=True)
class Method:
    """A benchmarked method: its parts, default learning-rate grid, extra trainer flags and prompt token."""

    name: str
    parts: tuple[Part, ...]
    lrs: tuple[float, ...]
    about: str
    flags: tuple[str, ...] = ()
    token: str = IDENTIFIER

    def build(self, models, args: argparse.Namespace, concept: Concept) -> Trainable:
        """Add every part to the loaded models (in place); what to train."""
        trainable = Trainable()
        for part in self.parts:
            trainable = trainable.merge(part(models, args, concept))
        return trainable

    def prompt(self, text: str) -> str:
        """`text` with the identifier this method learns ('sks', or the new token of textual inversion)."""
        return re.sub(rf"\b{IDENTIFIER}\b", self.token, text)


METHODS = {m.name: m for m in (
    Method("loldu", (add_loldu,), (1e-3, 3e-3, 1e-2), "LoLDU r=32, the paper's settings (the trainer's defaults)"),
    Method("loldu_r8", (add_loldu,), (1e-3, 3e-3, 1e-2), "LoLDU r=8", ("--rank", "8")),
    Method("lora", (add_lora,), (1e-4, 1e-3, 1e-2), "LoRA r=4 through peft (diffusers' DreamBooth LoRA)"),
    Method("ti", (add_token,), (5e-4, 5e-3, 5e-2), "textual inversion: one new token embedding", token=TI_TOKEN),
    Method("full", (add_full,), (1e-5, 1e-4, 1e-3), "full fine-tuning of the attention projections"),
    Method("svdiff", (add_svdiff,), (1e-3, 1e-2, 1e-1), "SVDiff spectral shifts on the attention projections"),
    Method("loldu_ti", (add_loldu, add_token), (1e-3, 3e-3, 1e-2), "LoLDU r=32 plus one trained token embedding",
           token=TI_TOKEN),
)}
