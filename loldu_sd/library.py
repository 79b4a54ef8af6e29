"""A resident library: thousands of adapters of one base model in memory, a few kilobytes each.

Every adapter of one base shares the factors B, z0, A of each layer; what differs is the diagonal
s = sigma z - sigma0 z0 (r values per layer). The library keeps exactly that, packed into one float32 tensor per
adapter, and decomposes each layer once per rank (the first file of that rank); the shared B and A live on the
model's layers. Use any subset per batch with loldu_sd.per_sample_adapters / per_prompt_adapters(library=...).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .decompose import LDUFactors, single_threaded
from .io import _plan_load, read_adapter_file
from .layer import change_diag
from .model import _wrap_linears, components, loldu_layers, remove_loldu
from .naming import checkpoint_prefixes
from .pipeline import pipeline_components

# (component, layer name) -> (offset, rank) in an adapter's packed diagonal
Layout = dict[tuple[str, str], tuple[int, int]]


class ResidentLibrary:
    """Adapters of one base model held as packed per-layer diagonals over the model's shared factors."""

    def __init__(self, modules: nn.Module | Mapping[str, nn.Module]):
        self.components = components(modules)
        self._diags: dict[str, tuple[torch.Tensor, Layout]] = {}
        self._layouts: dict[str, Layout] = {}  # the files' layer lists, shared by adapters with the same one
        self._factors: dict[tuple, LDUFactors] = {}

    @classmethod
    def for_pipeline(cls, pipe) -> ResidentLibrary:
        """A library over a diffusers pipeline's UNet and text encoders."""
        return cls(pipeline_components(pipe))

    def names(self) -> list[str]:
        """Resident adapter names, in load order."""
        return list(self._diags)

    def __contains__(self, name: str) -> bool:
        return name in self._diags

    def __len__(self) -> int:
        return len(self._diags)

    def nbytes(self) -> int:
        """Bytes of the resident diagonals (the shared factors are the model's, counted once, not here)."""
        return sum(d.numel() * d.element_size() for d, _ in self._diags.values())

    def load(self, path: str | Path, name: str | None = None) -> str:
        """Add the adapter file at `path` (validated against the base first; nothing changes on error)."""
        path = Path(path)
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"{path}: name={name!r} names no adapter; pass a non-empty name, or None for the file's")
        tensors, meta = read_adapter_file(path)
        name = name or meta.get("adapter_name") or path.stem
        if name in self._diags:
            raise ValueError(f"{path}: adapter name {name!r} is already in the library; pass another name")
        config, plan, maps = single_threaded(lambda: _plan_load(
            path, tensors, meta, self.components, checkpoint_prefixes(self.components), cache=self._factors))
        for comp, modules in maps.items():
            layers = _wrap_linears(self.components[comp], [e[1] for e in plan if e[0] == comp], modules)
            for c, layer_name, _, _, factors in plan:
                if c == comp:
                    layers[layer_name].install_factors(factors)
        dz = torch.cat([d.float() for *_, d, _, _ in plan])
        ranks = torch.tensor([d.numel() for *_, d, _, _ in plan])
        dsigma = torch.stack([d.float() for *_, d, _ in plan]).repeat_interleave(ranks)
        z0 = torch.cat([f.z0.float().cpu() for *_, f in plan])
        # elementwise, as LoLDUAdapter.diag() computes it: a resident adapter equals a loaded one bit for bit
        diag = change_diag(dz, dsigma, z0, config.sigma0)
        self._diags[name] = (diag, self._layout(meta["layers"], plan))
        return name

    def _layout(self, key: str, plan: list) -> Layout:
        """Where each layer's values sit in the packed diagonal; one dict per distinct layer list."""
        if key not in self._layouts:
            layout, offset = {}, 0
            for comp, layer_name, z, _, _ in plan:
                layout[(comp, layer_name)] = (offset, z.numel())
                offset += z.numel()
            self._layouts[key] = layout
        return self._layouts[key]

    def diag(self, name: str, component: str, layer_name: str) -> torch.Tensor | None:
        """Adapter `name`'s diagonal at one layer, or None where the adapter does not reach it."""
        packed, layout = self._diags[name]
        where = layout.get((component, layer_name))
        return None if where is None else packed[where[0]: where[0] + where[1]]

    def remove(self, name: str) -> None:
        """Drop one resident adapter."""
        if name not in self._diags:
            raise ValueError(f"no adapter {name!r} in the library; resident: {len(self)} adapters")
        del self._diags[name]

    def check_components(self, modules: Mapping[str, nn.Module]) -> None:
        """Raise unless `modules` are this library's base model and still carry the shared factors it needs."""
        other = [c for c, m in self.components.items() if c in modules and modules[c] is not m]
        if other or not set(self.components) & set(modules):
            raise ValueError(f"the library holds adapters of a different base model (component "
                             f"{(other or sorted(self.components))[0]!r} is not this model's); build one per base")
        layers = {(c, n): layer for c, m in self.components.items() for n, layer in loldu_layers(m)}
        for layout in {id(layout): layout for _, layout in self._diags.values()}.values():
            for key, (_, rank) in layout.items():
                layer = layers.get(key)
                if layer is None or layer.loldu_B is None or layer.loldu_B.shape[1] < rank:
                    raise ValueError(f"layer {'.'.join(key).lstrip('.')} lost the library's shared factors "
                                     "(unload_loldu_weights/remove_loldu unwraps them); load the library again")

    def close(self) -> None:
        """Forget every resident adapter; layers that carry no loaded adapter become plain nn.Linear again."""
        self._diags.clear()
        self._factors.clear()
        for module in self.components.values():
            remove_loldu(module, [])


__all__ = ["ResidentLibrary"]
