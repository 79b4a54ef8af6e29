"""The logic behind the Gradio studio (app.py): an adapter library on disk, one shared pipeline, training jobs.

Threads: Gradio runs handlers in worker threads, so a Studio holds ONE generation pipeline shared by every session
and guards it with a lock. Adapters are loaded into it once (cached by name + file mtime) and switched with
set_loldu_adapters, which only changes which z/sigma vectors are active: no model reload. Training runs in a
background thread on its own copy of the base model (the trainer loads it), so generation stays safe while another
user trains. That costs the base model twice in memory (nothing for the tiny pipeline; about 2 GB more GPU memory
for the weights of SD 1.5 in fp16), the price of never mutating modules that another thread is running.

Security: uploads are decoded with PIL (never trusted by extension) and re-encoded as PNG; adapter uploads must be
safetensors and are validated by a dry-run load (nothing is unpickled); adapter names are sanitised and every path
is resolved and confined to the library folder.
"""
from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from .diffusers import LOLDU_WEIGHT_NAME  # no diffusers import: that happens on first use
from .io import LoLDUFormatError, read_adapter_file

log = logging.getLogger(__name__)

WEIGHT_NAME = LOLDU_WEIGHT_NAME  # each library folder holds the file pipe.load_loldu_weights(folder) finds
SAMPLE_NAME, INFO_NAME = "sample.png", "info.json"
MAX_IMAGE_BYTES = 20 * 2**20
MIN_IMAGES, MAX_IMAGES = 3, 10
MAX_ADAPTER_BYTES = 20 * 2**20  # LoLDU files are kilobytes; anything this big is not one
IMAGE_FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "GIF"]  # never EPS/PDF: PIL shells out to Ghostscript for those
NAME_MAX = 64
MAX_MIX = 3  # adapter slots in the Generate tab


@dataclass(frozen=True)
class Limits:
    """Accepted ranges of every numeric field (the UI builds its sliders from these)."""

    train_steps: tuple[int, int] = (1, 2000)
    rank: tuple[int, int] = (1, 128)
    learning_rate: tuple[float, float] = (1e-6, 0.1)
    validation_every: tuple[int, int] = (1, 2000)
    gen_steps: tuple[int, int] = (1, 150)
    guidance: tuple[float, float] = (0.0, 30.0)
    num_images: tuple[int, int] = (1, 8)
    seed: tuple[int, int] = (0, 2**32 - 1)
    weight: tuple[float, float] = (-2.0, 2.0)


LIMITS = Limits()


class StudioError(ValueError):
    """Bad input or state; the message is one line, meant for the UI."""


class StudioBusyError(StudioError):
    """Another training job is running."""


def check_range(what: str, value: Any, bounds: tuple[float, float], integer: bool = False) -> Any:
    """`value` as a number within bounds, or a StudioError naming the field."""
    try:
        num = float(value)
    except (TypeError, ValueError):
        raise StudioError(f"{what} must be a number, got {value!r}") from None
    if num != num or not bounds[0] <= num <= bounds[1]:  # num != num: NaN
        raise StudioError(f"{what} must be between {bounds[0]:g} and {bounds[1]:g}, got {value!r}")
    if integer and num != int(num):
        raise StudioError(f"{what} must be a whole number, got {value!r}")
    return int(num) if integer else num


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sanitize_name(name: str | None) -> str:
    """A safe adapter name: ASCII letters, digits, '-' and '_' only, at most 64 characters."""
    clean = _UNSAFE.sub("_", str(name or "").strip()).strip("_-")[:NAME_MAX].strip("_-")
    if not clean:
        raise StudioError(f"adapter name {name!r} is empty once unsafe characters are removed; "
                          "use letters, digits, '-' or '_'")
    return clean


def suggest_instance_prompt(class_noun: str, token: str = "sks") -> str:
    """The DreamBooth-style prompt `a photo of sks <class>` for a class noun such as 'dog' or 'robot'."""
    noun = " ".join(str(class_noun or "").split()) or "object"
    return f"a photo of {token} {noun}"


