"""One run of the quality benchmark: train one method on one concept with the trainer's data, loss and optimizer,
and score it at each checkpoint with the toy-world judges.

The loop is the trainer's (loldu_sd.training): DreamBoothDataset and SampleStream for the images and augmentation,
the Conditioner and batch_loss for the loss (Min-SNR, offset noise and the rest as the flags say), make_optimizer
and make_lr_scheduler, gradient clipping, then the method's after-step hook (LoLDU's projection). For LoLDU this
gives the adapter train_dreambooth writes for the same flags (tests/test_quality.py checks it bit for bit).
"""
from __future__ import annotations

import argparse
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from loldu_sd.toyworld import CONCEPTS_DIR
from loldu_sd.toyworld.concepts import CONCEPTS, prompts

from .before_after import PRIOR_SAMPLES, SHOWN, prior_similarity, score_set
from .methods import METHODS, Method, Trainable
from .toyworld import concept_images, generate

BASE = "base"  # the job that scores the base model (and the concept photos) once per concept


@dataclass(frozen=True)
class Job:
    """One unit of work: a concept x method x learning rate x seed (method 'base': the reference rows)."""

    concept: str
    method: str
    lr: float = 0.0
    seed: int = 0

    @property
    def key(self) -> str:
        """A stable name, also the run's folder under <out>/runs."""
        return f"{self.concept}/{self.method}" + ("" if self.method == BASE else f"/lr{self.lr:g}-seed{self.seed}")


@dataclass(frozen=True)
class Settings:
    """What every run shares."""

    pipeline: str
    out: Path
    steps: tuple[int, ...] = (50, 100, 200, 400)
    prompts_limit: int | None = None
    class_samples: int = PRIOR_SAMPLES
    inference_steps: int = 20
    eval_seed: int = 0
    threads: int = 1
    trainer_flags: tuple[str, ...] = ()

    def record(self) -> dict:
        """The settings that decide a run's numbers (a saved run is reused only when they match)."""
        out = asdict(self)
        out.pop("out"), out.pop("threads")
        return out


def trainer_args(job: Job, settings: Settings, method: Method | None) -> argparse.Namespace:
    """The trainer's flags of this run (parse_args: the trainer's defaults for everything not given)."""
    from loldu_sd.training import parse_args

    concept = CONCEPTS[job.concept]
    flags = ["--pretrained_model_name_or_path", settings.pipeline, "--instance_data_dir",
             str(CONCEPTS_DIR / job.concept), "--resolution", "64", "--report_to", "none",
             "--num_validation_images", "0", "--output_dir", str(settings.out / "runs" / job.key),
             "--instance_prompt", method.prompt(concept.instance_prompt) if method else concept.instance_prompt,
             "--max_train_steps", str(max(settings.steps)), "--seed", str(job.seed),
             "--learning_rate", str(job.lr or 1.0), *(method.flags if method else ()), *settings.trainer_flags]
    return parse_args(flags)


def train(args: argparse.Namespace, models, trainable: Trainable, checkpoints: tuple[int, ...], on_checkpoint
          ) -> None:
    """The trainer's optimizer-step loop on one process, calling on_checkpoint(step, mean loss since the last)."""
    from torch.utils.data import DataLoader

    from loldu_sd.training import DreamBoothDataset, SampleStream, TrainingError, load_images
    from loldu_sd.training.conditioning import Conditioner
    from loldu_sd.training.loss import batch_loss
    from loldu_sd.training.optim import make_lr_scheduler, make_optimizer

    device, bs, accum = torch.device("cpu"), args.train_batch_size, args.gradient_accumulation_steps
    instance = [im for _, im in load_images(args.instance_data_dir, args.resolution)[0]]
    dataset = DreamBoothDataset(instance, args.resolution, args.seed, args.center_crop, args.random_flip)
    data = iter(DataLoader(dataset, batch_size=bs, sampler=SampleStream(0, 1, 0, bs),
                           num_workers=args.dataloader_num_workers))
    conditioner = Conditioner(models, trainable.trained, args.text_encoder_use_attention_mask, device, torch.float32)
    optimizer = make_optimizer(args, trainable.params, args.learning_rate * (bs * accum if args.scale_lr else 1))
    schedule = make_lr_scheduler(args, optimizer, max(checkpoints))
    for module in trainable.trained.values():
        module.train()  # as the trainer does (from_pretrained returns eval-mode models)
    losses = []
    for step in range(1, max(checkpoints) + 1):
        for _ in range(accum):  # accelerate's accumulation: each micro-batch's loss divided by their number
            loss = batch_loss(args, conditioner, models.unet, models, next(data), device, False)
            if not torch.isfinite(loss):
                raise TrainingError(f"step {step}: the loss is {float(loss)}; lower the learning rate")
            (loss / accum).backward()
            losses.append(float(loss.detach()))
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable.params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        for hook in trainable.after_step:
            hook()
        if step in checkpoints:
            on_checkpoint(step, sum(losses) / len(losses))
            losses = []


