"""The training run: train_dreambooth and its optimizer-step loop."""
from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import torch
from PIL import Image

from .args import check_args, loldu_config, preflight, resolve_max_train_steps
from .base import check_trainable_base
from .checkpoints import (clean_interrupted_saves, load_checkpoint, output_dir_lock, rank_digests, resolve_checkpoint,
                          save_checkpoint)
from .class_images import class_images_for
from .conditioning import Conditioner
from .data import DreamBoothDataset, SampleStream, load_images
from .errors import TrainingError, TrainingInputError
from .loss import batch_loss
from .models import generate_samples, make_accelerator, models_with_adapters, pipeline_components, pipeline_from_args
from .optim import make_lr_scheduler, make_optimizer
from .results import TrainingCallbacks, TrainingResult
from .rng import caller_rngs_restored
from .outputs import create_hub_repo, final_outputs, log_images, tracker_config
from .step import NonFiniteStep, loldu_trainable, training_step

logger = logging.getLogger(__name__)


def train_dreambooth(args: argparse.Namespace, callbacks: TrainingCallbacks | None = None) -> TrainingResult:
    """Train a LoLDU adapter on --instance_data_dir; write it, checkpoints, samples, plots and a model card."""
    started = time.time()
    callbacks = callbacks or TrainingCallbacks()
    check_args(args)
    preflight(args)
    instance, notes = load_images(args.instance_data_dir, args.resolution, "instance")
    check_trainable_base(args)
    if args.with_prior_preservation:
        class_dir = Path(args.class_data_dir)
        if class_dir.exists() and not class_dir.is_dir():
            raise TrainingInputError(f"--class_data_dir {class_dir}: is a file, not a folder")
        try:
            class_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainingInputError(f"--class_data_dir {class_dir}: cannot create it ({e.strerror or e})") from None
    accelerator = make_accelerator(args)
    try:
        with output_dir_lock(Path(args.output_dir), accelerator), caller_rngs_restored():
            return _train(args, accelerator, callbacks, [im for _, im in instance], notes, started)
    finally:
        accelerator.end_training()


def _train(args, accelerator, callbacks: TrainingCallbacks, instance: list[Image.Image], notes: list[str],
           started: float) -> TrainingResult:
    run = _Run(args, accelerator, callbacks, notes)
    run.setup(instance)
    run.prepare()
    try:
        run.loop()
    finally:
        run.progress.close()
    return run.finish(started)


