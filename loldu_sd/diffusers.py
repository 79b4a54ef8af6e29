"""Stable Diffusion integration: UNet/text-encoder injection, `pipe.load_loldu_weights()` & co., LoRA export.

Importing loldu_sd attaches the LoLDULoaderMixin methods to diffusers' DiffusionPipeline, so every Stable Diffusion
pipeline (txt2img, img2img, inpaint, SD 1.x/2.x/XL) gains them. As in diffusers' LoRA loader, the instance methods
are thin: the work happens in module-level functions that take the components explicitly (the trainer uses those).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

import torch
from torch import nn

from .config import LoLDUConfig
from .io import LoadedAdapter, LoLDUFormatError, atomic_write, load_loldu, read_adapter_file, save_loldu
from .model import (
    add_loldu,
    get_loldu_adapters,
    loldu_adapter_names,
    loldu_layers,
    loldu_scale,
    merge_loldu,
    remove_loldu,
    set_loldu_adapters,
    unmerge_loldu,
)
from .presets import PRESETS

LOLDU_WEIGHT_NAME = "pytorch_loldu_weights.safetensors"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


# ---- injection ----------------------------------------------------------------------------------------------------
def unet_attention_modules(unet: nn.Module) -> list[str]:
    """Names of the Attention modules that `unet.attn_processors` reports (self- and cross-attention)."""
    return [k[: -len(".processor")] for k in unet.attn_processors]


def unet_target_layers(unet: nn.Module, targets: list[str] | None = None) -> list[str]:
    """Linear layers to adapt inside the UNet's attention modules (default: to_q, to_k, to_v, to_out.0)."""
    targets = list(PRESETS["sd-unet"]) if targets is None else list(targets)
    modules = dict(unet.named_modules())
    names = [f"{attn}.{t}" for attn in unet_attention_modules(unet) for t in targets
             if isinstance(modules.get(f"{attn}.{t}"), nn.Linear)]
    if not names:
        raise ValueError(f"none of {targets} exists in the UNet's attention modules")
    return names


def add_loldu_to_unet(unet: nn.Module, config: LoLDUConfig, adapter_name: str = "default") -> nn.Module:
    """Wrap to_q/to_k/to_v/to_out.0 (or config.target_modules) of every UNet Attention block with adapter `name`."""
    targets = config.target_modules
    if isinstance(targets, str):  # a regex: match it against the full layer names as peft does
        return add_loldu(unet, config, adapter_name)
    add_loldu(unet, config, adapter_name, layer_names=unet_target_layers(unet, targets))
    _install_scale_hook(unet)
    return unet


def add_loldu_to_text_encoder(text_encoder: nn.Module, config: LoLDUConfig, adapter_name: str = "default"
                              ) -> nn.Module:
    """Wrap q/k/v/out projections of a CLIP text encoder (or config.target_modules) with adapter `name`."""
    if config.target_modules is None or config.target_modules == PRESETS["sd-unet"]:
        config = LoLDUConfig.from_dict({**config.to_dict(), "target_modules": PRESETS["clip-text"]})
    return add_loldu(text_encoder, config, adapter_name)


def _scale_pre_hook(module, args, kwargs):
    scale = (kwargs.get("cross_attention_kwargs") or {}).get("scale", 1.0)
    module._loldu_scale_ctx = loldu_scale(module, scale)
    module._loldu_scale_ctx.__enter__()


def _scale_post_hook(module, args, kwargs, output):
    ctx = getattr(module, "_loldu_scale_ctx", None)
    if ctx is not None:
        module._loldu_scale_ctx = None
        ctx.__exit__(None, None, None)


def _install_scale_hook(unet: nn.Module) -> None:
    """Honour cross_attention_kwargs={"scale": s} as diffusers does for LoRA (the UNet pops it before attention)."""
    if "_loldu_scale_hooks" not in unet.__dict__:
        unet.__dict__["_loldu_scale_hooks"] = [
            unet.register_forward_pre_hook(_scale_pre_hook, with_kwargs=True),
            unet.register_forward_hook(_scale_post_hook, with_kwargs=True, always_call=True)]


