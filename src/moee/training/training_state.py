"""A fine-tuning run's state on disk (model, optimiser, schedule, random generators, losses),
saved atomically every few steps so an interrupted `moee.distill` resumes where it stopped
and ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moee.util.disk_space import ensure_room, tensor_bytes

STATE_NAME = "distill_state.pt"
log = logging.getLogger(__name__)


def save_state(directory: Path, key: str, step: int, losses: list[float], student: nn.Module,
               opt: torch.optim.Optimizer, sched: Any) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / (STATE_NAME + ".partial")
    torch.save({"key": key, "step": step, "losses": losses, "student": student.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                **rng_state()}, partial)
    os.replace(partial, directory / STATE_NAME)


def rng_state() -> dict[str, Any]:
    """The random generators' states: the CPU's ("rng") and, when CUDA is available, every
    CUDA device's ("cuda_rng"), so a resumed run on GPUs draws the same dropout masks."""
    state: dict[str, Any] = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved (a state saved without CUDA restores the CPU's only)."""
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def check_state_room(directory: Path, student: nn.Module) -> None:
    """Refuse before training when `directory` cannot hold the run's saved state: the weights
    and Adam's two moments per trained parameter."""
    trained = tensor_bytes(p for p in student.parameters() if p.requires_grad)
    ensure_room(directory, tensor_bytes(student.state_dict().values()) + 2 * trained,
                f"the distillation's resume state in {directory}",
                "free space or choose another --work-dir / state_dir")


def resume_state(directory: Path | None, key: str, student: nn.Module,
                 opt: torch.optim.Optimizer, sched: Any
                 ) -> tuple[int, list[float], dict[str, Any] | None]:
    """Restore the saved state into `student`, `opt` and `sched` when it belongs to this run
    (`key`); (steps done, their losses, the random generators' states to give `set_rng_state`
    before the next step: set later, since replaying the data up to it may draw from them)."""
    path = directory / STATE_NAME if directory is not None else None
    if path is None or not path.is_file():
        return 0, [], None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        log.warning("ignoring unreadable %s (%s); starting over", path, e)
        return 0, [], None
    if state.get("key") != key:
        log.warning("%s is from another run (teacher, student, data or settings differ); "
                    "starting over", path)
        return 0, [], None
    student.load_state_dict(state["student"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    log.info("resuming distillation at step %d from %s", state["step"], path)
    rng = {"rng": state["rng"], "cuda_rng": state.get("cuda_rng")}
    return state["step"], list(state["losses"]), rng
