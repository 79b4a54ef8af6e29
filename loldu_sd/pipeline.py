"""Stable Diffusion pipelines as plain functions: injection, the `*_loldu*` operations, LoRA export.

Every function takes the pipeline first and touches only its models, never its class: library code calls these.
`import loldu_sd.diffusers` (the documented opt-in) attaches the same functions as methods of SD/SDXL pipelines.
"""
from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from . import model as core
from .config import LoLDUConfig, bounded_weight
from .io import LOLDU_WEIGHT_NAME, LoLDUFormatError, atomic_write, load_loldu, read_adapter_file, save_loldu
from .loading import looks_local
from .naming import checkpoint_prefixes, kohya_key, kohya_prefixes, lora_output_file
from .presets import PRESETS

# the one declaration of which pipeline models carry adapters (SD 1/2: unet + text_encoder; SDXL adds text_encoder_2)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
ADAPTED_COMPONENTS = ("unet",) + TEXT_ENCODERS

# models inside a per_prompt_adapters block: a nested block or a fuse there would render the wrong adapters
_IN_BLOCK: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def check_outside_per_prompt_block(components: Mapping[str, nn.Module], what: str) -> None:
    """A one-line ValueError when any of `components` is inside a per_prompt_adapters block."""
    if any(m in _IN_BLOCK for m in components.values()):
        raise ValueError(f"{what} inside a per_prompt_adapters block of this pipeline; leave the block first "
                         "(one block per pipeline at a time: give every prompt its mix in one list)")


@contextlib.contextmanager
def inside_per_prompt_block(components: Mapping[str, nn.Module]) -> Iterator[None]:
    """Mark `components` as inside a per_prompt_adapters block for the duration of the `with`."""
    _IN_BLOCK.update(components.values())
    try:
        yield
    finally:
        _IN_BLOCK.difference_update(components.values())


# ---- injection ----------------------------------------------------------------------------------------------------
def unet_attention_modules(unet: nn.Module) -> list[str]:
    """Names of the Attention modules that `unet.attn_processors` reports (self- and cross-attention)."""
    return [k[: -len(".processor")] for k in unet.attn_processors]


def unet_target_layers(unet: nn.Module, targets: list[str] | None = None) -> list[str]:
    """Linear layers to adapt inside the UNet's attention modules (default: to_q, to_k, to_v, to_out.0)."""
    targets = list(PRESETS["sd-unet"]) if targets is None else list(targets)
    modules = dict(unet.named_modules())
    pairs = [(t, f"{attn}.{t}") for attn in unet_attention_modules(unet) for t in targets
             if isinstance(modules.get(f"{attn}.{t}"), nn.Linear)]
    unknown = [t for t in targets if t not in {t for t, _ in pairs}]
    if unknown:  # an unknown name would otherwise be dropped silently while the file's metadata records it
        raise ValueError(f"{', '.join(map(repr, unknown))}: no such Linear layer in the UNet's attention modules "
                         f"(known: {', '.join(PRESETS['sd-unet'])}, ...)")
    return [name for _, name in pairs]


def add_loldu_to_unet(unet: nn.Module, config: LoLDUConfig, adapter_name: str = "default") -> nn.Module:
    """Wrap to_q/to_k/to_v/to_out.0 (or config.target_modules) of every UNet Attention block with adapter `name`.

    A list of targets is looked up inside the attention modules; a regex is matched against full layer names, as
    peft does. Either way the adapters follow `cross_attention_kwargs={"scale": s}`.
    """
    targets = config.target_modules
    names = None if isinstance(targets, str) else unet_target_layers(unet, targets)
    core.add_loldu(unet, config, adapter_name, layer_names=names)
    _follow_scale(unet, _cross_attention_scale)
    return unet


def add_loldu_to_text_encoder(text_encoder: nn.Module, config: LoLDUConfig, adapter_name: str = "default"
                              ) -> nn.Module:
    """Wrap q/k/v/out projections of a CLIP text encoder (or config.target_modules) with adapter `name`."""
    if config.target_modules is None or config.target_modules == PRESETS["sd-unet"]:
        config = LoLDUConfig.from_dict({**config.to_dict(), "target_modules": PRESETS["clip-text"]})
    return core.add_loldu(text_encoder, config, adapter_name)


