"""`python -m eval.bench`: performance of LoLDU against peft LoRA, naive LoLDU and the frozen-base floor.

Sections (each printed as a markdown table, all written to one JSON file):
  injection  top-r LDU of the 128 attention projections of the SD1.5 UNet vs a full torch.linalg.lu of them
  llama      64 LLaMA-7B-shaped 4096x4096 matrices at r=1024 vs full LU (eval/bench/llama.py)
  sd         the SD1.5-architecture UNet (random weights): init, params, file bytes, train step, peak memory,
             inference unfused/fused, fuse/unfuse, pipeline load and adapter switch
  batch      16 prompts over 1, 4 and 16 adapters in one UNet call vs one adapter, sequential switching and peft
             LoRA mixed batches
  library    a resident library of 1,000 adapter files of the UNet: load time, bytes per resident adapter
  targets    the issues' targets, PASS/MISS, computed from this run
Every comparison is made within one run, as ratios of interleaved measurements (the machines are shared and noisy);
figures are medians over --repeats rounds after one warm-up round, with (min-max) shown; "best" ratios are
min(method) / min(reference), the estimate least hurt by other people's jobs on a shared machine.
Train steps and peak memory run in one fresh subprocess per method (so peaks do not mix), each against the floor
step of its own process. `--smoke` runs every code path on the tiny pipeline in about a minute.

Modules, read top-down: cli (flags, main) runs injection (sections 1 and 2), sd (section 3, with worker, files and
methods), batch (sections `batch` and `library`) and report (its tables, section 4 targets); timing holds the
clocks and table helpers; naive and llama are the naive LoLDU baseline and the LLaMA-shape benchmark (also runnable
alone: python -m eval.bench.llama).
"""
from __future__ import annotations

from .cli import main

__all__ = ["main"]
