"""LoLDULinear: bit-identical at init (every dtype, both forward paths), the paper's formula, gradients, inits,
projection, config validation and rank-deficient weights."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from loldu_sd import INITS, LoLDUConfig, LoLDULinear, add_loldu, loldu_parameters, project_loldu_
from loldu_sd.decompose import top_r_ldu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(8, 8), (12, 8), (8, 12)]  # (in, out): square, wide, tall


def wrap(linear: nn.Linear, **cfg) -> LoLDULinear:
    """Inject one adapter into a lone Linear and return the LoLDULinear."""
    model = nn.Sequential(linear)
    add_loldu(model, LoLDUConfig(**{"rank": 4, "target_modules": ["0"], **cfg}))
    return model[0]


PATHS = ["train", "train_many", "infer"]


def run(layer: nn.Module, x: torch.Tensor, path: str) -> torch.Tensor:
    """Forward on a training path (grad enabled: few tokens low-rank, many tokens merged in fp32) or the inference
    fast path (no_grad, many tokens)."""
    if path.startswith("train"):
        return layer(x)
    with torch.no_grad():
        return layer(x)


def inputs(n_in: int, path: str, dtype: torch.dtype) -> torch.Tensor:
    tokens = 3 if path == "train" else 64  # 64 * (in + out) > 2 * in * out: the merged (addmm) paths
    return torch.randn(2, tokens, n_in).to(dtype)


def merged_path(path: str, dtype: torch.dtype) -> bool:
    """Whether `path` folds the delta into the weight (one addmm) for inputs of `dtype`."""
    return path == "infer" or (path == "train_many" and dtype == torch.float32)


@pytest.fixture
def count_addmm(monkeypatch):
    """Counts torch.addmm calls, to check which forward path ran."""
    calls = []
    real = torch.addmm

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", spy)
    return calls


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_identical_at_init(dtype, shape, bias, path, count_addmm):
    base = nn.Linear(*shape, bias=bias).to(dtype)
    ref = copy.deepcopy(base)
    layer = wrap(base)
    assert layer.weight is base.weight and layer.bias is base.bias  # shared, not copied
    x = inputs(shape[0], path, dtype)
    assert torch.equal(run(layer, x, path), run(ref, x, path))
    assert bool(count_addmm) == merged_path(path, dtype)


@pytest.mark.parametrize("path", ["train", "infer"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_bit_identical_after_casting_an_injected_fp32_model(dtype, path, tiny_net):
    net, ref = tiny_net(), tiny_net()
    add_loldu(net, LoLDUConfig(rank=4, target_modules=r".*"))
    net.to(dtype)
    ref.to(dtype)
    x = torch.randn(2, 64, 6).to(dtype)
    assert torch.equal(run(net, x, path), run(ref, x, path))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(14, 10), (10, 14)])
def test_random_z_sigma_match_the_papers_formula_float64(shape, path):
    n, m = shape
    r = 4
    layer = wrap(nn.Linear(n, m, dtype=torch.float64), rank=r, factor_dtype="float64")
    adapter = layer.loldu_adapters["default"]
    with torch.no_grad():
        adapter.set_(z=torch.randn(r) * 3, sigma=0.37)
    # independent reference: full LU in float64, RSM x + sigma P L_r diag(z) U_r x (U_r unit upper rows)
    W0, b = layer.weight.detach(), layer.bias.detach()
    P, L, U = torch.linalg.lu(W0)
    d = U.diagonal()
    PL_r, U_r, z0 = (P @ L)[:, :r], (U / d[:, None])[:r], d[:r]
    sigma0 = r / r  # alpha defaults to rank
    RSM = W0 - sigma0 * PL_r @ torch.diag(z0) @ U_r
    z, sigma = adapter.z.detach().double(), adapter.sigma.item()
    x = inputs(n, path, torch.float64)
    expected = x @ (RSM + sigma * PL_r @ torch.diag(z) @ U_r).T + b
    y = run(layer, x, path)
    assert ((y.detach() - expected).norm() / expected.norm()).item() < 1e-6


def test_merged_training_path_matches_the_low_rank_path_values_and_gradients(count_addmm):
    """Many tokens in fp32 take the merged autograd path; outputs and gradients (x, z, sigma, mixed adapters) agree
    with the low-rank formula."""
    torch.manual_seed(0)
    layer = wrap(nn.Linear(24, 16), rank=6)
    layer.add_adapter("b", LoLDUConfig(rank=3, target_modules=["0"]))
    layer.set_active(["default", "b"], [0.7, -0.4])
    params = loldu_parameters(layer)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 50, 24, requires_grad=True)

    def grads(y):
        out = torch.autograd.grad(y.sin().sum(), [x, *params])
        return y.detach(), out

    y_merged, g_merged = grads(layer(x))
    assert count_addmm  # the merged path ran
    s = layer.combined_diag()
    B, A = layer.loldu_B[:, :6], layer.loldu_A[:6]
    y_ref, g_ref = grads(torch.nn.functional.linear(x, layer.weight, layer.bias)
                         + torch.nn.functional.linear(torch.nn.functional.linear(x, A) * s, B))
    torch.testing.assert_close(y_merged, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_merged, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    calls = len(count_addmm)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps the low-rank path (and trains)
        _, g_auto = grads(layer(x))
    assert len(count_addmm) == calls and all(torch.isfinite(g).all() for g in g_auto)


def test_gradients_reach_only_z_and_sigma(tiny_net):
    net = tiny_net()
    add_loldu(net, LoLDUConfig(rank=3, target_modules=r".*"))  # every Linear
    layers = [m for m in net.modules() if isinstance(m, LoLDULinear)]
    assert len(layers) == 14
    net(torch.randn(2, 5, 6)).square().sum().backward()
    trainable = {id(p) for p in loldu_parameters(net)}
    for p in net.parameters():
        assert (p.grad is not None) == (id(p) in trainable)
    for layer in layers:
        assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)
        assert not layer.weight.requires_grad
        a = layer.loldu_adapters["default"]
        assert a.dz.grad.abs().sum() > 0 and a.dsigma.grad is not None
        assert {n for n, _ in layer.named_buffers()} >= {"loldu_B", "loldu_A"}  # frozen factors are buffers


@pytest.mark.parametrize("train_sigma", [True, False])
def test_trainable_count_is_r_plus_one_per_layer(train_sigma, tiny_net):
    net = tiny_net()
    add_loldu(net, LoLDUConfig(rank=5, target_modules=["to_q", "to_v", "ff.0"], train_sigma=train_sigma))
    n_layers = 6  # 2 blocks x (to_q, to_v, ff.0)
    per_layer = 5 + 1 if train_sigma else 5
    assert sum(p.numel() for p in loldu_parameters(net)) == per_layer * n_layers
    if not train_sigma:
        net(torch.randn(1, 3, 6)).sum().backward()
        assert all(a.dsigma.grad is None for m in net.modules() if isinstance(m, LoLDULinear)
                   for a in m.loldu_adapters.values())


def test_rank_larger_than_layer_is_clamped(tiny_net):
    net, ref = tiny_net(), tiny_net()
    add_loldu(net, LoLDUConfig(rank=32, target_modules=r".*"))
    layers = [m for m in net.modules() if isinstance(m, LoLDULinear)]
    ranks = [m.loldu_adapters["default"].rank for m in layers]
    assert ranks == [min(m.in_features, m.out_features) for m in layers]  # includes rank == in (tall proj_in)
    assert sum(p.numel() for p in loldu_parameters(net)) == sum(r + 1 for r in ranks)
    x = torch.randn(2, 3, 6)
    assert torch.equal(net(x), ref(x))


def _delta_from_z(layer: LoLDULinear, x: torch.Tensor) -> torch.Tensor:
    """sigma0 B diag(z - z0) A x: the paper's change of output when z leaves z0 (sigma = sigma0)."""
    a = layer.loldu_adapters["default"]
    r = a.rank
    s = a.sigma0 * (a.z.detach() - a.z0)
    return (x @ layer.loldu_A[:r].T * s) @ layer.loldu_B[:, :r].T


