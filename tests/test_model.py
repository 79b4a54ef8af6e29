"""Functional API over a module: target matching, named adapters (mixing, scale, delete, remove), merge/unmerge."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from loldu_sd import (
    LoLDUConfig,
    LoLDULinear,
    add_loldu,
    count_loldu_parameters,
    find_targets,
    get_loldu_adapters,
    loldu_adapter_names,
    loldu_parameters,
    loldu_scale,
    merge_loldu,
    project_loldu_,
    remove_loldu,
    set_loldu_adapters,
    unmerge_loldu,
)

ATTN = [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("to_q", "to_k", "to_v", "to_out.0")]


def randomise(module: nn.Module, adapter_name: str, scale: float = 0.5) -> None:
    """Move z and sigma of one adapter away from their init, so that it changes the outputs."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, LoLDULinear) and adapter_name in m.loldu_adapters:
                a = m.loldu_adapters[adapter_name]
                a.dz.copy_(scale * a.z0 * torch.randn(a.rank))
                a.dsigma.fill_(-0.1 * a.sigma0)


def types(module: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in module.named_modules()}


# ---- target matching ------------------------------------------------------------------------------------------------
def test_suffix_targets_match_whole_name_components(tiny_net):
    net = tiny_net()
    assert find_targets(net, ["to_q", "to_k", "to_v", "to_out.0"]) == ATTN
    assert find_targets(net, ["ff.0"]) == ["blocks.0.ff.0", "blocks.1.ff.0"]
    assert find_targets(net, ["q", "out.0", "attn"]) == []  # no partial-component or non-Linear matches
    add_loldu(net, LoLDUConfig(rank=2, target_modules=["to_q", "to_out.0"]))
    wrapped = sorted(n for n, m in net.named_modules() if isinstance(m, LoLDULinear))
    assert wrapped == ["blocks.0.attn.to_out.0", "blocks.0.attn.to_q", "blocks.1.attn.to_out.0", "blocks.1.attn.to_q"]
    assert all(isinstance(m, nn.Linear) for m in net.modules() if isinstance(m, LoLDULinear))


def test_regex_targets_full_match(tiny_net):
    net = tiny_net()
    assert find_targets(net, r"blocks\.\d+\.attn\.to_[qkv]") == [n for n in ATTN if "to_out" not in n]
    assert find_targets(net, r"blocks\.1\..*") == [n for n in ATTN if n.startswith("blocks.1")] + [
        "blocks.1.ff.0", "blocks.1.ff.2"]
    assert find_targets(net, "to_q") == []  # a string is a full-match regex, not a suffix


@pytest.mark.parametrize("targets", [["to_x"], "to_q", r"nothing\..*"])
def test_no_match_lists_linear_layers(targets, tiny_net):
    net = tiny_net()
    with pytest.raises(ValueError, match=r"matched no nn\.Linear layer.*proj_in.*blocks\.0\.attn\.to_q"):
        add_loldu(net, LoLDUConfig(rank=2, target_modules=targets))
    assert not any(isinstance(m, LoLDULinear) for m in net.modules())
    with pytest.raises(ValueError, match="target_modules is None"):
        add_loldu(net, LoLDUConfig(rank=2))


def test_duplicate_adapter_name_is_refused_and_changes_nothing(tiny_net):
    net = tiny_net()
    add_loldu(net, LoLDUConfig(rank=2, target_modules=["to_q"]))
    before = types(net)
    with pytest.raises(ValueError, match="adapter 'default' already exists"):
        add_loldu(net, LoLDUConfig(rank=3, target_modules=["to_k"]))
    assert types(net) == before


# ---- several named adapters -----------------------------------------------------------------------------------------
@pytest.fixture
def two_adapters():
    """A Linear(10 -> 12) with adapters 'a' (rank 2) and 'b' (rank 6), both moved off their init."""
    return _two_adapters()


def _two_adapters():
    net = nn.Sequential(nn.Linear(10, 12))
    base = nn.Linear(10, 12)
    base.load_state_dict(net[0].state_dict())
    add_loldu(net, LoLDUConfig(rank=2, target_modules=["0"]), "a")
    add_loldu(net, LoLDUConfig(rank=6, alpha=3, target_modules=["0"]), "b")
    randomise(net, "a")
    randomise(net, "b")
    return net, base


