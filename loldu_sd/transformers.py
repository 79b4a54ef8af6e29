"""transformers integration: LoLDU on RoBERTa/BERT, ViT, LLaMA and CLIP text models, with a trainable task head.

    report = add_loldu_to_transformer(model, "roberta", rank=768)   # inject, freeze the base, unfreeze `classifier`
    print(report)                                                    # trainable counts with and without the head
    ... train loldu_parameters(model) + head parameters, project_loldu_(model) after every optimizer step ...
    save_transformer_adapter("sst2.safetensors", model)              # adapter + head weights, one safetensors file
    load_transformer_adapter("sst2.safetensors", fresh_model)        # refuses other base weights (fingerprint)

The file is the core adapter format (loldu_sd.io) with the head weights as extra tensors named `head.<param name>`.
Like peft's `modules_to_save`, the head is trained fully and stored fully: the paper reports LoLDU's count without it.
Nothing here imports transformers: the functions work on any nn.Module and read `model.config` when there is one.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import LoLDUConfig
from .io import LoadedAdapter, LoLDUFormatError, load_loldu, read_adapter_file, save_loldu
from .model import add_loldu, count_loldu_parameters, find_targets, loldu_layers, loldu_parameters
from .naming import checkpoint_prefix
from .presets import PRESETS, preset

DEFAULT_HEADS = ("classifier", "score", "qa_outputs")  # task heads of *ForSequence/TokenClassification/QA models
HEAD_PREFIX = "head."


@dataclass
class InjectionReport:
    """What add_loldu_to_transformer did: adapted layers, trained heads and parameter counts."""

    adapter_name: str
    layers: list[str]
    heads: list[str]
    loldu_params: int  # (r+1) per adapted layer: the number the paper reports
    head_params: int
    base_params: int  # parameters of the model itself (LoLDU's z/sigma excluded)
    rank: int = 0  # largest per-layer rank (the requested rank, clamped to min(out, in) of each layer)

    @property
    def trainable_params(self) -> int:
        """LoLDU values plus the fully trained head."""
        return self.loldu_params + self.head_params

    def to_dict(self) -> dict:
        """Plain dict (JSON-able) of the report."""
        return {"adapter_name": self.adapter_name, "rank": self.rank, "adapted_layers": len(self.layers),
                "heads": self.heads, "loldu_params": self.loldu_params, "head_params": self.head_params,
                "trainable_params": self.trainable_params, "base_params": self.base_params}

    def __str__(self) -> str:
        pct = 100.0 / max(self.base_params, 1)
        return (f"LoLDU adapter {self.adapter_name!r}: rank {self.rank} on {len(self.layers)} layers\n"
                f"  trainable without head: {self.loldu_params:,} ({self.loldu_params * pct:.4f}% of "
                f"{self.base_params:,})\n"
                f"  trainable with head {self.heads or '-'}: {self.trainable_params:,} "
                f"({self.trainable_params * pct:.4f}%)")


def resolve_targets(targets: str | list[str], all_attention: bool = False) -> list[str] | str:
    """A preset name (optionally its '-all' variant: every attention projection) or explicit targets, as given."""
    if isinstance(targets, str) and targets in PRESETS:
        if all_attention and not targets.endswith("-all") and targets != "clip-text":
            if f"{targets}-all" not in PRESETS:
                raise ValueError(f"preset {targets!r} has no all-attention variant; have {sorted(PRESETS)}")
            targets = f"{targets}-all"
        return preset(targets)
    if all_attention:
        raise ValueError("all_attention=True needs a preset name, not explicit target modules")
    if isinstance(targets, str) and re.fullmatch(r"[\w-]+", targets):  # a bare word as a full-match regex: a typo
        raise KeyError(f"unknown LoLDU preset {targets!r}; choose one of {sorted(PRESETS)}, or pass a list of "
                       f"module-name suffixes such as [{targets!r}]")
    return targets


def find_heads(model: nn.Module, heads: tuple[str, ...] | list[str] | None = None) -> list[str]:
    """Names of the task-head modules in `model` (default: classifier/score/qa_outputs, where present)."""
    wanted = DEFAULT_HEADS if heads is None else tuple(heads)
    found: list[str] = []
    for name, _ in model.named_modules():
        if name and any(name == h or name.endswith("." + h) for h in wanted):
            if not any(name.startswith(f + ".") for f in found):  # keep the outermost match only
                found.append(name)
    if heads is not None:
        missing = [h for h in wanted if not any(f == h or f.endswith("." + h) for f in found)]
        if missing:
            raise ValueError(f"{type(model).__name__}: no head module named {missing}; top-level modules are "
                             f"{[n for n, _ in model.named_children()]}")
    return found


def head_parameters(model: nn.Module, heads: list[str]) -> dict[str, nn.Parameter]:
    """{full parameter name: Parameter} of the head modules (the weights stored with the adapter)."""
    return {f"{h}.{n}": p for h in heads for n, p in model.get_submodule(h).named_parameters()}


def _unique_numel(params) -> int:
    seen: dict[int, int] = {id(p): p.numel() for p in params}  # tied weights count once
    return sum(seen.values())


def add_loldu_to_transformer(model: nn.Module, targets: str | list[str] = "roberta", rank: int = 32,
                             alpha: float | None = None, init: str = "ldu",
                             heads: tuple[str, ...] | list[str] | None = None, adapter_name: str = "default",
                             all_attention: bool = False, verbose: bool = False, **config_kwargs) -> InjectionReport:
    """Inject LoLDU with a preset (or targets), freeze everything else, make the task head fully trainable."""
    config = LoLDUConfig(rank=rank, alpha=alpha, init=init, target_modules=resolve_targets(targets, all_attention),
                         **config_kwargs)
    head_names = find_heads(model, heads)
    # the head is trained in full, so its own Linear layers never get an adapter (roberta's classifier.out_proj)
    layers = [n for n in find_targets(model, config.target_modules)
              if not any(n == h or n.startswith(h + ".") for h in head_names)]
    if not layers:
        sample = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:6]
        raise ValueError(f"{type(model).__name__}: targets {config.target_modules!r} match no Linear layer outside "
                         f"the head; Linear layers look like {sample}")
    add_loldu(model, config, adapter_name, layer_names=layers)

    trainable = {id(p) for p in loldu_parameters(model, adapter_name)}
    head = head_parameters(model, head_names)
    trainable |= {id(p) for p in head.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    model._loldu_heads = {**getattr(model, "_loldu_heads", {}), adapter_name: head_names}

    loldu_ids = {id(p) for _, layer in loldu_layers(model) for p in layer.loldu_adapters.parameters()}
    ranks = [model.get_submodule(n).loldu_adapters[adapter_name].rank for n in layers]  # clamped to min(out, in)
    report = InjectionReport(
        adapter_name=adapter_name, layers=layers, heads=head_names, rank=max(ranks),
        loldu_params=count_loldu_parameters(model, adapter_name), head_params=_unique_numel(head.values()),
        base_params=_unique_numel(p for p in model.parameters() if id(p) not in loldu_ids))
    if verbose:
        print(report)
    return report


def model_fingerprint_metadata(model: nn.Module) -> dict[str, str]:
    """Metadata naming the base model (name_or_path, class, model_type); the weights check is the core fingerprint."""
    config = getattr(model, "config", None)
    meta = {"model_class": type(model).__name__}
    name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if name:
        meta["base_model"] = str(name)
    if getattr(config, "model_type", None):
        meta["model_type"] = str(config.model_type)
    return meta


def save_transformer_adapter(path: str | Path, model: nn.Module, adapter_name: str = "default",
                             heads: list[str] | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write adapter `adapter_name` plus the trained head weights (default: the heads it was injected with)."""
    if heads is None:
        heads = getattr(model, "_loldu_heads", {}).get(adapter_name, [])
    extra = {HEAD_PREFIX + k: p.detach() for k, p in head_parameters(model, list(heads)).items()}
    meta = {**model_fingerprint_metadata(model), "heads": json.dumps(list(heads)), **(metadata or {})}
    return save_loldu(path, model, adapter_name, metadata=meta, extra_tensors=extra,
                      name_prefixes={"": checkpoint_prefix(model)})