def remove_scale_hook(unet: nn.Module) -> None:
    """Remove the UNet's runtime-scale hooks (unload_loldu_weights does): the UNet is the bare base model again."""
    for handle in unet.__dict__.pop("_loldu_scale_hooks", []):
        handle.remove()


def _text_scaled(encode_prompt):
    """Wrap a pipeline class's encode_prompt so that lora_scale=s also scales the text encoders' LoLDU adapters."""

    @functools.wraps(encode_prompt)
    def wrapper(self, *args, **kwargs):
        scale = kwargs.get("lora_scale")
        if scale is None:
            return encode_prompt(self, *args, **kwargs)
        with contextlib.ExitStack() as stack:  # loldu_scale sets (not multiplies): nested wrappers are harmless
            for module in _components(self, TEXT_ENCODERS).values():
                stack.enter_context(loldu_scale(module, scale))
            return encode_prompt(self, *args, **kwargs)

    wrapper._loldu_text_scaled = True
    return wrapper


def _wrap_encode_prompt(cls) -> None:
    fn = cls.__dict__.get("encode_prompt")
    if callable(fn) and not getattr(fn, "_loldu_text_scaled", False):
        cls.encode_prompt = _text_scaled(fn)


def _components(pipe, names=("unet",) + TEXT_ENCODERS) -> dict[str, nn.Module]:
    return {n: getattr(pipe, n) for n in names if isinstance(getattr(pipe, n, None), nn.Module)}


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
    text = str(path_or_repo_id)
    if text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1):
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


# ---- functions taking components explicitly (used by the trainer and the studio) --------------------------------
def save_pipeline_adapter(save_directory: str | os.PathLike, components: dict[str, nn.Module],
                          adapter_name: str = "default", base_model: str | None = None,
                          metadata: dict[str, str] | None = None, weight_name: str = LOLDU_WEIGHT_NAME) -> Path:
    """Write adapter `adapter_name` of {component: module} to save_directory/pytorch_loldu_weights.safetensors."""
    meta = {"base_model": base_model or "", **(metadata or {})}
    return save_loldu(Path(save_directory) / weight_name, components, adapter_name, metadata=meta)


