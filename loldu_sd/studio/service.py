"""Studio: the library plus ONE generation pipeline shared by every session (lock-guarded), plus training."""
from __future__ import annotations

import atexit
import itertools
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .. import pipeline as pipeline_fns
from ..io import LoLDUFormatError, read_adapter_file
from ..per_prompt import per_prompt_adapters
from .inputs import (
    MAX_ADAPTER_BYTES,
    CompareRequest,
    GenerateRequest,
    StudioError,
    _display,
    sanitize_name,
)
from .jobs import Trainer
from .library import WEIGHT_NAME, AdapterInfo, AdapterLibrary

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """Generated images, the adapter switch time and the denoising time."""

    images: list[Image.Image]
    switch_seconds: float
    seconds: float


@dataclass
class Comparison:
    """One image per concept (then the base model), their labels, and the denoising time of the single batch."""

    images: list[Image.Image]
    labels: list[str]
    seconds: float


class Studio:
    """Library + one shared generation pipeline + a Trainer (one job at a time); safe to call from many threads."""

    def __init__(self, pretrained_model_name_or_path: str, library_dir: str | Path, device: str | None = None,
                 sample_steps: int = 20, preview_images: int = 2, scratch_dir: str | Path | None = None):
        self.base_model = str(pretrained_model_name_or_path)
        self.library = AdapterLibrary(library_dir)
        self.device = device
        self.sample_steps = sample_steps  # denoising steps of sample images the studio makes itself
        self._lock = threading.RLock()  # the pipeline: loading, adapter switching, denoising
        self._pipe = None
        self._loaded: dict[str, tuple[tuple[int, int], str]] = {}  # library name -> ((mtime_ns, size), name in pipe)
        self._ids = itertools.count()
        self.trainer = Trainer(self.library, self.base_model, preview_images, resolution=lambda: self.resolution,
                               device=lambda: self.device, make_sample=self._make_sample)
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

                from ..loading import PipelineLoadError, load_pipeline

                self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
                try:
                    self._pipe = load_pipeline(self.base_model, self.device)
                except PipelineLoadError as e:
                    raise StudioError(f"could not load the base model {self.base_model!r}: {e.reason}") from None
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
            pipeline_fns.delete_loldu_adapters(pipe, cached[1])
            del self._loaded[info.name]
        internal = f"studio_{next(self._ids)}"  # library names may clash with module attributes; these cannot
        try:
            pipeline_fns.load_loldu_weights(pipe, str(info.weights), adapter_name=internal)
        except LoLDUFormatError as e:
            raise StudioError(f"adapter {info.name!r}: {e.reason}") from None
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
                pipeline_fns.delete_loldu_adapters(self._pipe, internal)
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
            pipeline_fns.set_loldu_adapters(pipe, names, [float(w) for _, w in adapters])
            return time.perf_counter() - started

    def _check_exist(self, names: Sequence[str]) -> None:
        for name in names:
            if not self.library.exists(name):
                raise StudioError(f"no adapter named {name!r} in the library (deleted or renamed?); refresh the list")

    def generate(self, request: GenerateRequest) -> Generation:
        """Images for a prompt with a mix of library adapters (one denoising run at a time)."""
        import torch

        req = request.validated()
        self._check_exist([name for name, _ in req.adapters])
        with self._lock:
            pipe = self.pipeline()
            switch = self.activate(req.adapters)
            size, started = self.resolution, time.perf_counter()
            out = pipe(req.prompt, negative_prompt=req.negative_prompt or None, num_images_per_prompt=req.num_images,
                       num_inference_steps=req.steps, guidance_scale=req.guidance, height=size, width=size,
                       generator=torch.Generator(self.device).manual_seed(req.seed))
        return Generation(list(out.images), switch, time.perf_counter() - started)

    def compare(self, request: CompareRequest) -> Comparison:
        """One prompt for several library concepts (and the base model) in ONE batch, same noise for every image."""
        import torch

        req = request.validated()
        self._check_exist(req.adapters)
        labels = req.adapters + (["base model"] if req.include_base else [])
        with self._lock:
            pipe = self.pipeline()
            self._evict_stale()
            entries = [self._load(n) for n in req.adapters] + ([None] if req.include_base else [])
            size, started, n = self.resolution, time.perf_counter(), len(entries)
            with per_prompt_adapters(pipe, entries):
                out = pipe([req.prompt] * n, negative_prompt=[req.negative_prompt] * n if req.negative_prompt else None,
                           num_inference_steps=req.steps, guidance_scale=req.guidance, height=size, width=size,
                           generator=[torch.Generator(self.device).manual_seed(req.seed) for _ in entries])
        return Comparison(list(out.images), labels, time.perf_counter() - started)

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
                pipeline_fns.load_loldu_weights(pipe, str(path), adapter_name=probe)
                pipeline_fns.delete_loldu_adapters(pipe, probe)
        except LoLDUFormatError as e:
            raise StudioError(f"{shown}: rejected: {e.reason}") from None
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
        if format not in ("diffusers", "kohya"):
            raise StudioError(f"LoRA format must be 'diffusers' or 'kohya', got {format!r}")
        info = self.library.info(name)
        dest = self.scratch / "exports" / uuid.uuid4().hex / f"{info.name}.lora.safetensors"
        dest.parent.mkdir(parents=True)
        with self._lock:
            internal = self._load(info.name)
            meta = {"loldu_adapter": info.name, "base_model": info.base_model}  # library names, not internal ones
            return pipeline_fns.export_lora(self.pipeline(), dest, internal, format, metadata=meta)
