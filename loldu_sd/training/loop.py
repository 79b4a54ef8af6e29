"""The training run: train_dreambooth and its optimizer-step loop."""
from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..model import loldu_parameters, project_loldu_
from .args import check_args, loldu_config, preflight, resolve_max_train_steps
from .checkpoints import (STATE_NAME, clean_interrupted_saves, load_adapter_values_, rank_digests, resolve_checkpoint,
                          save_checkpoint)
from .data import CLASS_NOISE, NOISE, DreamBoothDataset, SampleStream, class_images_for, load_images
from .errors import TrainingError, TrainingInputError
from .loss import diffusion_loss, encode_prompt
from .models import generate_samples, make_accelerator, models_with_adapters, pipeline_from_args
from .outputs import create_hub_repo, final_outputs, log_images, tracker_config

logger = logging.getLogger(__name__)


@dataclass
class TrainingCallbacks:
    """Hooks for in-process callers (the studio); all run on the main process only."""

    on_step: Callable[[int, float], None] | None = None  # (step, loss) after every optimizer step
    on_validation: Callable[[int, list[Image.Image]], None] | None = None  # (step, images)
    should_stop: Callable[[], bool] | None = None  # True: checkpoint this step, save the adapter, return


@dataclass
class TrainingResult:
    """What train_dreambooth produced."""

    output_dir: Path
    adapter_path: Path | None  # None when cancelled before the first step
    steps: int
    max_train_steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    cancelled: bool = False
    images: list[Image.Image] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def size_kb(self) -> float:
        """Adapter file size in kilobytes (0 when there is none)."""
        return self.adapter_path.stat().st_size / 1024 if self.adapter_path else 0.0


def train_dreambooth(args: argparse.Namespace, callbacks: TrainingCallbacks | None = None) -> TrainingResult:
    """Train a LoLDU adapter on --instance_data_dir; write it, checkpoints, samples, plots and a model card."""
    started = time.time()
    callbacks = callbacks or TrainingCallbacks()
    check_args(args)
    preflight(args)
    instance, notes = load_images(args.instance_data_dir, args.resolution, "instance")
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
        return _train(args, accelerator, callbacks, [im for _, im in instance], notes, started)
    finally:
        accelerator.end_training()


