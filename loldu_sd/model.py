"""Functional API over any nn.Module (minLoRA style): add, merge, unmerge, remove, project, select adapters."""
from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .config import LoLDUConfig
from .decompose import LDUFactors, single_threaded, top_r_ldu
from .layer import LoLDULinear, RuntimeScale, check_adapter_name, ratio_problem

Components = nn.Module | Mapping[str, nn.Module | None]  # a model, or a pipeline's named models


def components(modules: Components) -> dict[str, nn.Module]:
    """{component name: module}: {"": module} for one model, the non-None entries of a mapping otherwise."""
    return {"": modules} if isinstance(modules, nn.Module) else {k: v for k, v in modules.items() if v is not None}


def _matches(name: str, targets: list[str] | str) -> bool:
    """peft convention: a string is a full-match regex, a list holds name suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(module: nn.Module, targets: list[str] | str) -> list[str]:
    """Names of the nn.Linear submodules of `module` matched by `targets`."""
    # nn.MultiheadAttention reads out_proj.weight directly and never calls the layer: an adapter there does nothing
    skip = {f"{n}.out_proj" if n else "out_proj" for n, m in module.named_modules()
            if isinstance(m, nn.MultiheadAttention)}
    return [n for n, m in module.named_modules()
            if isinstance(m, nn.Linear) and n and n not in skip and _matches(n, targets)]


def _submodules(root: nn.Module) -> dict[str, nn.Module]:
    """Every submodule by every name it has: one walk, then O(1) lookups (get_submodule walks the path each time)."""
    return dict(root.named_modules(remove_duplicate=False))


def _replace_modules(root: nn.Module, new: dict[str, nn.Module], modules: dict[str, nn.Module] | None = None) -> None:
    """Put new[name] in place of each named submodule of `root` (`modules`: a _submodules map to reuse)."""
    modules = _submodules(root) if modules is None else modules
    for name, module in new.items():
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else root, child, module)


def _wrap_linears(root: nn.Module, names: list[str], modules: dict[str, nn.Module]) -> dict[str, LoLDULinear]:
    """The LoLDULinear at each name of `root`, wrapping (in place) the plain nn.Linear ones; `modules`: _submodules.

    New layers share the runtime scale of the layers `root` already has, so the model keeps one scale object.
    """
    scale = next((m.loldu_runtime_scale for m in modules.values() if isinstance(m, LoLDULinear)), None)
    scale = RuntimeScale() if scale is None else scale
    wrapped = {n: LoLDULinear.from_linear(modules[n], scale) for n in names if not isinstance(modules[n], LoLDULinear)}
    if wrapped:
        _replace_modules(root, wrapped, modules)
    return {n: wrapped.get(n, modules[n]) for n in names}


def loldu_layers(modules: Components) -> Iterator[tuple[str, LoLDULinear]]:
    """(name, layer) for every LoLDU layer in a module, or in each of a mapping's ("component.name")."""
    for comp, module in components(modules).items():
        for name, m in module.named_modules():
            if isinstance(m, LoLDULinear):
                yield (f"{comp}.{name}" if comp else name), m


def runtime_scale(module: nn.Module) -> RuntimeScale | None:
    """The runtime scale object that the LoLDU layers of `module` read (None without LoLDU layers)."""
    return next((layer.loldu_runtime_scale for _, layer in loldu_layers(module)), None)


def add_loldu(module: nn.Module, config: LoLDUConfig, adapter_name: str = "default",
              layer_names: list[str] | None = None) -> nn.Module:
    """Add adapter `adapter_name` to the Linear layers of `module` that `config.target_modules` names (in place)."""
    if layer_names is None:
        if config.target_modules is None:
            raise ValueError("LoLDUConfig.target_modules is None: name the Linear layers to adapt (or use a preset)")
        layer_names = find_targets(module, config.target_modules)
        if not layer_names:
            sample = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)][:8]
            raise ValueError(f"target_modules={config.target_modules!r} matched no nn.Linear layer; "
                             f"Linear layers here look like {sample}")
    check_adapter_name(adapter_name)
    if any(adapter_name in layer.loldu_adapters for _, layer in loldu_layers(module)):
        raise ValueError(f"adapter {adapter_name!r} already exists; pick another name or delete it first")
    modules = _submodules(module)
    missing = [name for name in layer_names if name not in modules]
    if missing:
        raise ValueError(f"no submodule named {missing[0]!r} in this {type(module).__name__}")
    factors = _new_factors(modules, layer_names, config)  # before any change: a failure leaves the model as it was
    for name, layer in _wrap_linears(module, layer_names, modules).items():
        layer.add_adapter(adapter_name, config, factors=factors[name], layer_name=name)
    return module


