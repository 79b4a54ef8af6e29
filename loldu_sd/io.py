"""Adapter files: safetensors only, a few kilobytes, validated before anything is changed.

Layout, per component (prefix "" for a bare module, "unet." / "text_encoder." for a pipeline):
    {prefix}loldu.z            float32 (sum of ranks,)   every layer's z, concatenated in the layer order below
    {prefix}loldu.sigma        float32 (L,)
    {prefix}loldu.pivots       int16 (int32 past 32767 rows) (sum of ranks,)   rows eliminated at each step
    {prefix}loldu.fingerprint  float32 (L, 3)            (||W0||_F, sum|z0|, unit roundoff of W0's dtype)
    extra.{name}               optional extra tensors (e.g. a trained classification head)
Metadata (str -> str): format="loldu", format_version, config (JSON), layers (JSON {component: [[name, rank]...]}),
adapter_name, plus caller metadata (base model, ...). Packing per component keeps the JSON header small: the
per-layer-key alternative costs ~3x the bytes for the SD UNet (measured in eval.bench).
B, A, z0 are recomputed from the base weights on load: that is what keeps the file tiny. The pivot order makes that
recomputation follow the base rather than its bit pattern: fp32, fp16 and bf16 copies of one base eliminate the same
rows, so their factors differ only by the copies' rounding, and the fingerprint is checked with tolerances of that
size. Version 1 files (no pivot order) load where their pivot checksum still matches and are refused otherwise.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import LoLDUConfig
from .decompose import LDUFactors, fingerprint, lapack_threads, legacy_pivots, top_r_ldu, unit_roundoff
from .layer import LoLDULinear, adapter_name_problem, delta_ratio, ratio_problem
from .model import (Components, _submodules, _wrap_linears, components, get_loldu_config, loldu_adapter_names,
                    loldu_layers, loldu_value_problem, merged_adapters, remove_loldu)

FORMAT_NAME = "loldu"
FORMAT_VERSION = 2
# Base checks, relative, in units of (roundoff of the file's base + roundoff of the loaded base): ||W0|| of two
# roundings of one weight differ by at most that sum; sum|z0| moved by < 1 unit on real and tiny weights; a stored
# pivot row never loses its column to a row more than a few units larger (|multiplier| <= 1 on the source copy).
# The floors cover float32 work on identical copies.
NORM_UNITS, Z0_UNITS, MULTIPLIER_UNITS = 1.0, 8.0, 64.0
NORM_FLOOR, Z0_FLOOR, MULTIPLIER_FLOOR = 1e-6, 1e-5, 1e-4
LEGACY_CANONICAL = "float16"  # version 1 chose pivots on W0 rounded through this dtype (unless its config said None)
LOLDU_WEIGHT_NAME = "pytorch_loldu_weights.safetensors"  # the file name in an adapter directory


class LoLDUFormatError(ValueError):
    """The file is not a valid LoLDU adapter for this model."""


class LoLDUBaseMismatchError(LoLDUFormatError):
    """The adapter was made for different base weights."""


@dataclass
class LoadedAdapter:
    """What load_loldu read: the adapter name, its config, metadata and extra tensors."""

    name: str
    config: LoLDUConfig
    metadata: dict[str, str]
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _prefix(component: str) -> str:
    return f"{component}." if component else ""


def atomic_write(path: str | Path, write) -> Path:
    """Call write(tmp_path) then rename onto `path`, so a crash or full disk never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # safetensors creates 0600 files; a file we create first shows the mode the user's umask gives
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o666))
        mode = tmp.stat().st_mode & 0o777
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"{path}: could not write ({e.strerror or e}); any previous file is untouched") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def layer_values(tensors: dict[str, torch.Tensor], component: str, ranks: list[int]
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(z, sigma) of each layer of one component of an adapter file, in the file's layer order."""
    p = _prefix(component)
    return list(zip(tensors[p + "loldu.z"].split(ranks), tensors[p + "loldu.sigma"]))


def loldu_state_dict(modules: Components, adapter_name: str = "default", name_prefixes: dict[str, str] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, list[list]]]:
    """Packed tensors and layer list of one adapter, as stored in the file (layer names with `name_prefixes`)."""
    tensors, layers, name_prefixes = {}, {}, name_prefixes or {}
    for comp, module in components(modules).items():
        entries = [(n, layer.loldu_adapters[adapter_name]) for n, layer in loldu_layers(module)
                   if adapter_name in layer.loldu_adapters]
        if not entries:
            continue
        p = _prefix(comp)
        tensors[p + "loldu.z"] = torch.cat([a.z.detach().float().cpu() for _, a in entries])
        tensors[p + "loldu.sigma"] = torch.stack([a.sigma.detach().float().cpu() for _, a in entries])
        pivots = torch.cat([a.pivots.cpu() for _, a in entries])
        tensors[p + "loldu.pivots"] = pivots.to(torch.int16 if int(pivots.max()) < 2**15 else torch.int32)
        tensors[p + "loldu.fingerprint"] = torch.stack([a.fingerprint() for _, a in entries])
        layers[comp] = [[name_prefixes.get(comp, "") + n, a.rank] for n, a in entries]
    if not layers:
        raise ValueError(f"no LoLDU adapter named {adapter_name!r} to save")
    return tensors, layers


