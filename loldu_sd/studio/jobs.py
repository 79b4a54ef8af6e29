"""Training jobs: the studio's Trainer, the in-process trainer call, and the job state the UI polls."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..training.errors import first_line
from .inputs import NAME_MAX, StudioBusyError, StudioError, TrainRequest, renamed
from .library import WEIGHT_NAME, AdapterInfo, AdapterLibrary

log = logging.getLogger(__name__)


class Trainer:
    """The studio's trainer: at most one background job, whose adapter is saved into the library.

    `resolution()` and `device()` are the generation pipeline's (loading it if needed); `make_sample(name, prompt)`
    draws a library thumbnail.
    """

    def __init__(self, library: AdapterLibrary, base_model: str, preview_images: int, resolution: Callable[[], int],
                 device: Callable[[], str | None], make_sample: Callable[[str, str], None]):
        self.library, self.base_model = library, base_model
        self.preview_images = preview_images  # validation images per preview while training (0: none)
        self.resolution, self.device, self.make_sample = resolution, device, make_sample
        self.job: TrainingJob | None = None
        self._lock = threading.Lock()
        self._waiting: dict[str, bool] = {}  # session -> cancel requested, for sessions queued behind a running job

    def busy(self) -> bool:
        """Whether a training job is running right now."""
        return self._lock.locked()

    def start(self, request: TrainRequest, owner: str = "") -> TrainingJob:
        """Validate, then run the trainer in a background thread; StudioBusyError while another job runs."""
        images = request.validate(self.library)
        if not self._lock.acquire(blocking=False):
            raise StudioBusyError("another training job is running; wait for it to finish (you are not queued)")
        try:
            job = TrainingJob(request, owner, images)
            self.job = job
            thread = threading.Thread(target=self._run_job, args=(job,), name=f"loldu-train-{job.id}", daemon=True)
            thread.start()
        except BaseException:
            self._lock.release()
            raise
        return job

    def cancel(self, owner: str | None = None) -> str | None:
        """Cancel `owner`'s job: 'running' (stops after its current step; only its owner may, unless owner is None),
        'queued' (a job waiting in the queue will not start), or None when there is nothing of theirs to cancel."""
        job = self.job
        if job is not None and not job.finished and (owner is None or job.owner == owner):
            job.cancel()
            return "running"
        if owner is not None and owner in self._waiting:
            self._waiting[owner] = True
            return "queued"
        return None

    def note_waiting(self, owner: str) -> None:
        """Record that `owner` submitted a job that waits in the queue, so that they can cancel it before it runs."""
        self._waiting[owner] = False

    def take_waiting(self, owner: str) -> bool:
        """Called when `owner`'s queued job reaches the front: forget it; True if they cancelled it meanwhile."""
        return self._waiting.pop(owner, False)

    def _run_job(self, job: TrainingJob) -> None:
        workdir = None
        end: dict[str, Any] = {}  # the final state, published only once the lock is free again
        try:
            workdir = self.library.private_dir(".jobs", job.id)  # hidden: never listed, inside the library folder
            instance_dir = workdir / "instance"
            instance_dir.mkdir()
            for i, im in enumerate(job.images):  # re-encoded PNGs: no uploaded byte reaches the trainer
                im.save(instance_dir / f"{i:02d}.png")
            prior = " and generating class images for prior preservation" if job.request.class_prompt else ""
            job.update(state="running", message=f"loading the base model for training{prior}")
            resolution = self.resolution()
            key = hashlib.sha1(f"{self.base_model}|{job.request.class_prompt}|{resolution}".encode()).hexdigest()
            class_dir = self.library.private_dir(".class_images", key[:16])  # reused by later runs with this prompt
            result = run_trainer(self.base_model, workdir, job, resolution, self.device(), class_dir,
                                 self.preview_images)
            end = self._save_result(job, result.adapter_path, cancelled=result.cancelled)
        except NothingToSave:
            end = {"state": "cancelled", "message": "cancelled before the first step; nothing was saved"}
        except TrainingFailed as e:  # e.g. a NaN loss: keep the last good checkpoint, if there is one
            if e.checkpoint is not None:
                end = self._save_result(job, e.checkpoint, failed=str(e))
            else:
                end = {"state": "failed", "message": f"{e}; nothing was saved"}
        except StudioError as e:
            end = {"state": "failed", "message": str(e)}
        except Exception as e:  # the UI gets one line; the traceback goes to the server log
            log.exception("training job %s failed", job.id)
            end = {"state": "failed", "message": f"training failed: {type(e).__name__}: {first_line(e)}"}
        finally:
            if workdir is not None:  # only a folder this job made: never one a symlink points to
                shutil.rmtree(workdir, ignore_errors=True)
            self._lock.release()
            job.update(**(end or {"state": "failed", "message": "training ended unexpectedly"}))

    def _save_result(self, job: TrainingJob, weights: Path | None, cancelled: bool = False,
                     failed: str | None = None) -> dict[str, Any]:
        """Put a finished (or cancelled, or last-good) adapter into the library; returns the job's final state."""
        if weights is None or not Path(weights).is_file():
            raise StudioError("the trainer finished without writing an adapter file")
        name = job.request.name
        said = renamed(job.request.requested_name or name, name)
        if self.library.path(name).exists():  # taken by another session meanwhile: keep both
            name = f"{name[:NAME_MAX - 9]}-{job.id}"
            said = f" ({job.request.name!r} was taken meanwhile)"
        steps = f"{job.step}/{job.total}"
        note = f"stopped at step {steps}: {failed}" if failed else f"cancelled at step {steps}" if cancelled else ""
        info = self.library.add(name, weights, job.previews[0] if job.previews else None, extra={
            "source": "trained", "instance_prompt": job.request.instance_prompt,
            "class_prompt": job.request.class_prompt, "steps": job.step, "rank": job.request.rank,
            "learning_rate": job.request.learning_rate, "seed": job.request.seed, "note": note})
        if info.sample is None:
            self.make_sample(info.name, job.request.instance_prompt)
            info = self.library.info(info.name)
        saved = f"saved {info.name!r} ({info.size_kb:.1f} KB) to the library{said}"
        if failed:
            return {"state": "failed", "adapter": info, "message": f"{failed}; kept the last good checkpoint: {saved}"}
        if cancelled:
            return {"state": "cancelled", "adapter": info,
                    "message": f"cancelled at step {steps}; kept the last checkpoint: {saved}"}
        return {"state": "done", "adapter": info, "message": saved}


def run_trainer(base_model: str, workdir: Path, job: TrainingJob, resolution: int, device: str | None = None,
                class_dir: Path | None = None, preview_images: int = 2):
    """Run loldu_sd.training.train_dreambooth in this thread on workdir/instance, reporting to `job`."""
    from .. import training

    req = job.request
    out = workdir / "output"
    argv = ["--pretrained_model_name_or_path", base_model, "--instance_data_dir", str(workdir / "instance"),
            "--instance_prompt", req.instance_prompt, "--output_dir", str(out), "--resolution", str(resolution),
            "--max_train_steps", str(req.steps), "--train_batch_size", str(req.batch_size),
            "--rank", str(req.rank), "--alpha", str(req.rank),
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