def _display(path: str | Path) -> str:
    """Upload paths live in Gradio's cache; messages name the file only."""
    return Path(path).name


def load_images(paths: Sequence[str | Path], minimum: int = MIN_IMAGES, maximum: int = MAX_IMAGES
                ) -> list[Image.Image]:
    """Decode uploaded images with PIL (never trusting the extension): RGB, EXIF rotation applied, size-checked."""
    paths = [p for p in (paths or []) if p]
    if len(paths) < minimum:
        raise StudioError(f"upload at least {minimum} images of the concept (got {len(paths)}); 3-5 work best")
    if len(paths) > maximum:
        raise StudioError(f"upload at most {maximum} images per run (got {len(paths)})")
    images = []
    for p in paths:
        size = os.path.getsize(p)
        if size > MAX_IMAGE_BYTES:
            raise StudioError(f"{_display(p)}: {size / 2**20:.1f} MB is over the {MAX_IMAGE_BYTES // 2**20} MB "
                              "limit per image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(p, formats=IMAGE_FORMATS) as im:
                    im.verify()  # structure and checksums; the image must be reopened afterwards
                with Image.open(p, formats=IMAGE_FORMATS) as im:
                    images.append(ImageOps.exif_transpose(im).convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            reason = "unsupported or not an image" if isinstance(e, Image.UnidentifiedImageError) else str(e)
            raise StudioError(f"{_display(p)}: not a readable image ({reason}); upload PNG, JPEG or WebP files"
                              ) from None
    return images


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


@dataclass
class GenerateRequest:
    """One Generate-tab click: a prompt and up to MAX_MIX (adapter, weight) pairs."""

    prompt: str
    adapters: list[tuple[str, float]] = field(default_factory=list)
    negative_prompt: str = ""
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    num_images: int = 1

    def validated(self) -> "GenerateRequest":
        """A checked copy (StudioError on the first bad field); weight-0 and empty adapter slots are dropped."""
        prompt = (self.prompt or "").strip()
        if not prompt:
            raise StudioError("the prompt is empty; describe the image, e.g. 'a photo of sks robot on the beach'")
        mix: dict[str, float] = {}
        for name, weight in self.adapters:
            if not name:
                continue
            name = sanitize_name(name)
            if name in mix:
                raise StudioError(f"adapter {name!r} is picked twice; pick it once and set its weight")
            weight = check_range(f"weight of {name}", weight, LIMITS.weight)
            if weight != 0:
                mix[name] = weight
        if len(mix) > MAX_MIX:
            raise StudioError(f"mix at most {MAX_MIX} adapters")
        return GenerateRequest(
            prompt=prompt, adapters=list(mix.items()), negative_prompt=(self.negative_prompt or "").strip(),
            steps=check_range("steps", self.steps, LIMITS.gen_steps, integer=True),
            guidance=check_range("guidance", self.guidance, LIMITS.guidance),
            seed=check_range("seed", self.seed, LIMITS.seed, integer=True),
            num_images=check_range("number of images", self.num_images, LIMITS.num_images, integer=True))


@dataclass
class Generation:
    """Generated images, the adapter switch time and the denoising time."""

    images: list[Image.Image]
    switch_seconds: float
    seconds: float


def _pipeline_components(pipe) -> dict[str, Any]:
    from torch import nn

    names = ("unet", "text_encoder", "text_encoder_2")
    return {n: getattr(pipe, n) for n in names if isinstance(getattr(pipe, n, None), nn.Module)}


class Studio:
    """Library + one shared generation pipeline + at most one training job; safe to call from many threads."""

    def __init__(self, pretrained_model_name_or_path: str, library_dir: str | Path, device: str | None = None,
                 sample_steps: int = 20, preview_images: int = 2, scratch_dir: str | Path | None = None):
        self.base_model = str(pretrained_model_name_or_path)
        self.library = AdapterLibrary(library_dir)
        self.device = device
        self.sample_steps = sample_steps  # denoising steps of sample images the studio makes itself
        self.preview_images = preview_images  # validation images per preview while training (0: none)
        self._lock = threading.RLock()  # the pipeline: loading, adapter switching, denoising
        self._pipe = None
        self._loaded: dict[str, tuple[tuple[int, int], str]] = {}  # library name -> ((mtime_ns, size), name in pipe)
        self._ids = itertools.count()
        self._train_lock = threading.Lock()
        self.job: TrainingJob | None = None
        if scratch_dir is None:  # downloads/exports go to the temp dir, which Gradio may serve
            scratch_dir = tempfile.mkdtemp(prefix="loldu-studio-")
            atexit.register(shutil.rmtree, scratch_dir, True)
        self.scratch = Path(scratch_dir)

    # ---- the shared pipeline ---------------------------------------------------------------------------------
    def pipeline(self):
        """The generation pipeline, loaded on first use (so importing and starting the app stay fast)."""
        with self._lock:
            if self._pipe is None:
                import torch
                from diffusers import DiffusionPipeline

                import loldu_sd  # noqa: F401  (adds the pipeline methods)

                self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
                dtype = torch.float16 if self.device == "cuda" else torch.float32
                try:
                    pipe = DiffusionPipeline.from_pretrained(self.base_model, torch_dtype=dtype)
                except (OSError, ValueError) as e:
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    raise StudioError(f"could not load the base model {self.base_model!r}: {first}") from None
                pipe.set_progress_bar_config(disable=True)
                self._pipe = pipe.to(self.device)
            return self._pipe

    @property
    def resolution(self) -> int:
        """Image side in pixels the base model was trained at."""
        pipe = self.pipeline()
        return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)

    def _load(self, name: str) -> str:
        """Name of library adapter `name` inside the pipeline, loading it (kilobytes) when new or changed on disk."""
        info = self.library.info(name)
        stat = info.weights.stat()
        key = (stat.st_mtime_ns, stat.st_size)
        cached = self._loaded.get(info.name)
        if cached and cached[0] == key:
            return cached[1]
        pipe = self.pipeline()
        if cached:
            pipe.delete_loldu_adapters(cached[1])
            del self._loaded[info.name]
        internal = f"studio_{next(self._ids)}"  # library names may clash with module attributes; these cannot
        try:
            pipe.load_loldu_weights(str(info.weights), adapter_name=internal)
        except LoLDUFormatError as e:
            raise StudioError(f"adapter {info.name!r}: {str(e).replace(str(info.weights) + ': ', '')}") from None
        self._loaded[info.name] = (key, internal)
        return internal

    def _evict_stale(self) -> None:
        """Drop cached adapters whose library file was deleted, renamed or replaced."""
        for name, (key, internal) in list(self._loaded.items()):
            weights = self.library.root / name / WEIGHT_NAME
            try:
                stat = weights.stat()
                fresh = (stat.st_mtime_ns, stat.st_size) == key
            except OSError:
                fresh = False
            if not fresh:
                self._pipe.delete_loldu_adapters(internal)
                del self._loaded[name]

    def loaded_adapters(self) -> list[str]:
        """Library names currently cached in the pipeline."""
        with self._lock:
            return sorted(self._loaded)

    def activate(self, adapters: Sequence[tuple[str, float]]) -> float:
        """Make exactly these adapters active with these weights (loads new ones; no model reload); returns seconds."""
        with self._lock:
            pipe = self.pipeline()
            started = time.perf_counter()
            self._evict_stale()
            names = [self._load(n) for n, _ in adapters]
            pipe.set_loldu_adapters(names, [float(w) for _, w in adapters])
            return time.perf_counter() - started

    def generate(self, request: GenerateRequest) -> "Generation":
        """Images for a prompt with a mix of library adapters (one denoising run at a time)."""
        import torch

        req = request.validated()
        for name, _ in req.adapters:
            if not self.library.exists(name):
                raise StudioError(f"no adapter named {name!r} in the library (deleted or renamed?); refresh the list")
        with self._lock:
            pipe = self.pipeline()
            switch = self.activate(req.adapters)
            size, started = self.resolution, time.perf_counter()
            out = pipe(req.prompt, negative_prompt=req.negative_prompt or None, num_images_per_prompt=req.num_images,
                       num_inference_steps=req.steps, guidance_scale=req.guidance, height=size, width=size,
                       generator=torch.Generator(self.device).manual_seed(req.seed))
        return Generation(list(out.images), switch, time.perf_counter() - started)

    # ---- library operations that need the model ----------------------------------------------------------------
    def check_adapter(self, path: str | Path) -> dict[str, str]:
        """Validate a LoLDU safetensors file against the base model by a dry-run load; returns its metadata."""
        path = Path(path)
        shown = _display(path)
        if not path.is_file():
            raise StudioError(f"{shown}: the upload is missing; upload the file again")
        if path.suffix.lower() != ".safetensors":
            raise StudioError(f"{shown}: adapters must be .safetensors files (.bin/.pt/.ckpt pickles are refused)")
        size = path.stat().st_size
        if size > MAX_ADAPTER_BYTES:
            raise StudioError(f"{shown}: {size / 2**20:.1f} MB is far too big for a LoLDU adapter (kilobytes)")
        try:
            _, meta = read_adapter_file(path)  # header + tensors only: safetensors cannot run code
            with self._lock:  # a failed load leaves the pipeline unchanged; a successful one is removed again
                pipe = self.pipeline()
                probe = f"studio_probe_{next(self._ids)}"
                pipe.load_loldu_weights(str(path), adapter_name=probe)
                pipe.delete_loldu_adapters(probe)
        except LoLDUFormatError as e:
            msg = str(e).replace(str(path) + ": ", "")
            raise StudioError(f"{shown}: rejected: {msg}") from None
        return meta

    def import_adapter(self, upload: str | Path, name: str | None = None) -> AdapterInfo:
        """Validate an uploaded adapter and add it to the library with a freshly generated sample image."""
        upload = Path(upload)
        stem = upload.name.removesuffix(".safetensors").removesuffix(".loldu")
        name = sanitize_name(name or stem)
        if self.library.path(name).exists():
            raise StudioError(f"an adapter named {name!r} already exists; pick another name or delete it")
        meta = self.check_adapter(upload)
        prompt = meta.get("instance_prompt") or meta.get("validation_prompt") or "a photo"
        info = self.library.add(name, upload, extra={"source": "imported", "original_file": upload.name,
                                                     "instance_prompt": meta.get("instance_prompt", "")})
        self._make_sample(info.name, prompt)
        return self.library.info(info.name)

    def _make_sample(self, name: str, prompt: str) -> None:
        """Generate the library's sample image of an adapter (a failure only costs the thumbnail)."""
        try:
            request = GenerateRequest(prompt or "a photo", [(name, 1.0)], steps=self.sample_steps)
            sample = self.generate(request).images[0]
            self.library.set_sample(name, sample)
        except StudioError as e:
            log.warning("no sample image for %s: %s", name, e)

    def rename_adapter(self, old: str, new: str) -> AdapterInfo:
        """Rename a library adapter (the pipeline cache notices on its next use)."""
        return self.library.rename(old, new)

    def delete_adapter(self, name: str) -> None:
        """Delete a library adapter."""
        self.library.delete(name)

    def download_path(self, name: str) -> Path:
        """A scratch copy of the adapter file for the browser to download."""
        return self.library.copy_out(name, self.scratch / "downloads" / uuid.uuid4().hex)

    def export_lora(self, name: str, format: str = "diffusers") -> Path:
        """Export an adapter as the exact equivalent standard LoRA file (diffusers/peft or kohya keys)."""
        from safetensors.torch import save_file

        from .diffusers import export_lora_state_dict

        if format not in ("diffusers", "kohya"):
            raise StudioError(f"LoRA format must be 'diffusers' or 'kohya', got {format!r}")
        info = self.library.info(name)
        with self._lock:
            internal = self._load(info.name)
            tensors = export_lora_state_dict(_pipeline_components(self.pipeline()), internal, format)
        dest = self.scratch / "exports" / uuid.uuid4().hex / f"{info.name}.lora.safetensors"
        dest.parent.mkdir(parents=True)
        save_file(tensors, str(dest), metadata={"format": "pt", "exported_from": "loldu", "loldu_adapter": info.name,
                                                "base_model": info.base_model, "lora_format": format})
        return dest

    # ---- training -------------------------------------------------------------------------------------------
    def training_busy(self) -> bool:
        """Whether a training job is running right now."""
        return self._train_lock.locked()

    def start_training(self, request: "TrainRequest", owner: str = "") -> "TrainingJob":
        """Validate, then run the trainer in a background thread; StudioBusyError while another job runs."""
        images = request.validate(self.library)
        if not self._train_lock.acquire(blocking=False):
            raise StudioBusyError("another training job is running; wait for it to finish (you are not queued)")
        try:
            job = TrainingJob(request, owner, images)
            self.job = job
            thread = threading.Thread(target=self._run_job, args=(job,), name=f"loldu-train-{job.id}", daemon=True)
            thread.start()
        except BaseException:
            self._train_lock.release()
            raise
        return job

    def cancel_training(self, owner: str | None = None) -> bool:
        """Ask the running job to stop after its current step (only its owner may, unless owner is None)."""
        job = self.job
        if job is None or job.finished or (owner is not None and job.owner != owner):
            return False
        job.cancel()
        return True

    def _run_job(self, job: "TrainingJob") -> None:
        workdir = self.library.root / ".jobs" / job.id  # hidden: never listed, still inside the library folder
        end: dict[str, Any] = {}  # the final state, published only once the lock is free again
        try:
            instance_dir = workdir / "instance"
            instance_dir.mkdir(parents=True)
            for i, im in enumerate(job.images):  # re-encoded PNGs: no uploaded byte reaches the trainer
                im.save(instance_dir / f"{i:02d}.png")
            prior = " and generating class images for prior preservation" if job.request.class_prompt else ""
            job.update(state="running", message=f"loading the base model for training{prior}")
            key = hashlib.sha1(f"{self.base_model}|{job.request.class_prompt}|{self.resolution}".encode()).hexdigest()
            class_dir = self.library.root / ".class_images" / key[:16]  # reused by later runs with this prompt
            result = run_trainer(self.base_model, workdir, job, self.resolution, self.device, class_dir,
                                 self.preview_images)
            end = self._save_result(job, result.adapter_path, cancelled=result.cancelled)
        except NothingToSave:
            end = dict(state="cancelled", message="cancelled before the first step; nothing was saved")
        except TrainingFailed as e:  # e.g. a NaN loss: keep the last good checkpoint, if there is one
            if e.checkpoint is not None:
                end = self._save_result(job, e.checkpoint, failed=str(e))
            else:
                end = dict(state="failed", message=f"{e}; nothing was saved")
        except StudioError as e:
            end = dict(state="failed", message=str(e))
        except Exception as e:  # the UI gets one line; the traceback goes to the server log
            log.exception("training job %s failed", job.id)
            first = (str(e).strip().splitlines() or [""])[0][:300]
            end = dict(state="failed", message=f"training failed: {type(e).__name__}: {first}")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            self._train_lock.release()
            job.update(**(end or dict(state="failed", message="training ended unexpectedly")))

    def _save_result(self, job: "TrainingJob", weights: Path | None, cancelled: bool = False,
                     failed: str | None = None) -> dict[str, Any]:
        """Put a finished (or cancelled, or last-good) adapter into the library; returns the job's final state."""
        if weights is None or not Path(weights).is_file():
            raise StudioError("the trainer finished without writing an adapter file")
        name = job.request.name
        if self.library.path(name).exists():  # taken by another session meanwhile: keep both
            name = f"{name[:NAME_MAX - 9]}-{job.id}"
        steps = f"{job.step}/{job.total}"
        note = f"stopped at step {steps}: {failed}" if failed else f"cancelled at step {steps}" if cancelled else ""
        info = self.library.add(name, weights, job.previews[0] if job.previews else None, extra={
            "source": "trained", "instance_prompt": job.request.instance_prompt,
            "class_prompt": job.request.class_prompt, "steps": job.step, "rank": job.request.rank,
            "learning_rate": job.request.learning_rate, "seed": job.request.seed, "note": note})
        if info.sample is None:
            self._make_sample(info.name, job.request.instance_prompt)
            info = self.library.info(info.name)
        saved = f"saved {info.name!r} ({info.size_kb:.1f} KB) to the library"
        if failed:
            return dict(state="failed", adapter=info, message=f"{failed}; kept the last good checkpoint: {saved}")
        if cancelled:
            return dict(state="cancelled", adapter=info,
                        message=f"cancelled at step {steps}; kept the last checkpoint: {saved}")
        return dict(state="done", adapter=info, message=saved)


def run_trainer(base_model: str, workdir: Path, job: "TrainingJob", resolution: int, device: str | None = None,
                class_dir: Path | None = None, preview_images: int = 2):
    """Run loldu_sd.training.train_dreambooth in this thread on workdir/instance, reporting to `job`."""
    from . import training

    req = job.request
    out = workdir / "output"
    argv = ["--pretrained_model_name_or_path", base_model, "--instance_data_dir", str(workdir / "instance"),
            "--instance_prompt", req.instance_prompt, "--output_dir", str(out), "--resolution", str(resolution),
            "--max_train_steps", str(req.steps), "--rank", str(req.rank), "--alpha", str(req.rank),
            "--learning_rate", repr(req.learning_rate), "--seed", str(req.seed),
            "--validation_steps", str(req.validation_every), "--num_validation_images", str(preview_images),
            "--checkpointing_steps", str(req.validation_every), "--checkpoints_total_limit", "1",
            "--lr_warmup_steps", str(min(15, req.steps // 4)),  # the paper's 15, but short runs must reach the lr
            "--report_to", "none", "--mixed_precision", "fp16" if device == "cuda" else "no"]
    if req.class_prompt:
        argv += ["--with_prior_preservation", "--class_prompt", req.class_prompt, "--class_data_dir",
                 str(class_dir or workdir / "class"), "--num_class_images", str(req.num_class_images)]
    callbacks = training.TrainingCallbacks(on_step=job.on_step, on_validation=job.on_validation,
                                           should_stop=job.should_stop)
    try:
        result = training.train_dreambooth(training.parse_args(argv), callbacks)
    except training.TrainingInputError as e:
        raise StudioError(_without(str(e), workdir)) from None
    except training.TrainingError as e:
        checkpoints = training.list_checkpoints(out)
        weights = checkpoints[-1] / WEIGHT_NAME if checkpoints else None
        reason = _without(str(e).split(";")[0], workdir)  # "step 3: the loss is nan"
        raise TrainingFailed(f"training stopped ({reason}); lower the learning rate and try again",
                             weights if weights is not None and weights.is_file() else None) from None
    if result.adapter_path is None:
        raise NothingToSave()
    return result


def _without(message: str, folder: Path) -> str:
    """A trainer message without the server's folder names."""
    return message.replace(str(folder) + os.sep, "").replace(str(folder), "job folder")


class TrainingFailed(RuntimeError):
    """The trainer stopped with a message meant for the user (e.g. a NaN loss); maybe a last good checkpoint."""

    def __init__(self, message: str, checkpoint: Path | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint


class NothingToSave(RuntimeError):
    """The job was cancelled before any step completed."""


@dataclass
class TrainRequest:
    """One Train-tab click."""

    images: list[str]
    instance_prompt: str
    name: str
    class_prompt: str = ""
    steps: int = 100  # the paper reports concept acquisition in about 100 steps
    rank: int = 32
    learning_rate: float = 5e-4
    seed: int = 42
    validation_every: int = 25
    num_class_images: int = 8  # prior-preservation images generated for the class prompt (few: this is an app)

    def validate(self, library: AdapterLibrary | None = None) -> list[Image.Image]:
        """Check every field (StudioError on the first problem) and normalise it in place; returns the images."""
        self.instance_prompt = " ".join((self.instance_prompt or "").split())
        if not self.instance_prompt:
            raise StudioError("the instance prompt is empty; use e.g. 'a photo of sks robot' (sks = rare token)")
        self.class_prompt = " ".join((self.class_prompt or "").split())
        self.name = sanitize_name(self.name)
        if library is not None and library.path(self.name).exists():
            raise StudioError(f"an adapter named {self.name!r} already exists; pick another name or delete it")
        self.steps = check_range("training steps", self.steps, LIMITS.train_steps, integer=True)
        self.rank = check_range("rank", self.rank, LIMITS.rank, integer=True)
        self.learning_rate = check_range("learning rate", self.learning_rate, LIMITS.learning_rate)
        self.seed = check_range("seed", self.seed, LIMITS.seed, integer=True)
        self.validation_every = check_range("preview every N steps", self.validation_every,
                                            LIMITS.validation_every, integer=True)
        return load_images(self.images)


@dataclass
class JobSnapshot:
    """What the UI shows of a training job at one moment."""

    state: str  # "starting" | "running" | "done" | "cancelled" | "failed"
    step: int
    total: int
    losses: list[tuple[int, float]]
    previews: list[Image.Image]
    message: str
    adapter: AdapterInfo | None
    elapsed: float
    seconds_per_step: float | None = None

    @property
    def finished(self) -> bool:
        """Whether the job has ended (in any way)."""
        return self.state in ("done", "cancelled", "failed")


class TrainingJob:
    """State of one training run, written by the trainer thread and read (as snapshots) by UI threads."""

    def __init__(self, request: TrainRequest, owner: str, images: list[Image.Image]):
        self.id = uuid.uuid4().hex[:8]
        self.request, self.owner, self.images = request, owner, images
        self.total, self.step = request.steps, 0
        self.state, self.message, self.adapter = "starting", "queued for the trainer", None
        self.losses: list[tuple[int, float]] = []
        self.previews: list[Image.Image] = []
        self.started = time.time()
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._version = 0
        self._step_times: list[float] = []

    @property
    def finished(self) -> bool:
        """Whether the job has ended."""
        return self.state in ("done", "cancelled", "failed")

    def cancel(self) -> None:
        """Ask the trainer to stop after the current step; it then saves what it has."""
        self._stop.set()
        self.update(message="cancelling after the current step...")

    def should_stop(self) -> bool:
        """The trainer's cancel hook."""
        return self._stop.is_set()

    def update(self, **changes: Any) -> None:
        """Change fields and wake the UI threads waiting in snapshots()."""
        with self._changed:
            for k, v in changes.items():
                setattr(self, k, v)
            self._version += 1
            self._changed.notify_all()

    def on_step(self, step: int, loss: float) -> None:
        """Trainer callback after each optimizer step."""
        message = ("cancelling after the current step..." if self.should_stop() else
                   "saving the adapter and rendering the final previews" if step >= self.total else "training")
        self._step_times.append(time.time())
        self.update(step=step, losses=self.losses + [(step, float(loss))], state="running", message=message)

    def on_validation(self, step: int, images: Sequence[Image.Image]) -> None:
        """Trainer callback with validation previews."""
        self.update(previews=list(images))

    def snapshot(self) -> JobSnapshot:
        """A consistent copy of the job's state."""
        with self._changed:
            t = self._step_times
            speed = (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None  # model loading excluded
            return JobSnapshot(self.state, self.step, self.total, list(self.losses), list(self.previews),
                               self.message, self.adapter, time.time() - self.started, speed)

    def snapshots(self, interval: float = 0.5, heartbeat: float = 2.0) -> Iterator[JobSnapshot]:
        """Yield a snapshot when the job changes (at most every `interval` s, at least every `heartbeat` s)."""
        seen = -1
        while True:
            with self._changed:
                if self._version == seen and not self.finished:
                    self._changed.wait(timeout=heartbeat)
                seen = self._version
            snap = self.snapshot()
            yield snap
            if snap.finished:
                return
            time.sleep(interval)  # throttle: the browser does not need every step of a fast run
