"""Command line of `python -m eval.bench`: parse the flags, run the sections, write the JSON (or run one worker)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from . import __doc__ as package_doc
from .batch import bench_batch, bench_resident
from .injection import bench_injection, bench_llama  # noqa: F401  (main calls them as globals()[f"bench_{section}"])
from . import record
from .report import targets
from .sd import bench_files_section, bench_sd
from .timing import log
from .worker import run_worker


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
    p = argparse.ArgumentParser(prog="python -m eval.bench", description=package_doc.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="every code path on the tiny pipeline (CI), ~1 minute")
    p.add_argument("--resolution", type=int, default=None, help="image size in px (default 256; smoke 64)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=3, help="kept rounds after one warm-up round (smoke: at most 2)")
    p.add_argument("--out", default="bench_results.json", help="JSON output path")
    p.add_argument("--only", choices=["injection", "llama", "sd", "files", "batch", "library"],
                   help="run one section (targets use what ran); files: adapter files and pipeline load of section sd")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", action="store_true",
                   help="compare this run's ratios with the committed record (eval/bench/record.json)")
    p.add_argument("--record", action="store_true", help="make this run's ratios the record (commit the file)")
    p.add_argument("--from", dest="from_json", metavar="JSON",
                   help="run nothing: read the results of an earlier run (for --compare / --record)")
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
    """Run the selected sections (or read --from), then compare with the record (--compare) or replace it."""
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return None
    res = json.loads(Path(args.from_json).read_text()) if args.from_json else run_sections(args)
    if args.compare:
        recorded = record.load_record()
        record.print_compare(record.compare(record.summarise(res), recorded), recorded)
    if args.record:
        record.write_record(res)
        print(f"\nrecord written: {record.RECORD_PATH}")
    return res


def run_sections(args) -> dict:
    """Run the selected sections, print their tables, write the JSON."""
    logging_quiet()
    t0 = time.perf_counter()
    res = {"meta": meta(args)}
    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix="loldu-bench-"))
    print(f"# eval.bench — {res['meta']['date']} — {res['meta']['device']} — load average "
          f"{' '.join(f'{x:.2f}' for x in res['meta']['loadavg_start'])}" + (" — SMOKE (tiny pipeline)" if args.smoke
                                                                             else ""))
    try:
        with_tmp = {"sd": bench_sd, "files": bench_files_section, "batch": bench_batch, "library": bench_resident}
        for section in [args.only] if args.only else ["injection", "llama", "sd", "batch", "library"]:
            log(f"section {section} ...")
            run = with_tmp.get(section)
            key = "sd" if section == "files" else section  # the files part of section sd reports under sd
            res[key] = run(args, tmp) if run else globals()[f"bench_{section}"](args)
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