def add_loldu_to_pipeline(pipe, config: LoLDUConfig, adapter_name: str = "default", text_encoders: bool = False
                          ) -> str:
    """Add adapter `adapter_name` to the pipeline's UNet (and text encoders): all follow the call's runtime scale."""
    add_loldu_to_unet(pipe.unet, config, adapter_name)
    if text_encoders:
        for name in TEXT_ENCODERS:
            if isinstance(getattr(pipe, name, None), nn.Module):
                add_loldu_to_text_encoder(getattr(pipe, name), config, adapter_name)
    follow_pipeline_scale(pipe)
    return adapter_name


# ---- runtime scale: one RuntimeScale per adapted model, set by a forward pre-hook --------------------------------
def _cross_attention_scale(kwargs: dict) -> float | None:
    """The UNet's runtime scale: cross_attention_kwargs["scale"], as diffusers reads it for LoRA."""
    return (kwargs.get("cross_attention_kwargs") or {}).get("scale")


def _follow_scale(module: nn.Module, read_scale) -> None:
    """During each forward of `module`, its LoLDU layers use read_scale(forward kwargs) (None: leave it as is).

    The hooks live on the model's RuntimeScale, so they go when its last LoLDU layer is removed.
    """
    scale = core.runtime_scale(module)
    if scale is None or scale.hooks:
        return
    saved: list[float] = []

    def before(_module, _args, kwargs):
        saved.append(scale.value)
        value = read_scale(kwargs)
        if value is not None:
            scale.value = bounded_weight(value, "the LoLDU/LoRA scale (cross_attention_kwargs['scale'])")

    def after(_module, _args, _kwargs, _output):
        if saved:
            scale.value = saved.pop()

    scale.hooks += [module.register_forward_pre_hook(before, with_kwargs=True),
                    module.register_forward_hook(after, with_kwargs=True, always_call=True)]


def follow_pipeline_scale(pipe) -> None:
    """The UNet follows its cross_attention_kwargs; the text encoders follow the scale of the pipeline call.

    SD and SDXL pipelines keep the call's cross_attention_kwargs on the pipeline before they encode the prompt (and
    derive lora_scale from it), so the text encoders read it there; a weak reference keeps the pipeline collectable.
    """
    comps = pipeline_components(pipe)
    if "unet" in comps:
        _follow_scale(comps["unet"], _cross_attention_scale)
    ref = weakref.ref(pipe)

    def pipeline_scale(_kwargs):
        return _cross_attention_scale({"cross_attention_kwargs": getattr(ref(), "cross_attention_kwargs", None)})

    for name in TEXT_ENCODERS:
        if name in comps:
            _follow_scale(comps[name], pipeline_scale)


def pipeline_components(pipe) -> dict[str, nn.Module]:
    """The pipeline's models that carry LoLDU adapters: {"unet", "text_encoder", "text_encoder_2"} where present."""
    return {n: getattr(pipe, n) for n in ADAPTED_COMPONENTS if isinstance(getattr(pipe, n, None), nn.Module)}


# ---- file resolution ------------------------------------------------------------------------------------------
def resolve_adapter_file(path_or_repo_id: str | os.PathLike, weight_name: str | None = None, **hub_kwargs) -> Path:
    """A local file, a directory holding the adapter, or a Hub repo id (downloaded through huggingface_hub's cache)."""
    p = Path(path_or_repo_id)
    if p.is_file():
        return p
    if p.is_dir():
        f = p / (weight_name or LOLDU_WEIGHT_NAME)
        if not f.is_file():
            raise FileNotFoundError(f"{p}: no {f.name} in this directory (pass weight_name=... to pick a file)")
        return f
    if looks_local(path_or_repo_id):
        raise FileNotFoundError(f"{path_or_repo_id}: no such adapter file or directory")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    allowed = {"revision", "subfolder", "cache_dir", "force_download", "local_files_only", "token", "proxies"}
    unknown = set(hub_kwargs) - allowed
    if unknown:
        raise TypeError(f"load_loldu_weights got unexpected keyword arguments {sorted(unknown)}")
    try:
        return Path(hf_hub_download(str(path_or_repo_id), weight_name or LOLDU_WEIGHT_NAME, **hub_kwargs))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"{path_or_repo_id}: not a local path, and {weight_name or LOLDU_WEIGHT_NAME} is not "
                                "in the Hugging Face cache (offline or unreachable Hub)") from None
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"{path_or_repo_id}: could not download the adapter from the Hub ({e})") from None


# ---- pipeline functions (the opt-in loldu_sd.diffusers attaches them as methods) -----------------------------
def save_pipeline_adapter(save_directory: str | os.PathLike, components: dict[str, nn.Module],
                          adapter_name: str = "default", base_model: str | None = None,
                          metadata: dict[str, str] | None = None, weight_name: str = LOLDU_WEIGHT_NAME) -> Path:
    """Write adapter `adapter_name` of {component: module} to save_directory/pytorch_loldu_weights.safetensors."""
    meta = {"base_model": base_model or "", **(metadata or {})}
    return save_loldu(Path(save_directory) / weight_name, components, adapter_name, metadata=meta,
                      name_prefixes=checkpoint_prefixes(components))