class _Run:
    """One training run: setup (models, data, optimizer), prepare (accelerate, resume), loop of steps, finish."""

    def __init__(self, args, accelerator, callbacks: TrainingCallbacks, notes: list[str]):
        self.args, self.accelerator, self.callbacks, self.notes = args, accelerator, callbacks, notes
        self.out, self.main = Path(args.output_dir), accelerator.is_main_process
        self.global_step, self.losses, self.last_checkpoint, self.cancelled = 0, [], None, False

    def setup(self, instance: list[Image.Image]) -> None:
        """Check the device, resolve the checkpoint, load models with adapters, build data, optimizer, schedule."""
        from accelerate.utils import set_seed

        args, accelerator = self.args, self.accelerator
        if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
            raise TrainingInputError("--mixed_precision fp16 needs a CUDA GPU; on CPU use --mixed_precision bf16 or no")
        self.repo_id = create_hub_repo(args, accelerator) if args.push_to_hub else None
        if self.main:
            clean_interrupted_saves(self.out)
        accelerator.wait_for_everyone()
        self.resume = resolve_checkpoint(self.out, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
        if args.resume_from_checkpoint == "latest" and self.resume is None and self.main:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s yet; starting a new run", self.out)
        self.class_images = class_images_for(args, accelerator, self.notes) if args.with_prior_preservation else []
        if self.main:
            for w in self.notes:
                logger.warning(w)
        set_seed(args.seed)  # only init="uniform"/"normal*" draw from the global RNG; data and noise have their own
        self.m, self.components, self.weight_dtype = models_with_adapters(args, accelerator)
        self.config = loldu_config(args)
        self.trainable = loldu_trainable(self.components, args.pretrained_model_name_or_path)
        self.params = self.trainable.params
        self.dataset = DreamBoothDataset(instance, args.resolution, args.seed, args.center_crop, args.random_flip,
                                         self.class_images or None)
        world, accum, bs = accelerator.num_processes, args.gradient_accumulation_steps, args.train_batch_size
        self.max_steps = resolve_max_train_steps(args, len(self.dataset), world)
        self.lr = args.learning_rate * (bs * accum * world if args.scale_lr else 1)
        self.optimizer = make_optimizer(args, self.params, self.lr)
        # not accelerator.prepare'd: accelerate would step it once per process; here it counts optimizer steps
        self.lr_scheduler = make_lr_scheduler(args, self.optimizer, self.max_steps)

    def prepare(self) -> None:
        """Hand the models to accelerate (adapter-only checkpoints), resume, encode frozen prompts, build the loader."""
        from tqdm.auto import tqdm

        args, accelerator, components = self.args, self.accelerator, self.components
        with warnings.catch_warnings():  # torch >= 2.10 renames broadcast_buffers; the meaning we want is the same
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated")
            *self.prepared, self.optimizer = accelerator.prepare(*components.values(), self.optimizer)
        self.trained = self.trainable.trained = dict(zip(components, self.prepared))
        for module in self.prepared:
            module.train()  # from_pretrained returns eval-mode models; checkpointing (CLIP) only acts in train mode

        if self.resume is not None:
            state = load_checkpoint(self.resume, accelerator, components, self.optimizer, self.lr_scheduler)
            self.global_step, self.losses = state["global_step"], [tuple(x) for x in state["losses"]]
            self.last_checkpoint = self.resume
            if self.main:
                logger.info("resumed from %s at step %d", self.resume, self.global_step)
        self.conditioner = Conditioner(self.m, self.trained, args.text_encoder_use_attention_mask, accelerator.device,
                                       self.weight_dtype)
        world, accum, bs = accelerator.num_processes, args.gradient_accumulation_steps, args.train_batch_size
        sampler = SampleStream(self.global_step * accum, world, accelerator.process_index, bs)
        self.data = iter(torch.utils.data.DataLoader(self.dataset, batch_size=bs, sampler=sampler,
                                                     num_workers=args.dataloader_num_workers))
        accelerator.init_trackers("dreambooth-loldu", config=tracker_config(args))
        if self.main:
            logger.info("training %d LoLDU values (%s) for %d steps, %d per batch on %d process(es), lr %.2g",
                        sum(p.numel() for p in self.params), ", ".join(components), self.max_steps,
                        bs * world * accum, world, self.lr)
        self.progress = tqdm(total=self.max_steps, initial=self.global_step, desc="Steps",
                             disable=not accelerator.is_local_main_process)

    def batch_loss(self, batch) -> torch.Tensor:
        """Diffusion loss of one micro-batch (instance and class samples in one forward pass, as diffusers does)."""
        return batch_loss(self.args, self.conditioner, self.trained["unet"], self.m, batch, self.accelerator.device,
                          bool(self.class_images))

    def step(self) -> float:
        """One optimizer step (the shared training_step: accumulation, clipping, projection, checks); its loss."""
        batches = (next(self.data) for _ in range(self.args.gradient_accumulation_steps))
        try:
            loss = training_step(self.trainable, self.accelerator, batches, self.batch_loss, self.optimizer,
                                 self.lr_scheduler, self.args.max_grad_norm)
        except NonFiniteStep as e:
            raise self.diverged(str(e)) from None
        self.global_step += 1
        return loss

    def diverged(self, what: str) -> TrainingError:
        """The one-line error of a run that went non-finite at this step (nothing of the step is saved)."""
        where = self.last_checkpoint or "none (no checkpoint saved yet)"
        return TrainingError(f"step {self.global_step + 1}: {what}; training stopped, this step is not saved. Last "
                             f"good checkpoint: {where}. Lower --learning_rate, or use --mixed_precision bf16/no")

    def loop(self) -> None:
        """Steps until max_train_steps or a stop request; logging, checkpoints and validation images on the way."""
        args, accelerator = self.args, self.accelerator
        while self.global_step < self.max_steps:
            if self.stop_requested():
                self.cancelled = True
                break
            loss_value = self.step()
            lr_now = self.lr_scheduler.get_last_lr()[0]
            self.losses.append((self.global_step, loss_value))
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_now:.2e}")
            accelerator.log({"loss": loss_value, "lr": lr_now}, step=self.global_step)
            if self.main and self.callbacks.on_step is not None:
                self.callbacks.on_step(self.global_step, loss_value)
            if self.global_step % args.checkpointing_steps == 0:
                self.last_checkpoint = self.checkpoint()
            if (args.num_validation_images and self.global_step % args.validation_steps == 0
                    and self.global_step < self.max_steps and self.main):
                self.validate()
        if (self.cancelled and self.global_step > 0
                and getattr(self.last_checkpoint, "name", "") != f"checkpoint-{self.global_step}"):
            self.last_checkpoint = self.checkpoint()  # cancelled: keep a resumable checkpoint of exactly this step

    def stop_requested(self) -> bool:
        """The caller's stop request, seen by every process at the same step."""
        if self.main and self.callbacks.should_stop is not None and self.callbacks.should_stop():
            self.accelerator.set_trigger()
        return self.accelerator.check_trigger()

    def checkpoint(self) -> Path:
        """Save a resumable checkpoint of this step."""
        state = {"global_step": self.global_step, "losses": self.losses, "max_train_steps": self.max_steps}
        return save_checkpoint(self.accelerator, self.out, self.global_step, state, self.args.checkpoints_total_limit,
                               write_adapter=self.trainable.save, optimizer=self.optimizer,
                               lr_scheduler=self.lr_scheduler)

    def validate(self) -> None:
        """Sample validation images with the adapter being trained."""
        unwrap, m = self.accelerator.unwrap_model, self.m
        pipe = pipeline_from_args(self.args, **pipeline_components(m, self.trained, unwrap))
        images = generate_samples(pipe, self.args)
        del pipe
        log_images(self.accelerator, "validation", images, self.global_step)
        if self.callbacks.on_validation is not None:
            self.callbacks.on_validation(self.global_step, images)

    def finish(self, started: float) -> TrainingResult:
        """Check that every process holds the same adapter, write it, then samples, card and upload."""
        from ..pipeline import save_pipeline_adapter
        from ..io import LOLDU_WEIGHT_NAME

        accelerator, args = self.accelerator, self.args
        accelerator.wait_for_everyone()
        digests = rank_digests(accelerator, self.components)
        if len(set(digests)) > 1:
            raise TrainingError(f"processes ended with different adapters (digests {digests}); please report this")
        if self.main:
            logger.info("adapter digest per process: %s", " ".join(digests))
        result = TrainingResult(self.out, None, self.global_step, self.max_steps, self.losses, self.last_checkpoint,
                                self.cancelled, [], self.notes)
        if self.global_step == 0:
            return result  # cancelled before the first step: nothing to save
        n_values = sum(p.numel() for p in self.params)
        if self.main:
            save_pipeline_adapter(self.out, self.components, base_model=args.pretrained_model_name_or_path,
                                  metadata={"instance_prompt": args.instance_prompt,
                                            "training_steps": str(self.global_step),
                                            "trainer": "loldu_sd.training.train_dreambooth"})
        result.adapter_path = self.out / LOLDU_WEIGHT_NAME
        self.optimizer = self.prepared = self.trained = self.components = self.m = self.params = None
        self.trainable = None
        self.conditioner = None
        self.data = None
        accelerator.free_memory()
        if self.main:
            final_outputs(args, accelerator, result, self.weight_dtype, n_values, self.repo_id, self.callbacks)
        accelerator.wait_for_everyone()
        result.seconds = time.time() - started
        return result