@pytest.mark.parametrize("init", INITS)
def test_every_init(init):
    base = nn.Linear(64, 48)
    ref = copy.deepcopy(base)
    layer = wrap(base, rank=48, init=init, init_range=(-0.5, 2.0))
    a = layer.loldu_adapters["default"]
    z, z0 = a.z.detach(), a.z0
    # the residual always keeps the LDU pivots z0 (paper semantics)
    torch.testing.assert_close(z0, top_r_ldu(base.weight, 48).z0)
    mean, std = z0.mean(), z0.std()
    checks = {
        "ldu": lambda: torch.equal(z, z0),
        "uniform": lambda: bool(((z >= -0.5) & (z < 2.0)).all()) and float(z.std()) > 0.2,
        "uniform_mean": lambda: bool((z.abs() <= mean.abs() / 2).all()) and float(z.std()) > 0,
        "normal": lambda: abs(float(z.mean())) < 0.5 and 0.6 < float(z.std()) < 1.4,
        "normal_stats": lambda: abs(float(z.mean() - mean)) < 0.5 * float(std) and 0.5 < float(z.std() / std) < 1.5,
        "constant": lambda: torch.allclose(z, torch.full_like(z, float(mean)), rtol=0, atol=1e-6),
        "zeros": lambda: torch.equal(z, torch.zeros_like(z)),
        "ones": lambda: torch.allclose(z, torch.ones_like(z), rtol=0, atol=1e-6),  # z0 + (1 - z0)
    }
    assert checks[init](), (init, z)
    x = torch.randn(3, 64)
    y, y0 = layer(x), ref(x)
    assert torch.equal(y, y0) == (init == "ldu")  # only ldu is the identity at init
    torch.testing.assert_close(y - y0, _delta_from_z(layer, x), rtol=1e-4, atol=1e-4)