def _train(args, accelerator, callbacks: TrainingCallbacks, instance: list[Image.Image], notes: list[str],
           started: float) -> TrainingResult:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from ..diffusers import save_pipeline_adapter
    from ..io import LOLDU_WEIGHT_NAME

    out, main = Path(args.output_dir), accelerator.is_main_process
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        raise TrainingInputError("--mixed_precision fp16 needs a CUDA GPU; on CPU use --mixed_precision bf16 or no")
    repo_id = create_hub_repo(args, accelerator) if args.push_to_hub else None
    if main:
        clean_interrupted_saves(out)
    accelerator.wait_for_everyone()
    resume = resolve_checkpoint(out, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if args.resume_from_checkpoint == "latest" and resume is None and main:
        logger.warning("--resume_from_checkpoint latest: no checkpoint in %s yet; starting a new run", out)
    class_images = class_images_for(args, accelerator, notes) if args.with_prior_preservation else []
    if main:
        for w in notes:
            logger.warning(w)
    set_seed(args.seed)  # only init="uniform"/"normal*" draw from the global RNG; data and noise have their own

    m, components, weight_dtype = models_with_adapters(args, accelerator)
    config = loldu_config(args)
    params = [p for module in components.values() for p in loldu_parameters(module)]

    # ---- data, optimizer, schedule
    world, accum, bs = accelerator.num_processes, args.gradient_accumulation_steps, args.train_batch_size
    dataset = DreamBoothDataset(instance, args.resolution, args.seed, args.center_crop, args.random_flip,
                                class_images or None)
    max_steps = resolve_max_train_steps(args, len(dataset), world)
    lr = args.learning_rate * (bs * accum * world if args.scale_lr else 1)
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    optimizer = optimizer_class(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                                weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    # not accelerator.prepare'd: accelerate would step it once per process; here it counts optimizer steps
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_steps, num_cycles=args.lr_num_cycles, power=args.lr_power)
    names = list(components)
    with warnings.catch_warnings():  # torch >= 2.10 renames broadcast_buffers; the meaning we want is the same
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated")
        *prepared, optimizer = accelerator.prepare(*components.values(), optimizer)
    trained = dict(zip(names, prepared))
    for module in prepared:
        module.train()  # from_pretrained returns eval-mode models; checkpointing (CLIP) only acts in train mode

    def save_hook(models, weights, folder):
        if accelerator.is_main_process:  # the adapter file instead of the full frozen UNet
            save_pipeline_adapter(folder, components, base_model=args.pretrained_model_name_or_path)
        weights.clear()

    def load_hook(models, folder):
        models.clear()  # nothing for accelerate to load: the adapter is all the model state there is
        load_adapter_values_(Path(folder) / LOLDU_WEIGHT_NAME, components, config)

    hooks = [accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)]
    accelerator.register_for_checkpointing(lr_scheduler)

    global_step, losses, last_checkpoint = 0, [], None
    if resume is not None:
        accelerator.load_state(str(resume))
        state = json.loads((resume / STATE_NAME).read_text())
        global_step, losses, last_checkpoint = state["global_step"], [tuple(x) for x in state["losses"]], resume
        if main:
            logger.info("resumed from %s at step %d", resume, global_step)

    if not args.train_text_encoder:  # frozen text encoder: encode the two prompts once
        with torch.no_grad():
            instance_embeds = encode_prompt(m.text_encoder, m.tokenizer, [args.instance_prompt])
            class_embeds = encode_prompt(m.text_encoder, m.tokenizer, [args.class_prompt]) if class_images else None
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=bs, sampler=SampleStream(global_step * accum, world, accelerator.process_index, bs),
        num_workers=args.dataloader_num_workers)
    accelerator.init_trackers("dreambooth-loldu", config=tracker_config(args))
    if main:
        logger.info("training %d LoLDU values (%s) for %d steps, %d per batch on %d process(es), lr %.2g",
                    sum(p.numel() for p in params), ", ".join(names), max_steps, bs * world * accum, world, lr)

    def batch_loss(batch) -> torch.Tensor:
        idx = batch["index"].tolist()
        pixels, streams = batch["instance"], [(NOISE, idx)]
        prompts = [args.instance_prompt] * len(idx)
        if class_images:  # one forward pass for instance and class samples, as diffusers does
            pixels, streams = torch.cat([pixels, batch["class"]]), streams + [(CLASS_NOISE, idx)]
            prompts += [args.class_prompt] * len(idx)
        if args.train_text_encoder:
            embeds = encode_prompt(trained["text_encoder"], m.tokenizer, prompts, accelerator.device)
        else:
            embeds = torch.cat([instance_embeds.expand(len(idx), -1, -1)]
                               + ([class_embeds.expand(len(idx), -1, -1)] if class_images else []))
        parts = diffusion_loss(trained["unet"], m.vae, m.scheduler, pixels.to(accelerator.device), embeds,
                               args.seed, streams)
        return parts[0] + args.prior_loss_weight * parts[1] if class_images else parts[0]

    def stop_requested() -> bool:
        if main and callbacks.should_stop is not None and callbacks.should_stop():
            accelerator.set_trigger()
        return accelerator.check_trigger()

    def checkpoint() -> Path:
        state = {"global_step": global_step, "losses": losses, "max_train_steps": max_steps}
        return save_checkpoint(accelerator, out, global_step, state, args.checkpoints_total_limit)

    progress = tqdm(total=max_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    data, cancelled, images = iter(loader), False, []
    try:
        while global_step < max_steps:
            if stop_requested():
                cancelled = True
                break
            micro = []
            for _ in range(accum):
                batch = next(data)
                with accelerator.accumulate(*prepared):
                    loss = batch_loss(batch)
                    every = accelerator.gather(loss.detach().float().reshape(1))  # the same verdict on every process
                    if not torch.isfinite(every).all():
                        where = last_checkpoint or "none (no checkpoint saved yet)"
                        raise TrainingError(
                            f"step {global_step + 1}: the loss is {float(every[~torch.isfinite(every)][0])}; "
                            f"training stopped before updating the adapter. Last good checkpoint: {where}. "
                            "Lower --learning_rate, or use --mixed_precision bf16/no")
                    micro.append(float(every.mean()))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            if not accelerator.optimizer_step_was_skipped:  # fp16: skipped when the grad scaler saw inf
                lr_scheduler.step()
            for module in components.values():
                project_loldu_(module)  # projected gradient descent (eqs. 10-12), after every optimizer step
            global_step += 1
            loss_value, lr_now = sum(micro) / len(micro), lr_scheduler.get_last_lr()[0]
            losses.append((global_step, loss_value))
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_now:.2e}")
            accelerator.log({"loss": loss_value, "lr": lr_now}, step=global_step)
            if main and callbacks.on_step is not None:
                callbacks.on_step(global_step, loss_value)
            if global_step % args.checkpointing_steps == 0:
                last_checkpoint = checkpoint()
            if (args.num_validation_images and global_step % args.validation_steps == 0
                    and global_step < max_steps and main):
                pipe = pipeline_from_args(args, unet=accelerator.unwrap_model(trained["unet"]), vae=m.vae,
                                 text_encoder=accelerator.unwrap_model(trained.get("text_encoder", m.text_encoder)),
                                 tokenizer=m.tokenizer)
                images = generate_samples(pipe, args)
                del pipe
                log_images(accelerator, "validation", images, global_step)
                if callbacks.on_validation is not None:
                    callbacks.on_validation(global_step, images)
    finally:
        progress.close()
    if cancelled and global_step > 0 and getattr(last_checkpoint, "name", "") != f"checkpoint-{global_step}":
        last_checkpoint = checkpoint()  # cancelled: keep a resumable checkpoint of exactly this step

    # ---- every process must hold the same adapter; the main process writes it
    accelerator.wait_for_everyone()
    digests = rank_digests(accelerator, components)
    if len(set(digests)) > 1:
        raise TrainingError(f"processes ended with different adapters (digests {digests}); please report this")
    if main:
        logger.info("adapter digest per process: %s", " ".join(digests))
    result = TrainingResult(out, None, global_step, max_steps, losses, last_checkpoint, cancelled, [], notes)
    if global_step == 0:
        return result  # cancelled before the first step: nothing to save
    n_values = sum(p.numel() for p in params)
    adapter_path = out / LOLDU_WEIGHT_NAME
    if main:
        save_pipeline_adapter(out, components, base_model=args.pretrained_model_name_or_path, metadata={
            "instance_prompt": args.instance_prompt, "training_steps": str(global_step),
            "trainer": "loldu_sd.training.train_dreambooth"})
    result.adapter_path = adapter_path
    for hook in hooks:  # they hold the training models: let those go before the fresh pipeline loads
        hook.remove()
    optimizer = prepared = trained = components = m = None  # the closures above hold names, not the objects
    accelerator.free_memory()

    if main:
        final_outputs(args, accelerator, result, weight_dtype, n_values, repo_id, callbacks)
    accelerator.wait_for_everyone()
    result.seconds = time.time() - started
    return result
