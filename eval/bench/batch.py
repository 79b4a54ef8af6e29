"""Section `batch`: 16 prompts for 1, 4 or 16 concepts in one UNet call, and the resident library.

Interleaved rounds on the SD1.5-architecture UNet, a batch of 16 latents:
  ours one      one LoLDU adapter (r=32) active on the whole batch: the reference (a)
  ours mixed:k  loldu_sd.per_sample_adapters, the 16 samples spread over k adapters, one call
  ours seq:k    set_loldu_adapters per sub-batch, k calls (b)
  lora mixed:k  peft LoRA r=4 mixed-batch inference (adapter_names: peft splits each layer's batch) (c)
LoLDU and LoRA rounds run in turn on one UNet (never both injected), each with its own base call, so their ratios
to the LoLDU reference go through the base: (lora/base) / (ours one/base).
Section `library`: 1,000 adapter files of the UNet loaded into a ResidentLibrary: load time, bytes per adapter.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import loldu_sd
import loldu_sd.diffusers
from loldu_sd import LoLDUConfig

from .methods import TARGETS
from .timing import clock, fmt, log, paired, rounds, summary, table

BATCH, SPREADS, RANK, LORA_RANK = 16, (1, 4, 16), 32, 4


def spread(k: int) -> list[str]:
    """16 samples over k concepts, in contiguous groups (what a sequential server would batch together)."""
    return [f"c{i * k // BATCH}" for i in range(BATCH)]


def batch_inputs(unet: nn.Module, args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents (16, C, res/8, res/8), timestep 500, text embeddings (16, 77, cross_dim)."""
    g, side, cfg, dev = torch.Generator().manual_seed(args.seed), args.resolution // 8, unet.config, args.device
    x = torch.randn(BATCH, cfg.in_channels, side, side, generator=g)
    enc = torch.randn(BATCH, 77, cfg.cross_attention_dim, generator=g)
    return x.to(dev), torch.tensor([500], device=dev), enc.to(dev)


def add_concepts(unet: nn.Module, n: int) -> None:
    """n LoLDU adapters c0..c{n-1} with distinct non-initial values, none active."""
    for i in range(n):
        loldu_sd.diffusers.add_loldu_to_unet(unet, LoLDUConfig(rank=RANK, target_modules=TARGETS), f"c{i}")
        with torch.no_grad():
            for p in loldu_sd.loldu_parameters(unet, f"c{i}"):
                p.mul_(1 + 0.01 * (i + 1))
    loldu_sd.set_loldu_adapters(unet, [])


@contextlib.contextmanager
def lora_adapter_names(unet: nn.Module, names: list[str]):
    """peft's mixed-batch inference on a diffusers UNet: every LoRA layer's forward gets adapter_names=names."""
    from peft.tuners.lora import LoraLayer

    def inject(module, args, kwargs):
        return args, {**kwargs, "adapter_names": names}

    handles = [m.register_forward_pre_hook(inject, with_kwargs=True) for m in unet.modules()
               if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def ours_round(unet: nn.Module, inputs) -> dict[str, float]:
    """One interleaved round of the LoLDU calls (adapters c0..c15 present)."""
    x, t, enc = inputs
    dev = x.device

    @torch.no_grad()
    def call(rows=slice(None)):
        unet(x[rows], t, enc[rows])

    def sequential(names):
        for name in dict.fromkeys(names):
            loldu_sd.set_loldu_adapters(unet, [name])
            call([i for i, n in enumerate(names) if n == name])
        loldu_sd.set_loldu_adapters(unet, [])

    out = {"base": clock(call, dev)}
    loldu_sd.set_loldu_adapters(unet, ["c0"])
    out["one"] = clock(call, dev)
    loldu_sd.set_loldu_adapters(unet, [])
    for k in SPREADS:
        with loldu_sd.per_sample_adapters(unet, spread(k)):
            out[f"mixed:{k}"] = clock(call, dev)
        if k > 1:
            out[f"seq:{k}"] = clock(functools.partial(sequential, spread(k)), dev)
    return out


def lora_round(unet: nn.Module, inputs) -> dict[str, float]:
    """One interleaved round of the peft LoRA calls (adapters c0..c15 present)."""
    x, t, enc = inputs

    @torch.no_grad()
    def call():
        unet(x, t, enc)

    unet.disable_adapters()
    out = {"base": clock(call, x.device)}
    unet.enable_adapters()
    unet.set_adapters(["c0"])
    out["one"] = clock(call, x.device)
    for k in SPREADS:
        with lora_adapter_names(unet, spread(k)):
            out[f"mixed:{k}"] = clock(call, x.device)
    return out


def add_lora_concepts(unet: nn.Module, n: int) -> None:
    """n peft LoRA r=4 adapters c0..c{n-1} on the same target layers."""
    from peft import LoraConfig

    for i in range(n):
        unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                    target_modules=list(TARGETS)), adapter_name=f"c{i}")


def bench_rounds(unet: nn.Module, args) -> dict:
    """Both methods' rounds; every timing as a ratio to the same round's base call, then to ours one adapter."""
    inputs = batch_inputs(unet, args)
    add_concepts(unet, BATCH)
    ours = rounds(lambda: ours_round(unet, inputs), args.repeats)
    loldu_sd.remove_loldu(unet)
    add_lora_concepts(unet, BATCH)
    lora = rounds(lambda: lora_round(unet, inputs), args.repeats)
    unet.unload_lora()
    to_base = {f"ours {k}": paired(v, ours["base"]) for k, v in ours.items()}
    to_base.update({f"lora {k}": paired(v, lora["base"]) for k, v in lora.items() if k != "base"})
    ref = to_base["ours one"]
    return {"times": {**{f"ours {k}": summary(v) for k, v in ours.items()},
                      **{f"lora {k}": summary(v) for k, v in lora.items()}},
            "vs_base": to_base,
            "vs_ours_one": {k: {"median": v["median"] / ref["median"], "best": v["best"] / ref["best"]}
                            for k, v in to_base.items()}}


