"""Per-sample adapters: every input of a batch with its own adapter, weighted mix, or none, in one forward pass.

All LoLDU adapters of one base share the factors B and A; only the diagonal differs. So a mixed batch costs one
(batch x R) table per layer and no extra weights:
    y[b] = W0 x[b] + bias + B (S[b] ⊙ A x[b]),   S[b] = sum_a w_ba s_a   (zero-padded to the largest rank)
A sample without an adapter gets a row of zeros: its output is the base layer's output exactly. Inside the block the
table replaces the active adapters; training code never binds one.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from numbers import Real
from typing import TYPE_CHECKING

import torch
from torch import nn

from .layer import LoLDULinear
from .model import components, loldu_adapter_names, loldu_layers

if TYPE_CHECKING:
    from .library import ResidentLibrary

Entry = str | Mapping[str, float] | None
Mix = dict[str, float]
# batch size, number of entries -> the entry index of every sample of that batch
RowPlan = Callable[[int, int], torch.Tensor]


def same_rows(batch: int, entries: int) -> torch.Tensor:
    """Sample b uses entry b: the batch must hold exactly one sample per entry."""
    if batch != entries:
        raise ValueError(f"{entries} adapter entries for a batch of {batch}; pass one entry per sample")
    return torch.arange(batch)


def normalise_entries(entries: Sequence[Entry], known: set[str]) -> list[Mix]:
    """One {name: weight} per entry (None -> {}, "a" -> {"a": 1.0}); one ValueError line for the first bad entry."""
    if isinstance(entries, (str, Mapping)) or not isinstance(entries, Sequence):
        raise ValueError("adapters must be a list with one entry per prompt (a name, a {name: weight} dict or None), "
                         f"got {type(entries).__name__}")
    mixes = []
    for i, entry in enumerate(entries):
        if entry is None:
            entry = {}
        elif isinstance(entry, str):
            entry = {entry: 1.0}
        elif not isinstance(entry, Mapping):
            raise ValueError(f"adapter entry {i} is a {type(entry).__name__}; use a name, a {{name: weight}} dict or "
                             "None (the base model)")
        for name, weight in entry.items():
            if name not in known:
                raise ValueError(f"adapter entry {i}: unknown LoLDU adapter {name!r}; loaded: {sorted(known)}")
            if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight):
                raise ValueError(f"adapter entry {i}: weight {weight!r} of {name!r} must be a finite number "
                                 "(negative weights subtract a concept)")
        mixes.append({str(n): float(w) for n, w in entry.items()})
    return mixes


def layer_table(mixes: list[Mix], diag: Callable[[str], torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """(len(mixes), R) float32 table of one layer: row b = sum_a w_ba s_a; `diag(name)` is None where a is absent."""
    diags = {n: d for n in dict.fromkeys(n for mix in mixes for n in mix) if (d := diag(n)) is not None}
    table = torch.zeros(len(mixes), max((d.numel() for d in diags.values()), default=0))
    for b, mix in enumerate(mixes):
        for name, weight in mix.items():
            if name in diags:
                table[b, : diags[name].numel()] += weight * diags[name].detach().float().cpu()
    return table.to(device)


def _diag_source(library: ResidentLibrary | None, loaded: set[str]):
    """(component, layer name, layer) -> (adapter name -> its diagonal there, or None)."""

    def source(comp: str, layer_name: str, layer: LoLDULinear) -> Callable[[str], torch.Tensor | None]:
        def diag(name: str) -> torch.Tensor | None:
            if name in loaded:
                adapter = layer.loldu_adapters[name] if name in layer.loldu_adapters else None
                return None if adapter is None else adapter.diag()
            return library.diag(name, comp, layer_name)

        return diag

    return source


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))


def _binder(tables: dict[LoLDULinear, torch.Tensor], plan: RowPlan, entries: int, what: str):
    """Forward pre-hook: give every layer the rows of its table that this call's batch needs."""
    bound: list[torch.Tensor | None] = [None]

    def hook(module, args, kwargs):
        try:
            index = plan(_first_tensor(args, kwargs).shape[0], entries)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        if bound[0] is None or not torch.equal(bound[0], index):
            for layer, table in tables.items():
                layer.loldu_sample_diag = table[index.to(table.device)]
            bound[0] = index

    return hook


@contextlib.contextmanager
def per_sample_adapters(modules: nn.Module | Mapping[str, nn.Module], entries: Sequence[Entry],
                        library: ResidentLibrary | None = None, rows: Mapping[str, RowPlan] | None = None,
                        what: str = "per_sample_adapters") -> Iterator[list[Mix]]:
    """Inside the block, sample b of each batch a module gets uses entries[b]: a name, {name: weight} or None (base).

    `modules`: a module or {component: module}; `library`: resident adapters to draw names from besides the loaded
    ones; `rows`: per component, which entry each sample of a batch uses (default: sample b uses entry b). Everything
    is checked before anything changes; leaving the block restores the previous state exactly.
    """
    comps = components(modules)
    loaded = {n for m in comps.values() for n in loldu_adapter_names(m)}
    resident = set() if library is None else set(library.names())
    both = sorted(loaded & resident)
    if both:
        raise ValueError(f"{what}: adapter {both[0]!r} is both loaded and in the library; rename or delete one")
    mixes = normalise_entries(entries, loaded | resident)
    layers = {c: list(loldu_layers(m)) for c, m in comps.items()}
    merged = [f"{c}.{n}".lstrip(".") for c, ls in layers.items() for n, layer in ls if layer.loldu_merged]
    if merged:
        raise ValueError(f"{what}: adapters are fused into {merged[0]} and others; call unfuse_loldu() first")
    if library is not None:
        library.check_components(comps)
    source = _diag_source(library, loaded)
    with torch.no_grad():
        tables = {c: {layer: layer_table(mixes, source(c, n, layer), layer.weight.device) for n, layer in ls}
                  for c, ls in layers.items()}
    hooks = []
    try:
        for c, m in comps.items():
            hook = _binder(tables[c], (rows or {}).get(c, same_rows), len(mixes), what)
            hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
        yield mixes
    finally:
        for handle in hooks:
            handle.remove()
        for ls in layers.values():
            for _, layer in ls:
                layer.loldu_sample_diag = None


__all__ = ["Entry", "Mix", "layer_table", "normalise_entries", "per_sample_adapters", "same_rows"]