def export_lora_state_dict(components: dict[str, nn.Module], adapter_name: str, format: str = "diffusers",
                           dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Exact rank-r LoRA of an adapter: up = B, down = diag(sigma z - sigma0 z0) A (diffusers or kohya keys)."""
    if format not in ("diffusers", "kohya"):
        raise ValueError(f"format must be 'diffusers' or 'kohya', got {format!r}")
    out = {}
    for comp, module in components.items():
        for name, layer in loldu_layers(module):
            if adapter_name not in layer.loldu_adapters:
                continue
            a = layer.loldu_adapters[adapter_name]
            with torch.no_grad():
                up = layer.loldu_B[:, : a.rank].float().cpu()
                down = (a.diag()[:, None].cpu() * layer.loldu_A[: a.rank].float().cpu())
            if format == "diffusers":  # peft-style keys that stock load_lora_weights reads
                out[f"{comp}.{name}.lora_A.weight"] = down.to(dtype).contiguous()
                out[f"{comp}.{name}.lora_B.weight"] = up.to(dtype).contiguous()
            else:  # kohya/A1111: module path with "_" and lora_unet_/lora_te_ prefixes, alpha = rank (scale 1)
                prefix = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}[comp]
                key = f"{prefix}_{name.replace('.', '_')}"
                out[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
                out[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
                out[f"{key}.alpha"] = torch.tensor(float(a.rank), dtype=dtype)
    if not out:
        raise ValueError(f"no LoLDU adapter named {adapter_name!r} to export")
    return out


def export_lora(pipe, output_path: str | os.PathLike, adapter_name: str | None = None, format: str = "diffusers",
                dtype: torch.dtype = torch.float32) -> Path:
    """Write the exact LoRA equivalent of a LoLDU adapter, loadable by `pipe.load_lora_weights` / A1111 / ComfyUI."""
    from safetensors.torch import save_file

    comps = _components(pipe)
    name = adapter_name or _single_adapter(comps)
    tensors = export_lora_state_dict(comps, name, format, dtype)
    meta = {"format": "pt", "exported_from": "loldu", "loldu_adapter": name}
    return atomic_write(output_path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _single_adapter(comps: dict[str, nn.Module]) -> str:
    active = {n for m in comps.values() for n in get_loldu_adapters(m)}
    names = sorted(active) or sorted({n for m in comps.values() for n in loldu_adapter_names(m)})
    if len(names) != 1:
        raise ValueError(f"pipeline has adapters {names}; pass adapter_name=... to choose one")
    return names[0]


# ---- the pipeline mixin ---------------------------------------------------------------------------------------
class LoLDULoaderMixin:
    """Pipeline methods mirroring diffusers' LoRA loader: load/save/set/get/delete/fuse/unfuse/unload."""

    def load_loldu_weights(self, path_or_repo_id: str | os.PathLike, weight_name: str | None = None,
                           adapter_name: str | None = None, **hub_kwargs) -> str:
        """Load a LoLDU adapter (file, directory or Hub repo id) into the UNet and text encoders; returns its name."""
        path = resolve_adapter_file(path_or_repo_id, weight_name, **hub_kwargs)
        comps = _components(self)
        fused = any(layer.loldu_merged for m in comps.values() for _, layer in loldu_layers(m))
        loaded: LoadedAdapter = load_loldu(path, comps, adapter_name)
        if "unet" in comps:
            _install_scale_hook(comps["unet"])
        if not fused:  # like diffusers, the newly loaded adapter becomes the active one
            for m in comps.values():
                if loaded.name in loldu_adapter_names(m):
                    set_loldu_adapters(m, [loaded.name])
                else:
                    for _, layer in loldu_layers(m):
                        layer.set_active([])
        return loaded.name

    def save_loldu_weights(self, save_directory: str | os.PathLike, adapter_name: str | None = None,
                           weight_name: str = LOLDU_WEIGHT_NAME) -> Path:
        """Save one adapter to save_directory/pytorch_loldu_weights.safetensors (atomic)."""
        comps = _components(self)
        name = adapter_name or _single_adapter(comps)
        comps = {c: m for c, m in comps.items() if name in loldu_adapter_names(m)}
        base_model = getattr(self, "name_or_path", None) or self.config.get("_name_or_path", "")
        return save_pipeline_adapter(save_directory, comps, name, base_model=base_model,
                                     weight_name=weight_name)

    def set_loldu_adapters(self, adapter_names: str | list[str], weights: float | list[float] | None = None) -> None:
        """Activate adapters with mixing weights (they are summed: sum_a w_a * delta_a)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        comps = _components(self)
        known = {n for m in comps.values() for n in loldu_adapter_names(m)}
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"unknown LoLDU adapter(s) {missing}; loaded: {sorted(known)}")
        if weights is None or isinstance(weights, (int, float)):
            weights = [1.0 if weights is None else float(weights)] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"got {len(weights)} weights for {len(names)} adapters")
        for m in comps.values():
            present = loldu_adapter_names(m)
            sel = [(n, w) for n, w in zip(names, weights) if n in present]
            if sel:
                set_loldu_adapters(m, [n for n, _ in sel], [w for _, w in sel])
            else:
                for _, layer in loldu_layers(m):
                    layer.set_active([])

    def get_loldu_adapters(self) -> dict[str, float]:
        """Active adapters and their weights."""
        active: dict[str, float] = {}
        for m in _components(self).values():
            active.update(get_loldu_adapters(m))
        return active

    def list_loldu_adapters(self) -> dict[str, list[str]]:
        """All loaded adapters per component."""
        return {c: loldu_adapter_names(m) for c, m in _components(self).items() if loldu_adapter_names(m)}

    def delete_loldu_adapters(self, adapter_names: str | list[str]) -> None:
        """Delete adapters from every component (layers left empty become plain nn.Linear)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        comps = _components(self)
        known = {n for m in comps.values() for n in loldu_adapter_names(m)}
        if any(n not in known for n in names):
            unknown = [n for n in names if n not in known]
            raise ValueError(f"unknown LoLDU adapter(s) {unknown}; loaded: {sorted(known)}")
        for m in comps.values():
            present = [n for n in names if n in loldu_adapter_names(m)]
            if present:
                remove_loldu(m, present)
        _remove_hooks_if_empty(self)

    def fuse_loldu(self, scale: float = 1.0, components: list[str] | None = None,
                   adapter_names: list[str] | None = None) -> None:
        """Merge active adapters into the weights: inference then costs exactly the base model."""
        for c, m in _components(self).items():
            if components is None or c in components:
                merge_loldu(m, adapter_names, scale)

    def unfuse_loldu(self) -> None:
        """Undo fuse_loldu, restoring the base weights bit-exactly."""
        for m in _components(self).values():
            unmerge_loldu(m)

    def unload_loldu_weights(self) -> None:
        """Remove every LoLDU adapter; the pipeline is the base model again, bit for bit."""
        for m in _components(self).values():
            if loldu_adapter_names(m):
                remove_loldu(m)
        _remove_hooks_if_empty(self)


def _remove_hooks_if_empty(pipe) -> None:
    """Once the last adapter is gone, take the UNet's scale hooks out too: the UNet runs bare, as loaded.

    The encode_prompt wrapper stays: without adapters it is one dict lookup, and removing it would make the text
    encoder's runtime scale depend on the order of calls.
    """
    comps = _components(pipe)
    if "unet" in comps and not any(loldu_adapter_names(m) for m in comps.values()):
        remove_scale_hook(comps["unet"])


def _attach(pipeline_utils) -> None:
    """Add the LoLDULoaderMixin methods to DiffusionPipeline, and the text-encoder runtime scale to every pipeline
    class's encode_prompt: those defined already and, through __init_subclass__, those diffusers loads later."""
    base = pipeline_utils.DiffusionPipeline
    for name, fn in vars(LoLDULoaderMixin).items():
        if callable(fn) and not name.startswith("_"):
            setattr(base, name, fn)
    if base.__dict__.get("_loldu_attached"):
        return
    own = base.__dict__.get("__init_subclass__")

    def __init_subclass__(cls, **kwargs):
        if own is not None:
            own.__func__(cls, **kwargs)
        else:
            super(base, cls).__init_subclass__(**kwargs)
        _wrap_encode_prompt(cls)

    base.__init_subclass__ = classmethod(__init_subclass__)
    base._loldu_attached = True
    todo = list(base.__subclasses__())
    while todo:
        cls = todo.pop()
        _wrap_encode_prompt(cls)
        todo.extend(cls.__subclasses__())


class _AttachOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Post-import hook: attach the methods when diffusers' pipeline_utils loads, so `import loldu_sd` stays light."""

    target = "diffusers.pipelines.pipeline_utils"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)  # find the real spec without us, then wrap its loader
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        sys.meta_path.remove(self)
        _attach(module)


def register() -> None:
    """Give every diffusers pipeline the LoLDU methods: now if diffusers is loaded, else when it loads."""
    if _AttachOnImport.target in sys.modules:
        _attach(sys.modules[_AttachOnImport.target])
    elif not any(isinstance(f, _AttachOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AttachOnImport())


__all__ = ["LOLDU_WEIGHT_NAME", "LoLDULoaderMixin", "add_loldu_to_unet", "add_loldu_to_text_encoder", "export_lora",
           "export_lora_state_dict", "register", "resolve_adapter_file", "save_pipeline_adapter",
           "unet_target_layers", "LoLDUFormatError", "read_adapter_file"]
