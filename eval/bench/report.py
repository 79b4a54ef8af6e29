"""Reports: the SD section's tables (print_sd) and section 4, the issues' targets as PASS/MISS (targets)."""
from __future__ import annotations

from .methods import SD_METHODS, Method
from .timing import fmt, table

KB = 1024


def best(ratio: dict | None) -> str:
    """' best 1.01×': min(method) / min(base), the estimate least hurt by other people's load."""
    return "" if not ratio else f" best {ratio['best']:.3g}×"


def _mb(st: dict | None) -> str:
    return "n/a" if st is None else f"{st / 1e6:+.0f} MB"


def print_sd(res: dict, args) -> None:
    """The SD tables: training, inference, pipeline, file format."""
    tr, rd, files = res["train"], res["rounds"], res["files"]
    floor = next((w for w in tr.values() if "floor_step" in w), {})
    what = "tiny UNet of loldu_sd.testing.tiny_pipeline" if args.smoke else "SD1.5-architecture UNet"
    print(f"\n### {what} ({res['unet_params'] / 1e6:.0f} M params, random weights), "
          f"{res['resolution']} px (latent {res['latent']}²), batch 1, {args.device}; "
          f"{res['n_target_layers']} adapted layers\n")
    rows = [["floor: frozen base, grad to input only", "–", "0", "–",
             f"{fmt(floor.get('floor_step'))} (1×)", f"{floor.get('floor_flops', 0) / 1e9:.1f} GFLOP (1×)",
             f"peak {floor.get('floor_peak_bytes', 0) / 1e9:.2f} GB"]]
    for spec in SD_METHODS:
        w, r, f = tr.get(spec, {}), rd.get(spec, {}), files.get(spec, {})
        step = "error: " + w["error"].strip().splitlines()[-1][:60] if "error" in w else \
            f"{fmt(w['step_ratio'], '×')} best {w['step_ratio']['best']:.3g}× [{w['step']['median']:.3g} s]"
        rows.append([Method.parse(spec).label, fmt(r.get("inject")), f"{r.get('trainable', 0):,}",
                     f"{f['bytes'] / 1000:.1f} KB" if f else "n/a", step,
                     f"{w['flops_ratio']:.4f}×" if "flops_ratio" in w else "n/a", _mb(w.get("peak_increase_bytes"))])
    print(table(["method", "init (inject)", "trainable", "file", "train step vs floor [median]", "FLOPs vs floor",
                 f"peak {'RSS' if args.device == 'cpu' else 'allocated'} vs floor"], rows))
    print("\nStep = forward + backward + AdamW step (+ projection for ours); each method in its own process, "
          "interleaved with floor steps there; peak = increase over that process's floor peak. FLOPs: "
          "torch.utils.flop_counter over one step (matmuls and convolutions; the floor also backpropagates "
          "through conv_in to the latent, which adapters do not need).\n")
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
    print_files(res)