def save_loldu(path: str | Path, modules: Components, adapter_name: str = "default",
               metadata: dict[str, str] | None = None, extra_tensors: dict[str, torch.Tensor] | None = None,
               name_prefixes: dict[str, str] | None = None) -> Path:
    """Write adapter `adapter_name` of a module (or {component: module}) to a safetensors file, atomically.

    `name_prefixes` ({component: prefix}) prepends a prefix to that component's layer names in the file, so files
    carry checkpoint names where a library version names the modules without it (see loldu_sd.naming).
    """
    tensors, layers = loldu_state_dict(modules, adapter_name, name_prefixes)
    for comp in layers:
        problem = loldu_value_problem(components(modules)[comp], adapter_name)
        if problem:
            raise ValueError(f"{path}: not saved: layer {_prefix(comp)}{problem}; any previous file is untouched")
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v.detach().cpu().contiguous()
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(format=FORMAT_NAME, format_version=str(FORMAT_VERSION), adapter_name=adapter_name,
                config=get_loldu_config(modules, adapter_name).to_json(),
                layers=json.dumps(layers, separators=(",", ":")))
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoLDU safetensors file, with a one-line LoLDUFormatError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such adapter file")
    with open(path, "rb") as f:
        head = f.read(16)
    # safetensors: 8-byte header length, then '{'; that length's low byte may well be 0x80, so check '{' first
    if head[8:9] != b"{" and (head[:1] == b"\x80" or head[:2] == b"PK"):
        raise LoLDUFormatError(f"{path}: is a pickle/PyTorch checkpoint, not safetensors; LoLDU never unpickles "
                               "files (convert it with safetensors.torch.save_file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
            # only a LoLDU file's tensors are read: a multi-GB checkpoint passed by mistake is refused at once
            tensors = {k: f.get_tensor(k) for k in keys} if meta.get("format") == FORMAT_NAME else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoLDUFormatError(f"{path}: not a readable safetensors file (truncated or corrupted: {e})") from None
    if meta.get("format") != FORMAT_NAME:
        if any("lora" in k.lower() for k in keys):
            raise LoLDUFormatError(f"{path}: is a LoRA file, not a LoLDU adapter; load it with "
                                   "pipe.load_lora_weights(...) instead")
        raise LoLDUFormatError(f"{path}: not a LoLDU adapter (no format='loldu' in its metadata)")
    version = meta.get("format_version", "")
    if not (version.isascii() and version.isdigit() and len(version) <= 6):  # isdigit() alone accepts "²"
        raise LoLDUFormatError(f"{path}: corrupted LoLDU metadata (format_version {version!r} is not a number)")
    if int(version) > FORMAT_VERSION:
        raise LoLDUFormatError(f"{path}: LoLDU format version {version} is newer than this loldu-sd reads "
                               f"({FORMAT_VERSION}); upgrade loldu-sd")
    for key, tensor in tensors.items():  # values stored as int or bool, pivots as floats: truncated or misread
        if ".loldu." in f".{key}":
            whole = key.endswith("loldu.pivots")
            if tensor.is_floating_point() == whole or tensor.dtype == torch.bool or tensor.is_complex():
                raise LoLDUFormatError(f"{path}: corrupted: {key} is {str(tensor.dtype).removeprefix('torch.')}, "
                                       f"not {'an integer' if whole else 'a floating-point'} tensor")
    return tensors, meta


def _check_base(path: Path, where: str, factors: LDUFactors, stored: torch.Tensor, file_roundoff: float) -> None:
    """Refuse, with the real reason, base weights that are not a precision copy of those the adapter was made on."""
    units = file_roundoff + factors.roundoff
    mine = fingerprint(factors)
    head = f"{path}: made for a different base model: first mismatching layer {where}"
    if not math.isclose(mine[0], stored[0], rel_tol=NORM_UNITS * units + NORM_FLOOR):
        raise LoLDUBaseMismatchError(f"{head} has ||W0|| {float(mine[0]):.6g} here vs {float(stored[0]):.6g} in the "
                                     "file, more than the two copies' rounding explains")
    if not math.isclose(mine[1], stored[1], rel_tol=Z0_UNITS * units + Z0_FLOOR):
        raise LoLDUBaseMismatchError(f"{head} has sum|z0| {float(mine[1]):.6g} here vs {float(stored[1]):.6g} in the "
                                     "file, more than the two copies' rounding explains")
    multiplier = float(factors.B.abs().max())
    if not multiplier <= 1 + MULTIPLIER_UNITS * units + MULTIPLIER_FLOOR:  # NaN (0/0 at a zero pivot) fails too
        raise LoLDUBaseMismatchError(f"{head}: the file's pivot rows do not dominate their columns here (multiplier "
                                     f"{multiplier:.4g} > 1), so these are not the weights it was made on")


def _layer_pivots(path: Path, where: str, weight: torch.Tensor, rank: int, version: int, pivots: torch.Tensor | None,
                  stored: torch.Tensor, canonical: str | None) -> tuple[torch.Tensor, float]:
    """The pivot rows to force for one layer, and the unit roundoff of the base the file was made on."""
    if version >= 2:
        rows = pivots.long()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= weight.shape[0]
                             or rows.unique().numel() != rows.numel()):
            raise LoLDUFormatError(f"{path}: corrupted pivot order at {where}: rows must be distinct and below "
                                   f"{weight.shape[0]}")
        return rows, float(stored[2])
    legacy = legacy_pivots(weight, rank, canonical)
    if float(sum(k * p for k, p in enumerate(legacy.tolist(), 1))) % 16777213.0 != float(stored[2]):
        raise LoLDUFormatError(
            f"{path}: a format version 1 file made on another precision copy of this base (layer {where} pivots "
            "on other rows here); load it on the copy it was made on and re-save it with save_loldu / "
            f"pipe.save_loldu_weights to get format version {FORMAT_VERSION}, which loads on fp32, fp16 and bf16 alike")
    return legacy, unit_roundoff(getattr(torch, canonical or "float32"))


