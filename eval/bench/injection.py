"""Sections 1 and 2: injection time, top-r LDU vs a full LU, on the SD1.5 projection shapes and on LLaMA-7B shapes."""
from __future__ import annotations

import torch
from torch import nn

import loldu_sd
from loldu_sd import LoLDUConfig, top_r_ldu
from loldu_sd.decompose import single_threaded

from .timing import busy_cores, clock, fmt, paired, rounds, summary, table, torch_threads

SD15_SHAPES = [(320, 320, 30), (320, 768, 10), (640, 640, 30), (640, 768, 10), (1280, 1280, 36), (1280, 768, 12)]


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

    def ours(r):  # on one torch thread, as add_loldu and load_loldu run it
        c = cfgs[r]
        return lambda: single_threaded(lambda: [top_r_ldu(w, r, c.factor_dtype, c.pivot_eps) for w in weights])

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
    res["load_threads"] = bench_load_threads(weights, args)
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


def bench_load_threads(weights: list[torch.Tensor], args) -> dict:
    """What load_loldu factorises (r=32, the file's pivot order forced onto a bf16 copy) on a quiet and a busy
    machine, with torch's default thread count (what add_loldu/load_loldu run with) and with one thread."""
    dev = torch.device(args.device)
    made = [top_r_ldu(w, 32 if min(w.shape) >= 32 else min(w.shape)) for w in weights]
    copies = [w.bfloat16() for w in weights]
    default = torch.get_num_threads()

    def load(threads):
        def run():
            with torch_threads(threads):
                [top_r_ldu(w, f.pivots.numel(), pivots=f.pivots) for w, f in zip(copies, made)]
        return run

    def task():
        return {f"{threads}_threads": clock(load(threads), dev) for threads in sorted({default, 1})}

    res = {"quiet": {k: summary(v) for k, v in rounds(task, args.repeats).items()}}
    with busy_cores() as n:
        res["busy"] = {k: summary(v) for k, v in rounds(task, args.repeats).items()}
    res["busy_processes"] = n
    rows = [[f"{load}, {k.replace('_', ' ')}", fmt(res[load][k])] for load in ("quiet", "busy") for k in res[load]]
    print(f"\n### Load-time factorisation: the {len(weights)} projections, r=32, file pivots forced onto bf16 copies"
          f" (busy: {n} spinning processes started by the benchmark)\n")
    print(table(["machine, torch threads", f"time for all {len(weights)}"], rows))
    return res


# ---- section 2: LLaMA-7B shapes ------------------------------------------------------------------------------------
def bench_llama(args) -> dict:
    """64 x 4096^2 at r=1024 vs full LU, from eval/bench/llama.py (its smoke mode is tiny)."""
    try:
        from .llama import llama_injection_benchmark
    except ImportError as e:
        print(f"\n### LLaMA injection\n\nskipped: eval/bench/llama.py not importable ({e})")
        return {"skipped": f"eval.bench.llama not importable: {e}"}
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
