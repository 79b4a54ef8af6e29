"""`python -m eval.bench`: performance of LoLDU against peft LoRA, naive LoLDU and the frozen-base floor.

Sections (each printed as a markdown table, all written to one JSON file):
  injection  top-r LDU of the 128 attention projections of the SD1.5 UNet vs a full torch.linalg.lu of them
  llama      64 LLaMA-7B-shaped 4096x4096 matrices at r=1024 vs full LU (eval/bench_llama.py)
  sd         the SD1.5-architecture UNet (random weights): init, params, file bytes, train step, peak memory,
             inference unfused/fused, fuse/unfuse, pipeline load and adapter switch
  targets    the issues' targets, PASS/MISS, computed from this run
Every comparison is made within one run, as ratios of interleaved measurements (the machines are shared and noisy);
figures are medians over --repeats rounds after one warm-up round, with (min-max) shown; "best" ratios are
min(method) / min(reference), the estimate least hurt by other people's jobs on a shared machine.
Train steps and peak memory run in one fresh subprocess per method (so peaks do not mix), each against the floor
step of its own process. `--smoke` runs every code path on the tiny pipeline in about a minute.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import loldu_sd
from loldu_sd import LoLDUConfig, top_r_ldu

SD15_SHAPES = [(320, 320, 30), (320, 768, 10), (640, 640, 30), (640, 768, 10), (1280, 1280, 36), (1280, 768, 12)]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SD_METHODS = ["ours:1", "ours:8", "ours:32", "lora:4", "lora:32", "naive:32"]
FUSED_IN_ROUNDS = {"ours:32", "lora:4", "naive:32"}  # fused inference is rank-independent: measure one of each
KB = 1024


# ---- timing and formatting --------------------------------------------------------------------------------------
def clock(fn, device: torch.device) -> float:
    """Wall time of fn() in seconds (synchronising the GPU around it)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def summary(xs: list[float]) -> dict:
    """Median, min, max and the raw values."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "values": list(xs)}


def paired(num: list[float], den: list[float]) -> dict:
    """Per-round ratios num[i] / den[i] (rounds interleave, so drift cancels), plus best = min(num) / min(den)."""
    return {**summary([a / b for a, b in zip(num, den)]), "best": min(num) / min(den)}


def rounds(task, repeats: int) -> dict[str, list[float]]:
    """Run task() -> {name: seconds} for one warm-up round plus `repeats` kept rounds; collect per name."""
    out: dict[str, list[float]] = {}
    for i in range(repeats + 1):
        for k, v in task().items():
            if i:
                out.setdefault(k, []).append(v)
    return out


def fmt(st: dict | None, unit: str = "s", scale: float = 1.0) -> str:
    """'median (min-max) unit' with 3 significant digits; 'n/a' when missing."""
    if not st:
        return "n/a"
    f = lambda v: f"{v * scale:.3g}" if abs(v * scale) < 1000 else f"{v * scale:.0f}"  # noqa: E731
    sep = "" if unit == "×" else " "
    return f"{f(st['median'])}{sep}{unit} ({f(st['min'])}–{f(st['max'])})".strip()


def table(headers: list[str], rows: list[list]) -> str:
    """Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def peak_bytes(device: torch.device) -> int:
    """Peak memory so far: torch.cuda.max_memory_allocated on GPU, peak RSS (ru_maxrss) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---- section 1: injection on the 128 SD1.5 projection shapes ------------------------------------------------------
def bench_injection(args) -> dict:
    """top_r_ldu at r=1, 8, 32 and add_loldu(r=32) vs a full torch.linalg.lu of all 128 weights, interleaved."""
    shapes = SD15_SHAPES if not args.smoke else [(o // 10, i // 10, max(1, c // 10)) for o, i, c in SD15_SHAPES]
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    weights = [(torch.randn(o, i, generator=g) / i**0.5).to(dev) for o, i, c in shapes for _ in range(c)]
    layers = nn.ModuleDict({f"l{k}": nn.Linear(w.shape[1], w.shape[0], bias=False, device=dev)
                            for k, w in enumerate(weights)})
    with torch.no_grad():
        for k, w in enumerate(weights):
            layers[f"l{k}"].weight.copy_(w)
    cfgs = {r: LoLDUConfig(rank=r, target_modules=".*") for r in (1, 8, 32)}

    def ours(r):
        c = cfgs[r]
        return lambda: [top_r_ldu(w, r, c.factor_dtype, c.canonical_dtype, c.pivot_eps) for w in weights]

    def add():
        loldu_sd.add_loldu(layers, cfgs[32])

    def task():
        out = {"full_lu": clock(lambda: [torch.linalg.lu(w) for w in weights], dev)}
        out.update({f"top_r_ldu_r{r}": clock(ours(r), dev) for r in cfgs})
        out["add_loldu_r32"] = clock(add, dev)
        loldu_sd.remove_loldu(layers)
        return out

    times = rounds(task, args.repeats)
    res = {"n_layers": len(weights), "n_params": sum(w.numel() for w in weights),
           "shapes": [[o, i, c] for o, i, c in shapes], "times": {k: summary(v) for k, v in times.items()},
           "speedup_vs_full_lu": {k: paired(times["full_lu"], v) for k, v in times.items() if k != "full_lu"}}
    rows = [["full `torch.linalg.lu` (reference)", fmt(res["times"]["full_lu"]), "1×"]]
    for k in times:
        if k != "full_lu":
            name = (f"`top_r_ldu` r={k.split('_r')[-1]}" if k.startswith("top")
                    else "`add_loldu` r=32 (wrap + decompose)")
            rows.append([name, fmt(res["times"][k]), fmt(res["speedup_vs_full_lu"][k], "×")])
    print(f"\n### Injection: {len(weights)} SD1.5 attention projections ({res['n_params'] / 1e6:.1f} M params"
          f"{', shapes ÷10 for smoke' if args.smoke else ''}), {args.device}\n")
    print(table(["method", f"time for all {len(weights)}", "faster than full LU"], rows))
    return res


# ---- section 2: LLaMA-7B shapes ------------------------------------------------------------------------------------
def bench_llama(args) -> dict:
    """64 x 4096^2 at r=1024 vs full LU, from eval/bench_llama.py (its smoke mode is tiny)."""
    try:
        from eval.bench_llama import llama_injection_benchmark
    except ImportError as e:
        print(f"\n### LLaMA injection\n\nskipped: eval/bench_llama.py not importable ({e})")
        return {"skipped": f"eval.bench_llama not importable: {e}"}
    res = llama_injection_benchmark(64, 4096, 1024, device=args.device, seed=args.seed, smoke=args.smoke)
    n, size, rank = res.get("n_matrices"), res.get("size"), res.get("rank")
    print(f"\n### LLaMA-7B-shaped injection: {n} × {size}² at r={rank}, {args.device}"
          + (" (smoke: tiny sizes)" if args.smoke else "") + "\n")
    rows = [["full `torch.linalg.lu` (reference)", f"{res.get('full_lu_total_s', float('nan')):.3g} s",
             f"{res.get('full_lu_s_per_matrix', float('nan')):.3g} s", "1×"],
            [f"`top_r_ldu` r={rank}", f"{res.get('top_r_ldu_total_s', float('nan')):.3g} s",
             f"{res.get('top_r_ldu_s_per_matrix', float('nan')):.3g} s", f"{res.get('speedup', float('nan')):.3g}×"]]
    print(table(["method", f"total for {n}", "mean per matrix", "faster than full LU"], rows))
    print(f"\n(max |pivot difference| vs full LU on the first matrix: {res.get('max_pivot_diff_vs_full_lu')})")
    return res


# ---- SD methods: one interface over ours, peft LoRA and naive LoLDU -----------------------------------------------
@dataclass
class Method:
    """One adapter method at one rank, with the operations the benchmark needs."""

    kind: str  # "ours" | "lora" | "naive"
    rank: int

    @classmethod
    def parse(cls, spec: str) -> "Method":
        kind, rank = spec.split(":")
        return cls(kind, int(rank))

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.rank}"

    @property
    def label(self) -> str:
        return {"ours": "LoLDU (ours)", "lora": "peft LoRA", "naive": "naive LoLDU"}[self.kind] + f" r={self.rank}"

    def inject(self, unet: nn.Module) -> None:
        if self.kind == "ours":
            loldu_sd.add_loldu_to_unet(unet, LoLDUConfig(rank=self.rank, alpha=self.rank, target_modules=TARGETS), "a")
        elif self.kind == "lora":
            from peft import LoraConfig

            unet.add_adapter(LoraConfig(r=self.rank, lora_alpha=self.rank, init_lora_weights="gaussian",
                                        target_modules=list(TARGETS)), adapter_name="a")
        else:
            from loldu_sd.diffusers import unet_target_layers

            from .bench_naive import add_naive_loldu
            add_naive_loldu(unet, unet_target_layers(unet, TARGETS), self.rank)

    def params(self, unet: nn.Module) -> list[torch.Tensor]:
        if self.kind == "ours":
            return loldu_sd.loldu_parameters(unet)
        if self.kind == "naive":
            from .bench_naive import naive_parameters
            return naive_parameters(unet)
        return [p for p in unet.parameters() if p.requires_grad]

    def after_step(self, unet: nn.Module) -> None:
        if self.kind == "ours":  # the projection is part of a LoLDU training step (trainer calls it every step)
            loldu_sd.project_loldu_(unet)

    def disable(self, unet: nn.Module) -> None:
        """Bypass the adapter (the floor step then runs the base computation on the same module tree)."""
        if self.kind == "ours":
            for _, layer in loldu_sd.loldu_layers(unet):
                layer.set_active([])
        elif self.kind == "lora":
            unet.disable_adapters()
        else:
            from .bench_naive import bypass_naive_loldu
            self._bypassed = bypass_naive_loldu(unet)

    def enable(self, unet: nn.Module) -> None:
        if self.kind == "ours":
            loldu_sd.set_loldu_adapters(unet, ["a"])
        elif self.kind == "lora":
            unet.enable_adapters()
        else:
            from .bench_naive import restore_naive_loldu
            restore_naive_loldu(self._bypassed)

    def fuse(self, unet: nn.Module) -> None:
        if self.kind == "ours":
            loldu_sd.merge_loldu(unet)  # what pipe.fuse_loldu() calls per component
        elif self.kind == "lora":
            unet.fuse_lora()  # what pipe.fuse_lora() calls for the UNet
        else:
            from .bench_naive import fuse_naive_loldu
            fuse_naive_loldu(unet)  # one way: the parametrization is baked in and dropped

    def unfuse(self, unet: nn.Module) -> None:
        if self.kind == "ours":
            loldu_sd.unmerge_loldu(unet)
        elif self.kind == "lora":
            unet.unfuse_lora()

    def remove(self, unet: nn.Module, base_weights: dict[str, torch.Tensor] | None = None) -> None:
        """Take the adapter out; naive LoLDU overwrote W0, so it is restored from `base_weights` when given."""
        if self.kind == "ours":
            loldu_sd.remove_loldu(unet)
            drop_loldu_scale_hooks(unet)
        elif self.kind == "lora":
            unet.unload_lora()
        else:
            from .bench_naive import remove_naive_loldu
            remove_naive_loldu(unet)
        if base_weights is not None and self.kind == "naive":
            with torch.no_grad():
                for name, w in base_weights.items():
                    unet.get_submodule(name).weight.copy_(w)


def drop_loldu_scale_hooks(unet: nn.Module) -> None:
    """remove_loldu leaves the UNet's cross_attention_kwargs scale hooks installed; drop them so 'base' stays pure."""
    for hooks in (unet._forward_pre_hooks, unet._forward_hooks):
        for k in [k for k, fn in hooks.items() if getattr(fn, "__module__", "") == "loldu_sd.diffusers"]:
            del hooks[k]
            for extra in (unet._forward_pre_hooks_with_kwargs, unet._forward_hooks_with_kwargs,
                          unet._forward_hooks_always_called):
                extra.pop(k, None)
    unet._loldu_scale_hooked = False


