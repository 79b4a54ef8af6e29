"""The quality benchmark's summary: learning-rate winners, the table, the validity gate, the chart and the grids.

Subject fidelity is the mean of DINO* and CLIP-I*. "Gap closed" is (method - base) / (concept photos - base) of it
on the same concept: 0 = the base model, 1 = as close to the photos as the photos are to each other.
Winner rule: per method, the learning rate with the best mean subject fidelity at the last checkpoint among those
whose mean prior and CLIP-T* stay within 10 % of the base's (prior >= 0.9, CLIP-T* >= 0.9 x base); when none does,
the best fidelity anyway, flagged (kept_base false).
Gate: at the last checkpoint, LoRA r=4 and full fine-tuning (winner lr, mean over seeds) close >= 60 % of the gap
on every concept, with CLIP-T* >= 0.9 x base and prior >= 0.9.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from PIL import Image, ImageDraw

from .quality_run import BASE

METRICS = ("dino", "clip_i", "clip_t", "prior", "fidelity", "closed", "size")
GATE_METHODS, GATE_CLOSED, WITHIN = ("lora", "full"), 0.6, 0.9


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def stats(values: list[float]) -> dict:
    """Mean and spread (sample standard deviation; 0 for one value) of a list."""
    return {"mean": round(_mean(values), 4), "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "n": len(values)}


def references(records: list[dict]) -> dict[str, dict]:
    """Per concept: the base model's scores and the concept photos' (real) fidelity."""
    out = {}
    for r in records:
        if r["job"]["method"] == BASE:
            real = r["real"]
            out[r["job"]["concept"]] = {"base": r["steps"]["0"], "real": {**real, "fidelity": round(
                (real["dino"] + real["clip_i"]) / 2, 4)}}
    return out


def with_closure(row: dict, ref: dict) -> dict:
    """A checkpoint's scores plus the fraction of the base-to-photos fidelity gap it closed."""
    gap = ref["real"]["fidelity"] - ref["base"]["fidelity"]
    return {**row, "closed": round((row["fidelity"] - ref["base"]["fidelity"]) / gap, 4) if gap else float("nan")}


def by_lr(records: list[dict], refs: dict) -> dict[str, dict[float, list[dict]]]:
    """method -> lr -> the runs' records (checkpoint rows extended with 'closed')."""
    out: dict[str, dict[float, list[dict]]] = {}
    for r in records:
        job = r["job"]
        if job["method"] != BASE:
            rows = {s: with_closure(row, refs[job["concept"]]) for s, row in r["steps"].items()}
            out.setdefault(job["method"], {}).setdefault(job["lr"], []).append({**r, "steps": rows})
    return out


def step_stats(runs: list[dict], step: str) -> dict:
    """Mean and spread of every metric at one checkpoint over the runs (concepts x seeds)."""
    return {m: stats([r["steps"][step][m] for r in runs]) for m in METRICS}


def pick_lr(lrs: dict[float, list[dict]], last: str, base_clip_t: float) -> dict:
    """The winner rule of the module docstring; returns the lr, whether it kept the prior, and every lr's numbers."""
    grid = {lr: step_stats(runs, last) for lr, runs in sorted(lrs.items())}
    kept = [lr for lr, s in grid.items()
            if s["prior"]["mean"] >= WITHIN and s["clip_t"]["mean"] >= WITHIN * base_clip_t]
    pool = kept or list(grid)
    best = max(pool, key=lambda lr: grid[lr]["fidelity"]["mean"])
    return {"lr": best, "kept_base": bool(kept), "grid": {f"{lr:g}": s for lr, s in grid.items()}}


def gate(method: str, runs: list[dict], refs: dict, last: str) -> dict[str, dict]:
    """PASS/FAIL per concept for one baseline (winner lr; mean over seeds at the last checkpoint)."""
    out = {}
    for concept, ref in refs.items():
        rows = [r["steps"][last] for r in runs if r["job"]["concept"] == concept]
        if not rows:
            continue
        closed, clip_t, prior = (_mean([r[k] for r in rows]) for k in ("closed", "clip_t", "prior"))
        ok = closed >= GATE_CLOSED and clip_t >= WITHIN * ref["base"]["clip_t"] and prior >= WITHIN
        out[concept] = {"pass": ok, "closed": round(closed, 4), "clip_t": round(clip_t, 4),
                        "base_clip_t": ref["base"]["clip_t"], "prior": round(prior, 4)}
    return out