def load_transformer_adapter(path: str | Path, model: nn.Module, adapter_name: str | None = None,
                             load_heads: bool = True) -> LoadedAdapter:
    """Load an adapter (and its head weights) into `model`; refuses other base weights, leaves `model` unchanged."""
    tensors, _ = read_adapter_file(path)
    stored = "extra." + HEAD_PREFIX  # save_loldu files extra tensors under "extra."
    heads = {k[len(stored):]: v for k, v in tensors.items() if k.startswith(stored)} if load_heads else {}
    params = dict(model.named_parameters())
    for name, value in heads.items():  # check every head tensor before anything is changed
        if name not in params:
            raise LoLDUFormatError(path, f"head weight {name!r} has no place in this {type(model).__name__} "
                                   "(a model without that head?); pass load_heads=False to load the adapter alone")
        if params[name].shape != value.shape:
            raise LoLDUFormatError(path, f"head weight {name} is {tuple(value.shape)} in the file but "
                                   f"{tuple(params[name].shape)} here (different num_labels?)")
    # raises LoLDUBaseMismatchError for other base weights
    loaded = load_loldu(path, model, adapter_name, {"": checkpoint_prefix(model)})
    with torch.no_grad():
        for name, value in heads.items():
            params[name].copy_(value)
    saved_heads = json.loads(loaded.metadata.get("heads", "[]")) if load_heads else []
    model._loldu_heads = {**getattr(model, "_loldu_heads", {}), loaded.name: saved_heads}
    return loaded


__all__ = ["DEFAULT_HEADS", "InjectionReport", "add_loldu_to_transformer", "find_heads", "head_parameters",
           "load_transformer_adapter", "model_fingerprint_metadata", "resolve_targets", "save_transformer_adapter"]
