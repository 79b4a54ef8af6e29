"""The adapter library: a folder of adapters on disk, one sub-folder each, confined to the library folder."""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

# no diffusers import: that happens on first use
from ..io import LOLDU_WEIGHT_NAME
from ..io import LoLDUFormatError, read_adapter_file
from .inputs import StudioError, sanitize_name

log = logging.getLogger(__name__)

WEIGHT_NAME = LOLDU_WEIGHT_NAME  # each library folder holds the file pipe.load_loldu_weights(folder) finds
SAMPLE_NAME, INFO_NAME = "sample.png", "info.json"


@dataclass
class AdapterInfo:
    """One library entry as shown in the Library tab."""

    name: str
    weights: Path
    size_bytes: int
    created: float
    base_model: str
    rank: int | None
    sample: Path | None
    instance_prompt: str = ""
    note: str = ""

    @property
    def size_kb(self) -> float:
        """File size in kilobytes (1 KB = 1024 bytes)."""
        return self.size_bytes / 1024

    @property
    def created_str(self) -> str:
        """Creation time, local, to the minute."""
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(self.created))


class AdapterLibrary:
    """A folder of adapters, one sub-folder each: weights, sample.png, info.json. Re-read from disk on every call."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # renames/deletes/adds of several sessions

    def path(self, name: str) -> Path:
        """The folder of adapter `name`, guaranteed to lie directly inside the library folder."""
        folder = (self.root / sanitize_name(name)).resolve()  # resolve(): a symlink cannot lead outside
        if folder.parent != self.root:
            raise StudioError(f"adapter {name!r} lies outside the library folder")
        return folder

    def exists(self, name: str) -> bool:
        """Whether adapter `name` is in the library."""
        return (self.path(name) / WEIGHT_NAME).is_file()

    def names(self) -> list[str]:
        """Adapter names, sorted; hidden folders (jobs in progress, trash) are skipped."""
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / WEIGHT_NAME).is_file())

    def info(self, name: str) -> AdapterInfo:
        """Metadata of one adapter, read from its safetensors header and info.json."""
        folder = self.path(name)
        weights = folder / WEIGHT_NAME
        if not weights.is_file() or weights.resolve().parent != folder:
            raise StudioError(f"no adapter named {name!r} in the library")
        try:
            _, meta = read_adapter_file(weights)
        except LoLDUFormatError as e:
            raise StudioError(f"adapter {folder.name!r}: {str(e).replace(str(weights), WEIGHT_NAME)}") from None
        try:
            extra = json.loads((folder / INFO_NAME).read_text())
            extra = extra if isinstance(extra, dict) else {}
        except (OSError, ValueError):
            extra = {}
        try:
            rank = int(json.loads(meta.get("config", "{}")).get("rank"))
        except (ValueError, TypeError, AttributeError):
            rank = None
        stat = weights.stat()
        sample = folder / SAMPLE_NAME
        return AdapterInfo(
            name=folder.name, weights=weights, size_bytes=stat.st_size,
            created=float(extra.get("created") or stat.st_mtime), base_model=meta.get("base_model", "") or "?",
            rank=rank, sample=sample if sample.is_file() else None,
            instance_prompt=str(extra.get("instance_prompt") or meta.get("instance_prompt", "")),
            note=str(extra.get("note", "")))

    def list(self) -> list[AdapterInfo]:
        """Every readable adapter, newest first (unreadable entries are logged and skipped)."""
        out = []
        for name in self.names():
            try:
                out.append(self.info(name))
            except StudioError as e:
                log.warning("library: skipping %s", e)
        return sorted(out, key=lambda a: a.created, reverse=True)

    def add(self, name: str, weights: str | Path, sample: Image.Image | None = None,
            extra: dict[str, Any] | None = None) -> AdapterInfo:
        """Copy an adapter file (with sample image and info) into the library under a new name, atomically."""
        with self._lock:
            folder = self.path(name)
            if folder.exists():
                raise StudioError(f"an adapter named {folder.name!r} already exists; pick another name or delete it")
            stage = self.root / f".incoming-{uuid.uuid4().hex}"  # build aside, then one rename: never half-visible
            stage.mkdir()
            try:
                shutil.copyfile(weights, stage / WEIGHT_NAME)
                if sample is not None:
                    sample.save(stage / SAMPLE_NAME)
                info = {"created": time.time(), **(extra or {})}
                (stage / INFO_NAME).write_text(json.dumps(info, indent=1))
                os.rename(stage, folder)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        return self.info(folder.name)

    def rename(self, old: str, new: str) -> AdapterInfo:
        """Rename an adapter; the new name is sanitised and must be free."""
        with self._lock:
            src, dst = self.path(old), self.path(new)
            if not (src / WEIGHT_NAME).is_file():
                raise StudioError(f"no adapter named {old!r} in the library")
            if dst.exists():
                raise StudioError(f"an adapter named {dst.name!r} already exists; pick another name")
            os.rename(src, dst)
        return self.info(dst.name)

    def delete(self, name: str) -> None:
        """Remove an adapter folder (moved aside first, so other sessions never list half a folder)."""
        with self._lock:
            folder = self.path(name)
            if not (folder / WEIGHT_NAME).is_file():
                raise StudioError(f"no adapter named {name!r} in the library")
            trash = self.root / f".trash-{uuid.uuid4().hex}"
            os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def set_sample(self, name: str, image: Image.Image) -> None:
        """Replace the sample image of an adapter."""
        folder = self.path(name)
        image.save(folder / f".{SAMPLE_NAME}.tmp", format="PNG")
        os.replace(folder / f".{SAMPLE_NAME}.tmp", folder / SAMPLE_NAME)

    def copy_out(self, name: str, dest_dir: str | Path) -> Path:
        """A copy of the adapter file named `<name>.safetensors` in dest_dir (what the browser downloads)."""
        info = self.info(name)
        dest = Path(dest_dir) / f"{info.name}.safetensors"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(info.weights, dest)
        return dest
