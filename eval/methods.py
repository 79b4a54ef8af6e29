"""The personalisation methods of the quality benchmark, as parts added to the trainer's frozen models.

Each part changes the loaded models in place and returns a `loldu_sd.training.Trainable` (what to train, what to do
after every optimizer step, what a user would ship), trained by the trainer's own `training_step`:

    loldu     our LoLDU adapter on the UNet attention projections (loldu_sd; the trainer's own Trainable and file)
    loldu_r8  the same at rank 8
    lora      LoRA r=4 through peft as diffusers' train_dreambooth_lora.py adds it (unet.add_adapter), its LoRA file
    lora_r16  LoRA r=16, a stronger baseline
    ti        textual inversion: one new token "<sks>" whose embedding row alone is trained, its embedding file
    full      full fine-tuning of the attention projections, the changed weights' file
    svdiff    SVDiff's spectral shifts (arXiv 2303.11305): W = U diag(relu(s + delta)) V^T, only delta trained
    loldu_ti  LoLDU plus one trained token embedding

A variant is a method with learning options (OPTIONS): `variant("loldu_s05=loldu:sigma0=0.5,warmup=0")`.
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from loldu_sd.model import find_targets
from loldu_sd.toyworld.concepts import IDENTIFIER, Concept
from loldu_sd.training.step import Trainable, loldu_trainable

TI_TOKEN = "<sks>"
# LoLDU's module groups (option modules=attn+ff+te): names inside the UNet's transformer blocks
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
TEXT_FEED_FORWARD = ("mlp.fc1", "mlp.fc2")  # the CLIP text encoder's


def targets(args: argparse.Namespace) -> list[str]:
    """The trainer's --target_modules (to_q, to_k, to_v, to_out.0 by default): every method adapts the same layers."""
    return [t.strip() for t in args.target_modules.split(",") if t.strip()]


def _loldu_configs(args: argparse.Namespace) -> tuple:
    """The trainer's LoLDUConfig of the flags for the UNet and for the text encoder, both widened to the
    feed-forward layers when the modules option asks for them."""
    from loldu_sd.config import LoLDUConfig
    from loldu_sd.presets import PRESETS
    from loldu_sd.training import loldu_config

    config = loldu_config(args)
    wide = "ff" in getattr(args, "loldu_modules", ("attn",))

    def with_targets(names: list[str]) -> LoLDUConfig:
        pattern = rf".*\.(?:{'|'.join(re.escape(t) for t in names)})"  # a regex matches outside attention too
        return LoLDUConfig.from_dict({**config.to_dict(), "target_modules": pattern if wide else names})

    return (with_targets([*config.target_modules, *(FEED_FORWARD if wide else ())]),
            with_targets([*PRESETS["clip-text"], *(TEXT_FEED_FORWARD if wide else ())]))


def add_loldu(models, args: argparse.Namespace, concept: Concept) -> Trainable:
    """LoLDU as the trainer adds it (its Trainable and file); the modules option adds text encoder, feed-forward."""
    from loldu_sd.pipeline import add_loldu_to_text_encoder, add_loldu_to_unet
    from loldu_sd.model import cast_loldu_parameters

    unet_config, text_config = _loldu_configs(args)
    components = {"unet": add_loldu_to_unet(models.unet, unet_config)}
    if args.train_text_encoder:
        components["text_encoder"] = add_loldu_to_text_encoder(models.text_encoder, text_config)
    cast_loldu_parameters(components, torch.float32)
    return loldu_trainable(components, args.pretrained_model_name_or_path)


def add_lora(models, args: argparse.Namespace, concept: Concept, rank: int = 4) -> Trainable:
    """LoRA (r=4 unless `rank`), alpha = r, gaussian init on the same projections, as train_dreambooth_lora.py."""
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

    def restore(lr: float) -> None:
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


def _none_or_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _modules(text: str) -> tuple[str, ...]:
    groups = tuple(text.split("+"))
    if "conv" in groups:
        raise ValueError("modules=conv: LoLDU adapts nn.Linear layers only; the UNet's convolutions need a LoLDU "
                         "convolution layer in loldu_sd first")
    if "attn" not in groups or not set(groups) <= {"attn", "ff", "te"}:
        raise ValueError(f"modules={text}: expected attn, optionally +ff and +te (e.g. attn+ff+te)")
    return groups