def _new_factors(modules: dict[str, nn.Module], layer_names: list[str], config: LoLDUConfig) -> dict[str, LDUFactors]:
    """The factors a new adapter of each named layer needs (what add_adapter would compute), on one torch thread."""
    def factorise(name: str) -> LDUFactors:
        layer = modules[name]
        rank = min(config.rank, layer.in_features, layer.out_features)
        if isinstance(layer, LoLDULinear):  # keep the held row order and rank: other adapters share them
            current = 0 if layer.loldu_B is None else layer.loldu_B.shape[1]
            return layer.factorise(config, max(rank, current), name, layer.loldu_pivots)
        return top_r_ldu(layer.weight, rank, config.factor_dtype, config.pivot_eps, name)

    return single_threaded(lambda: {name: factorise(name) for name in layer_names})


def loldu_parameters(module: Components, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The LoLDU tensors to train (the changes dz, and dsigma unless the config freezes it) of one adapter or all.

    Chosen by the adapter's config, not by `requires_grad`: freezing the surrounding model must not hide them.
    """
    return [p for _, layer in loldu_layers(module) for n, a in layer.loldu_adapters.items()
            if adapter_name in (None, n) for p in ([a.dz, a.dsigma] if a.config.train_sigma else [a.dz])]


def loldu_adapter_names(module: Components) -> list[str]:
    """Names of the adapters present in `module`, in insertion order."""
    names: dict[str, None] = {}
    for _, layer in loldu_layers(module):
        names.update(dict.fromkeys(layer.loldu_adapters))
    return list(names)


def get_loldu_config(module: Components, adapter_name: str) -> LoLDUConfig:
    """The config adapter `adapter_name` was created with."""
    for _, layer in loldu_layers(module):
        if adapter_name in layer.loldu_adapters:
            return layer.loldu_adapters[adapter_name].config
    raise KeyError(f"no LoLDU adapter named {adapter_name!r}; present: {loldu_adapter_names(module)}")


def project_loldu_(module: Components) -> None:
    """Projected gradient descent: clamp sigma and z of every adapter into their bounds (after optimizer.step())."""
    for _, layer in loldu_layers(module):
        for adapter in layer.loldu_adapters.values():
            adapter.project_()


def loldu_value_problem(module: Components, adapter_name: str | None = None) -> str | None:
    """'layer (adapter) <problem>' for the first adapter whose values are NaN/inf or absurdly large; None if none."""
    entries = [(f"{n} ({a})", ratio) for n, layer in loldu_layers(module) for a, ratio in layer.adapter_ratios().items()
               if adapter_name in (None, a)]
    if not entries:
        return None
    ratios = torch.stack([r for _, r in entries]).cpu().tolist()  # one device sync for all layers
    for (where, _), ratio in zip(entries, ratios):
        problem = ratio_problem(ratio)
        if problem:
            return f"{where} {problem}"
    return None


def merged_adapters(module: Components) -> list[str]:
    """Names of the adapters merged (fused) into some layer's weight, sorted."""
    return sorted({n for _, layer in loldu_layers(module) for n in layer.loldu_merged})


def check_not_merged(module: Components, action: str) -> None:
    """RuntimeError naming the merged (fused) adapters: `action` would mix fused and unfused state silently."""
    merged = merged_adapters(module)
    if merged:
        raise RuntimeError(merged_message(merged, action))


def merged_message(merged: list[str], action: str) -> str:
    """The error check_not_merged raises."""
    return f"adapters {merged} are merged (fused) into the weights; unmerge before {action} (pipelines: unfuse_loldu())"


def _check_names(module: Components, names: list[str]) -> None:
    present = loldu_adapter_names(module)
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f"unknown LoLDU adapter(s) {missing}; present: {present}")


