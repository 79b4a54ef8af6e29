"""SD methods: one interface over ours, peft LoRA and naive LoLDU (inject, train, bypass, fuse, remove)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import loldu_sd.diffusers
from loldu_sd import LoLDUConfig

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SD_METHODS = ["ours:1", "ours:8", "ours:32", "lora:4", "lora:32", "naive:32"]
FUSED_IN_ROUNDS = {"ours:32", "lora:4", "naive:32"}  # fused inference is rank-independent: measure one of each


@dataclass
class Method:
    """One adapter method at one rank, with the operations the benchmark needs."""

    kind: str  # "ours" | "lora" | "naive"
    rank: int

    @classmethod
    def parse(cls, spec: str) -> Method:
        kind, rank = spec.split(":")
        return cls(kind, int(rank))

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.rank}"

    @property
    def label(self) -> str:
        return {"ours": "LoLDU (ours)", "lora": "peft LoRA", "naive": "naive LoLDU"}[self.kind] + f" r={self.rank}"

    def inject(self, unet: nn.Module) -> None:
        if self.kind == "ours":
            cfg = LoLDUConfig(rank=self.rank, alpha=self.rank, target_modules=TARGETS)
            loldu_sd.diffusers.add_loldu_to_unet(unet, cfg, "a")
        elif self.kind == "lora":
            from peft import LoraConfig

            unet.add_adapter(LoraConfig(r=self.rank, lora_alpha=self.rank, init_lora_weights="gaussian",
                                        target_modules=list(TARGETS)), adapter_name="a")
        else:
            from loldu_sd.diffusers import unet_target_layers

            from .naive import add_naive_loldu
            add_naive_loldu(unet, unet_target_layers(unet, TARGETS), self.rank)

    def params(self, unet: nn.Module) -> list[torch.Tensor]:
        if self.kind == "ours":
            return loldu_sd.loldu_parameters(unet)
        if self.kind == "naive":
            from .naive import naive_parameters
            return naive_parameters(unet)
        return [p for p in unet.parameters() if p.requires_grad]

    def after_step(self, unet: nn.Module) -> None:
        if self.kind == "ours":  # the projection is part of a LoLDU training step (trainer calls it every step)
            loldu_sd.project_loldu_(unet)

    def disable(self, unet: nn.Module) -> None:
        """Bypass the adapter (the floor step then runs the base computation on the same module tree)."""
        if self.kind == "ours":
            for _, layer in loldu_sd.loldu_layers(unet):
                layer.set_active([])
        elif self.kind == "lora":
            unet.disable_adapters()
        else:
            from .naive import bypass_naive_loldu
            self._bypassed = bypass_naive_loldu(unet)

    def enable(self, unet: nn.Module) -> None:
        if self.kind == "ours":
            loldu_sd.set_loldu_adapters(unet, ["a"])
        elif self.kind == "lora":
            unet.enable_adapters()
        else:
            from .naive import restore_naive_loldu
            restore_naive_loldu(self._bypassed)

    def fuse(self, unet: nn.Module) -> None:
        if self.kind == "ours":
            loldu_sd.merge_loldu(unet)  # what pipe.fuse_loldu() calls per component
        elif self.kind == "lora":
            unet.fuse_lora()  # what pipe.fuse_lora() calls for the UNet
        else:
            from .naive import fuse_naive_loldu
            fuse_naive_loldu(unet)  # one way: the parametrization is baked in and dropped

    def unfuse(self, unet: nn.Module) -> None:
        if self.kind == "ours":
            loldu_sd.unmerge_loldu(unet)
        elif self.kind == "lora":
            unet.unfuse_lora()

    def remove(self, unet: nn.Module, base_weights: dict[str, torch.Tensor] | None = None) -> None:
        """Take the adapter out; naive LoLDU overwrote W0, so it is restored from `base_weights` when given."""
        if self.kind == "ours":
            loldu_sd.remove_loldu(unet)  # takes the runtime-scale hooks along: 'base' is the bare UNet again
        elif self.kind == "lora":
            unet.unload_lora()
        else:
            from .naive import remove_naive_loldu
            remove_naive_loldu(unet)
        if base_weights is not None and self.kind == "naive":
            with torch.no_grad():
                for name, w in base_weights.items():
                    unet.get_submodule(name).weight.copy_(w)


def count(tensors: list[torch.Tensor]) -> int:
    """Total number of values."""
    return sum(t.numel() for t in tensors)
