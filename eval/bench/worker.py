"""SD workload and the worker: one method's train step and peak memory, measured in a fresh process.

spawn_worker starts `python -m eval.bench --worker SPECS ...`; main() hands those internal flags to run_worker,
which writes {spec: result} as JSON for the parent process to read.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .methods import Method, count
from .timing import clock, paired, peak_bytes, summary


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


def step_flops(step) -> int:
    """FLOPs that torch.utils.flop_counter counts in one call of `step`."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def run_worker(args) -> None:
    """Fresh process: for each method in --worker (comma-separated), measure_method; write {spec: result} JSON."""
    import peft  # noqa: F401  (imported before the floor peak so its modules do not count as LoRA's memory)
    from diffusers import UNet2DConditionModel
    from torch.nn.utils import parametrize  # noqa: F401

    from . import naive  # noqa: F401

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
    def floor():
        return clock(lambda: train_step(unet, xf, t, enc, target, opt_floor), dev)

    for _ in range(2):  # warm-up; the second step settles the allocator before the floor peak is read
        floor()
    floor_peak = peak_bytes(dev)
    inject_s = clock(lambda: m.inject(unet), dev)
    params = m.params(unet)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    def step():
        return clock(lambda: train_step(unet, x, t, enc, target, opt, lambda: m.after_step(unet)), dev)

    step()  # warm-up (creates the AdamW state)
    fl, st = [], []
    for _ in range(args.repeats):
        m.disable(unet)
        fl.append(floor())
        m.enable(unet)
        st.append(step())
    peak = peak_bytes(dev)
    # machine-independent cost: FLOPs of one step (torch's FlopCounterMode: matmuls, convs; not elementwise ops)
    m.disable(unet)
    floor_flops = step_flops(lambda: train_step(unet, xf, t, enc, target, opt_floor))
    m.enable(unet)
    flops = step_flops(lambda: train_step(unet, x, t, enc, target, opt, lambda: m.after_step(unet)))
    return {"method": m.spec, "floor_flops": floor_flops, "flops": flops, "flops_ratio": flops / floor_flops,
            "inject_s_cold": inject_s, "trainable": count(params), "floor_step": summary(fl),
            "step": summary(st), "step_ratio": paired(st, fl), "floor_peak_bytes": floor_peak, "peak_bytes": peak,
            "peak_increase_bytes": peak - floor_peak,
            "peak_kind": "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "peak RSS (ru_maxrss)"}


def spawn_worker(specs: list[str], unet_dir: Path, args, tmp: Path) -> dict[str, dict]:
    """Run run_worker for `specs` in one fresh Python process; {spec: result or {'error': ...}}."""
    out = tmp / f"worker-{len(list(tmp.glob('worker-*')))}.json"
    cmd = [sys.executable, "-m", "eval.bench", "--worker", ",".join(specs), "--unet-dir", str(unet_dir),
           "--worker-out", str(out), "--device", args.device, "--resolution", str(args.resolution),
           "--repeats", str(args.repeats), "--seed", str(args.seed)]
    # the repository root (eval/bench/worker.py -> parents[2]) first on the path, so the child finds this `eval`
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0 or not out.is_file():
        return {s: {"method": s, "error": (proc.stderr or proc.stdout)[-2000:]} for s in specs}
    res = json.loads(out.read_text())
    for r in res.values():
        r["process_s"] = time.perf_counter() - t
        r["shared_process"] = len(specs) > 1  # smoke: peaks of several methods mix
    return res