def print_files(res: dict) -> None:
    """The pipeline load/switch table and the file-layout table."""
    files, pl = res["files"], res["pipeline"]
    print(f"\nfiles: LoLDU r=32 {files['ours:32']['bytes']:,} B, peft LoRA r=4 {files['lora:4']['bytes']:,} B\n")
    rows = [["LoLDU (ours) r=32: `pipe.load_loldu_weights`", fmt(pl["load"]["ours:32"]), fmt(pl["load_ratio"], "×"),
             "`pipe.set_loldu_adapters`", fmt(pl["switch"]["ours:32"], "ms", 1e3)],
            ["LoLDU (ours) r=32 on a busy machine (every core spinning)", fmt(pl["load_busy"]["ours:32"]), "", "", ""],
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

    def med(d):
        return d["median"]

    def best_of(d):
        return d["best"]

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
    check("injection of the 128 SD1.5 shapes, r=32", "≤ 0.1 s", lambda: med(inj["times"]["top_r_ldu_r32"]),
          lambda v: v <= 0.1, lambda v: f"{v:.3g} s")
    check("injection vs full LU", "≥ 10× faster", lambda: med(inj["speedup_vs_full_lu"]["top_r_ldu_r32"]),
          lambda v: v >= 10, lambda v: f"{v:.3g}×")
    tr = sd.get("train", {})
    check("train step, ours r=32", "≤ 1.02× floor", lambda: med(tr["ours:32"]["step_ratio"]), lambda v: v <= 1.02,
          lambda v: f"{v:.3f}×", lambda: best_of(tr["ours:32"]["step_ratio"]))
    check("train step, ours r=32 vs LoRA r=4", "≤ LoRA r=4",
          lambda: (med(tr["ours:32"]["step_ratio"]), med(tr["lora:4"]["step_ratio"])), lambda v: v[0] <= v[1],
          lambda v: f"{v[0]:.3f}× vs {v[1]:.3f}× floor",
          lambda: (best_of(tr["ours:32"]["step_ratio"]), best_of(tr["lora:4"]["step_ratio"])))
    check("peak memory, ours r=32", "≤ LoRA r=4",
          lambda: (tr["ours:32"]["peak_increase_bytes"], tr["lora:4"]["peak_increase_bytes"]),
          lambda v: v[0] <= v[1], lambda v: f"{v[0] / 1e6:+.0f} MB vs {v[1] / 1e6:+.0f} MB")
    check("init (inject into the UNet), ours r=32", "≤ 0.1 s", lambda: med(sd["rounds"]["ours:32"]["inject"]),
          lambda v: v <= 0.1, lambda v: f"{v:.3g} s")
    check("adapter file, ours r=32", "≤ 40 KB (40,960 B)", lambda: sd["files"]["ours:32"]["bytes"],
          lambda v: v <= 40 * KB, lambda v: f"{v:,} B")
    check("load into the pipeline, ours r=32", "≤ 0.1 s", lambda: med(sd["pipeline"]["load"]["ours:32"]),
          lambda v: v <= 0.1, lambda v: f"{v:.3g} s")
    check("switch between two adapters", "≤ 3 ms", lambda: med(sd["pipeline"]["switch"]["ours:32"]),
          lambda v: v <= 0.003, lambda v: f"{v * 1e3:.3g} ms")
    check("unfused inference, ours r=32", "≤ 1.03× base", lambda: med(sd["rounds"]["ours:32"]["infer_ratio"]),
          lambda v: v <= 1.03, lambda v: f"{v:.3f}×", lambda: best_of(sd["rounds"]["ours:32"]["infer_ratio"]))
    check("fused inference, ours r=32", "= base (within noise)", lambda: sd["rounds"]["ours:32"]["infer_fused_ratio"],
          lambda v: v["min"] <= 1 <= v["max"] or abs(v["median"] - 1) <= 0.02,
          lambda v: f"{v['median']:.3f}× ({v['min']:.3f}–{v['max']:.3f})",
          lambda: best_of(sd["rounds"]["ours:32"]["infer_fused_ratio"]), lambda v: v <= 1.03,
          lambda v: f"{v:.3f}× (no extra cost: ≤ 1.03×)")
    batch = res.get("batch", {})
    check("16 adapters in one batch of 16, ours r=32", "≤ 1.05× one adapter",
          lambda: batch["rounds"]["vs_ours_one"]["ours mixed:16"]["median"], lambda v: v <= 1.05,
          lambda v: f"{v:.3f}×", lambda: batch["rounds"]["vs_ours_one"]["ours mixed:16"]["best"])
    check("memory per resident adapter, ours r=32", "≤ 20 KB (20,480 B)",
          lambda: max(res["library"]["nbytes_per_adapter"], res["library"]["rss_per_adapter"]),
          lambda v: v <= 20 * KB, lambda v: f"{v:,.0f} B (max of diagonals and RSS growth)")
    print("\n### Targets (from this run)" + (" — smoke run on tiny shapes: not meaningful" if smoke else "") + "\n")
    word = {True: "PASS", False: "MISS", None: "n/a"}
    print(table(["target", "required", "measured (median)", "result", "on best-of-N (min/min)"],
                [[t["target"], t["required"], t["measured"], word[t["pass"]],
                  f"{t['best']}: {word[t['best_pass']]}" if "best" in t else "–"] for t in out]))
    return out
