"""Adapter files: safetensors only, a few kilobytes, validated before anything is changed.

Layout, per component (prefix "" for a bare module, "unet." / "text_encoder." for a pipeline):
    {prefix}loldu.dz           float32 (sum of ranks,)   every layer's change dz = z - z0, in the layer order below
    {prefix}loldu.dsigma       float32 (L,)              every layer's change dsigma = sigma - sigma0
    {prefix}loldu.pivots       int16 (int32 past 32767 rows) (sum of ranks,)   rows eliminated at each step
    {prefix}loldu.fingerprint  float32 (L, 5)            decompose.FINGERPRINT_FIELDS of W0
    extra.{name}               optional extra tensors (e.g. a trained classification head)
Metadata (str -> str): format="loldu", format_version, config (JSON), layers (JSON {component: [[name, rank]...]}),
adapter_name, plus caller metadata (base model, ...). Packing per component keeps the JSON header small: the
per-layer-key alternative costs ~3x the bytes for the SD UNet (measured in eval.bench).
B, A, z0 are recomputed from the base weights on load: that is what keeps the file tiny. The pivot order makes that
recomputation follow the base rather than its bit pattern: fp32, fp16 and bf16 copies of one base eliminate the same
rows, so their factors differ only by the copies' rounding, and the fingerprint is checked with tolerances of that
size. The update sigma0 dz + dsigma z (layer.change_diag) never involves sigma0 z0, so a copy's rounding of z0 only
scales with the change. Versions 1 and 2 (absolute z and sigma) are read by loldu_sd.migration.
"""
from __future__ import annotations

import functools
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

from . import migration
from .config import LoLDUConfig
from .decompose import LDUFactors, fingerprint, leading_factors, single_threaded, top_r_ldu, unit_roundoff
from .errors import PathError
from .layer import LoLDULinear, adapter_name_problem, change_diag, delta_ratio, ratio_problem
from .model import (
    Components,
    _submodules,
    _wrap_linears,
    components,
    get_loldu_config,
    loldu_adapter_names,
    loldu_layers,
    loldu_value_problem,
    merged_adapters,
    remove_loldu,
)

FORMAT_NAME = "loldu"
FORMAT_VERSION = 3
VALUE_KEYS = {**migration.VALUE_KEYS, 3: ("loldu.dz", "loldu.dsigma")}
FINGERPRINT_COLUMNS = {**migration.FINGERPRINT_COLUMNS, 3: 5}
# Base checks, relative, in units of (roundoff of the file's base + roundoff of the loaded base): norms and the
# checksum of two roundings of one weight differ by at most that sum (times the checksum's bound); sum|z0| moved by
# < 1 unit on real and tiny weights; a stored pivot row never loses its column to a row more than a few units larger
# (|multiplier| <= 1 on the source copy). The floors cover float32 work (summation order) on identical copies.
NORM_UNITS, Z0_UNITS, MULTIPLIER_UNITS = migration.NORM_UNITS, migration.Z0_UNITS, migration.MULTIPLIER_UNITS
NORM_FLOOR, Z0_FLOOR, MULTIPLIER_FLOOR = migration.NORM_FLOOR, migration.Z0_FLOOR, migration.MULTIPLIER_FLOOR
CHECKSUM_UNITS, CHECKSUM_FLOOR = 1.0, 1e-5
# the unit roundoffs a fingerprint may name: anything else (a crafted 1e6, a negative value) is a corrupted file
KNOWN_ROUNDOFFS = {float(torch.tensor(unit_roundoff(d), dtype=torch.float32))
                   for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}
LOLDU_WEIGHT_NAME = "pytorch_loldu_weights.safetensors"  # the file name in an adapter directory


class LoLDUFormatError(PathError):
    """The file is not a valid LoLDU adapter for this model: `path` names the file, `reason` says what is wrong."""


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


