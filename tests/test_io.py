"""Adapter files: round trip, size and metadata, every bad input (one-line error, model untouched), atomic saves."""
from __future__ import annotations

import errno
import json
import os
import pickle
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import loldu_sd.io
from loldu_sd import (
    LoLDUBaseMismatchError,
    LoLDUConfig,
    LoLDUFormatError,
    LoLDULinear,
    add_loldu,
    get_loldu_adapters,
    load_loldu,
    loldu_adapter_names,
    remove_loldu,
    save_loldu,
    set_loldu_adapters,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.0"]


def randomise(module, adapter_name):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, LoLDULinear) and adapter_name in m.loldu_adapters:
                a = m.loldu_adapters[adapter_name]
                a.dz.copy_(0.5 * a.z0 * torch.randn(a.rank))
                a.dsigma.fill_(-0.1 * a.sigma0)


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def rewrite(src, dst, edit):
    """Copy an adapter file, letting edit(tensors, metadata) change it on the way."""
    tensors, meta = read(src)
    edit(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def snapshot(module):
    """Everything a failed load must leave alone."""
    return ({k: v.clone() for k, v in module.state_dict().items()}, {n: type(m) for n, m in module.named_modules()},
            [p.requires_grad for p in module.parameters()], loldu_adapter_names(module), get_loldu_adapters(module))


def assert_unchanged(module, snap):
    state, types, grads, names, active = snapshot(module)
    assert state.keys() == snap[0].keys() and all(torch.equal(state[k], snap[0][k]) for k in state)
    assert (types, grads, names, active) == snap[1:]


def check_error(excinfo, path, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)


@pytest.fixture
def saved(tmp_path, tiny_net):
    """(trained net, adapter path, input, its output): adapter 'default' of rank 4 over 10 layers."""
    net = tiny_net()
    add_loldu(net, LoLDUConfig(rank=4, target_modules=TARGETS))
    randomise(net, "default")
    x = torch.randn(2, 5, 6)
    path = save_loldu(tmp_path / "adapter.safetensors", net, metadata={"base_model": "tiny-seed0"})
    return net, path, x, net(x).detach()


@pytest.fixture
def target(tiny_net):
    """The same base (seed 0) carrying another trained adapter 'other', as a load target."""
    net = tiny_net()
    add_loldu(net, LoLDUConfig(rank=3, target_modules=["to_q", "ff.2"]), "other")
    randomise(net, "other")
    return net


# ---- round trip, size, metadata -------------------------------------------------------------------------------------
def test_save_remove_load_restores_identical_outputs(saved):
    net, path, x, y = saved
    remove_loldu(net)
    assert not any(isinstance(m, LoLDULinear) for m in net.modules())
    loaded = load_loldu(path, net)
    assert loaded.name == "default" and loaded.metadata["base_model"] == "tiny-seed0"
    assert loaded.config.to_dict() == LoLDUConfig(rank=4, target_modules=TARGETS).to_dict()
    assert torch.equal(net(x), y)


def test_save_remove_add_load_into_fresh_model(saved, tiny_net):
    _, path, x, y = saved
    fresh = tiny_net()
    add_loldu(fresh, LoLDUConfig(rank=3, target_modules=["to_q", "to_v"]), "other")  # another adapter first
    load_loldu(path, fresh)
    set_loldu_adapters(fresh, "default")
    assert torch.equal(fresh(x), y)
    # under another name, next to the first copy
    load_loldu(path, fresh, adapter_name="copy")
    set_loldu_adapters(fresh, "copy")
    assert torch.equal(fresh(x), y)
    # next to a larger-rank adapter the nested factors come from a rank-6 LU: equal up to rounding
    bigger = tiny_net()
    add_loldu(bigger, LoLDUConfig(rank=6, target_modules=["to_q", "to_v"]), "other")
    load_loldu(path, bigger)
    set_loldu_adapters(bigger, "default")
    torch.testing.assert_close(bigger(x), y, rtol=1e-5, atol=1e-6)


def test_loads_onto_fp16_copy_of_the_base_without_warnings(saved, tiny_net):
    _, path, x, y = saved
    half = tiny_net(dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_loldu(path, half)
    torch.testing.assert_close(half(x.half()).float(), y, rtol=2e-2, atol=2e-2)


# ---- portability: the file's pivot order makes every precision copy of the base factor alike -----------------------
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def near_tie_net(dtype=torch.float32):
    """Two layers; the first pivots on row 1 in fp32 and fp16 but on row 0 in bf16 (1.002 rounds to 1.0 there)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 16))
    with torch.no_grad():
        net[0].weight[0, 0], net[0].weight[1, 0] = 1.0, 1.002
    return net.to(dtype)


def updates(module) -> dict[str, torch.Tensor]:
    """B diag(s) A of every LoLDU layer, in float32."""
    return {n: layer.delta_weight().detach() for n, layer in loldu_sd.loldu_layers(module)}


def assert_updates_match(made, loaded, weights, made_dtype, loaded_dtype, units):
    """Each layer's update on the copy matches the source's within `units` roundings of the coarser dtype."""
    u = max(torch.finfo(d).eps / 2 for d in (made_dtype, loaded_dtype))
    for name, delta in made.items():
        err = float((loaded[name] - delta).norm() / weights[name].float().norm())
        assert err <= units * u, (name, made_dtype, loaded_dtype, err / u)


@pytest.mark.parametrize("made_dtype", DTYPES)
def test_adapter_made_on_any_precision_loads_on_every_copy(made_dtype, tmp_path):
    net = near_tie_net(made_dtype)
    add_loldu(net, LoLDUConfig(rank=8, target_modules=["0", "2"]))
    randomise(net, "default")
    path = save_loldu(tmp_path / "a.safetensors", net)
    made, weights = updates(net), {n: m.weight for n, m in loldu_sd.loldu_layers(net)}
    for loaded_dtype in DTYPES:
        copy = near_tie_net(loaded_dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_loldu(path, copy)
        assert torch.equal(copy[0].loldu_adapters["default"].pivots, net[0].loldu_adapters["default"].pivots)
        assert_updates_match(made, updates(copy), weights, made_dtype, loaded_dtype, units=8)


def test_rows_swapped_base_with_the_same_norm_is_refused(saved, tiny_net):
    _, path, _, _ = saved
    net = tiny_net()
    with torch.no_grad():  # same ||W0||, but the file's pivot rows no longer dominate their columns here
        w = net.blocks[0].attn.to_k.weight
        w.copy_(w.flip(0))
    snap = snapshot(net)
    with pytest.raises(LoLDUBaseMismatchError) as excinfo:
        load_loldu(path, net)
    check_error(excinfo, path, "different base model", "first mismatching layer blocks.0.attn.to_k")
    assert_unchanged(net, snap)


def small_update_net(dtype, seed=0):
    """Three 48x40 layers of a seeded base (the same weights rounded to `dtype`)."""
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(*(torch.nn.Linear(40, 48) for _ in range(3)))
    with torch.no_grad():
        for m in net:
            m.weight.copy_(torch.randn(48, 40, generator=g) / 40**0.5)
    return net.to(dtype)


@pytest.mark.parametrize("rank,dz_std,dsigma", [(8, 0.02, 0.0), (40, 0.02, 0.0), (40, 0.3, -0.2), (8, 1e-4, -1e-3)])
def test_update_made_on_fp32_keeps_its_own_size_on_fp16_and_bf16_copies(rank, dz_std, dsigma, tmp_path):
    """The error is relative to the update itself (not to ||W0||): small trained changes survive a cast."""
    net = small_update_net(torch.float32)
    add_loldu(net, LoLDUConfig(rank=rank, target_modules=r"\d+"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in loldu_sd.loldu_layers(net):
            a = layer.loldu_adapters["default"]
            a.dz.copy_(dz_std * torch.randn(a.rank, generator=g))  # as a few training steps move z
            a.dsigma.fill_(dsigma)
    path = save_loldu(tmp_path / "a.safetensors", net)
    made = updates(net)
    for dtype, bound in ((torch.float16, 0.005), (torch.bfloat16, 0.02)):
        copy = small_update_net(dtype)
        load_loldu(path, copy)
        for name, delta in updates(copy).items():
            err = float((delta - made[name]).norm() / made[name].norm())
            assert err <= bound, (dtype, name, err)


def edited_base(tiny_net, edit):
    """The tiny net with one edit applied to blocks.0.attn.to_k's weight."""
    net = tiny_net()
    with torch.no_grad():
        w = net.blocks[0].attn.to_k.weight
        w.copy_(edit(w.clone()))
    return net


@pytest.mark.parametrize("edit", ["negated", "non_pivot_rows_swapped", "rows_permuted"])
def test_negated_or_permuted_base_is_refused(edit, saved, tiny_net):
    net0, path, _, _ = saved
    pivots = set(net0.blocks[0].attn.to_k.loldu_adapters["default"].pivots.tolist())
    free = [i for i in range(net0.blocks[0].attn.to_k.out_features) if i not in pivots]

    def swap_free(w):  # two rows that are not pivots: z0, ||W0|| and the multipliers stay as they were
        w[[free[0], free[1]]] = w[[free[1], free[0]]]
        return w

    edits = {"negated": lambda w: -w, "non_pivot_rows_swapped": swap_free,
             "rows_permuted": lambda w: w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))]}
    net = edited_base(tiny_net, edits[edit])
    snap = snapshot(net)
    with pytest.raises(LoLDUBaseMismatchError) as excinfo:
        load_loldu(path, net)
    check_error(excinfo, path, "different base model", "first mismatching layer blocks.0.attn.to_k")
    assert_unchanged(net, snap)


