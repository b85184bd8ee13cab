"""A fine-tuning run's state on disk (model, optimiser, schedule, random generator, losses),
saved atomically every few steps so an interrupted `moee.distill` resumes where it stopped
and ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moee.util.disk_space import ensure_room, tensor_bytes

STATE_NAME = "distill_state.pt"


def save_state(directory: Path, key: str, step: int, losses: list[float], student: nn.Module,
               opt: torch.optim.Optimizer, sched: Any) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / (STATE_NAME + ".partial")
    torch.save({"key": key, "step": step, "losses": losses, "student": student.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state()}, partial)
    os.replace(partial, directory / STATE_NAME)


def check_state_room(directory: Path, student: nn.Module) -> None:
    """Refuse before training when `directory` cannot hold the run's saved state: the weights
    and Adam's two moments per trained parameter."""
    trained = tensor_bytes(p for p in student.parameters() if p.requires_grad)
    ensure_room(directory, tensor_bytes(student.state_dict().values()) + 2 * trained,
                f"the distillation's resume state in {directory}",
                "free space or choose another --work-dir / state_dir")


def resume_state(directory: Path | None, key: str, student: nn.Module,
                 opt: torch.optim.Optimizer, sched: Any
                 ) -> tuple[int, list[float], torch.Tensor | None]:
    """Restore the saved state into `student`, `opt` and `sched` when it belongs to this run
    (`key`); (steps done, their losses, the random generator's state to set before the next
    step: set later, since replaying the data up to it may draw from the generator)."""
    path = directory / STATE_NAME if directory is not None else None
    if path is None or not path.is_file():
        return 0, [], None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        print(f"moee: ignoring unreadable {path} ({e}); starting over", file=sys.stderr)
        return 0, [], None
    if state.get("key") != key:
        print(f"moee: {path} is from another run (teacher, student, data or settings differ); "
              "starting over", file=sys.stderr)
        return 0, [], None
    student.load_state_dict(state["student"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    print(f"moee: resuming distillation at step {state['step']} from {path}", file=sys.stderr)
    return state["step"], list(state["losses"]), state["rng"]
