"""`python -m eval.quality`: LoLDU against LoRA, textual inversion, full fine-tuning and SVDiff on the toy world.

    python -m eval.quality                                    # every concept x method x lr x seed; table, chart, grids
    python -m eval.quality --concepts star --methods loldu lora --seeds 42 --steps 50 100 --lr lora=1e-3
    accelerate launch --num_processes 2 --cpu -m eval.quality ...    # runs split across processes, same numbers

Every run trains with the trainer's data pipeline, loss and optimizer (eval.quality_run), checkpoints at --steps,
generates the concept's prompts with fixed seeds and scores them with the toy-world judges (eval.quality_report
says how the winner lr and the validity gate are chosen). A finished run's result.json is reused when its settings
match (--overwrite recomputes), so an interrupted benchmark resumes. Outputs in --out: quality.md, quality.json,
quality.png, grid_<concept>.png and runs/<concept>/<method>/lr<lr>-seed<seed>/ (scores, image strips, the files).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from loldu_sd.toyworld import PIPELINE_DIR
from loldu_sd.toyworld.concepts import CONCEPTS, prompts

from . import quality_report as report
from .methods import METHODS
from .quality_run import BASE, Job, Settings, run_job, shown_indexes


def build_parser() -> argparse.ArgumentParser:
    """The command's flags (checked by `check`, so that bad input is one line)."""
    p = argparse.ArgumentParser(prog="python -m eval.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=str(PIPELINE_DIR), help="Toy-world pipeline folder.")
    p.add_argument("--concepts", nargs="+", default=list(CONCEPTS), help=f"Held-out concepts ({', '.join(CONCEPTS)}).")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"Methods ({', '.join(METHODS)}).")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR[,LR...]",
                   help="Learning-rate grid of a method (repeatable); default: each method's own grid.")
    p.add_argument("--seeds", nargs="+", default=["42", "43"], help="Training seeds (the trainer's --seed).")
    p.add_argument("--steps", nargs="+", default=["50", "100", "200", "400"], help="Checkpoints to score.")
    p.add_argument("--prompts_limit", default=None, help="Only the first N of the 25 prompts (smoke runs).")
    p.add_argument("--class_samples", default="8", help="Class-prompt samples for the prior.")
    p.add_argument("--inference_steps", default="20", help="Sampler steps per image.")
    p.add_argument("--trainer_args", default="", help="Extra trainer flags for every run, e.g. '--train_batch_size 4'.")
    p.add_argument("--threads", default="1", help="torch threads per process (fixed: equal numbers in any mode).")
    p.add_argument("--out", default="runs/quality", help="Output folder.")
    p.add_argument("--overwrite", action="store_true", help="Recompute runs whose result.json exists.")
    return p


def _ints(values: list[str], flag: str, low: int = 1) -> list[int]:
    try:
        out = [int(v) for v in values]
    except ValueError:
        raise ValueError(f"{flag}: expected whole numbers, got {' '.join(values)}") from None
    if any(v < low for v in out):
        raise ValueError(f"{flag}: every value must be >= {low}, got {' '.join(values)}")
    return out


def lr_grids(methods: list[str], given: list[str]) -> dict[str, tuple[float, ...]]:
    """Each method's learning-rate grid: its default, or what --lr METHOD=LR,LR says."""
    grids = {m: METHODS[m].lrs for m in methods}
    for item in given:
        name, _, values = item.partition("=")
        if name not in grids:
            raise ValueError(f"--lr {item}: {name!r} is not one of the --methods ({', '.join(methods)})")
        try:
            grids[name] = tuple(float(v) for v in values.split(","))
        except ValueError:
            raise ValueError(f"--lr {item}: expected METHOD=LR[,LR...], e.g. lora=1e-4,1e-3") from None
        if not grids[name] or any(not 0 < lr < float("inf") for lr in grids[name]):
            raise ValueError(f"--lr {item}: learning rates must be positive numbers")
    return grids