@pytest.mark.parametrize("roundoff", [1e6, -2.0**-24, 0.3])
def test_a_crafted_fingerprint_tolerance_is_refused(roundoff, saved, tiny_net, tmp_path):
    """The roundoff column sets the base check's tolerance: only a float dtype's own unit roundoff is believed."""
    _, src, _, _ = saved
    path = rewrite(src, tmp_path / "crafted.safetensors", lambda t, m: t["loldu.fingerprint"][:, 2].fill_(roundoff))
    net = edited_base(tiny_net, lambda w: -w)  # the base check would have to catch this
    snap = snapshot(net)
    with pytest.raises(LoLDUFormatError) as excinfo:
        load_loldu(path, net)
    check_error(excinfo, path, "corrupted base-model fingerprint", "roundoff", "fp32")
    assert_unchanged(net, snap)


def test_layer_holding_another_pivot_order_refuses_a_second_adapter(tmp_path):
    made = near_tie_net(torch.bfloat16)  # pivots on row 0
    add_loldu(made, LoLDUConfig(rank=4, target_modules=["0"]))
    path = save_loldu(tmp_path / "bf16.safetensors", made)
    net = near_tie_net()
    add_loldu(net, LoLDUConfig(rank=4, target_modules=["0"]), "own")  # pivots on row 1
    snap = snapshot(net)
    with pytest.raises(LoLDUFormatError) as excinfo:
        load_loldu(path, net)
    check_error(excinfo, path, "layer 0 already holds adapters ['own']", "fresh model")
    assert_unchanged(net, snap)


