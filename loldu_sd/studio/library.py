"""The adapter library: a folder of adapters on disk, one sub-folder each, confined to the library folder."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

# no diffusers import: that happens on first use
from ..images import MAX_IMAGE_BYTES, ImageReadError, read_image
from ..io import LOLDU_WEIGHT_NAME
from ..io import LoLDUFormatError, read_adapter_file
from .inputs import StudioError, sanitize_name

log = logging.getLogger(__name__)

WEIGHT_NAME = LOLDU_WEIGHT_NAME  # each library folder holds the file pipe.load_loldu_weights(folder) finds
SAMPLE_NAME, INFO_NAME = "sample.png", "info.json"
MAX_INFO_BYTES = 2**20  # info.json is a few hundred bytes; a bigger one is not ours


def read_inside(path: Path, limit: int) -> bytes:
    """The bytes of a regular file that is not a symlink (O_NOFOLLOW: checked when opening, not before)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # NONBLOCK: a planted FIFO cannot hang us
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path.name} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"{path.name} is over {limit} bytes")
    return data


@contextlib.contextmanager
def disk_errors(action: str):
    """Turn an OSError (read-only or full disk, a folder another session renamed) into a one-line StudioError."""
    try:
        yield
    except OSError as e:
        raise StudioError(f"could not {action}: {e.strerror or e} (another session may have changed it, or the "
                          "library folder is read-only or full)") from None


def _create_new(path: Path):
    """A new file at `path` opened for writing; never follows or reuses an existing name (a planted symlink)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb")


def _timestamp(value: Any, fallback: float) -> float:
    """info.json's `created` when it is a plausible Unix time (year 1970-9999), else the file's own time."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 253402300800
    return float(value) if ok else fallback


def _rank(meta: dict[str, str]) -> int | None:
    """The rank in an adapter's config metadata, or None when it is not a positive whole number."""
    try:
        rank = json.loads(meta.get("config", "{}")).get("rank")
    except (ValueError, TypeError, AttributeError, RecursionError):
        return None
    return rank if type(rank) is int and rank >= 1 else None


