"""`python -m eval.quality`: LoLDU against LoRA, textual inversion, full fine-tuning and SVDiff on the toy world.

    python -m eval.quality                                    # the grid: every concept x method x lr x seed
    python -m eval.quality --concepts star --methods loldu --lr loldu=1e-3 --seeds 0 --steps 50 100 200
    accelerate launch --num_processes 2 --cpu -m eval.quality ...    # runs dealt to 2 processes, same numbers
    python -m eval.quality --report                           # rebuild docs/quality/ from the committed runs alone
    python -m eval.quality --readme                           # the README's table from docs/quality/quality.json
    python -m eval.quality --variant loldu_s05=loldu:sigma0=0.5,warmup=0 --methods loldu_s05 ...   # an option

Every run trains with the trainer's data, loss and training step (eval.quality_run), is scored at each --steps
checkpoint within one run of max(--steps) steps, and writes docs/quality/runs/.../result.json (commit it). A run
whose key (settings, method, pipeline and judge files: eval.quality_store) is already committed is skipped. Then the
main process rebuilds docs/quality/ (quality.md, quality.json, quality.png, grid_<concept>.png) from every committed
run of this world and these settings (eval.quality_report says how winners and the gate are decided).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from loldu_sd.toyworld import JUDGES_DIR, PIPELINE_DIR, TRAIN_BATCH_SIZE
from loldu_sd.toyworld.concepts import CONCEPTS, prompts

from . import quality_report as report
from . import quality_store as store
from .methods import METHODS, variant
from .quality_run import BASE, STRIP, Job, Settings, identity, run_job, shown_indexes


def build_parser() -> argparse.ArgumentParser:
    """The command's flags (checked by `check`, so that bad input is one line)."""
    p = argparse.ArgumentParser(prog="python -m eval.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--pretrained_model_name_or_path", default=str(PIPELINE_DIR), help="Toy-world pipeline folder.")
    a("--judges", default=str(JUDGES_DIR), help="Toy-world judges folder.")
    a("--concepts", nargs="+", default=list(CONCEPTS), help=f"Held-out concepts ({', '.join(CONCEPTS)}).")
    a("--methods", nargs="+", default=list(METHODS), help=f"Methods ({', '.join(METHODS)}) and --variant names.")
    a("--variant", action="append", default=[], metavar="NAME=METHOD:KEY=VALUE[,...]",
      help="A method with learning options (repeatable): warmup, wd, sigma0, sigma_max, modules.")
    a("--lr", action="append", default=[], metavar="METHOD=LR[,LR...]",
      help="Learning-rate grid of a method (repeatable); default: each method's own grid.")
    a("--seeds", nargs="+", default=["42", "43"], help="Training seeds (the trainer's --seed).")
    a("--steps", nargs="+", default=["50", "100", "200", "400"], help="Checkpoints scored within one run.")
    a("--prompts_limit", default=None, help="Only the first N of the 25 prompts (smoke runs).")
    a("--class_samples", default="8", help="Class-prompt samples for the prior.")
    a("--inference_steps", default="20", help="Sampler steps per image.")
    a("--trainer_args", default=f"--train_batch_size {TRAIN_BATCH_SIZE}", help="Trainer flags of every run.")
    a("--threads", default="1", help="torch threads per process (fixed: equal numbers in any mode).")
    a("--runs", default=str(store.RUNS_DIR), help="Committed run records (result.json and strip.png).")
    a("--work", default="runs/quality", help="The files each run ships (its adapter; not committed).")
    a("--out", default=str(store.QUALITY_DIR), help="Where --report writes quality.md/json/png and the grids.")
    a("--overwrite", action="store_true", help="Recompute runs even when committed under the same key.")
    a("--report", action="store_true", help="Only rebuild the outputs from the committed runs.")
    a("--readme", default=None, nargs="?", const=str(store.ROOT / "README.md"),
      help="Only write the README's quality block from <out>/quality.json (default README.md).")
    return p


def _ints(values: list[str], flag: str, low: int = 1) -> list[int]:
    try:
        out = [int(v) for v in values]
    except ValueError:
        raise ValueError(f"{flag}: expected whole numbers, got {' '.join(values)}") from None
    if any(v < low for v in out):
        raise ValueError(f"{flag}: every value must be >= {low}, got {' '.join(values)}")
    return out