def layer_values(tensors: dict[str, torch.Tensor], component: str, ranks: list[int], version: int = FORMAT_VERSION
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The stored values of each layer of one component, in the file's layer order: (dz, dsigma) in format 3,
    the absolute (z, sigma) in formats 1-2 (migration.legacy_change converts them)."""
    p = _prefix(component)
    values, scales = VALUE_KEYS[version]
    return list(zip(tensors[p + values].split(ranks), tensors[p + scales]))


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
        tensors[p + "loldu.dz"] = torch.cat([a.dz.detach().float().cpu() for _, a in entries])
        tensors[p + "loldu.dsigma"] = torch.stack([a.dsigma.detach().float().cpu() for _, a in entries])
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
    config = get_loldu_config(modules, adapter_name)
    for comp, entries in layers.items():  # what load refuses is never written
        scales = tensors[_prefix(comp) + VALUE_KEYS[FORMAT_VERSION][1]]
        problem = _scale_problem(config, FORMAT_VERSION, comp, entries, scales)
        if problem:
            raise ValueError(f"{path}: not saved: {problem}; any previous file is untouched")
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
        raise LoLDUFormatError(path, "is a pickle/PyTorch checkpoint, not safetensors; LoLDU never unpickles "
                               "files (convert it with safetensors.torch.save_file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
            # only a LoLDU file's tensors are read: a multi-GB checkpoint passed by mistake is refused at once
            tensors = {k: f.get_tensor(k) for k in keys} if meta.get("format") == FORMAT_NAME else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoLDUFormatError(path, f"not a readable safetensors file (truncated or corrupted: {e})") from None
    if meta.get("format") != FORMAT_NAME:
        if any("lora" in k.lower() for k in keys):
            raise LoLDUFormatError(path, "is a LoRA file, not a LoLDU adapter; load it with "
                                   "pipe.load_lora_weights(...) instead")
        raise LoLDUFormatError(path, "not a LoLDU adapter (no format='loldu' in its metadata)")
    version = meta.get("format_version", "")
    if not (version.isascii() and version.isdigit() and len(version) <= 6):  # isdigit() alone accepts "²"
        raise LoLDUFormatError(path, f"corrupted LoLDU metadata (format_version {version!r} is not a number)")
    if int(version) > FORMAT_VERSION:
        raise LoLDUFormatError(path, f"LoLDU format version {version} is newer than this loldu-sd reads "
                               f"({FORMAT_VERSION}); upgrade loldu-sd")
    for key, tensor in tensors.items():  # values stored as int or bool, pivots as floats: truncated or misread
        if ".loldu." in f".{key}":
            whole = key.endswith("loldu.pivots")
            if tensor.is_floating_point() == whole or tensor.dtype == torch.bool or tensor.is_complex():
                raise LoLDUFormatError(path, f"corrupted: {key} is {str(tensor.dtype).removeprefix('torch.')}, "
                                       f"not {'an integer' if whole else 'a floating-point'} tensor")
    return tensors, meta


def _base_mismatch(path: Path, head: str, what: str, here: float, stored: float) -> LoLDUBaseMismatchError:
    return LoLDUBaseMismatchError(path, f"{head} has {what} {here:.6g} here vs {stored:.6g} in the file, more than "
                                        "the two copies' rounding explains")


def _check_base(path: Path, where: str, factors: LDUFactors, stored: torch.Tensor, file_roundoff: float,
                version: int, weight: torch.Tensor) -> None:
    """Refuse, with the real reason, base weights that are not a precision copy of those the adapter was made on."""
    units = file_roundoff + factors.roundoff
    head = f"made for a different base model: first mismatching layer {where}"
    if version < 3:
        migration.check_legacy_base(head, factors, stored, units, weight,
                                    functools.partial(LoLDUBaseMismatchError, path))
    else:
        mine = fingerprint(factors).tolist()
        theirs = stored.tolist()
        if not math.isclose(mine[0], theirs[0], rel_tol=NORM_UNITS * units + NORM_FLOOR):
            raise _base_mismatch(path, head, "a weight scale", mine[0], theirs[0])
        if not math.isclose(mine[1], theirs[1], rel_tol=Z0_UNITS * units + Z0_FLOOR):
            raise _base_mismatch(path, head, "sum|z0|", mine[1], theirs[1])
        if not abs(mine[3] - theirs[3]) <= (CHECKSUM_UNITS * units + CHECKSUM_FLOOR) * factors.checksum_bound:
            raise _base_mismatch(path, head, "a row checksum (sign- and row-order-sensitive)", mine[3], theirs[3])
        if not math.isclose(mine[4], theirs[4], rel_tol=Z0_UNITS * units + Z0_FLOOR):
            raise _base_mismatch(path, head, "a first pivot", mine[4], theirs[4])
    multiplier = factors.max_multiplier
    if not multiplier <= 1 + MULTIPLIER_UNITS * units + MULTIPLIER_FLOOR:  # NaN (0/0 at a zero pivot) fails too
        raise LoLDUBaseMismatchError(path, f"{head}: the file's pivot rows do not dominate their columns here "
                                           f"(multiplier {multiplier:.4g} > 1), so these are not the weights it was "
                                           "made on")


def _file_roundoff(path: Path, where: str, value: float) -> float:
    """The unit roundoff a fingerprint names, if it is one of a float dtype's: it sets the base check's tolerance."""
    if value not in KNOWN_ROUNDOFFS:
        raise LoLDUFormatError(path, f"corrupted base-model fingerprint at {where}: roundoff {value:g} is not the "
                               "unit roundoff of fp64, fp32, fp16 or bf16")
    return value


def _layer_pivots(path: Path, where: str, weight: torch.Tensor, rank: int, version: int, pivots: torch.Tensor | None,
                  stored: torch.Tensor, canonical: str | None) -> tuple[torch.Tensor, float]:
    """The pivot rows to force for one layer, and the unit roundoff of the base the file was made on."""
    if version == 1:
        return migration.legacy_layer_pivots(path, where, weight, rank, stored, canonical,
                                             functools.partial(LoLDUFormatError, path), FORMAT_VERSION)
    rows = pivots.long()
    listed = rows.tolist()  # a few dozen ints: plain Python checks them without tensor ops
    if listed and (min(listed) < 0 or max(listed) >= weight.shape[0] or len(set(listed)) != len(listed)):
        raise LoLDUFormatError(path, f"corrupted pivot order at {where}: rows must be distinct and below "
                               f"{weight.shape[0]}")
    return rows, _file_roundoff(path, where, float(stored[2]))


def _component_tensors(path: Path, tensors, comp: str, entries: list, version: int):
    """Values, scales, fingerprint and pivots of one component, with their shapes checked against its layer list."""
    p = _prefix(comp)
    z, sigma, fp, piv = (tensors.get(p + k) for k in (*VALUE_KEYS[version], "loldu.fingerprint", "loldu.pivots"))
    n_values, n_layers = sum(int(r) for _, r in entries), len(entries)
    if (z is None or sigma is None or fp is None or z.shape != (n_values,) or sigma.shape != (n_layers,)
            or fp.shape != (n_layers, FINGERPRINT_COLUMNS[version])
            or (version >= 2 and (piv is None or piv.shape != (n_values,)))):
        raise LoLDUFormatError(path, f"corrupted: tensors of component {comp!r} do not match its layer list")
    return z, sigma, fp, piv


def _module_name(name: str, modules: dict[str, nn.Module], prefix: str) -> str:
    """The module's own name for a layer the file calls `name` (which may carry `prefix`)."""
    if prefix and name.startswith(prefix) and name not in modules:
        return name[len(prefix):]
    return name


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
                              a.weight_norm, a.roundoff, a.checksum, a.checksum_bound, a.max_multiplier)
    return None


