"""The quality benchmark's summary: learning-rate winners, the table, the gate, the chart, the grids, the README block.

Subject fidelity is the mean of DINO* and CLIP-I*. "Gap closed" is (method - base) / (ceiling - base) of it on the
same concept, where the ceiling is the concept photos through the pipeline's own autoencoder (eval.ceiling): 0 = the
base model, 1 = as close to the photos as any generator on this codec can be. The photos against each other stay a
reference row.
Winner rule: per method, the learning rate with the best mean gap closed at the last checkpoint among those whose
mean prior >= 0.8 and CLIP-T* >= 0.9 x base; when none does, the best anyway, flagged (kept_base false).
Gate: at the last checkpoint, LoRA r=4 and full attention fine-tuning (each at its winner lr, mean over seeds) close
>= 60 % of the gap with prior >= 0.8 and CLIP-T* >= 0.9 x base on at least 3 of the 4 concepts; per concept the
numbers and the reasons it fails.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from PIL import Image, ImageDraw

from loldu_sd.images import read_image
from loldu_sd.toyworld.concepts import CONCEPTS

from .ceiling import gap_closed
from .quality_run import BASE

METRICS = ("dino", "clip_i", "clip_t", "prior", "fidelity", "closed", "size")
GATE_METHODS, GATE_CLOSED, GATE_PRIOR, WITHIN, GATE_CONCEPTS = ("lora", "full"), 0.6, 0.8, 0.9, 3


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def stats(values: list[float]) -> dict:
    """Mean and spread (sample standard deviation; 0 for one value) of a list."""
    return {"mean": round(_mean(values), 4), "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "n": len(values)}


def references(records: list[dict]) -> dict[str, dict]:
    """Per concept: the base model's scores, the photos' (real) and the codec round trip's (ceiling) fidelity."""
    return {r["job"]["concept"]: {"base": r["steps"]["0"], "real": r["real"], "ceiling": r["ceiling"]}
            for r in records if r["job"]["method"] == BASE}


def with_closure(row: dict, ref: dict) -> dict:
    """A checkpoint's scores plus the fraction of the base-to-ceiling fidelity gap it closed."""
    return {**row, "closed": round(gap_closed(ref["base"]["fidelity"], row["fidelity"], ref["ceiling"]["fidelity"]), 4)}


def by_lr(records: list[dict], refs: dict, last: str) -> dict[str, dict[float, list[dict]]]:
    """method -> lr -> the finished runs' records (checkpoint rows extended with 'closed'); runs that diverged
    before the last checkpoint or whose concept has no base run are left out."""
    out: dict[str, dict[float, list[dict]]] = {}
    for r in records:
        job = r["job"]
        if job["method"] != BASE and last in r["steps"] and job["concept"] in refs:
            rows = {s: with_closure(row, refs[job["concept"]]) for s, row in r["steps"].items()}
            out.setdefault(job["method"], {}).setdefault(job["lr"], []).append({**r, "steps": rows})
    return out


def step_stats(runs: list[dict], step: str) -> dict:
    """Mean and spread of every metric at one checkpoint over the runs (concepts x seeds)."""
    return {m: stats([r["steps"][step][m] for r in runs]) for m in METRICS}


def pick_lr(lrs: dict[float, list[dict]], last: str, base_clip_t: float) -> dict:
    """The winner rule of the module docstring; returns the lr, whether it kept the base, and every lr's numbers."""
    grid = {lr: step_stats(runs, last) for lr, runs in sorted(lrs.items())}
    kept = [lr for lr, s in grid.items()
            if s["prior"]["mean"] >= GATE_PRIOR and s["clip_t"]["mean"] >= WITHIN * base_clip_t]
    best = max(kept or list(grid), key=lambda lr: grid[lr]["closed"]["mean"])
    return {"lr": best, "kept_base": bool(kept), "grid": {f"{lr:g}": s for lr, s in grid.items()}}