def lr_grids(methods: dict, chosen: list[str], given: list[str]) -> dict[str, tuple[float, ...]]:
    """Each chosen method's learning-rate grid: its default, or what --lr METHOD=LR,LR says."""
    grids = {m: methods[m].lrs for m in chosen}
    for item in given:
        name, _, values = item.partition("=")
        if name not in grids:
            raise ValueError(f"--lr {item}: {name!r} is not one of the --methods ({', '.join(chosen)})")
        try:
            grids[name] = tuple(float(v) for v in values.split(","))
        except ValueError:
            raise ValueError(f"--lr {item}: expected METHOD=LR[,LR...], e.g. lora=1e-4,1e-3") from None
        if not grids[name] or any(not 0 < lr < float("inf") for lr in grids[name]):
            raise ValueError(f"--lr {item}: learning rates must be positive numbers")
    return grids


def _methods(specs: list[str]) -> dict:
    methods = dict(METHODS)
    for spec in specs:
        methods[spec.partition("=")[0]] = variant(spec, methods)
    return methods


def check(args: argparse.Namespace) -> tuple[Settings, list[Job]]:
    """Settings and the job list, or a one-line ValueError naming the bad flag."""
    methods = _methods(args.variant)
    unknown = [m for m in args.methods if m not in methods] + [c for c in args.concepts if c not in CONCEPTS]
    if unknown:
        raise ValueError(f"unknown method or concept {unknown[0]!r}; methods: {', '.join(methods)}; concepts: "
                         f"{', '.join(CONCEPTS)}")
    if not (Path(args.pretrained_model_name_or_path) / "model_index.json").is_file():
        raise ValueError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: no pipeline folder "
                         "there (model_index.json missing)")
    steps = _ints(args.steps, "--steps")
    if steps != sorted(set(steps)):
        raise ValueError(f"--steps must increase, without repeats, got {' '.join(args.steps)}")
    limit = _ints([args.prompts_limit], "--prompts_limit")[0] if args.prompts_limit else None
    grids = lr_grids(methods, args.methods, args.lr)
    settings = Settings(args.pretrained_model_name_or_path, args.judges, Path(args.runs), Path(args.work),
                        tuple(steps), limit, _ints([args.class_samples], "--class_samples")[0],
                        _ints([args.inference_steps], "--inference_steps")[0], 0,
                        _ints([args.threads], "--threads")[0], tuple(shlex.split(args.trainer_args)), methods)
    if "--with_prior_preservation" in settings.trainer_flags:  # the benchmark trains on instance images only
        raise ValueError("--trainer_args: --with_prior_preservation is not supported by the benchmark")
    seeds = _ints(args.seeds, "--seeds", low=0)
    jobs = [Job(c, BASE) for c in args.concepts] + [
        Job(c, m, lr, s) for c in args.concepts for m in args.methods for lr in grids[m] for s in seeds]
    return settings, jobs


def run_or_reuse(job: Job, settings: Settings, scorer, world: dict, overwrite: bool) -> dict:
    """The committed record under this job's key, or a fresh run (then written next to the others)."""
    key = store.run_key(identity(job, settings, world))
    folder = store.run_folder(settings.runs, asdict(job), key)
    saved = None if overwrite else store.reusable(folder, key)
    if saved is not None:
        print(f"{folder}: reused", flush=True)
        return saved
    record = run_job(job, settings, scorer, world)
    last = record["steps"][max(record["steps"], key=int)]
    note = f", diverged: {record['diverged']}" if record.get("diverged") else ""
    print(f"{folder}: fidelity {last['fidelity']:.3f}, prior {last['prior']:.3f} ({record['seconds']:.0f} s){note}",
          flush=True)
    return record


def method_order(records: list[dict], methods: dict) -> list[str]:
    """The methods the records hold: the registry's order first, then variants of earlier sittings by name."""
    present = {r["job"]["method"] for r in records} - {BASE}
    return [m for m in methods if m in present] + sorted(present - set(methods))