def count(tensors: list[torch.Tensor]) -> int:
    """Total number of values."""
    return sum(t.numel() for t in tensors)


# ---- SD workload ---------------------------------------------------------------------------------------------------
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


def workload(unet: nn.Module, args) -> tuple[torch.Tensor, ...]:
    """Fixed inputs: latent (1, C, res/8, res/8), timestep 500, text embeddings (1, 77, cross_dim), target noise."""
    g = torch.Generator().manual_seed(args.seed)
    side = args.resolution // 8
    cfg = unet.config
    x = torch.randn(1, cfg.in_channels, side, side, generator=g)
    enc = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    target = torch.randn(1, cfg.out_channels, side, side, generator=g)
    dev = torch.device(args.device)
    return x.to(dev), torch.tensor([500], device=dev), enc.to(dev), target.to(dev)


def train_step(unet, x, t, enc, target, opt, after=None) -> None:
    """One step: forward, MSE to fixed noise, backward, AdamW step (+ the method's post-step hook)."""
    opt.zero_grad(set_to_none=True)
    loss = F.mse_loss(unet(x, t, enc).sample.float(), target)
    loss.backward()
    opt.step()
    if after is not None:
        after()


def run_worker(args) -> None:
    """Fresh process: for each method in --worker (comma-separated), measure_method; write {spec: result} JSON."""
    from diffusers import UNet2DConditionModel

    import peft  # noqa: F401  (imported before the floor peak so its modules do not count as LoRA's memory)
    from torch.nn.utils import parametrize  # noqa: F401

    from . import bench_naive  # noqa: F401

    torch.linalg.lu_factor(torch.randn(8, 8, device=args.device))  # map LAPACK's code pages before the floor peak
    out = {}
    for spec in args.worker.split(","):
        unet = UNet2DConditionModel.from_pretrained(args.unet_dir).to(args.device)
        unet.requires_grad_(False)
        out[spec] = measure_method(unet, Method.parse(spec), args)
        del unet
        gc.collect()
    Path(args.worker_out).write_text(json.dumps(out))


