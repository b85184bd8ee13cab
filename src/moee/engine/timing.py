"""Wall-clock timing shared by calibration, evaluation and the benchmarks."""

from __future__ import annotations

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


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device,
                     repeats: int = 15, min_seconds: float = 0.5) -> dict[str, float]:
    """Median seconds of each callable, timed round-robin so that load from other processes
    on a shared machine hits every contender alike."""
    for fn in fns.values():
        for _ in range(2):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    rounds = 0
    while rounds < repeats or (sum(map(sum, times.values())) < min_seconds and rounds < 300):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {k: statistics.median(v) for k, v in times.items()}