def _compact(record: dict, runs: Path) -> dict:
    """A run as quality.json lists it: its job, key, folder and last checkpoint's scores."""
    last = max(record["steps"], key=int)
    return {"job": record["job"], "key": record["key"], "folder": record["_dir"].relative_to(runs).as_posix(),
            "last_step": int(last), "last": record["steps"][last], **(
                {"diverged": record["diverged"]} if record.get("diverged") else {})}


def write_grids(summary: dict, records: list[dict], settings: Settings, out: Path) -> None:
    """grid_<concept>.png: the base model's and each winner's (first seed) strip at the last checkpoint."""
    for concept in summary["references"]:
        texts = prompts(CONCEPTS[concept])[: settings.prompts_limit]
        shown = [texts[i] for i in shown_indexes(len(texts))]
        mine = [r for r in records if r["job"]["concept"] == concept]
        rows = [("base model", r["_dir"] / STRIP) for r in mine if r["job"]["method"] == BASE]
        for method, w in summary["winners"].items():
            runs = sorted((r for r in mine if r["job"]["method"] == method and r["job"]["lr"] == w["lr"]
                           and (r["_dir"] / STRIP).is_file()), key=lambda r: r["job"]["seed"])
            rows += [(f"{method} {w['lr']:g}", runs[0]["_dir"] / STRIP)] if runs else []
        report.grid(concept, rows, shown, out / f"grid_{concept}.png")


def write_outputs(records: list[dict], stale: int, settings: Settings, world: dict, out: Path) -> dict:
    """quality.md, quality.json, quality.png and the grids from the committed records; prints the table and gate."""
    from .scorer import write_json

    summary = report.summarise(records, method_order(records, settings.methods), settings.steps)
    winners = ", ".join(f"{m} {w['lr']:g}" + ("" if w["kept_base"] else " (no lr kept prior >= 0.8 and CLIP-T* "
                                                                           "within 10 %)")
                        for m, w in summary["winners"].items())
    tried = "; ".join(f"{m} {', '.join(w['grid'])}" for m, w in summary["winners"].items())
    notes = [f"{len(records)} committed runs of this world and settings ({stale} others left out: another pipeline, "
             "judges, settings or recipe)",
             f"mean ± sd over concepts x seeds; subject fidelity = (DINO* + CLIP-I*) / 2; gap closed = (method - "
             f"base) / (codec round trip - base); lrs tried: {tried}; winners: {winners}",
             *[f"diverged: {d}" for d in summary["diverged"]]]
    text = "\n\n".join([report.markdown(summary), "\n".join(notes), report.gate_markdown(summary)]) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.md").write_text(text)
    write_json(out / "quality.json", {"settings": settings.record(), "world": world, **summary,
                                      "runs": [_compact(r, settings.runs) for r in records]})
    if summary["references"]:
        report.chart(summary, out / "quality.png")
        write_grids(summary, records, settings, out)
    print(text)
    print(f"wrote {out / 'quality.md'}, quality.json, quality.png and grid_<concept>.png")
    return summary


def write_readme(quality_json: Path, readme: Path) -> None:
    """Replace the README's quality block with the table of quality.json."""
    block = report.readme_block(json.loads(quality_json.read_text()))
    readme.write_text(report.replace_block(readme.read_text(), block))
    print(f"wrote the quality table of {quality_json} into {readme}")


def main(argv: list[str] | None = None) -> int:
    """Entry point (also under accelerate launch); exit status 2 with one line for bad input."""
    import torch
    from accelerate import PartialState

    from .toyworld import toyworld_scorer

    args = build_parser().parse_args(argv)
    try:
        settings, jobs = check(args)
        if args.readme:
            write_readme(Path(args.out) / "quality.json", Path(args.readme))
            return 0
        world = store.world_digest(settings.pipeline, settings.judges)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = PartialState()  # one process, or the ones accelerate launch started
    if not args.report:
        torch.set_num_threads(settings.threads)  # a fixed thread count: 1 and N processes compute the same numbers
        scorer = toyworld_scorer(settings.judges, device="cpu")
        # each run is seeded on its own, so which process computes it does not change its numbers
        for job in jobs[state.process_index::state.num_processes]:
            run_or_reuse(job, settings, scorer, world, args.overwrite)
        state.wait_for_everyone()
    if state.is_main_process:
        records, stale = store.committed_runs(settings.runs, world, settings.record())
        write_outputs(records, stale, settings, world, Path(args.out))
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