def base_factors(layer: nn.Module, config: LoLDUConfig, rank: int, where: str, pivots: torch.Tensor,
                 cache: dict[tuple, LDUFactors] | None = None) -> LDUFactors:
    """Top-`rank` factors of the layer's base weight with `pivots` forced: from `cache` or the layer's adapters,
    else decomposed once."""
    key = (where, *_decomposition(config))
    known = cache.get(key) if cache is not None else None
    if known is not None and known.B.shape[1] >= rank and torch.equal(known.pivots[:rank].cpu(), pivots.cpu()):
        return leading_factors(known, rank)
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
        raise LoLDUFormatError(path, "corrupted LoLDU metadata (JSON nested too deeply)") from None
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise LoLDUFormatError(path, f"corrupted LoLDU metadata ({type(e).__name__}: {e})") from None
    problem = _layer_list_problem(layers)
    if problem:
        raise LoLDUFormatError(path, f"corrupted LoLDU metadata ({problem})")
    return config, layers


@dataclass
class _FileView:
    """What every layer of one load needs from the file."""

    path: Path
    config: LoLDUConfig
    version: int
    canonical: str | None  # format 1's pivot dtype
    finite: bool = False  # the current component's values are all finite (checked once, not per layer)


def _plan_layer(f: _FileView, where: str, layer: nn.Module, rank: int, values: tuple, stored: torch.Tensor,
                pivots: torch.Tensor | None, cache: dict | None) -> tuple[torch.Tensor, torch.Tensor, LDUFactors]:
    """(dz, dsigma, factors) of one layer, checked against this model without changing it."""
    path, config = f.path, f.config
    if not f.finite and not (torch.isfinite(values[0]).all() and torch.isfinite(values[1])):
        raise LoLDUFormatError(path, f"layer {where} holds NaN/inf values; the adapter is unusable")
    if not isinstance(layer, nn.Linear):
        raise LoLDUFormatError(path, f"target {where} is a {type(layer).__name__}, not a Linear layer")
    expected = min(config.rank, layer.in_features, layer.out_features)
    if rank != expected:
        raise LoLDUFormatError(path, f"rank mismatch at {where}: file has {rank}, config and layer shape "
                               f"give {expected}")
    weight = base_weight(layer)
    pivots, file_roundoff = _layer_pivots(path, where, weight, rank, f.version, pivots, stored, f.canonical)
    factors = base_factors(layer, config, rank, where, pivots, cache)
    _check_base(path, where, factors, stored, file_roundoff, f.version, weight)  # first: the real reason
    if isinstance(layer, LoLDULinear) and layer.pivot_conflict(pivots):
        raise LoLDUFormatError(
            path, f"layer {where} already holds adapters {list(layer.loldu_adapters)} that pivot on "
            "other rows (made on another precision copy); load this adapter into a fresh model")
    dz, dsigma = values if f.version >= 3 else migration.legacy_change(*values, factors.z0, config.sigma0)
    s = change_diag(dz.to(factors.z0.device), dsigma.to(factors.z0.device), factors.z0, config.sigma0)
    problem = ratio_problem(float(delta_ratio(s, factors.B, factors.A, factors.weight_norm)))
    if problem:
        raise LoLDUFormatError(path, f"layer {where} {problem}; the adapter is unusable")
    return dz, dsigma, factors


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight W0 of a Linear or LoLDU layer (unmerged)."""
    original = getattr(layer, "_loldu_original_weight", None)
    return layer.weight if original is None else original


def _scale_problem(config: LoLDUConfig, version: int, comp: str, entries: list, stored: torch.Tensor
                   ) -> str | None:
    """Why a finite sigma lies outside (0, sigma_max] of the adapter's own config (eq. 11), or None."""
    if config.sigma_max is None:
        return None
    sigma = stored.double() + (config.sigma0 if version >= 3 else 0.0)  # format 3 stores dsigma = sigma - sigma0
    bad = torch.isfinite(sigma) & ((sigma <= 0) | (sigma > config.sigma_max * (1 + 1e-5)))  # NaN: said per layer
    if not bool(bad.any()):
        return None
    i = int(bad.nonzero()[0])
    where = f"{comp}.{entries[i][0]}" if comp else entries[i][0]
    return f"layer {where} has sigma {float(sigma[i]):.6g}, outside (0, sigma_max={config.sigma_max:g}] of its config"