def concept_gate(rows: list[dict], base_clip_t: float) -> dict:
    """One baseline on one concept (rows: its seeds' last checkpoints): the numbers, PASS or the reasons it fails."""
    closed, clip_t, prior = (round(_mean([r[k] for r in rows]), 4) for k in ("closed", "clip_t", "prior"))
    reasons = [text for bad, text in (
        (not closed >= GATE_CLOSED, f"gap closed {closed:.2f} < {GATE_CLOSED:.2f}"),
        (not prior >= GATE_PRIOR, f"prior {prior:.2f} < {GATE_PRIOR:.2f}"),
        (not clip_t >= WITHIN * base_clip_t, f"CLIP-T* {clip_t:.3f} < {WITHIN} x base {base_clip_t:.3f}")) if bad]
    return {"pass": not reasons, "closed": closed, "prior": prior, "clip_t": clip_t, "base_clip_t": base_clip_t,
            "seeds": len(rows), "reasons": reasons}


def gate(grouped: dict, winners: dict, refs: dict, last: str) -> dict:
    """The gate over the baselines and CONCEPTS: per baseline and concept its numbers, and the verdict."""
    out, missing = {"methods": {}}, []
    for method in GATE_METHODS:
        runs = grouped.get(method, {}).get(winners.get(method, {}).get("lr"), [])
        concepts = {}
        for concept in CONCEPTS:
            rows = [r["steps"][last] for r in runs if r["job"]["concept"] == concept]
            if rows and concept in refs:
                concepts[concept] = concept_gate(rows, refs[concept]["base"]["clip_t"])
            else:
                missing.append(f"{method}/{concept}")
        out["methods"][method] = {"concepts": concepts, "passed": sum(c["pass"] for c in concepts.values())}
    if missing:
        out["verdict"], out["pass"] = f"incomplete: no runs of {', '.join(missing)}", False
    else:
        out["pass"] = all(m["passed"] >= GATE_CONCEPTS for m in out["methods"].values())
        out["verdict"] = ("PASS" if out["pass"] else "FAIL") + ": " + "; ".join(
            f"{m} {v['passed']} of {len(CONCEPTS)} concepts" for m, v in out["methods"].items()) + \
            f" (>= {GATE_CONCEPTS} needed)"
    return out


def summarise(records: list[dict], methods: list[str], steps: tuple[int, ...]) -> dict:
    """Everything quality.json holds besides the runs: references, winners, the table's rows, the gate."""
    refs, last = references(records), str(max(steps))
    grouped = by_lr(records, refs, last)
    base_clip_t = _mean([r["base"]["clip_t"] for r in refs.values()])
    winners, table = {}, []
    for method in [m for m in methods if m in grouped]:
        winners[method] = pick_lr(grouped[method], last, base_clip_t)
        runs = grouped[method][winners[method]["lr"]]
        table += [{"method": method, "lr": winners[method]["lr"], "steps": s, **step_stats(runs, str(s))}
                  for s in steps]
    reference_rows = [
        {"method": "concept photos", **{m: stats([r["real"][m] for r in refs.values()])
                                        for m in ("dino", "clip_i", "fidelity")}},
        {"method": "codec round trip (ceiling)", **{m: stats([r["ceiling"][m] for r in refs.values()])
                                                    for m in ("dino", "clip_i", "fidelity")}},
        {"method": "base model", "steps": 0, **{m: stats([r["base"][m] for r in refs.values()])
                                                for m in ("dino", "clip_i", "clip_t", "prior", "fidelity")}}]
    diverged = sorted(f"{r['job']['concept']}/{r['job']['method']} lr {r['job']['lr']:g} seed {r['job']['seed']}: "
                      f"{r['diverged']}" for r in records if r.get("diverged"))
    return {"references": refs, "reference_rows": reference_rows, "winners": winners, "table": table,
            "gate": gate(grouped, winners, refs, last), "gate_step": int(last), "diverged": diverged}


