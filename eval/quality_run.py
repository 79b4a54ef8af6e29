"""One run of the quality benchmark: train one method on one concept with the trainer's own training step, and
score it at each checkpoint with the toy-world judges.

The data, loss and step are the trainer's (loldu_sd.training): DreamBoothDataset and SampleStream for the images and
augmentation, the Conditioner and batch_loss for the loss, make_optimizer and make_lr_scheduler, and training_step
(accumulation, clipping, the method's after-step hooks and checks) on a OneProcess, as train_dreambooth runs it on
its Accelerator. One run of max(steps) steps is scored at every checkpoint in `steps`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from loldu_sd.toyworld import CONCEPTS_DIR, JUDGES_DIR, TRAIN_BATCH_SIZE
from loldu_sd.toyworld.concepts import CONCEPTS, concept_photos, prompts

from . import quality_store as store
from .before_after import PRIOR_SAMPLES, SHOWN, prior_similarity, score_set
from .methods import METHODS, Method
from .toyworld import generate

BASE = "base"  # the job that scores the base model, the concept photos and the codec ceiling once per concept
STRIP = "strip.png"  # the shown prompts' images at the last checkpoint, side by side (the grids' cells)


@dataclass(frozen=True)
class Job:
    """One unit of work: a concept x method x learning rate x seed (method 'base': the reference rows)."""

    concept: str
    method: str
    lr: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class Settings:
    """What every run of one command shares."""

    pipeline: str
    judges: str = str(JUDGES_DIR)
    runs: Path = store.RUNS_DIR  # committed records
    work: Path = Path("runs/quality")  # the shipped files of each run (not committed)
    steps: tuple[int, ...] = (50, 100, 200, 400)
    prompts_limit: int | None = None
    class_samples: int = PRIOR_SAMPLES
    inference_steps: int = 20
    eval_seed: int = 0
    threads: int = 1
    trainer_flags: tuple[str, ...] = ("--train_batch_size", str(TRAIN_BATCH_SIZE))
    methods: dict[str, Method] = field(default_factory=lambda: dict(METHODS), compare=False)

    def record(self) -> dict:
        """The settings that decide every run's numbers, as JSON stores them (where outputs go does not count)."""
        keep = ("steps", "prompts_limit", "class_samples", "inference_steps", "eval_seed", "trainer_flags")
        return json.loads(json.dumps({k: getattr(self, k) for k in keep}))


def identity(job: Job, settings: Settings, world: dict) -> dict:
    """Everything that decides one run's numbers (its key is the hash of this)."""
    method = settings.methods[job.method].definition() if job.method != BASE else None
    return {"job": asdict(job), "settings": settings.record(), "method": method, "world": world,
            "recipe": store.RECIPE}


def trainer_args(job: Job, settings: Settings, method: Method | None) -> argparse.Namespace:
    """The trainer's flags of this run (its defaults for everything not given), then the method's options."""
    from loldu_sd.training import parse_args

    concept = CONCEPTS[job.concept]
    flags = ["--pretrained_model_name_or_path", settings.pipeline, "--instance_data_dir",
             str(CONCEPTS_DIR / job.concept), "--resolution", "64", "--report_to", "none",
             "--num_validation_images", "0", "--output_dir", str(settings.work / "scratch"),
             "--instance_prompt", method.prompt(concept.instance_prompt) if method else concept.instance_prompt,
             "--max_train_steps", str(max(settings.steps)), "--seed", str(job.seed),
             "--learning_rate", str(job.lr or 1.0), *(method.flags if method else ()), *settings.trainer_flags]
    args = parse_args(flags)
    return method.apply_options(args) if method else args