def _component_tensors(path: Path, tensors, comp: str, entries: list, version: int):
    """z, sigma, fingerprint and pivots of one component, with their shapes checked against its layer list."""
    p = _prefix(comp)
    z, sigma, fp, piv = (tensors.get(p + k) for k in ("loldu.z", "loldu.sigma", "loldu.fingerprint", "loldu.pivots"))
    n_values, n_layers = sum(int(r) for _, r in entries), len(entries)
    if (z is None or sigma is None or fp is None or z.shape != (n_values,) or sigma.shape != (n_layers,)
            or fp.shape != (n_layers, 3) or (version >= 2 and (piv is None or piv.shape != (n_values,)))):
        raise LoLDUFormatError(f"{path}: corrupted: tensors of component {comp!r} do not match its layer list")
    return z, sigma, fp, piv


def _module_name(name: str, modules: dict[str, nn.Module], prefix: str) -> str:
    """The module's own name for a layer the file calls `name` (which may carry `prefix`)."""
    if prefix and name.startswith(prefix) and name not in modules:
        return name[len(prefix):]
    return name


def _leading(factors: LDUFactors, rank: int) -> LDUFactors:
    """The top-`rank` factors inside larger ones (factors are nested)."""
    return LDUFactors(factors.B[:, :rank], factors.z0[:rank], factors.A[:rank], factors.pivots[:rank],
                      factors.weight_norm, factors.roundoff)


def _decomposition(config: LoLDUConfig) -> tuple:
    """The config fields that decide the factors: adapters agreeing on them (and on pivots) share B, z0 and A."""
    return config.factor_dtype, config.pivot_eps


def resident_factors(layer: nn.Module, config: LoLDUConfig, rank: int, pivots: torch.Tensor) -> LDUFactors | None:
    """Top-`rank` factors from an adapter already on `layer` with the same pivot rows (no decomposition), or None."""
    if not isinstance(layer, LoLDULinear):
        return None
    for a in layer.loldu_adapters.values():
        if (a.rank >= rank and _decomposition(a.config) == _decomposition(config)
                and torch.equal(a.pivots[:rank].cpu(), pivots.cpu())):
            return LDUFactors(layer.loldu_B[:, :rank], a.z0[:rank], layer.loldu_A[:rank], a.pivots[:rank],
                              a.weight_norm, a.roundoff)
    return None


