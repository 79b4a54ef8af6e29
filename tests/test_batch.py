"""Per-sample adapters in one forward pass, shared factors on load, and the resident library (core, tiny model)."""
from __future__ import annotations

import pytest
import torch

import loldu_sd.io
import loldu_sd.layer
from loldu_sd import (
    LoLDUBaseMismatchError,
    LoLDUConfig,
    LoLDULinear,
    ResidentLibrary,
    add_loldu,
    get_loldu_adapters,
    load_loldu,
    loldu_layers,
    merge_loldu,
    per_sample_adapters,
    remove_loldu,
    save_loldu,
    set_loldu_adapters,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.0"]
MIXES = ["a", None, {"a": 0.5, "b": -1.0}, "b"]


def randomise(module, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in loldu_layers(module):
            if name in layer.loldu_adapters:
                a = layer.loldu_adapters[name]
                a.dz.copy_(0.5 * a.z0 * torch.randn(a.rank, generator=g))
                a.dsigma.fill_(-0.1 * a.sigma0)


@pytest.fixture
def net(tiny_net):
    """TinyNet with adapters a (rank 3) and b (rank 5, every target but ff.0), none active."""
    model = tiny_net()
    add_loldu(model, LoLDUConfig(rank=3, target_modules=TARGETS), "a")
    add_loldu(model, LoLDUConfig(rank=5, target_modules=TARGETS[:4]), "b")
    randomise(model, "a", 1)
    randomise(model, "b", 2)
    set_loldu_adapters(model, [])
    return model


def outputs_alone(model, x, mixes):
    """Each sample's output with its own adapters set the ordinary way, on the whole batch."""
    rows = []
    for b, mix in enumerate(mixes):
        mix = {} if mix is None else {mix: 1.0} if isinstance(mix, str) else mix
        set_loldu_adapters(model, list(mix), list(mix.values()))
        rows.append(model(x)[b])
    set_loldu_adapters(model, [])
    return torch.stack(rows)


@torch.no_grad()
def test_each_sample_gets_its_own_adapter_and_none_is_the_base_exactly(net):
    x = torch.randn(4, 7, 6)
    base = net(x)
    with per_sample_adapters(net, MIXES):
        y = net(x)
    assert torch.equal(y[1], base[1])
    torch.testing.assert_close(y, outputs_alone(net, x, MIXES), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(y[0], base[0], atol=1e-3) and not torch.allclose(y[0], y[3], atol=1e-3)


def test_leaving_restores_the_previous_state_and_training_path(net):
    set_loldu_adapters(net, ["a", "b"], [1.0, 0.3])
    x = torch.randn(4, 7, 6)
    with torch.no_grad():
        before = net(x)
        with per_sample_adapters(net, [None] * 4):
            net(x)
    assert get_loldu_adapters(net) == {"a": 1.0, "b": 0.3}
    assert all(layer.loldu_sample_diag is None for _, layer in loldu_layers(net)) and not net._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(net(x), before)


@pytest.mark.parametrize("entries, message", [
    ("a", "must be a list"),
    (["a", "nope"], "entry 1: unknown LoLDU adapter 'nope'"),
    ([{"a": float("nan")}], "weight nan of 'a' must be a finite number"),
    ([{"b": float("inf")}], "weight inf of 'b'"),
    ([3], "entry 0 is a int"),
])
def test_bad_entries_raise_one_line_and_change_nothing(net, entries, message):
    with pytest.raises(ValueError, match=message) as e:
        with per_sample_adapters(net, entries):
            pass
    assert "\n" not in str(e.value) and not net._forward_pre_hooks
    assert all(layer.loldu_sample_diag is None for _, layer in loldu_layers(net))


def test_wrong_batch_size_and_fused_adapters_are_refused(net):
    with per_sample_adapters(net, ["a", "b"]), pytest.raises(ValueError, match="2 adapter entries for a batch of 3"):
        net(torch.randn(3, 7, 6))
    set_loldu_adapters(net, ["a"])
    merge_loldu(net)
    with pytest.raises(ValueError, match="call unfuse_loldu"):
        with per_sample_adapters(net, ["a"]):
            pass


def count_decompositions(monkeypatch) -> list[int]:
    calls = [0]
    real = loldu_sd.layer.top_r_ldu

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(loldu_sd.layer, "top_r_ldu", counted)
    monkeypatch.setattr(loldu_sd.io, "top_r_ldu", counted)
    return calls


@pytest.fixture
def files(net, tmp_path):
    """Adapter files a.safetensors and b.safetensors of `net`'s base, and their number of adapted layers."""
    return {n: save_loldu(tmp_path / f"{n}.safetensors", net, n) for n in ("a", "b")}


def test_loading_more_adapters_reuses_the_shared_factors(files, tiny_net, monkeypatch):
    fresh = tiny_net()
    calls = count_decompositions(monkeypatch)
    load_loldu(files["b"], fresh)
    assert calls[0] == 4 * 2  # the first adapter of rank 5 decomposes its 8 layers
    load_loldu(files["b"], fresh, "b2")
    load_loldu(files["a"], fresh)  # rank 3 on the rank-5 layers: nested factors; ff.0 is new
    assert calls[0] == 4 * 2 + 2


@torch.no_grad()
def test_library_adapters_equal_loaded_ones_bit_for_bit(net, files, tiny_net, monkeypatch):
    library_net = tiny_net()
    calls = count_decompositions(monkeypatch)
    library = ResidentLibrary(library_net)
    assert [library.load(files[n]) for n in ("a", "b")] == ["a", "b"]
    library.load(files["a"], "a2")
    assert calls[0] == 10 + 8  # a: 10 layers at rank 3; b: rank 5 exceeds what the 8 shared layers hold
    assert library.nbytes() == 4 * (2 * 10 * 3 + 8 * 5) and not any(n for n in get_loldu_adapters(library_net))
    x = torch.randn(4, 7, 6)
    with per_sample_adapters(net, MIXES):
        expected = net(x)
    with per_sample_adapters(library_net, MIXES, library=library):
        assert torch.equal(library_net(x), expected)
    remove_loldu(library_net, [])  # unwraps the layers that carry no loaded adapter: the library's factors go
    with pytest.raises(ValueError, match="lost the library's shared factors"):
        with per_sample_adapters(library_net, MIXES, library=library):
            pass
    library.close()
    assert not list(loldu_layers(library_net)) and len(library) == 0


def test_library_refuses_other_bases_and_other_models(files, net, tiny_net):
    other = tiny_net(seed=1)
    library = ResidentLibrary(other)
    with pytest.raises(LoLDUBaseMismatchError, match="made for a different base model"):
        library.load(files["a"])
    assert len(library) == 0 and not any(isinstance(m, LoLDULinear) for m in other.modules())
    mine = ResidentLibrary(tiny_net())
    mine.load(files["a"], "c")
    with pytest.raises(ValueError, match="different base model"):
        with per_sample_adapters(net, ["c"], library=mine):
            pass
