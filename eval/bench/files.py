"""Section 3, files and pipeline: adapter file bytes and layout, pipeline load and adapter switch times."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import loldu_sd.diffusers

from .methods import TARGETS, Method
from .timing import busy_cores, clock, paired, rounds, summary


def header_bytes(path: Path) -> int:
    """Size of a safetensors file's JSON header (the first 8 bytes give it, little endian)."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def randomise_(tensors: list[torch.Tensor], seed: int) -> None:
    """Perturb trained values a little so files hold realistic (non-initial) numbers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tensors:
            if p.ndim:  # z's change and LoRA's matrices; sigma stays sigma0 (within its projection bound)
                p.add_((torch.randn(p.shape, generator=g) * 0.01).to(p))


def save_lora_dir(unet: nn.Module, rank: int, out: Path, seed: int) -> Path:
    """A peft LoRA on the UNet, saved as diffusers writes it (StableDiffusionPipeline.save_lora_weights)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    m = Method("lora", rank)
    m.inject(unet)
    randomise_(m.params(unet), seed)
    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="a"))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=sd)
    m.remove(unet)
    return out / "pytorch_lora_weights.safetensors"


def bench_files(pipe, tmp: Path, args) -> dict:
    """Adapter file bytes of every method, and the packed vs per-layer-key layout of our r=32 file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .naive import save_naive_loldu

    unet, res = pipe.unet, {}
    for r in (1, 8, 32):
        m = Method("ours", r)
        m.inject(unet)
        randomise_(m.params(unet), r)
        path = pipe.save_loldu_weights(tmp / f"ours{r}", adapter_name="a")
        res[m.spec] = {"bytes": path.stat().st_size, "header_bytes": header_bytes(path), "path": str(path)}
        if r == 32:  # the same content under per-layer keys (DESIGN §3): header cost of readability
            tensors, layers = loldu_sd.io.loldu_state_dict({"unet": unet}, "a")
            with safe_open(str(path), framework="pt") as f:
                meta = {k: v for k, v in f.metadata().items() if k != "layers"}
            per_layer, off = {}, 0
            for i, (name, rank) in enumerate(layers["unet"]):
                per_layer[f"unet.{name}.loldu.dz"] = tensors["unet.loldu.dz"][off: off + rank].clone()
                per_layer[f"unet.{name}.loldu.dsigma"] = tensors["unet.loldu.dsigma"][i: i + 1].clone()
                per_layer[f"unet.{name}.loldu.pivots"] = tensors["unet.loldu.pivots"][off: off + rank].clone()
                per_layer[f"unet.{name}.loldu.fingerprint"] = tensors["unet.loldu.fingerprint"][i].clone()
                off += rank
            alt = tmp / "ours32_per_layer_keys.safetensors"
            save_file(per_layer, str(alt), metadata=meta)
            res["format"] = {"packed": {"bytes": res[m.spec]["bytes"], "header_bytes": res[m.spec]["header_bytes"]},
                             "per_layer_keys": {"bytes": alt.stat().st_size, "header_bytes": header_bytes(alt)},
                             "n_layers": len(layers["unet"])}
        m.remove(unet)
    for r in (4, 32):
        path = save_lora_dir(unet, r, tmp / f"lora{r}", seed=r)
        res[f"lora:{r}"] = {"bytes": path.stat().st_size, "header_bytes": header_bytes(path), "path": str(path)}
    m = Method("naive", 32)
    names = loldu_sd.diffusers.unet_target_layers(unet, TARGETS)
    base_weights = {n: unet.get_submodule(n).weight.detach().clone() for n in names}
    m.inject(unet)
    path = tmp / "naive32.safetensors"
    save_naive_loldu(str(path), unet)
    res["naive:32"] = {"bytes": path.stat().st_size, "header_bytes": header_bytes(path), "path": str(path)}
    m.remove(unet, base_weights)
    return res


def bench_pipeline(pipe, files: dict, tmp: Path, args) -> dict:
    """Load into the pipeline (ours r=32 vs diffusers load_lora_weights of LoRA r=4) and adapter switch times."""
    dev = torch.device(args.device)
    ours_a = Path(files["ours:32"]["path"]).parent
    m = Method("ours", 32)  # a second r=32 adapter for the switch test
    m.inject(pipe.unet)
    randomise_(m.params(pipe.unet), 99)
    ours_b = pipe.save_loldu_weights(tmp / "ours32b", adapter_name="a").parent
    m.remove(pipe.unet)
    lora_a = Path(files["lora:4"]["path"]).parent
    lora_b = save_lora_dir(pipe.unet, 4, tmp / "lora4b", seed=99).parent

    def task():
        out = {"ours:32": clock(lambda: pipe.load_loldu_weights(ours_a, adapter_name="x"), dev)}
        pipe.unload_loldu_weights()  # also takes out the scale hooks
        out["lora:4"] = clock(lambda: pipe.load_lora_weights(lora_a, adapter_name="x"), dev)
        pipe.unload_lora_weights()
        return out

    load = rounds(task, args.repeats)

    def load_ours():
        out = {"ours:32": clock(lambda: pipe.load_loldu_weights(ours_a, adapter_name="x"), dev)}
        pipe.unload_loldu_weights()
        return out

    with busy_cores():  # a shared server or CI runner: every core already runs other work
        load_busy = rounds(load_ours, args.repeats)
    n_switch = 2 * max(5, args.repeats)  # clock() calls each lambda below at once: late binding of i is safe (B023)
    pipe.load_loldu_weights(ours_a, adapter_name="a")
    pipe.load_loldu_weights(ours_b, adapter_name="b")
    sw_ours = [clock(lambda: pipe.set_loldu_adapters("ab"[i % 2]), dev) for i in range(n_switch + 2)][2:]  # noqa: B023
    pipe.unload_loldu_weights()
    pipe.load_lora_weights(lora_a, adapter_name="a")
    pipe.load_lora_weights(lora_b, adapter_name="b")
    sw_lora = [clock(lambda: pipe.set_adapters("ab"[i % 2]), dev) for i in range(n_switch + 2)][2:]  # noqa: B023
    pipe.unload_lora_weights()
    return {"load": {k: summary(v) for k, v in load.items()}, "load_ratio": paired(load["ours:32"], load["lora:4"]),
            "load_busy": {k: summary(v) for k, v in load_busy.items()},
            "switch": {"ours:32": summary(sw_ours), "lora:4": summary(sw_lora)},
            "where": "StableDiffusionPipeline: SD1.5-config UNet + tiny VAE/CLIP (adapters touch the UNet only)"
            if not args.smoke else "tiny StableDiffusionPipeline"}