def rss_bytes() -> int:
    """Current resident set size (Linux /proc)."""
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_adapter_files(unet: nn.Module, n: int, folder: Path) -> list[Path]:
    """n adapter files of the UNet with distinct z, written as save_loldu writes them (one save, n edited copies)."""
    from safetensors import safe_open

    add_concepts(unet, 1)
    first = loldu_sd.save_loldu(folder / "c0.safetensors", {"unet": unet}, "c0")
    loldu_sd.remove_loldu(unet)
    with safe_open(str(first), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    paths = [first]
    g = torch.Generator().manual_seed(0)
    for i in range(1, n):
        dz = tensors["unet.loldu.dz"] + 0.01 * torch.randn(tensors["unet.loldu.dz"].shape, generator=g)
        paths.append(folder / f"c{i}.safetensors")
        save_file({**tensors, "unet.loldu.dz": dz}, str(paths[-1]), metadata={**meta, "adapter_name": f"c{i}"})
    return paths


def bench_library(unet: nn.Module, n: int, tmp: Path) -> dict:
    """Load n adapter files into a ResidentLibrary: first load (decomposes), the rest (shared factors), memory."""
    folder = tmp / "library"
    folder.mkdir(exist_ok=True)
    paths = write_adapter_files(unet, n, folder)
    gc.collect()
    library = loldu_sd.ResidentLibrary({"unet": unet})
    t = time.perf_counter()
    library.load(paths[0])
    first = time.perf_counter() - t
    rss = rss_bytes()
    times = []
    for p in paths[1:]:
        t = time.perf_counter()
        library.load(p)
        times.append(time.perf_counter() - t)
    gc.collect()
    res = {"n": n, "file_bytes": paths[1].stat().st_size, "first_load_s": first, "load_all_s": first + sum(times),
           "load_each_s": summary(times), "nbytes_per_adapter": library.nbytes() / n,
           "rss_per_adapter": (rss_bytes() - rss) / (n - 1)}
    library.close()
    return res


def _unet(args) -> nn.Module:
    from .sd import build_pipeline

    pipe, _ = build_pipeline(args)
    return pipe.unet.to(args.device)


def bench_batch(args, tmp: Path) -> dict:
    """Section `batch`: interleaved rounds of 16 prompts over 1, 4 and 16 adapters."""
    log("batch: 16 prompts over 1, 4, 16 adapters (ours per-sample, ours sequential, peft LoRA mixed batch) ...")
    res = {"resolution": args.resolution, "batch": BATCH, "rank": RANK, "lora_rank": LORA_RANK,
           "rounds": bench_rounds(_unet(args), args)}
    print_batch(res, args)
    return res


def bench_resident(args, tmp: Path) -> dict:
    """Section `library`: 1,000 adapter files (100 in a smoke run) loaded into a ResidentLibrary."""
    log("library: writing and loading adapter files ...")
    lib = bench_library(_unet(args), 100 if args.smoke else 1000, tmp)
    print(f"\n### Resident library ({'tiny UNet, smoke' if args.smoke else 'SD1.5-architecture UNet'}, "
          f"LoLDU r={RANK})\n\n{lib['n']} files of {lib['file_bytes']:,} B loaded in {lib['load_all_s']:.2f} s "
          f"(first {lib['first_load_s']:.3f} s with the decomposition, then {fmt(lib['load_each_s'], 'ms', 1e3)} "
          f"each); {lib['nbytes_per_adapter'] / 1024:.1f} KiB of diagonals per resident adapter, "
          f"RSS growth {lib['rss_per_adapter'] / 1024:.1f} KiB per adapter\n")
    return lib


def print_batch(res: dict, args) -> None:
    """The batch table: ratios to ours with one adapter."""
    r = res["rounds"]
    what = "tiny UNet (smoke)" if args.smoke else "SD1.5-architecture UNet"
    print(f"\n### One batch, many concepts: {what}, {BATCH} latents at {res['resolution']} px, {args.device}\n")
    rows = []
    for key, label in [("ours one", f"LoLDU r={RANK}, one adapter on all 16 (a)"),
                       *[(f"ours mixed:{k}", f"LoLDU r={RANK} per-sample, {k} adapter(s), one call") for k in SPREADS],
                       *[(f"ours seq:{k}", f"LoLDU sequential `set_loldu_adapters`, {k} sub-batches (b)")
                         for k in SPREADS if k > 1],
                       ("lora one", f"peft LoRA r={LORA_RANK}, one adapter on all 16"),
                       *[(f"lora mixed:{k}", f"peft LoRA r={LORA_RANK} `adapter_names`, {k} adapter(s) (c)")
                         for k in SPREADS]]:
        v = r["vs_ours_one"][key]
        rows.append([label, fmt(r["times"][key]), fmt(r["vs_base"][key], "×"),
                     f"{v['median']:.3f}× (best {v['best']:.3f}×)"])
    print(table(["16 prompts", "UNet time", "vs base (same round)", "vs LoLDU one adapter"], rows))


__all__ = ["bench_batch", "bench_resident"]