def test_projection_keeps_sigma_and_z_in_bounds(tiny_net):
    net = tiny_net()
    add_loldu(net, LoLDUConfig(rank=4, alpha=2, target_modules=["to_q", "ff.2"], sigma_max=0.8, z_max_norm=2.0))
    adapters = [a for m in net.modules() if isinstance(m, LoLDULinear) for a in m.loldu_adapters.values()]
    for sigma in (5.0, -1.0, 0.0):
        with torch.no_grad():
            for a in adapters:
                a.set_(z=torch.randn(a.rank) * 1e6, sigma=sigma)
        project_loldu_(net)
        for a in adapters:
            assert 0 < a.sigma.item() and a.sigma.item() <= 0.8 * (1 + 1e-6)
            assert a.z.detach().norm().item() <= 2.0 * (1 + 1e-6)
    # in-bounds values are left alone; z_max_norm=None never touches z
    layer = wrap(nn.Linear(8, 8), sigma_max=1.0)
    a = layer.loldu_adapters["default"]
    with torch.no_grad():
        a.set_(z=a.z * 1e3, sigma=0.5)
    z = a.z.detach().clone()
    project_loldu_(nn.Sequential(layer))
    assert a.sigma.item() == 0.5 and torch.equal(a.z.detach(), z)
    # zero change stays exactly zero: the projection never moves an adapter off the base
    layer = wrap(nn.Linear(8, 8), sigma_max=1.0, z_max_norm=1e9)
    project_loldu_(nn.Sequential(layer))
    assert not layer.loldu_adapters["default"].diag().any()


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 4, "alpha": 8}, r"sigma0 = alpha/rank = 2 lies outside \(0, sigma_max=1\]"),
    ({"rank": 4, "alpha": 3, "sigma_max": 0.5}, "sigma_max=0.5"),
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": -2}, "rank must be a positive integer"),
    ({"rank": 2.5}, "rank must be a positive integer"),
    ({"init": "xavier"}, "init must be one of"),
    ({"alpha": 0}, "alpha must be > 0"),
    ({"z_max_norm": 0}, "z_max_norm must be > 0"),
    ({"factor_dtype": "float16"}, "factor_dtype"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoLDUConfig(**kwargs)


def test_config_json_round_trip_and_sigma_max_none():
    cfg = LoLDUConfig(rank=4, alpha=8, sigma_max=None, target_modules=("to_q",), init="uniform")
    assert cfg.sigma0 == 2.0
    assert LoLDUConfig.from_dict({**cfg.to_dict(), "from_the_future": 1}) == cfg


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["zero_columns", "all_zero"])
def test_rank_deficient_weights_are_identity_at_init_and_finite(kind, dtype):
    base = nn.Linear(12, 10).to(dtype)
    with torch.no_grad():
        if kind == "zero_columns":
            base.weight[:, [0, 2, 3]] = 0  # three of the four panel columns
        else:
            base.weight.zero_()
    ref = copy.deepcopy(base)
    with pytest.warns(UserWarning, match=r"0: \d+ of 4 pivots are below"):
        layer = wrap(base)
    assert torch.isfinite(layer.loldu_A).all() and torch.isfinite(layer.loldu_B).all()
    for path in ("train", "infer"):
        x = inputs(12, path, dtype)
        y = run(layer, x, path)
        assert torch.equal(y, run(ref, x, path))
    # training moves z: outputs stay finite
    with torch.no_grad():
        layer.loldu_adapters["default"].dz.add_(0.1)
    for path in ("train", "infer"):
        assert torch.isfinite(run(layer, inputs(12, path, dtype), path)).all()


def test_zero_weight_with_full_rank_is_still_identity():
    base = nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        base.weight.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = wrap(base, rank=99)
    assert layer.loldu_adapters["default"].rank == 6
    x = torch.randn(4, 6)
    assert torch.equal(layer(x), torch.zeros(4, 6))