def train(args: argparse.Namespace, models, trainable, checkpoints: tuple[int, ...], on_checkpoint) -> None:
    """max(checkpoints) steps of the trainer's training_step on this process, calling on_checkpoint(step, mean loss
    since the last checkpoint); NonFiniteStep names the step that went non-finite."""
    from torch.utils.data import DataLoader

    from loldu_sd.training import DreamBoothDataset, NonFiniteStep, OneProcess, SampleStream, load_images
    from loldu_sd.training.conditioning import Conditioner
    from loldu_sd.training.loss import batch_loss
    from loldu_sd.training.optim import make_lr_scheduler, make_optimizer
    from loldu_sd.training.step import training_step

    device, bs, accum = torch.device("cpu"), args.train_batch_size, args.gradient_accumulation_steps
    instance = [im for _, im in load_images(args.instance_data_dir, args.resolution)[0]]
    dataset = DreamBoothDataset(instance, args.resolution, args.seed, args.center_crop, args.random_flip)
    data = iter(DataLoader(dataset, batch_size=bs, sampler=SampleStream(0, 1, 0, bs),
                           num_workers=args.dataloader_num_workers))
    conditioner = Conditioner(models, trainable.trained, args.text_encoder_use_attention_mask, device, torch.float32)
    optimizer = make_optimizer(args, trainable.params, args.learning_rate * (bs * accum if args.scale_lr else 1))
    schedule = make_lr_scheduler(args, optimizer, max(checkpoints))
    runner, losses = OneProcess(accum), []
    for module in trainable.trained.values():
        module.train()  # as the trainer does (from_pretrained returns eval-mode models)

    def loss_of(batch) -> torch.Tensor:
        return batch_loss(args, conditioner, models.unet, models, batch, device, False)

    for step in range(1, max(checkpoints) + 1):
        try:
            losses.append(training_step(trainable, runner, (next(data) for _ in range(accum)), loss_of, optimizer,
                                        schedule, args.max_grad_norm))
        except NonFiniteStep as e:
            raise NonFiniteStep(f"step {step}: {e}") from None
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
        self.reference = scorer.embed_images(concept_photos(job.concept))
        self.shown = shown_indexes(len(self.texts))
        self.base_class = self.class_samples()  # before any step every method draws the class as the base does

    def _generate(self, texts: list[str], seed: int) -> list[Image.Image]:
        return generate(self.pipe, texts, seed, steps=self.settings.inference_steps)

    def class_samples(self) -> list[Image.Image]:
        """Class-prompt samples with before_after's seeds (the prior is measured on them)."""
        n, seed = self.settings.class_samples, self.settings.eval_seed + 2000
        return self._generate([self.concept.class_prompt] * n, seed)

    def __call__(self) -> tuple[dict, Image.Image]:
        """DINO*, CLIP-I*, CLIP-T*, prior and subject fidelity of the pipeline now; the shown prompts' images."""
        texts = [self.method.prompt(t) for t in self.texts] if self.method else self.texts
        images = self._generate(texts, self.settings.eval_seed)
        row = score_set(self.scorer, images, self.reference, self.texts)
        row["prior"] = prior_similarity(self.scorer, self.base_class, self.class_samples())
        row["fidelity"] = round((row["dino"] + row["clip_i"]) / 2, 4)
        strip = Image.new("RGB", (64 * len(self.shown), 64))
        for k, i in enumerate(self.shown):
            strip.paste(images[i].resize((64, 64)), (64 * k, 0))
        return row, strip


def _references(record: dict, judge: Judge, pipe, concept: str, scorer) -> None:
    """The base job's rows: the photos against each other, the codec round trip (the ceiling), the base model."""
    from .ceiling import codec_ceiling

    real = {k: round(v, 4) for k, v in scorer.score_real(judge.reference).items() if k in ("dino", "clip_i")}
    record["real"] = {**real, "fidelity": round((real["dino"] + real["clip_i"]) / 2, 4)}
    record["ceiling"] = codec_ceiling(pipe, concept, scorer)
    row, strip = judge()
    record["steps"]["0"] = {**row, "size": 0}
    strip.save(record["_folder"] / STRIP)


def _trained(record: dict, judge: Judge, args, models, trainable, settings: Settings, work: Path) -> None:
    """Train and score at each checkpoint; the last one's strip and files are kept, a divergence is recorded."""
    from loldu_sd.training import NonFiniteStep

    record["values"] = sum(p.numel() for p in trainable.params)

    def on_checkpoint(step: int, loss: float) -> None:
        row, strip = judge()
        last = step == max(settings.steps)
        row["size"] = trainable.save(work / ("files" if last else "tmp"))  # the files a user would ship
        shutil.rmtree(work / "tmp", ignore_errors=True)
        row["loss"] = round(loss, 5)
        record["steps"][str(step)] = row
        if last:
            strip.save(record["_folder"] / STRIP)

    try:
        train(args, models, trainable, settings.steps, on_checkpoint)
    except NonFiniteStep as e:  # a too-high lr: recorded (the report leaves it out of its lr's numbers)
        record["diverged"] = str(e)


def run_job(job: Job, settings: Settings, scorer, world: dict) -> dict:
    """Train (unless 'base') and score one job; its record, written to its committed folder as result.json."""
    from accelerate.utils import set_seed

    from loldu_sd.training.models import load_models, pipeline_components, pipeline_from_args

    started, method = time.time(), settings.methods.get(job.method)
    ident = identity(job, settings, world)
    key = store.run_key(ident)
    folder = store.run_folder(settings.runs, asdict(job), key)
    folder.mkdir(parents=True, exist_ok=True)
    args = trainer_args(job, settings, method)
    set_seed(args.seed)  # LoRA's gaussian init draws from the global RNG (the trainer seeds it here too)
    models = load_models(args, torch.device("cpu"), torch.float32)
    trainable = method.build(models, args, CONCEPTS[job.concept]) if method else None
    # the methods change the loaded models in place: the pipeline samples what they train
    pipe = pipeline_from_args(args, **pipeline_components(models, {"unet": models.unet}, lambda module: module))
    pipe.set_progress_bar_config(disable=True)
    judge = Judge(pipe, scorer, job, settings, method)
    record = {**ident, "key": key, "steps": {}, "_folder": folder}
    if method is None:
        _references(record, judge, pipe, job.concept, scorer)
    else:
        _trained(record, judge, args, models, trainable, settings, settings.work / folder.relative_to(settings.runs))
    record.pop("_folder")
    record["seconds"] = round(time.time() - started, 1)
    store.write_record(folder, record)
    return record
