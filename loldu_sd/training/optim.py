"""The optimizer and learning-rate schedule the flags describe: one place for the trainer and the quality benchmark."""
from __future__ import annotations

import argparse
from collections.abc import Iterable

import torch


def make_optimizer(args: argparse.Namespace, params: Iterable[torch.nn.Parameter], lr: float):
    """AdamW (bitsandbytes' 8-bit one with --use_8bit_adam) over `params` with the flags' betas, decay and eps."""
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def make_lr_scheduler(args: argparse.Namespace, optimizer, max_steps: int):
    """diffusers' schedule --lr_scheduler with the flags' warm-up, cycles and power over `max_steps` steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                         num_training_steps=max_steps, num_cycles=args.lr_num_cycles, power=args.lr_power)