def base_factors(layer: nn.Module, config: LoLDUConfig, rank: int, where: str, pivots: torch.Tensor,
                 cache: dict[tuple, LDUFactors] | None = None) -> LDUFactors:
    """Top-`rank` factors of the layer's base weight with `pivots` forced: from `cache` or the layer's adapters,
    else decomposed once."""
    key = (where, *_decomposition(config))
    known = cache.get(key) if cache is not None else None
    if known is not None and known.B.shape[1] >= rank and torch.equal(known.pivots[:rank].cpu(), pivots.cpu()):
        return _leading(known, rank)
    factors = resident_factors(layer, config, rank, pivots)
    if factors is None:
        if isinstance(layer, LoLDULinear):
            factors = layer.factorise(config, rank, where, pivots)
        else:  # decompose without wrapping: from_linear would freeze the weights of a model we may not change
            factors = top_r_ldu(layer.weight, rank, config.factor_dtype, config.pivot_eps, where, pivots)
    if cache is not None:
        cache[key] = factors
    return factors


def _layer_list_problem(layers) -> str | None:
    """Why a file's `layers` metadata is malformed (see the module docstring), or None."""
    if not isinstance(layers, dict):
        return f"layers is {type(layers).__name__}, not a JSON object"
    if not layers or [] in layers.values():  # an adapter of no layer would "load" and change nothing
        return "layers lists a component without layers" if layers else "layers lists no layer"
    for comp, entries in layers.items():
        if not isinstance(entries, list) or not all(
                isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and type(e[1]) is int and e[1] >= 1
                for e in entries):
            return f"layers of component {comp!r} are not a list of [name, positive rank] pairs"
        names = [name for name, _ in entries]
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            return f"layer {comp + '.' if comp else ''}{twice} is listed twice"
    return None


def parse_metadata(path: str | Path, meta: dict[str, str]) -> tuple[LoLDUConfig, dict[str, list[list]]]:
    """The config and layer list of an adapter file's metadata; one-line LoLDUFormatError if either is malformed."""
    try:
        config = LoLDUConfig.from_dict(json.loads(meta["config"]))
        layers = json.loads(meta["layers"])
    except RecursionError:
        raise LoLDUFormatError(f"{path}: corrupted LoLDU metadata (JSON nested too deeply)") from None
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise LoLDUFormatError(f"{path}: corrupted LoLDU metadata ({type(e).__name__}: {e})") from None
    problem = _layer_list_problem(layers)
    if problem:
        raise LoLDUFormatError(f"{path}: corrupted LoLDU metadata ({problem})")
    return config, layers