def summarise(records: list[dict], methods: list[str], steps: tuple[int, ...]) -> dict:
    """Everything quality.json holds besides the runs: references, winners, the table's rows, the gate."""
    refs, grouped, last = references(records), by_lr(records, references(records)), str(max(steps))
    base_clip_t = _mean([r["base"]["clip_t"] for r in refs.values()])
    winners, table, gates = {}, [], {}
    for method in [m for m in methods if m in grouped]:
        winners[method] = pick_lr(grouped[method], last, base_clip_t)
        runs = grouped[method][winners[method]["lr"]]
        table += [{"method": method, "lr": winners[method]["lr"], "steps": s, **step_stats(runs, str(s))}
                  for s in steps]
        if method in GATE_METHODS:
            gates[method] = gate(method, runs, refs, last)
    reference_rows = [
        {"method": "concept images", **{m: stats([r["real"][m] for r in refs.values()])
                                        for m in ("dino", "clip_i", "fidelity")}},
        {"method": "base model", "steps": 0, **{m: stats([r["base"][m] for r in refs.values()])
                                                for m in ("dino", "clip_i", "clip_t", "prior", "fidelity")}}]
    return {"references": refs, "reference_rows": reference_rows, "winners": winners, "table": table,
            "gate": gates, "gate_step": int(last)}


def human_size(n: float) -> str:
    """Bytes as B / KB / MB (1 KB = 1024 B)."""
    for unit, scale in (("MB", 1024 ** 2), ("KB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def markdown(summary: dict) -> str:
    """The table: method x steps, mean ± spread over concepts x seeds, the reference rows first."""
    head = ["method", "lr", "steps", "DINO*", "CLIP-I*", "CLIP-T*", "prior", "gap closed", "size"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(row: dict, m: str) -> str:
        s = row.get(m)
        return "" if s is None else f"{s['mean']:.3f} ± {s['std']:.3f}"

    for row in summary["reference_rows"] + summary["table"]:
        size = human_size(row["size"]["mean"]) if "size" in row else ""
        lr = f"{row['lr']:g}" if "lr" in row else ""
        lines.append("| " + " | ".join([row["method"], lr, str(row.get("steps", "")), *(
            cell(row, m) for m in ("dino", "clip_i", "clip_t", "prior", "closed")), size]) + " |")
    return "\n".join(lines)


def gate_lines(summary: dict) -> list[str]:
    """One line per baseline and concept: PASS/FAIL and the three numbers."""
    out = []
    for method, concepts in summary["gate"].items():
        for concept, g in concepts.items():
            out.append(f"gate {method:5} {concept:8} {'PASS' if g['pass'] else 'FAIL'}: gap closed {g['closed']:.2f} "
                       f"(>= {GATE_CLOSED}), CLIP-T* {g['clip_t']:.3f} (base {g['base_clip_t']:.3f}), prior "
                       f"{g['prior']:.3f} (>= {WITHIN}) at step {summary['gate_step']}")
    return out or ["gate: not computed (it needs the lora and full methods)"]


def chart(summary: dict, path: Path) -> Path:
    """Subject fidelity against steps, one line per method (winner lr), base and photos as dashed lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method in summary["winners"]:
        rows = [r for r in summary["table"] if r["method"] == method]
        ax.errorbar([r["steps"] for r in rows], [r["fidelity"]["mean"] for r in rows],
                    yerr=[r["fidelity"]["std"] for r in rows], marker="o", capsize=3,
                    label=f"{method} (lr {summary['winners'][method]['lr']:g})")
    for row, style in zip(summary["reference_rows"], ("--", ":")):
        ax.axhline(row["fidelity"]["mean"], ls=style, color="grey", label=row["method"])
    ax.set(xlabel="training steps", ylabel="subject fidelity, (DINO* + CLIP-I*) / 2",
           title="Quality benchmark on the toy world (mean ± sd over concepts x seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def grid(concept: str, rows: list[tuple[str, Path]], prompts: list[str], path: Path, cell: int = 96) -> Path:
    """Rows: methods (each a saved strip of images), columns: prompts; labels on the left and on top."""
    label_w, head = 120, 28
    grid_image = Image.new("RGB", (label_w + cell * len(prompts), head + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid_image)
    draw.text((4, 4), f"concept '{concept}'", fill="black")
    for c, text in enumerate(prompts):
        draw.text((label_w + c * cell + 2, 4), text.replace("a photo of ", "")[:22], fill="black")
    for r, (label, strip) in enumerate(rows):
        y = head + r * cell
        draw.text((4, y + cell // 2 - 6), label, fill="black")
        with Image.open(strip) as im:
            for c in range(len(prompts)):
                tile = im.crop((64 * c, 0, 64 * c + 64, 64)).resize((cell, cell), Image.Resampling.NEAREST)
                grid_image.paste(tile, (label_w + c * cell, y))
    grid_image.save(path)
    return path