V1_FILE = Path(__file__).parent / "data" / "adapter_v1.safetensors"  # written by loldu-sd 35802f6 (format 1)


def test_version_1_file_loads_where_its_pivots_still_hold():
    for dtype in (torch.float32, torch.float16):  # v1 chose pivots on the panel rounded through fp16
        net = near_tie_net(dtype)
        loaded = load_loldu(V1_FILE, net)
        x, y = loaded.extra_tensors["x"], loaded.extra_tensors["y"]
        # v1 factorised W0 rounded through fp16; version 2 factorises W0 itself, in the same order
        torch.testing.assert_close(net(x.to(dtype)).float(), y, rtol=1e-2, atol=1e-2)


def test_version_1_file_on_a_copy_that_pivots_differently_asks_to_re_save():
    net = near_tie_net(torch.bfloat16)
    snap = snapshot(net)
    with pytest.raises(LoLDUFormatError) as excinfo:
        load_loldu(V1_FILE, net)
    check_error(excinfo, V1_FILE, "format version 1", "layer 0", "re-save",
                f"format version {loldu_sd.io.FORMAT_VERSION}")
    assert_unchanged(net, snap)


V2_FILES = {dtype: Path(__file__).parent / "data" / f"adapter_v2_{tag}.safetensors"  # written by loldu-sd 56878fb
            for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))}


