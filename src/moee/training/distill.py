"""Knowledge-distillation fine-tune of a MoE student from its dense teacher, for any model whose
batches `extract` accepts (tensors, (inputs, labels) pairs, keyword dicts)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moee.config import DistillConfig
from moee.errors import ConfigError, EmptyDataError, NonFiniteError
from moee.losses import loss_kind, output_loss
from moee.moe import MoEMLP
from moee.training.training_state import (
    check_state_room,
    resume_state,
    save_state,
    set_rng_state,
)
from moee.util.batches import (
    Batch,
    call_model,
    check_batch,
    output_tensor,
    to_device,
)
from moee.util.cache_key import stage_key
from moee.util.distributed import rank_and_world, shard
from moee.util.fingerprint import model_fingerprint, new_digest, update_batch_digest
from moee.util.modes import eval_mode


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then a cosine decay to 0 at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _loss(student_out, teacher_out, batch: Batch, config: DistillConfig) -> torch.Tensor:
    return output_loss(output_tensor(student_out), output_tensor(teacher_out), batch,
                       loss_kind(teacher_out, config), config.temperature)


class _Shard:
    """Every world-th batch of an iterable with a length, re-iterated each epoch."""

    def __init__(self, data, rank: int, world: int) -> None:
        self.data, self.rank, self.world = data, rank, world

    def __len__(self) -> int:
        return len(range(self.rank, len(self.data), self.world))

    def __iter__(self):
        return shard(self.data, self.rank, self.world)


def run_key(student: nn.Module, teacher: nn.Module, data, config: DistillConfig) -> str:
    """The key of a resumable run: both models' starting weights and the data (its content
    when it is a sequence; else its type and length, since iterating it could draw from its
    random generator), under every setting of `config`."""
    data_key: dict[str, Any] = {"type": type(data).__name__, "length": len(data)}
    if isinstance(data, Sequence):
        h = new_digest()
        for batch in data:
            update_batch_digest(h, batch)
        data_key["digest"] = h.hexdigest()
    return stage_key("distill", {"student": model_fingerprint(student),
                                 "teacher": model_fingerprint(teacher), "data": data_key},
                     config)


def _training_data(data: Iterable[Batch], state_dir: str | Path | None, rank: int,
                   world: int) -> tuple[Any, Path | None, bool]:
    """(this rank's batches, its state folder, whether the batches were checked up front:
    a sequence is checked before the first step, anything else as it comes)."""
    if not hasattr(data, "__len__"):
        data = list(data)
    if len(data) == 0:
        raise EmptyDataError("distill() got no batches")
    state = Path(state_dir) if state_dir is not None else None
    if world > 1:  # torchrun: each rank trains on its shard, gradients averaged by DDP
        data = data[rank::world] if isinstance(data, Sequence) else _Shard(data, rank, world)
        state = state / f"rank{rank}" if state is not None else None
    checked = isinstance(data, Sequence)
    for i, batch in enumerate(data if checked else ()):
        check_batch(batch, i)
    return data, state, checked


def _to_training(student: nn.Module, teacher: nn.Module, config: DistillConfig,
                 device: torch.device, world: int) -> nn.Module:
    """Both models on `device`, the student in training mode (without dropout only its MoE
    layers, for their differentiable path); the module to call (DDP under torchrun)."""
    student.to(device).train(config.dropout)
    if not config.dropout:
        for layer in student.modules():
            if isinstance(layer, MoEMLP):
                layer.train()
    teacher.to(device)
    if world == 1:
        return student
    from torch.nn.parallel import DistributedDataParallel

    # Unused parameters are normal here (e.g. a pooler the loss does not read).
    return DistributedDataParallel(student, find_unused_parameters=True)


def _all_finite(tensors: list[torch.Tensor], world: int) -> bool:
    """Whether every value of `tensors` is finite on every rank (so that all ranks stop at
    the same step instead of some waiting for the others forever)."""
    ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
    if world > 1:
        import torch.distributed as dist

        flag = ok.float()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return bool(ok)


def _diverged(what: str, where: str, opt: torch.optim.Optimizer,
              config: DistillConfig) -> NonFiniteError:
    lr = opt.param_groups[0]["lr"]
    return NonFiniteError(
        f"distill: {what} at {where}, learning rate {config.lr:g} ({lr:.3g} at this step of "
        "the schedule): training diverged and stopped; nothing of this step was saved. "
        "Lower the learning rate (--kd-lr, DistillConfig.lr)")


def _step(trained: nn.Module, teacher: nn.Module, batch: Batch, config: DistillConfig,
          opt: torch.optim.Optimizer, sched: Any, world: int, where: str) -> float:
    """One optimiser step toward the teacher's outputs on `batch`; its loss. A non-finite
    loss or gradient is never applied, and weights that become non-finite are never saved:
    NonFiniteError naming `where` (the step) and the learning rate."""
    with torch.no_grad():
        target = call_model(teacher, batch)
    loss = _loss(call_model(trained, batch), target, batch, config)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    value = loss.item()
    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if not _all_finite([loss.detach(), *grads], world):
        what = (f"the loss is {value}" if not math.isfinite(value)
                else f"the gradient holds NaN or Inf (loss {value:.4g})")
        raise _diverged(what, where, opt, config)
    opt.step()
    sched.step()
    params = [p.detach() for g in opt.param_groups for p in g["params"]]
    if not _all_finite(params, 1):  # DDP keeps every rank's weights equal: no need to ask
        raise _diverged(f"the weights became NaN or Inf (loss {value:.4g})", where, opt, config)
    return value


def _optimiser(student: nn.Module, config: DistillConfig, steps: int) -> tuple[Any, Any]:
    """AdamW over the trainable parameters, and its warm-up + cosine schedule."""
    params = [p for p in student.parameters() if p.requires_grad]
    limit = max((torch.finfo(p.dtype).max for p in params if p.is_floating_point()),
                default=math.inf)
    if not config.lr < limit:  # the optimiser would fail converting it to the weights' dtype
        raise ConfigError(f"lr: {config.lr:g} is beyond the weights' range ({limit:.3g})")
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_with_warmup(s, steps, config.warmup_steps))
    return opt, sched


def distill(student: nn.Module, teacher: nn.Module, data: Iterable[Batch],
            config: DistillConfig | None = None,
            on_step: Callable[[int, float], None] | None = None,
            state_dir: str | Path | None = None, save_every: int = 50) -> list[float]:
    """Fine-tune every trainable parameter of `student` towards `teacher`'s outputs on `data`.

    One epoch is one pass over `data` (an iterable without a length is read into memory once;
    one with a length is iterated again each epoch, so it may reshuffle); `config.epochs`
    epochs, fractions allowed. AdamW with a cosine schedule; the run's random draws (dropout)
    come from `config.seed`. Returns the loss of every step; the student is left in eval mode,
    the teacher in the mode it came in. Batches are checked before the first step when `data`
    is a sequence, else as they come.

    `state_dir`: save the run's state there every `save_every` steps; called again with the
    same student, teacher, data and config, the run resumes from the last save (replaying the
    data's iteration up to it) and ends with the weights an uninterrupted run would have.
    A non-finite loss, gradient or weight stops the run (NonFiniteError naming the step and
    the learning rate) before anything of that step is saved.
    """
    config = config or DistillConfig()
    rank, world = rank_and_world()
    data, state_dir, checked = _training_data(data, state_dir, rank, world)
    steps = max(1, math.ceil(config.epochs * len(data)))
    device = torch.device(config.device)
    key = ""
    if state_dir is not None:
        check_state_room(state_dir, student)
        key = run_key(student, teacher, data, config)
    trained = _to_training(student, teacher, config, device, world)
    opt, sched = _optimiser(student, config, steps)
    # Every CUDA device's generator: the saved state holds them all (and manual_seed seeds all)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    first, losses, rng = resume_state(state_dir, key, student, opt, sched)
    bar = tqdm(total=steps, initial=first, desc="distill", leave=False)
    with torch.random.fork_rng(devices=devices), eval_mode(teacher), bar:  # closed on errors
        torch.manual_seed(config.seed + rank)  # ranks draw different dropout masks
        step = 0
        while step < steps:
            for batch in data:
                step += 1
                if step <= first:
                    continue  # replayed, not trained: the data's own random draws stay in step
                if step == first + 1 and rng is not None:
                    set_rng_state(rng)
                if not checked:
                    check_batch(batch, (step - 1) % len(data))
                losses.append(_step(trained, teacher, to_device(batch, device), config, opt,
                                    sched, world, f"step {step} of {steps}"))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
                if on_step:
                    on_step(step - 1, losses[-1])
                if state_dir is not None and (step % save_every == 0 or step == steps):
                    save_state(state_dir, key, step, losses, student, opt, sched)
                if step >= steps:
                    break
    student.eval()
    return losses