def _alone(net: nn.Module, name: str, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
    set_loldu_adapters(net, name)
    return net(x) - base(x)


@pytest.mark.parametrize("tokens", [3, 64])  # training path, inference (addmm) path
def test_mixing_two_adapters_of_different_ranks(two_adapters, tokens):
    net, base = two_adapters
    layer = net[0]
    assert layer.loldu_B.shape == (12, 6) and layer.loldu_A.shape == (6, 10)  # one nested set of factors
    assert [layer.loldu_adapters[n].rank for n in ("a", "b")] == [2, 6]
    x = torch.randn(2, tokens, 10)
    with torch.set_grad_enabled(tokens == 3):
        da, db = _alone(net, "a", x, base), _alone(net, "b", x, base)
        assert da.abs().max() > 1e-3 and db.abs().max() > 1e-3
        set_loldu_adapters(net, ["a", "b"], [0.5, 2.0])
        assert get_loldu_adapters(net) == {"a": 0.5, "b": 2.0}
        torch.testing.assert_close(net(x), base(x) + 0.5 * da + 2.0 * db, rtol=1e-5, atol=1e-5)
        with loldu_scale(net, 0.3):
            torch.testing.assert_close(net(x), base(x) + 0.3 * (0.5 * da + 2.0 * db), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net(x), base(x) + 0.5 * da + 2.0 * db, rtol=1e-5, atol=1e-5)  # scale restored
        set_loldu_adapters(net, [])
        assert torch.equal(net(x), base(x))


def test_set_adapters_validates_names_and_weights(two_adapters):
    net, _ = two_adapters
    with pytest.raises(ValueError, match=r"unknown LoLDU adapter\(s\) \['c'\]; present: \['a', 'b'\]"):
        set_loldu_adapters(net, ["a", "c"])
    with pytest.raises(ValueError, match="got 1 weights for 2 adapters"):
        set_loldu_adapters(net, ["a", "b"], [1.0])
    set_loldu_adapters(net, ["a", "b"], 0.25)
    assert get_loldu_adapters(net) == {"a": 0.25, "b": 0.25}


def test_delete_one_adapter_then_remove_all(two_adapters):
    net, base = two_adapters
    weight = net[0].weight
    x = torch.randn(2, 3, 10)
    db = _alone(net, "b", x, base)
    set_loldu_adapters(net, ["a", "b"], [0.5, 2.0])
    remove_loldu(net, "a")
    assert loldu_adapter_names(net) == ["b"] and isinstance(net[0], LoLDULinear)
    torch.testing.assert_close(net(x), base(x) + 2.0 * db, rtol=1e-5, atol=1e-5)  # b keeps its weight
    with pytest.raises(ValueError, match="unknown LoLDU adapter"):
        remove_loldu(net, "a")
    remove_loldu(net)
    assert type(net[0]) is nn.Linear
    assert net[0].weight is weight and net[0].weight.data_ptr() == weight.data_ptr()
    assert torch.equal(net(x), base(x))
    assert set(net.state_dict()) == {"0.weight", "0.bias"}


def test_trainable_count_per_adapter(two_adapters):
    net, _ = two_adapters
    assert count_loldu_parameters(net, "a") == 3 and count_loldu_parameters(net, "b") == 7
    assert count_loldu_parameters(net) == 10


# ---- merge / unmerge ------------------------------------------------------------------------------------------------
def test_merge_matches_unmerged_fp32(tiny_net):
    net, base = tiny_net(), tiny_net()
    add_loldu(net, LoLDUConfig(rank=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.0"]))
    randomise(net, "default")
    x = torch.randn(2, 5, 6)
    y = net(x)
    assert not torch.allclose(y, base(x), atol=1e-3)
    merge_loldu(net)
    layers = [m for m in net.modules() if isinstance(m, LoLDULinear)]
    assert all(m.loldu_merged == ["default"] for m in layers)
    assert all(m.combined_diag() is None for m in layers)  # forward is the plain Linear now
    torch.testing.assert_close(net(x), y, rtol=0, atol=1e-5)
    unmerge_loldu(net)
    assert torch.equal(net(x), y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unmerge_is_bit_exact(dtype, tiny_net):
    net = tiny_net(dtype=dtype)
    originals = {n: p.detach().clone() for n, p in net.named_parameters()}
    add_loldu(net, LoLDUConfig(rank=4, target_modules=r".*"), "a")
    add_loldu(net, LoLDUConfig(rank=2, target_modules=["to_v"]), "b")
    randomise(net, "a")
    randomise(net, "b")
    set_loldu_adapters(net, ["a", "b"], [0.7, 1.3])
    x = torch.randn(2, 5, 6).to(dtype)
    y = net(x)
    merge_loldu(net)
    weights = {n: m.weight for n, m in net.named_modules() if isinstance(m, LoLDULinear)}
    assert any(not torch.equal(w, originals[f"{n}.weight"]) for n, w in weights.items())
    for n, w in weights.items():
        assert w.dtype == dtype
    with pytest.raises(RuntimeError, match="merged"):
        set_loldu_adapters(net, ["a"])
    assert get_loldu_adapters(net) == {"a": 0.7, "b": 1.3}  # the failed switch changed nothing
    unmerge_loldu(net)
    for n, p in net.named_parameters():
        if n in originals:
            assert torch.equal(p, originals[n]), n
    assert torch.equal(net(x), y)
    set_loldu_adapters(net, ["a"])  # allowed again once unmerged


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_while_merged_then_unmerge_gives_the_cast_base(dtype, tiny_net):
    net, base = tiny_net(), tiny_net(dtype=dtype)
    add_loldu(net, LoLDUConfig(rank=4, target_modules=r".*"))
    randomise(net, "default")
    merge_loldu(net)
    net.to(dtype)  # e.g. pipe.fuse_loldu(); pipe.to("cuda", torch.float16); pipe.unfuse_loldu()
    unmerge_loldu(net)
    params = dict(net.named_parameters())
    for n, q in base.named_parameters():
        assert params[n].dtype == dtype and torch.equal(params[n], q), n
    remove_loldu(net)
    x = torch.randn(2, 5, 6).to(dtype)
    assert torch.equal(net(x), base(x))


def test_merge_then_remove_restores_base(tiny_net):
    net, base = tiny_net(), tiny_net()
    add_loldu(net, LoLDUConfig(rank=4, target_modules=["to_q", "ff.2"]))
    randomise(net, "default")
    merge_loldu(net)
    remove_loldu(net)
    assert types(net) == types(base)
    x = torch.randn(2, 5, 6)
    assert torch.equal(net(x), base(x))


def test_delete_merged_adapter_keeps_the_other_merged():
    net, base = _two_adapters()
    x = torch.randn(4, 10)
    db = _alone(net, "b", x, base)
    set_loldu_adapters(net, ["a", "b"])
    merge_loldu(net)
    remove_loldu(net, "a")
    assert net[0].loldu_merged == ["b"]
    torch.testing.assert_close(net(x), base(x) + db, rtol=1e-5, atol=1e-5)
    unmerge_loldu(net)
    assert torch.equal(net[0].weight, base.weight)


def test_refused_switch_after_partial_merge_changes_no_layer(tiny_net):
    net = tiny_net()
    add_loldu(net, LoLDUConfig(rank=2, target_modules=r".*"), "a")
    add_loldu(net, LoLDUConfig(rank=2, target_modules=["to_v"]), "b")
    merge_loldu(net, ["b"])  # only the to_v layers are merged; proj_in comes first and is not
    active = {n: (list(m.loldu_active), [a.mix_weight for a in m.loldu_adapters.values()])
              for n, m in net.named_modules() if isinstance(m, LoLDULinear)}
    with pytest.raises(RuntimeError, match="unmerge before changing the active adapters"):
        set_loldu_adapters(net, ["a"], [0.3])
    assert active == {n: (list(m.loldu_active), [a.mix_weight for a in m.loldu_adapters.values()])
                      for n, m in net.named_modules() if isinstance(m, LoLDULinear)}


def test_plain_assignment_of_a_wrapped_layer_is_seen_by_parameters_and_save(tmp_path):
    """A LoLDU layer moved in with `net[1] = layer` counts at once: no cached layer list to go stale."""
    from loldu_sd import load_loldu, loldu_layers, loldu_parameters, save_loldu

    torch.manual_seed(0)
    net, other = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6)), nn.Sequential(nn.Linear(6, 6))
    cfg = LoLDUConfig(rank=2, target_modules=["0"])
    add_loldu(net, cfg, "a")
    add_loldu(other, cfg, "a")
    assert len(loldu_parameters(net)) == 2
    net[1] = other[0]
    assert [n for n, _ in loldu_layers(net)] == ["0", "1"] and len(loldu_parameters(net)) == 4
    save_loldu(tmp_path / "a.safetensors", net, "a")
    fresh = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    fresh.load_state_dict({k: v for k, v in net.state_dict().items() if "loldu" not in k})
    load_loldu(tmp_path / "a.safetensors", fresh)
    assert [n for n, _ in loldu_layers(fresh)] == ["0", "1"]


def test_parameters_follow_the_config_not_requires_grad():
    """Freezing the whole model (a common first step) does not hide z and sigma from the optimizer."""
    from loldu_sd import loldu_parameters

    net = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    add_loldu(net, LoLDUConfig(rank=2, target_modules=["0"]), "a")
    add_loldu(net, LoLDUConfig(rank=2, target_modules=["1"], train_sigma=False), "b")
    net.requires_grad_(False)
    assert [p.numel() for p in loldu_parameters(net)] == [2, 1, 2]


def test_one_runtime_scale_per_model_released_with_its_last_layer():
    """Every layer of a model reads one scale object; hooks kept on it go when the last adapter does."""
    from loldu_sd import loldu_layers
    from loldu_sd.model import runtime_scale

    net = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    add_loldu(net, LoLDUConfig(rank=2, target_modules=["0"]), "a")
    add_loldu(net, LoLDUConfig(rank=2, target_modules=["1"]), "b")
    scale = runtime_scale(net)
    assert all(layer.loldu_runtime_scale is scale for _, layer in loldu_layers(net))
    scale.hooks.append(net.register_forward_pre_hook(lambda *_: None))
    remove_loldu(net, "a")
    assert len(net._forward_pre_hooks) == 1
    remove_loldu(net, "b")
    assert len(net._forward_pre_hooks) == 0 and runtime_scale(net) is None and not scale.hooks


def test_layer_list_follows_every_structural_change():
    from loldu_sd import loldu_layers
    from loldu_sd.layer import LoLDULinear

    net = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    assert list(loldu_layers(net)) == []
    add_loldu(net, LoLDUConfig(rank=2, target_modules=["0"]), "a")
    assert [n for n, _ in loldu_layers(net)] == ["0"]
    net[1] = LoLDULinear.from_linear(net[1])  # wrapped by hand, outside add_loldu
    assert [n for n, _ in loldu_layers(net)] == ["0", "1"]
    remove_loldu(net)
    assert [n for n, _ in loldu_layers(net)] == []


def test_unmerge_of_one_adapter_replays_the_other_merges_with_their_own_scales(tiny_net):
    net, x = tiny_net(), torch.randn(2, 5, 6)
    add_loldu(net, LoLDUConfig(rank=2, target_modules=["to_q", "to_v"]), "a")
    randomise(net, "a")
    merge_loldu(net, ["a"], scale=1.0)
    a_alone = net(x).detach()
    add_loldu(net, LoLDUConfig(rank=3, target_modules=["to_q"]), "b")
    randomise(net, "b")
    merge_loldu(net, ["b"], scale=0.5)
    remove_loldu(net, "b")
    assert torch.equal(net(x), a_alone)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "x"])