def shown_indexes(n: int) -> list[int]:
    """Which of the first n prompts the grids show: before_after's choice, or the first four of a short list."""
    return [i for i in SHOWN if i < n] or list(range(min(4, n)))


class Judge:
    """Scores a pipeline's samples of one concept: the prompt list, the class prompt (prior) and the photos."""

    def __init__(self, pipe, scorer, job: Job, settings: Settings, method: Method | None):
        self.pipe, self.scorer, self.settings = pipe, scorer, settings
        self.concept, self.method = CONCEPTS[job.concept], method
        self.texts = prompts(self.concept)[: settings.prompts_limit]
        self.reference = scorer.embed_images(concept_images(job.concept))
        self.shown = shown_indexes(len(self.texts))
        self.base_class = self.class_samples()  # before any step every method draws the class as the base does

    def _generate(self, texts: list[str], seed: int) -> list[Image.Image]:
        return generate(self.pipe, texts, seed, steps=self.settings.inference_steps)

    def class_samples(self) -> list[Image.Image]:
        """Class-prompt samples with before_after's seeds (the prior is measured on them)."""
        n, seed = self.settings.class_samples, self.settings.eval_seed + 2000
        return self._generate([self.concept.class_prompt] * n, seed)

    def __call__(self, strip: Path) -> dict:
        """DINO*, CLIP-I*, CLIP-T*, prior of the pipeline now; the shown prompts' images saved side by side."""
        texts = [self.method.prompt(t) for t in self.texts] if self.method else self.texts
        images = self._generate(texts, self.settings.eval_seed)
        row = score_set(self.scorer, images, self.reference, self.texts)
        row["prior"] = prior_similarity(self.scorer, self.base_class, self.class_samples())
        row["fidelity"] = round((row["dino"] + row["clip_i"]) / 2, 4)
        side = Image.new("RGB", (64 * len(self.shown), 64))
        for k, i in enumerate(self.shown):
            side.paste(images[i].resize((64, 64)), (64 * k, 0))
        strip.parent.mkdir(parents=True, exist_ok=True)
        side.save(strip)
        return row


def run_job(job: Job, settings: Settings, scorer) -> dict:
    """Train (unless 'base') and score one job; returns its record (also written to <run>/result.json)."""
    from accelerate.utils import set_seed

    from loldu_sd.training.models import load_models, pipeline_components, pipeline_from_args

    started = time.time()
    torch.set_num_threads(settings.threads)  # a fixed thread count: 1 and N processes compute the same numbers
    method = METHODS.get(job.method)
    args, folder = trainer_args(job, settings, method), settings.out / "runs" / job.key
    set_seed(args.seed)  # LoRA's gaussian init draws from the global RNG (the trainer seeds it here too)
    models = load_models(args, torch.device("cpu"), torch.float32)
    trainable = method.build(models, args, CONCEPTS[job.concept]) if method else None
    pipe = pipeline_from_args(args, **pipeline_components(models, {"unet": models.unet}, lambda module: module))
    pipe.set_progress_bar_config(disable=True)
    judge = Judge(pipe, scorer, job, settings, method)
    record = {"job": asdict(job), "settings": settings.record(), "steps": {}}
    if method is None:
        record["real"] = {k: round(v, 4) for k, v in scorer.score_real(judge.reference).items()
                          if k in ("dino", "clip_i")}
        record["steps"]["0"] = {**judge(folder / "step0.png"), "size": 0}
    else:
        record["values"] = sum(p.numel() for p in trainable.params)

        def on_checkpoint(step: int, loss: float) -> None:
            row = judge(folder / f"step{step}.png")
            keep = step == max(settings.steps)  # the last checkpoint's files stay: they load in a pipeline
            row["size"] = trainable.save(folder / ("files" if keep else "tmp"))
            shutil.rmtree(folder / "tmp", ignore_errors=True)
            row["loss"] = round(loss, 5) if math.isfinite(loss) else None
            record["steps"][str(step)] = row

        train(args, models, trainable, settings.steps, on_checkpoint)
    record["seconds"] = round(time.time() - started, 1)
    return record