@pytest.mark.parametrize("made", list(V2_FILES))
def test_version_2_file_loads_as_it_did(made):
    for dtype in (made, torch.float32):  # on the copy it was made on, and on fp32
        net = near_tie_net(dtype)
        loaded = load_loldu(V2_FILES[made], net)
        extra = loaded.extra_tensors
        if dtype == made:  # the same base copy: the update and the output the writing version gave
            for i in (0, 2):
                torch.testing.assert_close(net[i].delta_weight(), extra[f"delta_{i}"], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(net(extra["x"].to(dtype)).float(), extra["y"], rtol=1e-6, atol=1e-6)


def test_file_is_kilobytes_with_documented_metadata(tmp_path):
    net = torch.nn.Sequential(*(torch.nn.Linear(48, 40) for _ in range(20)))
    cfg = LoLDUConfig(rank=32, target_modules=r"\d+")
    add_loldu(net, cfg)
    path = save_loldu(tmp_path / "a.safetensors", net)
    size = os.path.getsize(path)
    assert size < 7_500, size  # 20 x 32 z + 20 x 32 pivots + 20 sigma + 20 x 5 fingerprint + JSON header
    tensors, meta = read(path)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == {
        "loldu.dz": (torch.float32, (640,)), "loldu.dsigma": (torch.float32, (20,)),
        "loldu.pivots": (torch.int16, (640,)), "loldu.fingerprint": (torch.float32, (20, 5))}
    assert meta["format"] == "loldu" and meta["format_version"] == str(loldu_sd.io.FORMAT_VERSION)
    assert meta["adapter_name"] == "default"
    assert LoLDUConfig.from_dict(json.loads(meta["config"])) == cfg
    assert json.loads(meta["layers"]) == {"": [[str(i), 32] for i in range(20)]}


def test_header_length_ending_in_0x80_is_not_mistaken_for_pickle(saved, tmp_path):
    net, _, x, y = saved
    for pad in range(0, 256, 8):  # find a header whose length's low byte is 0x80, the pickle magic
        path = save_loldu(tmp_path / "b.safetensors", net, metadata={"pad": "x" * pad})
        if struct.unpack("<Q", path.read_bytes()[:8])[0] % 256 == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length ending in 0x80")
    remove_loldu(net)
    load_loldu(path, net)
    assert torch.equal(net(x), y)


def test_save_unknown_adapter_is_refused(saved, tmp_path):
    net = saved[0]
    with pytest.raises(ValueError, match="no LoLDU adapter named 'nope'"):
        save_loldu(tmp_path / "x.safetensors", net, "nope")
    assert not (tmp_path / "x.safetensors").exists()


# ---- bad input: one clear line naming the file, model untouched ------------------------------------------------------
def _edit_rank(tensors, meta):
    """Consistent file (z length matches) whose second layer claims rank 3 instead of the config's 4."""
    layers = json.loads(meta["layers"])
    assert layers[""][1] == ["blocks.0.attn.to_k", 4]
    layers[""][1][1] = 3
    meta["layers"] = json.dumps(layers)
    for key in ("loldu.dz", "loldu.pivots"):
        tensors[key] = torch.cat([tensors[key][:7], tensors[key][8:]])


def make_bad_file(case: str, tmp, src):
    """Write the bad input `case` under tmp (src: a good adapter file) and return its path."""
    path = tmp / f"{case}.safetensors"
    if case == "lora_peft":
        save_file({k: torch.randn(4, 8) for k in ("unet.up.to_q.lora_A.weight", "unet.up.to_q.lora_B.weight")}, path)
    elif case == "lora_kohya":
        save_file({"lora_unet_up_to_q.lora_down.weight": torch.randn(4, 8), "lora_unet_up_to_q.alpha": torch.ones(())},
                  path)
    elif case == "other_safetensors":
        save_file({"weight": torch.randn(3)}, path, metadata={"format": "pt"})
    elif case == "truncated":
        path.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    elif case == "truncated_tail":
        path.write_bytes(src.read_bytes()[:-4])
    elif case == "garbage":
        path.write_bytes(bytes(torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(3)).tolist()))
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "rank_mismatch":
        rewrite(src, path, _edit_rank)
    elif case == "bad_pivots":
        rewrite(src, path, lambda t, m: t["loldu.pivots"].__setitem__(0, 999))
    elif case == "no_pivots":
        rewrite(src, path, lambda t, m: t.pop("loldu.pivots"))
    elif case == "layers_vs_tensors":  # layer list edited alone: z no longer matches it
        rewrite(src, path, lambda t, m: m.update(layers=m["layers"].replace("4]", "5]", 1)))
    elif case == "bad_metadata_json":
        rewrite(src, path, lambda t, m: m.update(config="{oops"))
    elif case == "target_missing":
        rename = "blocks.1.attn.to_v", "blocks.1.attn.to_x"
        rewrite(src, path, lambda t, m: m.update(layers=m["layers"].replace(*rename)))
    elif case == "nan_z":  # z[8:12] belongs to the third layer
        rewrite(src, path, lambda t, m: t["loldu.dz"].__setitem__(9, float("nan")))
    elif case == "inf_sigma":
        rewrite(src, path, lambda t, m: t["loldu.dsigma"].__setitem__(4, float("inf")))
    elif case == "huge_z":  # finite, but 1e30 x the base weight: NaN images
        rewrite(src, path, lambda t, m: t["loldu.dz"].__setitem__(9, 1e30))
    elif case == "duplicate_layer":  # the first layer listed twice, z and sigma grown to match
        def twice(t, m):
            layers = json.loads(m["layers"])
            layers[""].append(layers[""][0])
            m["layers"] = json.dumps(layers)
            t["loldu.dz"], t["loldu.dsigma"] = torch.cat([t["loldu.dz"], t["loldu.dz"][:4]]), torch.cat(
                [t["loldu.dsigma"], t["loldu.dsigma"][:1]])
            t["loldu.fingerprint"] = torch.cat([t["loldu.fingerprint"], t["loldu.fingerprint"][:1]])
        rewrite(src, path, twice)
    elif case in ("layers_null", "layers_abc", "layer_list_null"):
        text = {"layers_null": "null", "layers_abc": '"abc"', "layer_list_null": '{"": null}'}[case]
        rewrite(src, path, lambda t, m: m.update(layers=text))
    elif case == "rank_word":
        rewrite(src, path, lambda t, m: m.update(layers=m["layers"].replace(",4]", ',"thirty"]', 1)))
    elif case == "config_rank_word":
        rewrite(src, path, lambda t, m: m.update(config=m["config"].replace('"rank":4', '"rank":"thirty"')))
    elif case in ("name_dot", "name_keys"):
        rewrite(src, path, lambda t, m: m.update(adapter_name={"name_dot": "a.b", "name_keys": "keys"}[case]))
    elif case == "nan_fingerprint":
        rewrite(src, path, lambda t, m: t["loldu.fingerprint"].__setitem__((2, 0), float("nan")))
    elif case == "newer_version":
        rewrite(src, path, lambda t, m: m.update(format_version="99"))
    elif case == "no_version":
        rewrite(src, path, lambda t, m: m.pop("format_version"))
    elif case == "directory":
        return tmp
    return path  # "missing": never written