def test_non_finite_weights_and_scales_are_refused(bad, tiny_net):
    from loldu_sd import loldu_scale

    net = tiny_net()
    add_loldu(net, LoLDUConfig(rank=2, target_modules=["to_q"]), "a")
    for call in (lambda: set_loldu_adapters(net, ["a"], [bad]), lambda: merge_loldu(net, scale=bad),
                 lambda: loldu_scale(net, bad).__enter__()):
        with pytest.raises(ValueError, match="must be a finite number"):
            call()
    assert net.blocks[0].attn.to_q.loldu_merged == [] and net.blocks[0].attn.to_q.loldu_adapters["a"].mix_weight == 1


def test_weight_decay_with_zero_gradient_leaves_the_base_bit_identical(tiny_net):
    """The trainer's optimizer (its flags' defaults, decay 0.01) decays the change toward the base, never away."""
    from loldu_sd.training.args import build_parser, loldu_config
    from loldu_sd.training.optim import make_optimizer

    args = build_parser().parse_args(["--pretrained_model_name_or_path", "x", "--instance_data_dir", "x",
                                      "--instance_prompt", "x", "--target_modules", "to_q,to_k,to_v,ff.0"])
    assert args.adam_weight_decay > 0
    net, base = tiny_net(), tiny_net()
    add_loldu(net, loldu_config(args))
    params = loldu_parameters(net)
    optimizer = make_optimizer(args, params, lr=args.learning_rate * 100)  # a large step makes any drift show
    for _ in range(50):
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        project_loldu_(net)
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))
    assert all(not p.any() for p in params)
    assert torch.equal(net(x), base(x))
    merge_loldu(net)
    merged = net.state_dict()
    assert all(torch.equal(merged[k], v) for k, v in base.state_dict().items())  # fused: W0 + 0, exactly