def _text(value: Any) -> str:
    """A text field of info.json; anything else (numbers, lists, objects) shows as empty."""
    return value if isinstance(value, str) else ""


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
        """Adapter names, sorted; hidden folders (jobs in progress, trash) and symlinks are skipped."""
        return sorted(p.name for p in self.root.iterdir()
                      if not p.name.startswith(".") and not p.is_symlink() and p.is_dir()
                      and (p / WEIGHT_NAME).is_file())

    def private_dir(self, *parts: str) -> Path:
        """A hidden working folder inside the library (made if needed); a planted symlink is refused, not followed."""
        folder = self.root
        for part in parts:
            folder = folder / part
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                raise StudioError(f"{folder.relative_to(self.root)} in the library folder is a symlink or a file; "
                                  "remove it (the studio never writes outside --library_dir)")
            folder.mkdir(exist_ok=True)
        return folder

    def info(self, name: str) -> AdapterInfo:
        """Metadata of one adapter, read from its safetensors header and info.json."""
        folder = self.path(name)
        weights = folder / WEIGHT_NAME
        if weights.is_symlink() or not weights.is_file():
            raise StudioError(f"no adapter named {name!r} in the library (or its {WEIGHT_NAME} is a symlink)")
        try:
            _, meta = read_adapter_file(weights)
        except LoLDUFormatError as e:
            raise StudioError(f"adapter {folder.name!r}: {WEIGHT_NAME}: {e.reason}") from None
        try:
            extra = json.loads(read_inside(folder / INFO_NAME, MAX_INFO_BYTES))
            extra = extra if isinstance(extra, dict) else {}
        except (OSError, ValueError, RecursionError):  # missing, a symlink, not JSON: the file's own data serve
            extra = {}
        stat = weights.stat()
        sample = folder / SAMPLE_NAME
        return AdapterInfo(
            name=folder.name, weights=weights, size_bytes=stat.st_size,
            created=_timestamp(extra.get("created"), stat.st_mtime), base_model=meta.get("base_model", "") or "?",
            rank=_rank(meta), sample=sample if sample.is_file() and not sample.is_symlink() else None,
            instance_prompt=_text(extra.get("instance_prompt")) or meta.get("instance_prompt", ""),
            note=_text(extra.get("note")))

    def list(self) -> list[AdapterInfo]:
        """Every readable adapter, newest first (unreadable entries are logged and skipped)."""
        return self.scan()[0]

    def scan(self) -> tuple[list[AdapterInfo], list[str]]:
        """(every readable adapter, newest first; one note per adapter folder skipped and why)."""
        out = []
        notes = [f"skipped {p.name!r}: a symlink (the studio never follows links out of the library folder)"
                 for p in sorted(self.root.iterdir()) if p.is_symlink() and not p.name.startswith(".")]
        for name in self.names():
            try:
                out.append(self.info(name))
            except (StudioError, OSError) as e:  # one broken folder never hides the others
                notes.append(f"skipped {name!r}: {e}" if isinstance(e, OSError) else f"skipped: {e}")
                log.warning("library: %s", notes[-1])
        return sorted(out, key=lambda a: a.created, reverse=True), notes

    def sample_image(self, info: AdapterInfo) -> Image.Image | None:
        """The decoded sample image of an adapter, or None when it is missing, a symlink or unreadable."""
        if info.sample is None:
            return None
        try:
            return read_image(read_inside(info.sample, MAX_IMAGE_BYTES), name=f"{info.name}/{info.sample.name}")
        except (OSError, ImageReadError) as e:
            log.warning("library: sample image of %r unreadable (%s)", info.name, e)
            return None

    def add(self, name: str, weights: str | Path, sample: Image.Image | None = None,
            extra: dict[str, Any] | None = None) -> AdapterInfo:
        """Copy an adapter file (with sample image and info) into the library under a new name, atomically."""
        with self._lock, disk_errors(f"add {name!r} to the library"):
            folder = self._claim(name)
            stage = self.root / f".incoming-{uuid.uuid4().hex}"  # build aside, then one rename: never half-visible
            try:
                stage.mkdir()
                shutil.copyfile(weights, stage / WEIGHT_NAME)
                if sample is not None:
                    sample.save(stage / SAMPLE_NAME)
                info = {"created": time.time(), **(extra or {})}
                (stage / INFO_NAME).write_text(json.dumps(info, indent=1))
                os.rename(stage, folder)  # onto the empty folder claimed above
            except BaseException:
                if folder.is_dir() and not any(folder.iterdir()):  # give the claimed name back
                    folder.rmdir()
                raise
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        return self.info(folder.name)

    def _claim(self, name: str) -> Path:
        """Create the empty folder of a new adapter: mkdir is atomic, so two sessions never get the same name."""
        folder = self.path(name)
        try:
            folder.mkdir()
        except FileExistsError:
            raise StudioError(f"an adapter named {folder.name!r} already exists; pick another name or delete it"
                              ) from None
        return folder

    def rename(self, old: str, new: str) -> AdapterInfo:
        """Rename an adapter; the new name is sanitised and must be free."""
        with self._lock, disk_errors(f"rename {old!r}"):
            src = self.path(old)
            if not (src / WEIGHT_NAME).is_file():
                raise StudioError(f"no adapter named {old!r} in the library")
            dst = self._claim(new)
            try:
                os.rename(src, dst)  # onto the empty folder just claimed
            except BaseException:
                dst.rmdir()
                raise
        return self.info(dst.name)

    def delete(self, name: str) -> None:
        """Remove an adapter folder (moved aside first, so other sessions never list half a folder)."""
        with self._lock, disk_errors(f"delete {name!r}"):
            folder = self.path(name)
            if not (folder / WEIGHT_NAME).is_file():
                raise StudioError(f"no adapter named {name!r} in the library")
            trash = self.root / f".trash-{uuid.uuid4().hex}"
            os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def set_sample(self, name: str, image: Image.Image) -> None:
        """Replace the sample image of an adapter."""
        folder = self.path(name)
        tmp = folder / f".{SAMPLE_NAME}.{uuid.uuid4().hex}.tmp"
        with disk_errors(f"save the sample image of {name!r}"):
            self._write_sample(tmp, folder, image)

    @staticmethod
    def _write_sample(tmp: Path, folder: Path, image: Image.Image) -> None:
        try:
            with _create_new(tmp) as f:
                image.save(f, format="PNG")
            os.replace(tmp, folder / SAMPLE_NAME)  # replaces a planted symlink itself, never its target
        finally:
            tmp.unlink(missing_ok=True)

    def copy_out(self, name: str, dest_dir: str | Path) -> Path:
        """A copy of the adapter file named `<name>.safetensors` in dest_dir (what the browser downloads)."""
        info = self.info(name)
        dest = Path(dest_dir) / f"{info.name}.safetensors"
        with disk_errors(f"copy {name!r} for download"):
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(info.weights, dest)
        return dest