# a run's learning options: name -> (what it means, how it sets the parsed trainer flags)
OPTIONS: dict[str, tuple[str, Callable[[argparse.Namespace, str], None]]] = {
    "warmup": ("learning-rate warm-up steps (--lr_warmup_steps)",
               lambda a, v: setattr(a, "lr_warmup_steps", int(v))),
    # LoLDU trains the change (dz, dsigma), so AdamW's decay pulls it toward the base; others' toward 0
    "wd": ("AdamW weight decay (--adam_weight_decay)", lambda a, v: setattr(a, "adam_weight_decay", float(v))),
    "sigma0": ("LoLDU's initial sigma (alpha = sigma0 x rank); below sigma_max it can grow",
               lambda a, v: setattr(a, "alpha", float(v) * a.rank)),
    "sigma_max": ("LoLDU's bound on sigma, or 'none' to lift it",
                  lambda a, v: setattr(a, "sigma_max", _none_or_float(v))),
    "modules": ("what LoLDU adapts: attn (the default), +ff (feed-forward), +te (text encoder)",
                lambda a, v: (setattr(a, "loldu_modules", _modules(v)),
                              setattr(a, "train_text_encoder", "te" in _modules(v)))),
}


@dataclass(frozen=True)
class Method:
    """A benchmarked method: its parts, default learning-rate grid, extra trainer flags, prompt token and options."""

    name: str
    parts: tuple[Part, ...]
    lrs: tuple[float, ...]
    about: str
    flags: tuple[str, ...] = ()
    token: str = IDENTIFIER
    options: tuple[tuple[str, str], ...] = field(default=())

    def build(self, models, args: argparse.Namespace, concept: Concept) -> Trainable:
        """Add every part to the loaded models (in place); what to train."""
        trainable = Trainable()
        for part in self.parts:
            trainable = trainable.merge(part(models, args, concept))
        return trainable

    def prompt(self, text: str) -> str:
        """`text` with the identifier this method learns ('sks', or the new token of textual inversion)."""
        return re.sub(rf"\b{IDENTIFIER}\b", self.token, text)

    def apply_options(self, args: argparse.Namespace) -> argparse.Namespace:
        """The parsed trainer flags with this method's options set (in place)."""
        for key, value in self.options:
            OPTIONS[key][1](args, value)
        return args

    def definition(self) -> dict:
        """What decides this method's numbers (a committed run is reused only while it is the same)."""
        return {"parts": [getattr(p, "func", p).__name__ + (f"{p.keywords}" if isinstance(p, partial) else "")
                          for p in self.parts], "flags": list(self.flags), "token": self.token,
                "options": dict(self.options)}


def variant(spec: str, methods: dict[str, Method]) -> Method:
    """A method from 'NAME=METHOD:key=value,key=value' (OPTIONS' keys); ValueError naming the problem."""
    name, _, rest = spec.partition("=")
    base, _, opts = rest.partition(":")
    if not re.fullmatch(r"[a-z0-9_]+", name) or name in methods:
        raise ValueError(f"--variant {spec}: NAME must be new and of a-z, 0-9, _ (e.g. loldu_s05)")
    if base not in methods:
        raise ValueError(f"--variant {spec}: {base!r} is not a method ({', '.join(methods)})")
    pairs = tuple(tuple(o.split("=", 1)) for o in opts.split(",") if o)
    for pair in pairs:
        if len(pair) != 2 or pair[0] not in OPTIONS:
            raise ValueError(f"--variant {spec}: options are KEY=VALUE with KEY one of {', '.join(OPTIONS)}")
        try:
            OPTIONS[pair[0]][1](argparse.Namespace(rank=1), pair[1])
        except ValueError as e:
            raise ValueError(f"--variant {spec}: {e}") from None
    about = f"{methods[base].about}; " + ", ".join(f"{k}={v}" for k, v in pairs)
    return replace(methods[base], name=name, about=about, options=methods[base].options + pairs)


METHODS = {m.name: m for m in (
    Method("loldu", (add_loldu,), (1e-3, 3e-3, 1e-2), "LoLDU r=32, the paper's settings (the trainer's defaults)"),
    Method("loldu_r8", (add_loldu,), (1e-3, 3e-3, 1e-2), "LoLDU r=8", ("--rank", "8")),
    Method("lora", (add_lora,), (1e-4, 1e-3, 1e-2), "LoRA r=4 through peft (diffusers' DreamBooth LoRA)"),
    Method("lora_r16", (partial(add_lora, rank=16),), (1e-4, 1e-3, 1e-2), "LoRA r=16 through peft"),
    Method("ti", (add_token,), (5e-4, 5e-3, 5e-2), "textual inversion: one new token embedding", token=TI_TOKEN),
    Method("full", (add_full,), (1e-5, 1e-4, 1e-3), "full fine-tuning of the attention projections"),
    Method("svdiff", (add_svdiff,), (1e-3, 1e-2, 1e-1), "SVDiff spectral shifts on the attention projections"),
    Method("loldu_ti", (add_loldu, add_token), (1e-3, 3e-3, 1e-2), "LoLDU r=32 plus one trained token embedding",
           token=TI_TOKEN),
)}
