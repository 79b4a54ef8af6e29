"""Hostile adapter-file metadata and tensor types: one line naming the file, the model untouched."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loldu_sd import LoLDUConfig, add_loldu, get_loldu_adapters, load_loldu, loldu_adapter_names, save_loldu
from loldu_sd.io import LoLDUFormatError, read_adapter_file

DEEP = "[" * 100_000 + "]" * 100_000


def _values_key(tensors, kind):
    """The file's key of z ('loldu.z' or its change 'loldu.dz'), of sigma (likewise) or of the pivots."""
    ends = {"z": ("loldu.z", "loldu.dz"), "sigma": ("loldu.sigma", "loldu.dsigma"), "pivots": ("loldu.pivots",)}
    return next(k for k in tensors if k.endswith(ends[kind]))


def _set_sigma(tensors, layer, value):
    """Make layer `layer`'s sigma `value` (sigma0 = alpha/rank = 1 in these files)."""
    key = _values_key(tensors, "sigma")
    tensors[key][layer] = value - (1.0 if key.endswith("dsigma") else 0.0)


EDITS = {  # case: (edit of (tensors, metadata), words the one line holds)
    "version_superscript": (lambda t, m: m.update(format_version="²"), "format_version '²' is not a number"),
    "version_5000_digits": (lambda t, m: m.update(format_version="9" * 5000), "is not a number"),
    "deep_config": (lambda t, m: m.update(config=DEEP), "JSON nested too deeply"),
    "deep_layers": (lambda t, m: m.update(layers=DEEP), "JSON nested too deeply"),
    "layers_empty": (lambda t, m: m.update(layers="{}"), "layers lists no layer"),
    "component_empty": (lambda t, m: m.update(layers='{"": []}'), "layers lists a component without layers"),
    "z_int32": (lambda t, m: t.update({_values_key(t, "z"): t[_values_key(t, "z")].to(torch.int32)}),
                "is int32, not a floating-point tensor"),
    "z_bool": (lambda t, m: t.update({_values_key(t, "z"): t[_values_key(t, "z")] != 0}),
               "is bool, not a floating-point tensor"),
    "sigma_beyond_max": (lambda t, m: _set_sigma(t, 1, 6.0), "layer blocks.0.attn.to_v has sigma 6, outside (0, "
                         "sigma_max=1] of its config"),
    "sigma_negative": (lambda t, m: _set_sigma(t, 0, -0.5), "has sigma -0.5, outside (0, sigma_max=1]"),
    "pivots_float": (lambda t, m: t.update({_values_key(t, "pivots"): t[_values_key(t, "pivots")].float() + 0.4}),
                     "is float32, not an integer tensor"),
}


@pytest.fixture
def adapter(tmp_path, tiny_net):
    net = tiny_net()
    add_loldu(net, LoLDUConfig(rank=4, target_modules=["to_q", "to_v"]))
    return save_loldu(tmp_path / "adapter.safetensors", net)


@pytest.mark.parametrize("case", sorted(EDITS))
def test_hostile_metadata_and_tensor_types_are_one_line_and_change_nothing(case, adapter, tiny_net, tmp_path):
    edit, words = EDITS[case]
    with safe_open(str(adapter), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    edit(tensors, meta)
    bad = tmp_path / f"{case}.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(LoLDUFormatError) as e:
        load_loldu(bad, net)
    message = str(e.value)
    assert "\n" not in message and str(bad) in message and words in message, message
    assert loldu_adapter_names(net) == [] and get_loldu_adapters(net) == {}
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_the_untouched_file_still_loads(adapter, tiny_net):
    tensors, meta = read_adapter_file(adapter)
    assert json.loads(meta["layers"]) and load_loldu(adapter, tiny_net()) is not None


def test_an_empty_adapter_name_is_refused_not_replaced_by_the_files(adapter, tiny_net):
    net = tiny_net()
    with pytest.raises(LoLDUFormatError, match=r"adapter name '' must be a non-empty string") as e:
        load_loldu(adapter, net, adapter_name="")
    assert "\n" not in str(e.value) and loldu_adapter_names(net) == []


def test_a_file_of_no_layers_is_refused_by_the_resident_library_too(adapter, tiny_net, tmp_path):
    from loldu_sd import ResidentLibrary

    with safe_open(str(adapter), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    save_file(tensors, str(tmp_path / "empty.safetensors"), metadata={**meta, "layers": "{}"})
    library = ResidentLibrary(tiny_net())
    with pytest.raises(LoLDUFormatError, match=r"empty.safetensors: corrupted LoLDU metadata \(layers lists no layer"):
        library.load(tmp_path / "empty.safetensors")  # was: torch.cat(): expected a non-empty list
    assert len(library) == 0
    with pytest.raises(ValueError, match=r"name='' names no adapter"):
        library.load(adapter, name="")  # was: silently took the file's own name
    assert len(library) == 0


def test_a_sigma_outside_sigma_max_is_never_saved(tiny_net, tmp_path):
    net = tiny_net()
    add_loldu(net, LoLDUConfig(rank=4, target_modules=["to_q"]))
    layer = next(m for m in net.modules() if hasattr(m, "loldu_adapters"))
    with torch.no_grad():
        layer.loldu_adapters["default"].dsigma.fill_(5.0)  # sigma 6 with sigma_max 1: training never gets there
    with pytest.raises(ValueError, match=r"a.safetensors: not saved: layer .* has sigma 6, outside \(0, sigma_max=1\]"):
        save_loldu(tmp_path / "a.safetensors", net)
    assert not (tmp_path / "a.safetensors").exists()