BAD_FILES = {  # case: (error, words its message must hold)
    "lora_peft": (LoLDUFormatError, ["LoRA", "load_lora_weights"]),
    "lora_kohya": (LoLDUFormatError, ["LoRA", "load_lora_weights"]),
    "other_safetensors": (LoLDUFormatError, ["not a LoLDU adapter"]),
    "truncated": (LoLDUFormatError, ["truncated or corrupted"]),
    "truncated_tail": (LoLDUFormatError, ["truncated or corrupted"]),
    "garbage": (LoLDUFormatError, ["safetensors"]),
    "empty": (LoLDUFormatError, ["safetensors"]),
    "rank_mismatch": (LoLDUFormatError, ["rank mismatch at blocks.0.attn.to_k", "file has 3"]),
    "bad_pivots": (LoLDUFormatError, ["corrupted pivot order", "blocks.0.attn.to_q"]),
    "no_pivots": (LoLDUFormatError, ["corrupted", "do not match its layer list"]),
    "layers_vs_tensors": (LoLDUFormatError, ["corrupted"]),
    "bad_metadata_json": (LoLDUFormatError, ["corrupted LoLDU metadata"]),
    "target_missing": (LoLDUFormatError, ["target layer blocks.1.attn.to_x does not exist"]),
    "nan_z": (LoLDUFormatError, ["layer blocks.0.attn.to_v", "NaN/inf"]),
    "inf_sigma": (LoLDUFormatError, ["layer blocks.0.ff.0", "NaN/inf"]),
    "huge_z": (LoLDUFormatError, ["layer blocks.0.attn.to_v", "x ||W0||", "NaN/inf outputs"]),
    "duplicate_layer": (LoLDUFormatError, ["layer blocks.0.attn.to_q is listed twice"]),
    "layers_null": (LoLDUFormatError, ["corrupted LoLDU metadata", "layers is NoneType"]),
    "layers_abc": (LoLDUFormatError, ["corrupted LoLDU metadata", "layers is str"]),
    "layer_list_null": (LoLDUFormatError, ["corrupted LoLDU metadata", "[name, positive rank] pairs"]),
    "rank_word": (LoLDUFormatError, ["corrupted LoLDU metadata", "[name, positive rank] pairs"]),
    "config_rank_word": (LoLDUFormatError, ["corrupted LoLDU metadata", "rank must be a positive integer"]),
    "name_dot": (LoLDUFormatError, ["adapter name 'a.b' must not contain '.'", "adapter_name="]),
    "name_keys": (LoLDUFormatError, ["adapter name 'keys' is reserved"]),
    "nan_fingerprint": (LoLDUFormatError, ["fingerprint", "NaN/inf"]),
    "newer_version": (LoLDUFormatError, ["version 99 is newer", "upgrade"]),
    "no_version": (LoLDUFormatError, ["format_version '' is not a number"]),
    "missing": (FileNotFoundError, ["no such adapter file"]),
    "directory": (FileNotFoundError, ["no such adapter file"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_raise_one_line_and_leave_model_unchanged(case, saved, target, tmp_path):
    error, words = BAD_FILES[case]
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    path = make_bad_file(case, bad_dir, saved[1])
    snap = snapshot(target)
    with pytest.raises(error) as excinfo:
        load_loldu(path, target)
    check_error(excinfo, path, *words)
    assert_unchanged(target, snap)


def test_other_base_model_is_refused_naming_first_mismatching_layer(saved, target, tiny_net):
    _, path, _, _ = saved
    for net, first in ((tiny_net(seed=1), "blocks.0.attn.to_q"), (target, "blocks.1.attn.to_v")):
        if net is target:  # same base except one layer
            with torch.no_grad():
                target.blocks[1].attn.to_v.weight.mul_(1.1)
        snap = snapshot(net)
        with pytest.raises(LoLDUBaseMismatchError) as excinfo:
            load_loldu(path, net)
        assert isinstance(excinfo.value, LoLDUFormatError)
        check_error(excinfo, path, "different base model", f"first mismatching layer {first}")
        assert_unchanged(net, snap)


def test_missing_layer_in_a_smaller_model(saved, tiny_net):
    _, path, _, _ = saved
    net = tiny_net(n_blocks=1)
    snap = snapshot(net)
    with pytest.raises(LoLDUFormatError) as excinfo:
        load_loldu(path, net)
    check_error(excinfo, path, "blocks.1.attn.to_q does not exist")
    assert_unchanged(net, snap)


def test_adapter_name_already_loaded(saved, target):
    _, path, _, _ = saved
    load_loldu(path, target)
    snap = snapshot(target)
    with pytest.raises(LoLDUFormatError) as excinfo:
        load_loldu(path, target)
    check_error(excinfo, path, "'default' is already loaded")
    with pytest.raises(LoLDUFormatError):
        load_loldu(path, target, adapter_name="other")
    assert_unchanged(target, snap)


@pytest.mark.parametrize("how", ["zip", "legacy", "protocol0"])
def test_pickle_files_are_refused_and_never_unpickled(how, saved, target, tmp_path, monkeypatch):
    net, _, _, _ = saved
    path = tmp_path / "adapter.safetensors"  # a pickle disguised by its name
    state = net.state_dict()
    if how == "zip":
        torch.save(state, path)
    elif how == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps({"z": [1.0, 2.0]}, protocol=0))

    def forbidden(*args, **kwargs):
        raise AssertionError("something tried to unpickle the adapter file")

    for obj, name in ((pickle, "Unpickler"), (pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(obj, name, forbidden)
    snap = snapshot(target)
    with pytest.raises(LoLDUFormatError) as excinfo:
        load_loldu(path, target)
    check_error(excinfo, path, *(["pickle", "never unpickles"] if how != "protocol0" else ["safetensors"]))
    assert_unchanged(target, snap)


# ---- atomic saves ---------------------------------------------------------------------------------------------------
def test_full_disk_leaves_previous_file_intact(saved, monkeypatch):
    net, path, _, _ = saved
    before = path.read_bytes()
    real = loldu_sd.io.save_file

    def half_then_enospc(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = open(filename, "rb").read()
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(loldu_sd.io, "save_file", half_then_enospc)
    randomise(net, "default")  # the new save would differ
    with pytest.raises(OSError) as excinfo:
        save_loldu(path, net)
    assert excinfo.value.errno == errno.ENOSPC
    check_error(excinfo, path, "could not write", "No space left")
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]  # no temp file left behind


def test_overwrite_replaces_file_without_leftovers(saved):
    net, path, x, _ = saved
    randomise(net, "default")
    y = net(x).detach()
    save_loldu(path, net)
    assert os.listdir(path.parent) == [path.name]
    remove_loldu(net)
    load_loldu(path, net)
    assert torch.equal(net(x), y)


# ---- names, values and interrupted loads ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a.b", "keys", "training", ""])
def test_unusable_adapter_names_are_refused_before_any_layer_is_wrapped(name, saved, target):
    _, path, _, _ = saved
    snap = snapshot(target)
    with pytest.raises(ValueError, match="adapter name") as excinfo:
        load_loldu(path, target, adapter_name=name or None) if name else add_loldu(
            target, LoLDUConfig(rank=2, target_modules=TARGETS), name)
    assert "\n" not in str(excinfo.value)
    with pytest.raises(ValueError, match="adapter name"):
        add_loldu(target, LoLDUConfig(rank=2, target_modules=TARGETS), name)
    assert_unchanged(target, snap)


def test_a_load_interrupted_midway_takes_back_every_layer_it_wrapped(saved, target, monkeypatch):
    _, path, _, _ = saved
    real, calls = LoLDULinear.add_adapter, []

    def fail_on_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LoLDULinear, "add_adapter", fail_on_third)
    snap = snapshot(target)
    with pytest.raises(KeyboardInterrupt):
        load_loldu(path, target)
    assert_unchanged(target, snap)
    monkeypatch.undo()
    load_loldu(path, target)  # and the same load then works
    assert "default" in loldu_adapter_names(target)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_nan_inf_or_absurd_values_are_never_saved(value, saved):
    net, path, _, _ = saved
    before = path.read_bytes()
    with torch.no_grad():
        net.blocks[1].attn.to_k.loldu_adapters["default"].dz[0] = value
    with pytest.raises(ValueError, match=r"not saved: layer blocks\.1\.attn\.to_k \(default\)") as excinfo:
        save_loldu(path, net)
    check_error(excinfo, path, "previous file is untouched")
    assert path.read_bytes() == before and os.listdir(path.parent) == [path.name]


def test_ctrl_c_during_a_save_leaves_the_previous_file_and_no_temp(saved, monkeypatch):
    net, path, _, _ = saved
    before = path.read_bytes()

    def interrupted(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(loldu_sd.io, "save_file", interrupted)
    randomise(net, "default")
    with pytest.raises(KeyboardInterrupt):
        save_loldu(path, net)
    assert path.read_bytes() == before and os.listdir(path.parent) == [path.name]