def load_loldu_weights(pipe, path_or_repo_id: str | os.PathLike, weight_name: str | None = None,
                       adapter_name: str | None = None, **hub_kwargs) -> str:
    """Load a LoLDU adapter (file, directory or Hub repo id) into the UNet and text encoders; returns its name."""
    path = resolve_adapter_file(path_or_repo_id, weight_name, **hub_kwargs)
    comps = pipeline_components(pipe)
    fused = any(layer.loldu_merged for _, layer in core.loldu_layers(comps))
    name = load_loldu(path, comps, adapter_name, checkpoint_prefixes(comps)).name
    follow_pipeline_scale(pipe)
    if not fused:  # like diffusers, the newly loaded adapter becomes the active one
        core.set_loldu_adapters(comps, [name])
    return name


def save_loldu_weights(pipe, save_directory: str | os.PathLike, adapter_name: str | None = None,
                       weight_name: str = LOLDU_WEIGHT_NAME) -> Path:
    """Save one adapter to save_directory/pytorch_loldu_weights.safetensors (atomic)."""
    comps = pipeline_components(pipe)
    base_model = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "")
    return save_pipeline_adapter(save_directory, comps, adapter_name or _single_adapter(comps), base_model=base_model,
                                 weight_name=weight_name)


def set_loldu_adapters(pipe, adapter_names: str | list[str], weights: float | list[float] | None = None) -> None:
    """Activate adapters with mixing weights (they are summed: sum_a w_a * delta_a)."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    for name, weight in zip(names, core.mix_weights(names, weights)):
        bounded_weight(weight, f"the weight of adapter {name!r}")
    core.set_loldu_adapters(pipeline_components(pipe), adapter_names, weights)


def get_loldu_adapters(pipe) -> dict[str, float]:
    """Active adapters and their weights."""
    return core.get_loldu_adapters(pipeline_components(pipe))


def list_loldu_adapters(pipe) -> dict[str, list[str]]:
    """All loaded adapters per component."""
    names = {c: core.loldu_adapter_names(m) for c, m in pipeline_components(pipe).items()}
    return {c: n for c, n in names.items() if n}


def delete_loldu_adapters(pipe, adapter_names: str | list[str]) -> None:
    """Delete adapters from every component (layers left empty become plain nn.Linear)."""
    core.remove_loldu(pipeline_components(pipe), adapter_names)


def fuse_loldu(pipe, scale: float = 1.0, components: list[str] | None = None,
               adapter_names: list[str] | None = None) -> None:
    """Merge active (or named) adapters into the weights: inference then costs exactly the base model."""
    every = pipeline_components(pipe)
    components = [components] if isinstance(components, str) else components
    unknown = [c for c in components or [] if c not in every]
    if unknown:
        raise ValueError(f"fuse_loldu: no component {unknown[0]!r} with LoLDU adapters here; components: "
                         f"{sorted(every)}")
    comps = {c: m for c, m in every.items() if components is None or c in components}
    scale = bounded_weight(scale, "the fuse scale")
    check_outside_per_prompt_block(every, "fuse_loldu")
    layers = [layer for m in comps.values() for _, layer in core.loldu_layers(m)]
    merged = {n for layer in layers for n in layer.loldu_merged}
    if adapter_names is None:
        wanted = list(dict.fromkeys(n for layer in layers for n in layer.loldu_active))
        if not wanted or set(wanted) <= merged:
            why = f"{', '.join(map(repr, wanted))} already fused" if wanted else "no active adapter"
            raise ValueError(f"fuse_loldu: {why}; to fuse at another scale, call unfuse_loldu() first")
    else:
        adapter_names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        loaded = {n for layer in layers for n in layer.loldu_adapters}
        for name in adapter_names:
            if name not in loaded:
                raise ValueError(f"fuse_loldu: unknown LoLDU adapter {name!r}; loaded: {sorted(loaded)}")
            if name in merged:
                raise ValueError(f"fuse_loldu: {name!r} is already fused; to fuse it at another scale, call "
                                 "unfuse_loldu() first")
    core.merge_loldu(comps, adapter_names, scale)


def unfuse_loldu(pipe) -> None:
    """Undo fuse_loldu, restoring the base weights bit-exactly."""
    core.unmerge_loldu(pipeline_components(pipe))


def unload_loldu_weights(pipe) -> None:
    """Remove every LoLDU adapter; the pipeline is the base model again, bit for bit (runtime-scale hooks included)."""
    core.remove_loldu(pipeline_components(pipe))


def export_lora_state_dict(components: dict[str, nn.Module], adapter_name: str, format: str = "diffusers",
                           dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Exact rank-r LoRA of an adapter: up = B, down = diag(sigma z - sigma0 z0) A.

    diffusers keys are those diffusers' training scripts save for a peft LoRA on the same modules (peft state dict,
    convert_state_dict_to_diffusers, save_lora_weights); kohya keys use checkpoint names (lora_te_text_model_...,
    lora_te1_/lora_te2_ on SDXL) whatever the transformers version.
    """
    if format not in ("diffusers", "kohya"):
        raise ValueError(f"format must be 'diffusers' or 'kohya', got {format!r}")
    out, peft, prefixes, kohya = {}, {}, checkpoint_prefixes(components), kohya_prefixes(components)
    for comp, module in components.items():
        for name, layer in core.loldu_layers(module):
            if adapter_name not in layer.loldu_adapters:
                continue
            a = layer.loldu_adapters[adapter_name]
            with torch.no_grad():
                up = layer.loldu_B[:, : a.rank].float().cpu()
                down = (a.diag()[:, None].cpu() * layer.loldu_A[: a.rank].float().cpu())
            if format == "diffusers":  # a peft state dict, converted below as diffusers' training scripts do
                peft.setdefault(comp, {})[f"{name}.lora_A.weight"] = down.to(dtype).contiguous()
                peft[comp][f"{name}.lora_B.weight"] = up.to(dtype).contiguous()
            else:  # kohya/A1111: checkpoint path with "_" after lora_unet_/lora_te*_, alpha = rank (scale 1)
                key = kohya_key(kohya[comp], prefixes.get(comp, "") + name)
                out[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
                out[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
                out[f"{key}.alpha"] = torch.tensor(float(a.rank), dtype=dtype)
    if peft:
        from diffusers.utils import convert_state_dict_to_diffusers

        out = {f"{comp}.{k}": v for comp, sd in peft.items() for k, v in convert_state_dict_to_diffusers(sd).items()}
    if not out:
        raise ValueError(f"no LoLDU adapter named {adapter_name!r} to export")
    return out


def export_lora(pipe, output_path: str | os.PathLike, adapter_name: str | None = None, format: str = "diffusers",
                dtype: torch.dtype = torch.float32, metadata: dict[str, str] | None = None) -> Path:
    """Write the exact LoRA equivalent of a LoLDU adapter, loadable by `pipe.load_lora_weights` / A1111 / ComfyUI.

    A path without .safetensors is a folder that gets pytorch_lora_weights.safetensors, as in diffusers. `metadata`
    adds to (or overrides) the header's format, exported_from, loldu_adapter, base_model and lora_format.
    """
    from safetensors.torch import save_file

    comps = pipeline_components(pipe)
    name = adapter_name or _single_adapter(comps)
    tensors = export_lora_state_dict(comps, name, format, dtype)
    base_model = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "")
    meta = {"format": "pt", "exported_from": "loldu", "loldu_adapter": name, "base_model": str(base_model or ""),
            "lora_format": format, **(metadata or {})}
    return atomic_write(lora_output_file(output_path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _single_adapter(comps: dict[str, nn.Module]) -> str:
    names = sorted(core.get_loldu_adapters(comps)) or sorted(core.loldu_adapter_names(comps))
    if len(names) != 1:
        raise ValueError(f"pipeline has adapters {names}; pass adapter_name=... to choose one")
    return names[0]


__all__ = ["ADAPTED_COMPONENTS", "LOLDU_WEIGHT_NAME", "LoLDUFormatError", "TEXT_ENCODERS", "add_loldu_to_pipeline",
           "add_loldu_to_text_encoder", "add_loldu_to_unet", "check_outside_per_prompt_block",
           "delete_loldu_adapters", "export_lora", "export_lora_state_dict", "follow_pipeline_scale", "fuse_loldu",
           "get_loldu_adapters", "inside_per_prompt_block", "list_loldu_adapters", "load_loldu_weights",
           "pipeline_components",
           "read_adapter_file", "resolve_adapter_file", "save_loldu_weights", "save_pipeline_adapter",
           "set_loldu_adapters", "unet_target_layers", "unfuse_loldu", "unload_loldu_weights"]