def _plan_load(path: Path, tensors, meta, comps: dict[str, nn.Module], name_prefixes: dict[str, str] | None = None,
               cache: dict[tuple, LDUFactors] | None = None):
    """Check everything against the model without changing it.

    Returns (config, [(comp, module name, dz, dsigma, factors)], {comp: its _submodules map}); the factors are
    computed here with the file's pivot order forced, at most once per layer and rank (`cache`: factors kept between
    calls, as base_factors takes it). Files of formats 1-2 come out as the change they apply (loldu_sd.migration).
    """
    config, layers = parse_metadata(path, meta)
    raw_config = json.loads(meta["config"])  # version 1 files name their canonical dtype here
    f = _FileView(path, config, int(meta["format_version"]),
                  raw_config.get("canonical_dtype", migration.LEGACY_CANONICAL))
    plan, maps = [], {}
    for comp, entries in layers.items():
        if comp not in comps:
            raise LoLDUFormatError(path, f"adapter has layers for component {comp!r}, which this model lacks "
                                   f"(have {sorted(comps)})")
        z, sigma, fp, piv = _component_tensors(path, tensors, comp, entries, f.version)
        if not torch.isfinite(fp).all():  # NaN compares unequal to everything: it would read as "other base model"
            raise LoLDUFormatError(path, f"corrupted: the base-model fingerprint of component {comp!r} holds NaN/inf")
        problem = _scale_problem(config, f.version, comp, entries, sigma)  # training never leaves the bound
        if problem:
            raise LoLDUFormatError(path, f"corrupted: {problem}")
        f.finite = bool(torch.isfinite(z).all() and torch.isfinite(sigma).all())  # else each layer looks: names it
        modules = maps[comp] = _submodules(comps[comp])
        ranks = [int(r) for _, r in entries]
        pivs = piv.split(ranks) if piv is not None else [None] * len(ranks)
        seen = set()
        for i, ((name, rank), values, pi) in enumerate(zip(entries, layer_values(tensors, comp, ranks, f.version),
                                                           pivs)):
            where = f"{comp}.{name}" if comp else name
            name = _module_name(name, modules, (name_prefixes or {}).get(comp, ""))
            if name in seen:  # listed with and without the checkpoint prefix: one layer twice
                raise LoLDUFormatError(path, f"corrupted LoLDU metadata (layer {where} is listed twice)")
            seen.add(name)
            layer = modules.get(name) if name else None
            if layer is None:
                raise LoLDUFormatError(path, f"target layer {where} does not exist in this model "
                                       "(adapter made for another architecture)")
            plan.append((comp, name, *_plan_layer(f, where, layer, int(rank), values, fp[i], pi, cache)))
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
        raise LoLDUFormatError(path, f"adapter name {name!r} {problem}; pass adapter_name=... to load it")
    if name in loldu_adapter_names(comps):
        raise LoLDUFormatError(path, f"adapter name {name!r} is already loaded; pass another adapter_name "
                               "or delete that adapter first")
    fused = merged_adapters(comps)
    config, plan, maps = single_threaded(lambda: _plan_load(path, tensors, meta, comps, name_prefixes or {}))
    try:
        layers = {comp: _wrap_linears(comps[comp], [e[1] for e in plan if e[0] == comp], modules)
                  for comp, modules in maps.items()}
        with torch.no_grad():
            for comp, layer_name, dz, dsigma, factors in plan:
                adapter = layers[comp][layer_name].add_adapter(name, config, factors=factors, layer_name=layer_name)
                adapter.dz.copy_(dz)
                adapter.dsigma.copy_(dsigma)
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
