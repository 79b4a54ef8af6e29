"""Where the quality benchmark's runs accumulate: one small committed result.json per run, keyed by a hash.

A run's key hashes everything that decides its numbers: the job (concept, method, lr, seed), the shared settings
(checkpoints, prompts, sampler steps, trainer flags), the method's definition (parts, flags, options), the world
(the safetensors files of the pipeline and judges folders) and RECIPE, the version of the code's numbers. A
committed run is reused only under the same key, so a new pipeline or judge makes every old run stale, and the
report (`python -m eval.quality --report`) reads the runs of the current world, settings and recipe alone.

    docs/quality/runs/<concept>/base-<key>/result.json, strip.png
    docs/quality/runs/<concept>/<method>/lr<lr>-seed<seed>-<key>/result.json, strip.png
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUALITY_DIR = ROOT / "docs" / "quality"
RUNS_DIR = QUALITY_DIR / "runs"
KEY_CHARS = 12
# bump when a code change alters the numbers of runs already committed (the training step, a method, the scoring):
# 2 = LoLDU trains the change dz, dsigma (AdamW's decay pulls toward the base)
RECIPE = 2


def folder_digest(folder: str | Path) -> str:
    """sha256 over the folder's safetensors files (relative path and bytes, in sorted order)."""
    folder, h = Path(folder), hashlib.sha256()
    files = sorted(folder.rglob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no safetensors files to identify it by")
    for path in files:
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def world_digest(pipeline: str | Path, judges: str | Path) -> dict[str, str]:
    """The pipeline's and the judges' digests."""
    return {"pipeline": folder_digest(pipeline), "judges": folder_digest(judges)}


def run_key(identity: dict) -> str:
    """The first KEY_CHARS hex digits of sha256 over the canonical JSON of a run's identity."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_CHARS]


def run_folder(runs: Path, job: dict, key: str) -> Path:
    """The folder of one run: <runs>/<concept>/base-<key> or <runs>/<concept>/<method>/lr<lr>-seed<seed>-<key>."""
    if job["method"] == "base":
        return runs / job["concept"] / f"base-{key}"
    return runs / job["concept"] / job["method"] / f"lr{job['lr']:g}-seed{job['seed']}-{key}"


def reusable(folder: Path, key: str) -> dict | None:
    """The committed record in `folder` when its key is `key` (and it reads), else None."""
    path = folder / "result.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("key") == key else None


def write_record(folder: Path, record: dict) -> Path:
    """Write result.json (sorted keys, one value per line: small diffs when a run is redone)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "result.json"
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def committed_runs(runs: Path, world: dict, settings: dict) -> tuple[list[dict], int]:
    """The records under `runs` of this world, these settings and this RECIPE (each with its folder as '_dir'); and
    how many others (stale: another pipeline, judges, settings or recipe) were left out."""
    chosen, stale = [], 0
    for path in sorted(runs.rglob("result.json")):
        record = json.loads(path.read_text())
        if (record.get("world"), record.get("settings"), record.get("recipe")) == (world, settings, RECIPE):
            chosen.append({**record, "_dir": path.parent})
        else:
            stale += 1
    return chosen, stale
