"""Section 3: the Stable Diffusion UNet: pipeline, interleaved inference rounds, and the section's driver bench_sd."""
from __future__ import annotations

import gc
import time
from pathlib import Path

import torch
from torch import nn

import loldu_sd.diffusers

from .files import bench_files, bench_pipeline
from .methods import FUSED_IN_ROUNDS, SD_METHODS, TARGETS, Method, count
from .report import print_files, print_sd
from .timing import clock, log, paired, rounds, summary
from .worker import spawn_worker, workload


def build_pipeline(args, unet_dir: Path | None = None):
    """(pipe, seconds): the tiny pipeline; for the full run its UNet is the SD1.5-config UNet (or the one saved)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from loldu_sd.testing import sd15_unet_config, tiny_pipeline

    pipe = tiny_pipeline(seed=args.seed)
    t = time.perf_counter()
    if unet_dir is not None or not args.smoke:
        torch.manual_seed(args.seed)  # deterministic random weights
        unet = (UNet2DConditionModel.from_pretrained(unet_dir) if unet_dir is not None
                else UNet2DConditionModel.from_config(sd15_unet_config()))
        comps = {k: v for k, v in pipe.components.items() if k != "unet"}
        pipe = StableDiffusionPipeline(**comps, unet=unet, requires_safety_checker=False)
    pipe.unet.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    if "_name_or_path" not in pipe.config:  # pipelines built in code have no name: give the files' metadata one
        pipe.register_to_config(_name_or_path="sd15-config-random" if not args.smoke else "tiny-pipeline")
    return pipe, time.perf_counter() - t


def sd_rounds(unet: nn.Module, inputs, methods: list[Method], args) -> dict[str, dict]:
    """Interleaved rounds: base call, then per method inject, first and steady unfused calls, (fuse, warm-up call,
    fused call, unfuse), remove. Ratios to the same round's base call."""
    dev = torch.device(args.device)
    x, t, enc, _ = inputs
    names = loldu_sd.diffusers.unet_target_layers(unet, TARGETS)
    base_weights = {n: unet.get_submodule(n).weight.detach().clone() for n in names}  # naive LoLDU overwrites W0
    trainable: dict[str, int] = {}

    @torch.no_grad()
    def call():
        unet(x, t, enc)

    def task():
        out = {"base/infer": clock(call, dev)}
        for m in methods:  # clock() calls each lambda at once, so their late binding of m is safe (B023)
            out[f"{m.spec}/inject"] = clock(lambda: m.inject(unet), dev)  # noqa: B023
            with torch.enable_grad():
                trainable[m.spec] = count(m.params(unet))
            out[f"{m.spec}/infer_first"] = clock(call, dev)  # first call after injection pays one-time costs
            out[f"{m.spec}/infer"] = clock(call, dev)  # steady state: what the ratio to base uses
            if m.spec in FUSED_IN_ROUNDS:
                out[f"{m.spec}/fuse"] = clock(lambda: m.fuse(unet), dev)  # noqa: B023
                call()  # warm-up on the fused weights
                out[f"{m.spec}/infer_fused"] = clock(call, dev)
                if m.kind != "naive":
                    out[f"{m.spec}/unfuse"] = clock(lambda: m.unfuse(unet), dev)  # noqa: B023
            m.remove(unet, base_weights)
        return out

    times = rounds(task, args.repeats)
    base = times["base/infer"]
    res: dict[str, dict] = {"base": {"infer": summary(base)}}
    for m in methods:
        r = {k.split("/")[1]: summary(v) for k, v in times.items() if k.startswith(m.spec + "/")}
        r["trainable"] = trainable[m.spec]
        r["infer_ratio"] = paired(times[f"{m.spec}/infer"], base)
        r["infer_first_ratio"] = paired(times[f"{m.spec}/infer_first"], base)
        if f"{m.spec}/infer_fused" in times:
            r["infer_fused_ratio"] = paired(times[f"{m.spec}/infer_fused"], base)
        res[m.spec] = r
    m = Method("ours", 32)  # per-call cost of loldu_scale (it walks the module tree for the scale objects)
    m.inject(unet)

    def hook():
        with loldu_sd.loldu_scale(unet, 1.0):
            pass

    res["scale_hook_s"] = summary([clock(hook, dev) for _ in range(5)])
    m.remove(unet)
    return res


def bench_sd(args, tmp: Path) -> dict:
    """Section 3: workers (train step, memory), then interleaved rounds, files, pipeline load/switch."""
    from loldu_sd.diffusers import unet_target_layers

    dev = torch.device(args.device)
    pipe, build_s = build_pipeline(args)
    unet_dir = tmp / "unet"
    pipe.unet.save_pretrained(unet_dir)  # every worker loads this copy instead of re-initialising 860M weights
    res = {"unet_params": count(list(pipe.unet.parameters())), "build_s": build_s, "resolution": args.resolution,
           "latent": args.resolution // 8, "n_target_layers": len(unet_target_layers(pipe.unet, TARGETS))}
    del pipe
    gc.collect()
    res["train"] = {}
    # one fresh process per method so that peaks do not mix; smoke shares one process (imports dominate there)
    for group in [SD_METHODS] if args.smoke else [[s] for s in SD_METHODS]:
        log(f"sd: train step + peak memory of {', '.join(group)} in a fresh process ...")
        res["train"].update(spawn_worker(group, unet_dir, args, tmp))
    pipe, _ = build_pipeline(args, unet_dir)
    pipe.to(dev)
    log("sd: interleaved rounds (inject, inference unfused/fused, fuse/unfuse) ...")
    res["rounds"] = sd_rounds(pipe.unet, workload(pipe.unet, args), [Method.parse(s) for s in SD_METHODS], args)
    log("sd: adapter files ...")
    res["files"] = bench_files(pipe, tmp, args)
    log("sd: pipeline load and switch ...")
    res["pipeline"] = bench_pipeline(pipe, res["files"], tmp, args)
    for f in res["files"].values():
        f.pop("path", None)
    print_sd(res, args)
    return res


def bench_files_section(args, tmp: Path) -> dict:
    """Adapter files and pipeline load/switch only (no training workers): what a file-format change affects."""
    pipe, _ = build_pipeline(args)
    pipe.to(torch.device(args.device))
    res = {"files": bench_files(pipe, tmp, args)}
    res["pipeline"] = bench_pipeline(pipe, res["files"], tmp, args)
    for f in res["files"].values():
        f.pop("path", None)
    print_files(res)
    return res