def _plan_load(path: Path, tensors, meta, comps: dict[str, nn.Module], name_prefixes: dict[str, str] | None = None,
               cache: dict[tuple, LDUFactors] | None = None):
    """Check everything against the model without changing it.

    Returns (config, [(comp, module name, z, sigma, factors)], {comp: its _submodules map}); the factors are computed
    here with the file's pivot order forced, at most once per layer and rank (`cache`: factors kept between calls,
    as base_factors takes it).
    """
    config, layers = parse_metadata(path, meta)
    raw_config = json.loads(meta["config"])  # version 1 files name their canonical dtype here
    version, canonical = int(meta["format_version"]), raw_config.get("canonical_dtype", LEGACY_CANONICAL)
    plan, maps = [], {}
    for comp, entries in layers.items():
        if comp not in comps:
            raise LoLDUFormatError(f"{path}: adapter has layers for component {comp!r}, which this model lacks "
                                   f"(have {sorted(comps)})")
        z, sigma, fp, piv = _component_tensors(path, tensors, comp, entries, version)
        if not torch.isfinite(fp).all():  # NaN compares unequal to everything: it would read as "other base model"
            raise LoLDUFormatError(f"{path}: corrupted: the base-model fingerprint of component {comp!r} holds NaN/inf")
        modules = maps[comp] = _submodules(comps[comp])
        ranks = [int(r) for _, r in entries]
        pivs = piv.split(ranks) if piv is not None else [None] * len(ranks)
        seen = set()
        for i, ((name, rank), (zi, si), pi) in enumerate(zip(entries, layer_values(tensors, comp, ranks), pivs)):
            rank = int(rank)
            where = f"{comp}.{name}" if comp else name
            name = _module_name(name, modules, (name_prefixes or {}).get(comp, ""))
            if name in seen:  # listed with and without the checkpoint prefix: one layer twice
                raise LoLDUFormatError(f"{path}: corrupted LoLDU metadata (layer {where} is listed twice)")
            seen.add(name)
            if not (torch.isfinite(zi).all() and torch.isfinite(si) and torch.isfinite(fp[i]).all()):
                raise LoLDUFormatError(f"{path}: layer {where} holds NaN/inf values; the adapter is unusable")
            layer = modules.get(name) if name else None
            if layer is None:
                raise LoLDUFormatError(f"{path}: target layer {where} does not exist in this model "
                                       "(adapter made for another architecture)")
            if not isinstance(layer, nn.Linear):
                raise LoLDUFormatError(f"{path}: target {where} is a {type(layer).__name__}, not a Linear layer")
            expected = min(config.rank, layer.in_features, layer.out_features)
            if rank != expected:
                raise LoLDUFormatError(f"{path}: rank mismatch at {where}: file has {rank}, config and layer shape "
                                       f"give {expected}")
            pivots, file_roundoff = _layer_pivots(path, where, layer.weight, rank, version, pi, fp[i], canonical)
            factors = base_factors(layer, config, rank, where, pivots, cache)
            _check_base(path, where, factors, fp[i], file_roundoff)  # first: a different base is the real reason
            if isinstance(layer, LoLDULinear) and layer.pivot_conflict(pivots):
                raise LoLDUFormatError(
                    f"{path}: layer {where} already holds adapters {list(layer.loldu_adapters)} that pivot on "
                    "other rows (made on another precision copy); load this adapter into a fresh model")
            dev = factors.B.device
            s = si.to(dev).float() * zi.to(dev).float() - config.sigma0 * factors.z0[:rank].float()
            problem = ratio_problem(float(delta_ratio(s, factors.B, factors.A, factors.weight_norm)))
            if problem:
                raise LoLDUFormatError(f"{path}: layer {where} {problem}; the adapter is unusable")
            plan.append((comp, name, zi, si, factors))
    return config, plan, maps


def load_loldu(path: str | Path, modules: Components, adapter_name: str | None = None,
               name_prefixes: dict[str, str] | None = None) -> LoadedAdapter:
    """Load an adapter file into a module (or {component: module}); on any error the model is left unchanged.

    `name_prefixes` ({component: prefix}): file layer names carrying that prefix map onto modules named without it.
    """
    path = Path(path)
    tensors, meta = read_adapter_file(path)
    comps = components(modules)
    name = (meta.get("adapter_name") or "default") if adapter_name is None else adapter_name  # "" is refused below
    problem = adapter_name_problem(name)
    if problem:
        raise LoLDUFormatError(f"{path}: adapter name {name!r} {problem}; pass adapter_name=... to load it")
    if name in loldu_adapter_names(comps):
        raise LoLDUFormatError(f"{path}: adapter name {name!r} is already loaded; pass another adapter_name "
                               "or delete that adapter first")
    fused = merged_adapters(comps)
    with lapack_threads(1):
        config, plan, maps = _plan_load(path, tensors, meta, comps, name_prefixes or {})
    try:
        layers = {comp: _wrap_linears(comps[comp], [e[1] for e in plan if e[0] == comp], modules)
                  for comp, modules in maps.items()}
        with torch.no_grad():
            for comp, layer_name, z, sigma, factors in plan:
                adapter = layers[comp][layer_name].add_adapter(name, config, factors=factors, layer_name=layer_name)
                adapter.z.copy_(z)
                adapter.sigma.copy_(sigma)
    except BaseException:  # e.g. out of memory, Ctrl-C: take back what was added, unwrap what was wrapped
        for module in comps.values():
            remove_loldu(module, [name] if name in loldu_adapter_names(module) else [])
        raise
    if fused:  # exact (factors come from the unfused W0), but easy to miss
        warnings.warn(f"{path}: adapters {fused} are fused into the weights; {name!r} is active on top of them "
                      "(unfuse first to use it alone)", stacklevel=2)
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return LoadedAdapter(name=name, config=config, metadata=meta, extra_tensors=extra)


__all__ = ["LOLDU_WEIGHT_NAME", "LoLDUFormatError", "LoLDUBaseMismatchError", "LoadedAdapter", "save_loldu",
           "load_loldu", "read_adapter_file", "parse_metadata", "loldu_state_dict", "atomic_write"]