def finite_float(value: float, what: str) -> float:
    """`value` as a float, or a one-line ValueError naming `what` when it is not a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return number


def mix_weights(names: list[str], weights: float | list[float] | None) -> list[float]:
    """One finite weight per adapter name (default 1.0); a name given twice is refused rather than overwritten."""
    if weights is None or not isinstance(weights, (list, tuple)):
        weights = [1.0 if weights is None else weights] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"got {len(weights)} weights for {len(names)} adapters")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"adapter(s) {twice} given twice; give each once with its weight")
    return [finite_float(w, f"the weight of adapter {n!r}") for n, w in zip(names, weights)]


def set_loldu_adapters(module: Components, names: str | list[str], weights: float | list[float] | None = None) -> None:
    """Make `names` the active adapters, each with a mixing weight (default 1.0)."""
    names = [names] if isinstance(names, str) else list(names)
    weights = mix_weights(names, weights)
    layers = layer_objects(module)  # one walk serves the checks and the switch
    present = list(dict.fromkeys(n for layer in layers for n in layer.loldu_adapters))
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f"unknown LoLDU adapter(s) {missing}; present: {present}")
    merged = sorted({n for layer in layers for n in layer.loldu_merged})
    if merged:  # checked first: no half-switched model
        raise RuntimeError(merged_message(merged, "changing the active adapters"))
    for layer in layers:
        layer.set_active(names, weights, missing_ok=True)


def layer_objects(modules: Components) -> list[LoLDULinear]:
    """Every LoLDU layer of a model (or of a mapping's models), in one walk that builds no names."""
    found: list[LoLDULinear] = []
    seen: set[int] = set()
    stack = list(components(modules).values())[::-1]
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        if isinstance(m, LoLDULinear):
            found.append(m)  # its children are its adapters: nothing to find below
            continue
        children = list(m._modules.values())  # one list, no generator per module: few allocations, no GC pauses
        children.reverse()
        stack += children
    return found


def get_loldu_adapters(module: Components) -> dict[str, float]:
    """Active adapters and their mixing weights."""
    active: dict[str, float] = {}
    for _, layer in loldu_layers(module):
        active.update({n: layer.loldu_adapters[n].mix_weight for n in layer.loldu_active})
    return active


def merge_loldu(module: Components, adapter_names: list[str] | None = None, scale: float = 1.0) -> None:
    """Fuse the active (or named) adapters into the base weights; inference then costs exactly the base."""
    scale = finite_float(scale, "the fuse scale")
    for _, layer in loldu_layers(module):
        layer.merge(None if adapter_names is None else [n for n in adapter_names if n in layer.loldu_adapters], scale)


def unmerge_loldu(module: Components) -> None:
    """Undo every merge, restoring the base weights bit-exactly."""
    for _, layer in loldu_layers(module):
        layer.unmerge()


def remove_loldu(module: Components, adapter_names: str | list[str] | None = None) -> Components:
    """Delete adapters (default all); layers left with none become plain nn.Linear again, W0 untouched."""
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    if adapter_names is not None:
        _check_names(module, adapter_names)
    for root in components(module).values():
        _remove_from(root, adapter_names)
    return module


def _remove_from(root: nn.Module, adapter_names: list[str] | None) -> None:
    """remove_loldu for one model; the last layer to go takes the hooks that drive its runtime scale along."""
    unwrapped, scale = {}, runtime_scale(root)
    for name, layer in list(loldu_layers(root)):
        for n in list(layer.loldu_adapters) if adapter_names is None else adapter_names:
            if n in layer.loldu_adapters:
                layer.delete_adapter(n)
        if not layer.loldu_adapters:
            unwrapped[name] = layer.to_linear()
    if unwrapped:
        _replace_modules(root, unwrapped)
    if scale is not None and runtime_scale(root) is None:
        scale.release()


@contextlib.contextmanager
def loldu_scale(module: Components, scale: float):
    """Temporarily multiply every unmerged adapter's delta by `scale` (like LoRA's cross_attention_kwargs scale)."""
    scale = finite_float(scale, "the LoLDU/LoRA scale")
    scales = list({id(layer.loldu_runtime_scale): layer.loldu_runtime_scale for _, layer in loldu_layers(module)}
                  .values())
    old = [s.value for s in scales]
    for s in scales:
        s.value = scale
    try:
        yield module
    finally:
        for s, value in zip(scales, old):
            s.value = value


def count_loldu_parameters(module: Components, adapter_name: str | None = None) -> int:
    """Number of trainable LoLDU values: (r+1) per adapted layer, r with sigma frozen."""
    return sum(p.numel() for p in loldu_parameters(module, adapter_name))


@torch.no_grad()
def cast_loldu_parameters(module: Components, dtype: torch.dtype = torch.float32) -> None:
    """Keep trainable z/sigma in `dtype` (fp32) after casting the frozen model to fp16/bf16 for mixed precision."""
    for p in loldu_parameters(module):
        p.data = p.data.to(dtype)
