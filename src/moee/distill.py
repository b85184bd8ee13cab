"""Knowledge-distillation fine-tune of the MoE student from the dense teacher."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from moee.config import DistillConfig
from moee.data.tensors import normalize_images
from moee.evaluate import model_logits
from moee.train_base import augment, cosine_with_warmup


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, scaled by t^2."""
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    log_target=True, reduction="batchmean") * t * t


def image_training_batches(images: torch.Tensor, config: DistillConfig) -> tuple[Iterator, int]:
    """Shuffled (optionally augmented) batches covering `config.epochs` epochs of `images`."""
    gen = torch.Generator().manual_seed(config.seed)
    steps = max(1, math.ceil(config.epochs * len(images) / config.batch_size))

    def batches() -> Iterator[torch.Tensor]:
        step = 0
        while True:
            for idx in torch.randperm(len(images), generator=gen).split(config.batch_size):
                x = normalize_images(images[idx])
                yield augment(x, 2, gen) if config.augment else x
                step += 1
                if step >= steps:
                    return

    return batches(), steps


def distill(
    student: nn.Module, teacher: nn.Module, batches: Iterator[torch.Tensor], steps: int,
    config: DistillConfig, on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """AdamW (weight decay `config.weight_decay`) with a cosine schedule; returns the losses."""
    device = torch.device(config.device)
    student.to(device).train()
    teacher.to(device).eval()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad],
                            lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_with_warmup(s, steps, config.warmup_steps))
    losses = []
    bar = tqdm(batches, total=steps, desc="distill", leave=False)
    for step, x in enumerate(bar):
        x = x.to(device)
        with torch.no_grad():
            target = model_logits(teacher, x)
        loss = kd_loss(model_logits(student, x), target, config.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        if on_step:
            on_step(step, losses[-1])
    student.eval()
    return losses
