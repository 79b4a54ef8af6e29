"""Timing and formatting: interleaved rounds, medians and paired ratios, markdown tables, peak memory, progress log."""
from __future__ import annotations

import contextlib
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def clock(fn, device: torch.device) -> float:
    """Wall time of fn() in seconds (synchronising the GPU around it)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def summary(xs: list[float]) -> dict:
    """Median, min, max and the raw values."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "values": list(xs)}


def paired(num: list[float], den: list[float]) -> dict:
    """Per-round ratios num[i] / den[i] (rounds interleave, so drift cancels), plus best = min(num) / min(den)."""
    return {**summary([a / b for a, b in zip(num, den)]), "best": min(num) / min(den)}


def rounds(task, repeats: int) -> dict[str, list[float]]:
    """Run task() -> {name: seconds} for one warm-up round plus `repeats` kept rounds; collect per name."""
    out: dict[str, list[float]] = {}
    for i in range(repeats + 1):
        for k, v in task().items():
            if i:
                out.setdefault(k, []).append(v)
    return out


def fmt(st: dict | None, unit: str = "s", scale: float = 1.0) -> str:
    """'median (min-max) unit' with 3 significant digits; 'n/a' when missing."""
    if not st:
        return "n/a"
    def f(v):
        return f"{v * scale:.3g}" if abs(v * scale) < 1000 else f"{v * scale:.0f}"

    sep = "" if unit == "×" else " "
    return f"{f(st['median'])}{sep}{unit} ({f(st['min'])}–{f(st['max'])})".strip()


def table(headers: list[str], rows: list[list]) -> str:
    """Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def peak_bytes(device: torch.device) -> int:
    """Peak memory so far: torch.cuda.max_memory_allocated on GPU, peak RSS (ru_maxrss) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the tables)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def busy_cores(n: int | None = None):
    """Keep `n` cores (default: all) busy with spinning processes of our own while the block runs."""
    n = n or os.cpu_count() or 1
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5)  # let them reach their loop
        yield n
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with `n` torch threads, then restore the count (the benchmark compares thread counts; the
    library itself never changes them)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
