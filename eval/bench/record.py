"""The committed record of the benchmark's ratios, and `--compare`: which figure moved beyond its spread since then.

Only ratios measured within one run are recorded (ours against the floor, the base, a full LU or peft LoRA, timed in
interleaved rounds), never absolute times: a busier or faster machine moves both sides of a ratio alike. Each figure
is the median of its per-round ratios; its spread is half their range (see `spread`). A figure has moved when the new
median is further from the recorded one than the larger of the two spreads (and than MIN_CHANGE of it).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

RECORD_PATH = Path(__file__).with_name("record.json")
MIN_CHANGE = 0.05  # a relative change below 5 % is never flagged: two runs with no spread still differ by noise


def _values(res: dict, *path: str) -> list[float] | None:
    """The per-round values at a "/"-free key path of the results, or None when that section did not run."""
    for key in path:
        if not isinstance(res, dict) or key not in res:
            return None
        res = res[key]
    return list(res["values"]) if isinstance(res, dict) and "values" in res else None


def _over(num: list[float] | None, den: list[float] | None) -> list[float] | None:
    """Per-round ratios num[i] / den[i] (rounds interleave: drift cancels)."""
    if not num or not den:
        return None
    return [a / b for a, b in zip(num, den)]


def figures(res: dict) -> dict[str, list[float]]:
    """Per-round ratios of every recorded figure that this run measured (lower is better for all of them)."""
    sd = res.get("sd", {})
    found = {
        "top_r_ldu r=32 / full LU (128 SD1.5 shapes)": _over(_values(res, "injection", "times", "top_r_ldu_r32"),
                                                            _values(res, "injection", "times", "full_lu")),
        "init ours r=32 / inject peft LoRA r=4": _over(_values(sd, "rounds", "ours:32", "inject"),
                                                       _values(sd, "rounds", "lora:4", "inject")),
        "load ours r=32 / load_lora_weights r=4": _values(sd, "pipeline", "load_ratio"),
        "switch ours / set_adapters LoRA": _over(_values(sd, "pipeline", "switch", "ours:32"),
                                                 _values(sd, "pipeline", "switch", "lora:4")),
        "train step ours r=32 / floor": _values(sd, "train", "ours:32", "step_ratio"),
        "train step ours r=32 / peft LoRA r=4": _over(_values(sd, "train", "ours:32", "step_ratio"),
                                                      _values(sd, "train", "lora:4", "step_ratio")),
        "unfused UNet call ours r=32 / base": _values(sd, "rounds", "ours:32", "infer_ratio"),
    }
    return {name: v for name, v in found.items() if v}


def spread(values: list[float]) -> float:
    """Run-to-run spread of a figure's per-round ratios: half their range; from five rounds on 1.5 x their median
    absolute deviation, so that rounds stalled by a busy machine cannot widen the limit until a regression passes."""
    if len(values) < 5:
        return (max(values) - min(values)) / 2
    mid = statistics.median(values)
    return 1.5 * statistics.median(abs(v - mid) for v in values)


def summarise(res: dict) -> dict:
    """{figure: {"median", "spread"}} of a run, with where and when it ran: what the record keeps."""
    out = {name: {"median": statistics.median(v), "spread": spread(v)} for name, v in figures(res).items()}
    meta = res.get("meta", {})
    return {"meta": {k: meta.get(k) for k in ("date", "device", "loadavg_start", "resolution", "repeats")},
            "figures": out}


def compare(current: dict, record: dict) -> list[dict]:
    """One row per figure in both: recorded and current median, change, and whether it moved beyond the spread."""
    rows = []
    for name, now in current["figures"].items():
        then = record["figures"].get(name)
        if then is None:
            continue
        change = now["median"] - then["median"]
        limit = max(now["spread"], then["spread"], MIN_CHANGE * then["median"])
        moved = abs(change) > limit
        verdict = ("slower" if change > 0 else "faster") if moved else "–"
        rows.append({"figure": name, "record": then["median"], "now": now["median"], "change": change / then["median"],
                     "limit": limit, "moved": moved, "verdict": verdict})
    return rows


def print_compare(rows: list[dict], record: dict) -> None:
    """The comparison as a markdown table, figures that moved marked."""
    from .timing import table

    print(f"\n### Against the record ({record['meta'].get('date')}, {record['meta'].get('device')})\n")
    print(table(["figure (ratio, lower is better)", "record", "now", "change", "beyond spread?"],
                [[r["figure"], f"{r['record']:.3g}×", f"{r['now']:.3g}×", f"{r['change']:+.0%}",
                  f"**{r['verdict']}**" if r["moved"] else "no"] for r in rows]))
    moved = [r["figure"] for r in rows if r["moved"]]
    print(f"\n{len(moved)} of {len(rows)} figures moved beyond their spread" + (f": {', '.join(moved)}" if moved
                                                                                  else ""))


def load_record(path: Path = RECORD_PATH) -> dict:
    """The committed record."""
    return json.loads(Path(path).read_text())


def write_record(res: dict, path: Path = RECORD_PATH) -> dict:
    """Make this run the record (`python -m eval.bench --record`)."""
    record = summarise(res)
    Path(path).write_text(json.dumps(record, indent=1) + "\n")
    return record