def human_size(n: float) -> str:
    """Bytes as B / KB / MB (1 KB = 1024 B)."""
    for unit, scale in (("MB", 1024 ** 2), ("KB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def markdown(summary: dict) -> str:
    """The table: method x steps, mean ± spread over concepts x seeds, the reference rows first."""
    head = ["method", "lr", "steps", "DINO*", "CLIP-I*", "CLIP-T*", "prior", "gap closed", "ships"]
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


def gate_markdown(summary: dict) -> str:
    """The gate's verdict and, per baseline and concept, its numbers and the reasons it fails."""
    g = summary["gate"]
    lines = [f"**Gate: {g['verdict']}** (step {summary['gate_step']}: gap closed >= {GATE_CLOSED:.0%}, prior >= "
             f"{GATE_PRIOR}, CLIP-T* >= {WITHIN} x base, on >= {GATE_CONCEPTS} of {len(CONCEPTS)} concepts)", "",
             "| baseline | concept | gap closed | prior | CLIP-T* (base) | seeds | verdict |",
             "|---|---|---|---|---|---|---|"]
    for method, m in g["methods"].items():
        for concept, c in m["concepts"].items():
            verdict = "PASS" if c["pass"] else "FAIL: " + "; ".join(c["reasons"])
            lines.append(f"| {method} | {concept} | {c['closed']:.2f} | {c['prior']:.3f} | {c['clip_t']:.3f} "
                         f"({c['base_clip_t']:.3f}) | {c['seeds']} | {verdict} |")
    return "\n".join(lines if len(lines) > 4 else lines[:1])  # no baseline run yet: the verdict alone


README_BEGIN, README_END = "<!-- quality-table:begin -->", "<!-- quality-table:end -->"


def readme_block(quality: dict) -> str:
    """The README's table from quality.json: per method at its winner lr and last checkpoint, what it ships."""
    last = quality["gate_step"]
    rows = {r["method"]: r for r in quality["table"] if r["steps"] == last}
    refs = {r["method"]: r for r in quality["reference_rows"]}
    lines = ["| method | lr | subject fidelity | gap closed | prior | CLIP-T* | ships (bytes) |",
             "|---|---|---|---|---|---|---|"]
    for name in ("concept photos", "codec round trip (ceiling)"):
        lines.append(f"| {name} | | {refs[name]['fidelity']['mean']:.3f} | | | | |")
    base = refs["base model"]
    lines.append(f"| base model | | {base['fidelity']['mean']:.3f} | 0 | {base['prior']['mean']:.3f} | "
                 f"{base['clip_t']['mean']:.3f} | |")
    for method, r in rows.items():
        lines.append(f"| {method} | {r['lr']:g} | {r['fidelity']['mean']:.3f} | {r['closed']['mean']:.2f} | "
                     f"{r['prior']['mean']:.3f} | {r['clip_t']['mean']:.3f} | {r['size']['mean']:,.0f} |")
    n = len(quality["references"])
    intro = [f"Quality benchmark at {last} steps, mean over {n} concept(s) x seeds, {len(quality['runs'])} committed "
             "runs ([docs/quality.md](docs/quality.md));", "`python -m eval.quality --readme` writes this block from "
             "docs/quality/quality.json."]
    return "\n".join([README_BEGIN, *intro, "", *lines, "", f"Gate: {quality['gate']['verdict']}.", README_END])


def replace_block(text: str, block: str) -> str:
    """`text` with the part between the README markers (markers included) replaced by `block`."""
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"no {README_BEGIN} ... {README_END} block in the README; add the two markers where the "
                         "table belongs")
    return text[:start] + block + text[end + len(README_END):]


def chart(summary: dict, path: Path) -> Path:
    """Subject fidelity against steps, one line per method (winner lr); photos, ceiling and base as grey lines."""
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
    for row, style in zip(summary["reference_rows"], ("--", "-.", ":")):
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
        im = read_image(strip)  # committed run files: still read through the one allow-listed reader
        for c in range(len(prompts)):
            tile = im.crop((64 * c, 0, 64 * c + 64, 64)).resize((cell, cell), Image.Resampling.NEAREST)
            grid_image.paste(tile, (label_w + c * cell, y))
    grid_image.save(path)
    return path
