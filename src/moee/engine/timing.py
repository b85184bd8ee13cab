"""Wall-clock timing shared by calibration, evaluation and the benchmarks."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch


def first_error(fn: Callable[[], object]) -> str | None:
    """Run `fn` once: None if it works, else a one-line reason. Kernels exist only for some
    dtypes and devices (CUDA's grouped_mm wants bf16), so callers try a contender once and
    report the gap instead of failing half-way through a benchmark or a calibration."""
    try:
        fn()
    except (RuntimeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


# Calls faster than this run in blocks: a call that follows another model's starts with cold
# caches, which a served model does not (measured in docs/engine.md).
BLOCK_SECONDS = 0.02


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device,
                     repeats: int = 15, min_seconds: float = 0.5) -> dict[str, float]:
    """Median seconds of each callable over at least `repeats` timed calls (and, while all
    together hold under `min_seconds`, more: at most 300 each), timed round-robin so that
    load from other processes on a shared machine hits every contender alike. A callable
    faster than `BLOCK_SECONDS` runs a block of consecutive calls per turn, the first
    untimed, so each timed call follows one of its own (warm caches, as when one model is
    served)."""
    if not fns:
        return {}
    blocks = {}
    for name, fn in fns.items():
        fn()
        seconds = _timed(fn, device)
        blocks[name] = 1 if seconds >= BLOCK_SECONDS else min(
            50, math.ceil(BLOCK_SECONDS / max(seconds, 1e-6)))
    times: dict[str, list[float]] = {k: [] for k in fns}
    while True:
        turn = [k for k in fns if len(times[k]) < repeats]
        if not turn:
            if (sum(map(sum, times.values())) >= min_seconds
                    or min(map(len, times.values())) >= 300):
                break
            turn = list(fns)
        for name in turn:
            if blocks[name] > 1:
                fns[name]()
            times[name].extend(_timed(fns[name], device) for _ in range(blocks[name]))
    return {k: statistics.median(v) for k, v in times.items()}