def check(args: argparse.Namespace) -> tuple[Settings, list[Job], dict]:
    """Settings, the job list and the lr grids, or a one-line ValueError naming the bad flag."""
    unknown = [m for m in args.methods if m not in METHODS] + [c for c in args.concepts if c not in CONCEPTS]
    if unknown:
        raise ValueError(f"unknown method or concept {unknown[0]!r}; methods: {', '.join(METHODS)}; concepts: "
                         f"{', '.join(CONCEPTS)}")
    if not (Path(args.pretrained_model_name_or_path) / "model_index.json").is_file():
        raise ValueError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: no pipeline folder "
                         "there (model_index.json missing)")
    steps = _ints(args.steps, "--steps")
    if steps != sorted(set(steps)):
        raise ValueError(f"--steps must increase, without repeats, got {' '.join(args.steps)}")
    limit = _ints([args.prompts_limit], "--prompts_limit")[0] if args.prompts_limit else None
    grids = lr_grids(args.methods, args.lr)
    settings = Settings(args.pretrained_model_name_or_path, Path(args.out), tuple(steps), limit,
                        _ints([args.class_samples], "--class_samples")[0],
                        _ints([args.inference_steps], "--inference_steps")[0], 0,
                        _ints([args.threads], "--threads")[0], tuple(shlex.split(args.trainer_args)))
    if "--with_prior_preservation" in settings.trainer_flags:  # the benchmark's loop trains on instance images only
        raise ValueError("--trainer_args: --with_prior_preservation is not supported by the benchmark")
    seeds = _ints(args.seeds, "--seeds", low=0)
    jobs = [Job(c, BASE) for c in args.concepts] + [
        Job(c, m, lr, s) for c in args.concepts for m in args.methods for lr in grids[m] for s in seeds]
    return settings, jobs, grids


def run_or_reuse(job: Job, settings: Settings, scorer, overwrite: bool) -> dict:
    """A saved result.json with the same settings, or a fresh run (then saved)."""
    path = settings.out / "runs" / job.key / "result.json"
    if path.is_file() and not overwrite:
        saved = json.loads(path.read_text())
        if saved.get("settings") == json.loads(json.dumps(settings.record())):
            print(f"{job.key}: reused {path}", flush=True)
            return saved
    record = run_job(job, settings, scorer)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    last = record["steps"][max(record["steps"], key=int)]
    print(f"{job.key}: fidelity {last['fidelity']:.3f}, prior {last['prior']:.3f} ({record['seconds']:.0f} s)",
          flush=True)
    return record


def write_outputs(records: list[dict], settings: Settings, methods: list[str], grids: dict) -> dict:
    """quality.json, quality.md, quality.png and the grids; prints the table and the gate."""
    from .scorer import write_json

    summary = report.summarise(records, methods, settings.steps)
    out, table = settings.out, report.markdown(summary)
    gate = report.gate_lines(summary)
    winners = ", ".join(f"{m} {w['lr']:g}" + ("" if w["kept_base"] else " (no lr kept prior and CLIP-T* within 10 %)")
                        for m, w in summary["winners"].items())
    text = (f"{table}\n\nmean ± sd over {len({r['job']['concept'] for r in records})} concept(s) x seeds; subject "
            f"fidelity = (DINO* + CLIP-I*) / 2; lr grids: "
            + "; ".join(f"{m} {', '.join(f'{lr:g}' for lr in g)}" for m, g in grids.items())
            + f"; winners: {winners}\n\n" + "\n".join(gate) + "\n")
    (out / "quality.md").write_text(text)
    write_json(out / "quality.json", {"settings": {**settings.record(), "out": str(out)}, "lr_grids": grids,
                                      **summary, "runs": records})
    report.chart(summary, out / "quality.png")
    for concept in summary["references"]:
        texts = prompts(CONCEPTS[concept])[: settings.prompts_limit]
        shown = [texts[i] for i in shown_indexes(len(texts))]
        rows = [("base model", out / "runs" / concept / BASE / "step0.png")] + [
            (f"{m} {w['lr']:g}", out / "runs" / Job(concept, m, w["lr"], _first_seed(records, m)).key
             / f"step{max(settings.steps)}.png") for m, w in summary["winners"].items()]
        report.grid(concept, rows, shown, out / f"grid_{concept}.png")
    print(text)
    print(f"wrote {out / 'quality.md'}, quality.json, quality.png and grid_<concept>.png")
    return summary


def _first_seed(records: list[dict], method: str) -> int:
    return min(r["job"]["seed"] for r in records if r["job"]["method"] == method)


def main(argv: list[str] | None = None) -> int:
    """Entry point (also under accelerate launch); exit status 2 with one line for bad input."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from .toyworld import toyworld_scorer

    args = build_parser().parse_args(argv)
    try:
        settings, jobs, grids = check(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = PartialState()  # one process, or the ones accelerate launch started
    scorer = toyworld_scorer(device="cpu")
    # each run is seeded on its own, so which process computes it does not change its numbers
    share = jobs[state.process_index::state.num_processes]
    mine = [run_or_reuse(job, settings, scorer, args.overwrite) for job in share]
    records = sorted(gather_object(mine), key=lambda r: [str(v) for v in r["job"].values()])
    if state.is_main_process:
        write_outputs(records, settings, args.methods, grids)
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