def measure_method(unet: nn.Module, m: Method, args) -> dict:
    """Floor steps, inject, then method steps interleaved with floor steps (adapter bypassed); peaks around them."""
    dev = torch.device(args.device)
    x, t, enc, target = workload(unet, args)
    xf = x.clone().requires_grad_(True)  # the floor: frozen base, backprop to the input latent only
    opt_floor = torch.optim.AdamW([xf], lr=1e-3)
    floor = lambda: clock(lambda: train_step(unet, xf, t, enc, target, opt_floor), dev)  # noqa: E731
    for _ in range(2):  # warm-up; the second step settles the allocator before the floor peak is read
        floor()
    floor_peak = peak_bytes(dev)
    inject_s = clock(lambda: m.inject(unet), dev)
    params = m.params(unet)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    step = lambda: clock(lambda: train_step(unet, x, t, enc, target, opt, lambda: m.after_step(unet)), dev)  # noqa
    step()  # warm-up (creates the AdamW state)
    fl, st = [], []
    for _ in range(args.repeats):
        m.disable(unet)
        fl.append(floor())
        m.enable(unet)
        st.append(step())
    peak = peak_bytes(dev)
    return {"method": m.spec, "inject_s_cold": inject_s, "trainable": count(params), "floor_step": summary(fl),
            "step": summary(st), "step_ratio": paired(st, fl), "floor_peak_bytes": floor_peak, "peak_bytes": peak,
            "peak_increase_bytes": peak - floor_peak,
            "peak_kind": "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "peak RSS (ru_maxrss)"}


def spawn_worker(specs: list[str], unet_dir: Path, args, tmp: Path) -> dict[str, dict]:
    """Run run_worker for `specs` in one fresh Python process; {spec: result or {'error': ...}}."""
    out = tmp / f"worker-{len(list(tmp.glob('worker-*')))}.json"
    cmd = [sys.executable, "-m", "eval.bench", "--worker", ",".join(specs), "--unet-dir", str(unet_dir),
           "--worker-out", str(out), "--device", args.device, "--resolution", str(args.resolution),
           "--repeats", str(args.repeats), "--seed", str(args.seed)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0 or not out.is_file():
        return {s: {"method": s, "error": (proc.stderr or proc.stdout)[-2000:]} for s in specs}
    res = json.loads(out.read_text())
    for r in res.values():
        r["process_s"] = time.perf_counter() - t
        r["shared_process"] = len(specs) > 1  # smoke: peaks of several methods mix
    return res


# ---- section 3: Stable Diffusion UNet ------------------------------------------------------------------------------
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
        for m in methods:
            out[f"{m.spec}/inject"] = clock(lambda: m.inject(unet), dev)
            with torch.enable_grad():
                trainable[m.spec] = count(m.params(unet))
            out[f"{m.spec}/infer_first"] = clock(call, dev)  # first call after injection pays one-time costs
            out[f"{m.spec}/infer"] = clock(call, dev)  # steady state: what the ratio to base uses
            if m.spec in FUSED_IN_ROUNDS:
                out[f"{m.spec}/fuse"] = clock(lambda: m.fuse(unet), dev)
                call()  # warm-up on the fused weights
                out[f"{m.spec}/infer_fused"] = clock(call, dev)
                if m.kind != "naive":
                    out[f"{m.spec}/unfuse"] = clock(lambda: m.unfuse(unet), dev)
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
    m = Method("ours", 32)  # per-call cost of the cross_attention_kwargs scale hooks (they walk the module tree)
    m.inject(unet)

    def hook():
        with loldu_sd.loldu_scale(unet, 1.0):
            pass

    res["scale_hook_s"] = summary([clock(hook, dev) for _ in range(5)])
    m.remove(unet)
    return res


def header_bytes(path: Path) -> int:
    """Size of a safetensors file's JSON header (the first 8 bytes give it, little endian)."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def randomise_(tensors: list[torch.Tensor], seed: int) -> None:
    """Perturb trained values a little so files hold realistic (non-initial) numbers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tensors:
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

    from .bench_naive import save_naive_loldu

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
                per_layer[f"unet.{name}.loldu.z"] = tensors["unet.loldu.z"][off: off + rank].clone()
                per_layer[f"unet.{name}.loldu.sigma"] = tensors["unet.loldu.sigma"][i: i + 1].clone()
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
        pipe.unload_loldu_weights()
        drop_loldu_scale_hooks(pipe.unet)
        out["lora:4"] = clock(lambda: pipe.load_lora_weights(lora_a, adapter_name="x"), dev)
        pipe.unload_lora_weights()
        return out

    load = rounds(task, args.repeats)
    n_switch = 2 * max(5, args.repeats)
    pipe.load_loldu_weights(ours_a, adapter_name="a")
    pipe.load_loldu_weights(ours_b, adapter_name="b")
    sw_ours = [clock(lambda: pipe.set_loldu_adapters("ab"[i % 2]), dev) for i in range(n_switch + 2)][2:]
    pipe.unload_loldu_weights()
    drop_loldu_scale_hooks(pipe.unet)
    pipe.load_lora_weights(lora_a, adapter_name="a")
    pipe.load_lora_weights(lora_b, adapter_name="b")
    sw_lora = [clock(lambda: pipe.set_adapters("ab"[i % 2]), dev) for i in range(n_switch + 2)][2:]
    pipe.unload_lora_weights()
    return {"load": {k: summary(v) for k, v in load.items()}, "load_ratio": paired(load["ours:32"], load["lora:4"]),
            "switch": {"ours:32": summary(sw_ours), "lora:4": summary(sw_lora)},
            "where": "StableDiffusionPipeline: SD1.5-config UNet + tiny VAE/CLIP (adapters touch the UNet only)"
            if not args.smoke else "tiny StableDiffusionPipeline"}


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


def best(ratio: dict | None) -> str:
    """' best 1.01×': min(method) / min(base), the estimate least hurt by other people's load."""
    return "" if not ratio else f" best {ratio['best']:.3g}×"


def _mb(st: dict | None) -> str:
    return "n/a" if st is None else f"{st / 1e6:+.0f} MB"


def print_sd(res: dict, args) -> None:
    """The SD tables: training, inference, pipeline, file format."""
    tr, rd, files, pl = res["train"], res["rounds"], res["files"], res["pipeline"]
    floor = next((w for w in tr.values() if "floor_step" in w), {})
    what = "tiny UNet of loldu_sd.testing.tiny_pipeline" if args.smoke else "SD1.5-architecture UNet"
    print(f"\n### {what} ({res['unet_params'] / 1e6:.0f} M params, random weights), "
          f"{res['resolution']} px (latent {res['latent']}²), batch 1, {args.device}; "
          f"{res['n_target_layers']} adapted layers\n")
    rows = [["floor: frozen base, grad to input only", "–", "0", "–",
             f"{fmt(floor.get('floor_step'))} (1×)", f"peak {floor.get('floor_peak_bytes', 0) / 1e9:.2f} GB"]]
    for spec in SD_METHODS:
        w, r, f = tr.get(spec, {}), rd.get(spec, {}), files.get(spec, {})
        step = "error: " + w["error"].strip().splitlines()[-1][:60] if "error" in w else \
            f"{fmt(w['step_ratio'], '×')} best {w['step_ratio']['best']:.3g}× [{w['step']['median']:.3g} s]"
        rows.append([Method.parse(spec).label, fmt(r.get("inject")), f"{r.get('trainable', 0):,}",
                     f"{f['bytes'] / 1000:.1f} KB" if f else "n/a", step, _mb(w.get("peak_increase_bytes"))])
    print(table(["method", "init (inject)", "trainable", "file", "train step vs floor [median]",
                 f"peak {'RSS' if args.device == 'cpu' else 'allocated'} vs floor"], rows))
    print("\nStep = forward + backward + AdamW step (+ projection for ours); each method in its own process, "
          "interleaved with floor steps there; peak = increase over that process's floor peak.\n")
    rows = [["base", fmt(rd["base"]["infer"]), "1×", "–", "–", "–", "–"]]
    for spec in SD_METHODS:
        r = rd[spec]
        rows.append([Method.parse(spec).label, fmt(r["infer"]), fmt(r["infer_ratio"], "×") + best(r["infer_ratio"]),
                     fmt(r.get("infer_fused_ratio"), "×") + best(r.get("infer_fused_ratio")),
                     fmt(r.get("fuse"), "ms", 1e3),
                     fmt(r.get("unfuse"), "ms", 1e3) if spec != "naive:32" else "impossible (W0 overwritten)",
                     fmt(r["infer_first_ratio"], "×")])
    print(table(["method", "one UNet call (no grad)", "unfused vs base", "fused vs base", "fuse", "unfuse",
                 "1st call after inject vs base"], rows))
    print(f"\n(fuse/unfuse on the UNet: merge_loldu/unmerge_loldu, unet.fuse_lora/unfuse_lora; the LoLDU "
          f"scale hooks cost {fmt(rd['scale_hook_s'], 'ms', 1e3)} per UNet call)\n")
    rows = [["LoLDU (ours) r=32: `pipe.load_loldu_weights`", fmt(pl["load"]["ours:32"]), fmt(pl["load_ratio"], "×"),
             "`pipe.set_loldu_adapters`", fmt(pl["switch"]["ours:32"], "ms", 1e3)],
            ["peft LoRA r=4: `pipe.load_lora_weights`", fmt(pl["load"]["lora:4"]), "1×", "`pipe.set_adapters`",
             fmt(pl["switch"]["lora:4"], "ms", 1e3)]]
    print(table(["load into the pipeline", "time", "vs LoRA", "switch between two loaded adapters", "time"], rows))
    print(f"\n(pipeline: {pl['where']}; each load into a clean pipeline, then unloaded)\n")
    fm = files["format"]
    rows = [[k.replace("_", " "), f"{v['header_bytes']:,}", f"{v['bytes']:,}"]
            for k, v in fm.items() if isinstance(v, dict)]
    print(table([f"LoLDU r=32 file layout ({fm['n_layers']} layers)", "header bytes", "total bytes"], rows))


# ---- section 4: targets --------------------------------------------------------------------------------------------
def targets(res: dict, smoke: bool = False) -> list[dict]:
    """Each issue target as PASS/MISS from this run's numbers (n/a when the section did not run)."""
    out = []

    def check(name, required, get, ok, show, get_best=None, ok_best=None, show_best=None):
        try:
            v = get()
            row = {"target": name, "required": required, "measured": show(v), "value": v, "pass": bool(ok(v))}
        except (KeyError, TypeError, ZeroDivisionError):
            out.append({"target": name, "required": required, "measured": "n/a", "value": None, "pass": None})
            return
        if get_best is not None:  # the same target on min/min ratios: tells real misses from load noise
            b = get_best()
            row.update(best=(show_best or show)(b), best_pass=bool((ok_best or ok)(b)))
        out.append(row)

    inj, sd = res.get("injection", {}), res.get("sd", {})
    med = lambda d: d["median"]  # noqa: E731
    check("injection of the 128 SD1.5 shapes, r=32", "≤ 0.1 s", lambda: med(inj["times"]["top_r_ldu_r32"]),
          lambda v: v <= 0.1, lambda v: f"{v:.3g} s")
    check("injection vs full LU", "≥ 10× faster", lambda: med(inj["speedup_vs_full_lu"]["top_r_ldu_r32"]),
          lambda v: v >= 10, lambda v: f"{v:.3g}×")
    tr = sd.get("train", {})
    best = lambda d: d["best"]  # noqa: E731
    check("train step, ours r=32", "≤ 1.02× floor", lambda: med(tr["ours:32"]["step_ratio"]), lambda v: v <= 1.02,
          lambda v: f"{v:.3f}×", lambda: best(tr["ours:32"]["step_ratio"]))
    check("train step, ours r=32 vs LoRA r=4", "≤ LoRA r=4",
          lambda: (med(tr["ours:32"]["step_ratio"]), med(tr["lora:4"]["step_ratio"])), lambda v: v[0] <= v[1],
          lambda v: f"{v[0]:.3f}× vs {v[1]:.3f}× floor",
          lambda: (best(tr["ours:32"]["step_ratio"]), best(tr["lora:4"]["step_ratio"])))
    check("peak memory, ours r=32", "≤ LoRA r=4",
          lambda: (tr["ours:32"]["peak_increase_bytes"], tr["lora:4"]["peak_increase_bytes"]),
          lambda v: v[0] <= v[1], lambda v: f"{v[0] / 1e6:+.0f} MB vs {v[1] / 1e6:+.0f} MB")
    check("init (inject into the UNet), ours r=32", "≤ 0.1 s", lambda: med(sd["rounds"]["ours:32"]["inject"]),
          lambda v: v <= 0.1, lambda v: f"{v:.3g} s")
    check("adapter file, ours r=32", "≤ 40 KB (40,960 B)", lambda: sd["files"]["ours:32"]["bytes"],
          lambda v: v <= 40 * KB, lambda v: f"{v:,} B")
    check("load into the pipeline, ours r=32", "≤ 0.1 s", lambda: med(sd["pipeline"]["load"]["ours:32"]),
          lambda v: v <= 0.1, lambda v: f"{v:.3g} s")
    check("switch between two adapters", "≤ 6 ms", lambda: med(sd["pipeline"]["switch"]["ours:32"]),
          lambda v: v <= 0.006, lambda v: f"{v * 1e3:.3g} ms")
    check("unfused inference, ours r=32", "≤ 1.03× base", lambda: med(sd["rounds"]["ours:32"]["infer_ratio"]),
          lambda v: v <= 1.03, lambda v: f"{v:.3f}×", lambda: best(sd["rounds"]["ours:32"]["infer_ratio"]))
    check("fused inference, ours r=32", "= base (within noise)", lambda: sd["rounds"]["ours:32"]["infer_fused_ratio"],
          lambda v: v["min"] <= 1 <= v["max"] or abs(v["median"] - 1) <= 0.02,
          lambda v: f"{v['median']:.3f}× ({v['min']:.3f}–{v['max']:.3f})",
          lambda: best(sd["rounds"]["ours:32"]["infer_fused_ratio"]), lambda v: v <= 1.03,
          lambda v: f"{v:.3f}× (no extra cost: ≤ 1.03×)")
    print("\n### Targets (from this run)" + (" — smoke run on tiny shapes: not meaningful" if smoke else "") + "\n")
    word = {True: "PASS", False: "MISS", None: "n/a"}
    print(table(["target", "required", "measured (median)", "result", "on best-of-N (min/min)"],
                [[t["target"], t["required"], t["measured"], word[t["pass"]],
                  f"{t['best']}: {word[t['best_pass']]}" if "best" in t else "–"] for t in out]))
    return out


# ---- CLI -----------------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    """Progress on stderr (stdout carries the tables)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def meta(args) -> dict:
    """Where and when: date, device, versions, threads, load average."""
    import diffusers
    import peft

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU: {cpu}, {torch.get_num_threads()} threads"
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": dev,
            "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "smoke": args.smoke, "resolution": args.resolution,
            "repeats": args.repeats, "seed": args.seed, "loadavg_start": list(os.getloadavg())}


def parse_args(argv=None):
    """Command line; --worker/--unet-dir/--worker-out are internal (one method's step in a fresh process)."""
    p = argparse.ArgumentParser(prog="python -m eval.bench", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="every code path on the tiny pipeline (CI), ~1 minute")
    p.add_argument("--resolution", type=int, default=None, help="image size in px (default 256; smoke 64)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=3, help="kept rounds after one warm-up round (smoke: at most 2)")
    p.add_argument("--out", default="bench_results.json", help="JSON output path")
    p.add_argument("--only", choices=["injection", "llama", "sd"], help="run one section (targets use what ran)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--unet-dir", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here")
    args.resolution = args.resolution or (64 if args.smoke else 256)
    if args.smoke:
        args.repeats = min(args.repeats, 2)
    if args.resolution % 64:
        p.error(f"--resolution {args.resolution}: must be a multiple of 64 (the UNet downsamples the latent 3 times)")
    return args


def main(argv=None) -> dict | None:
    """Run the selected sections, print their tables, write the JSON."""
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return None
    logging_quiet()
    t0 = time.perf_counter()
    res = {"meta": meta(args)}
    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix="loldu-bench-"))
    print(f"# eval.bench — {res['meta']['date']} — {res['meta']['device']} — load average "
          f"{' '.join(f'{x:.2f}' for x in res['meta']['loadavg_start'])}" + (" — SMOKE (tiny pipeline)" if args.smoke
                                                                             else ""))
    try:
        for section in [args.only] if args.only else ["injection", "llama", "sd"]:
            log(f"section {section} ...")
            res[section] = bench_sd(args, tmp) if section == "sd" else globals()[f"bench_{section}"](args)
            out.write_text(json.dumps(res, indent=1))  # partial results survive a later crash
        res["targets"] = targets(res, args.smoke)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["meta"].update(loadavg_end=list(os.getloadavg()), seconds=time.perf_counter() - t0)
    out.write_text(json.dumps(res, indent=1))
    print(f"\n{res['meta']['seconds']:.0f} s; load average at the end "
          f"{' '.join(f'{x:.2f}' for x in res['meta']['loadavg_end'])}; JSON: {out}")
    return res


def logging_quiet() -> None:
    """Silence diffusers/transformers info and warnings about the deliberately tiny components."""
    import warnings

    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # two LoRAs loaded on purpose


if __name__ == "__main__":
    main()
