"""Wall-clock timing shared by evaluation, calibration and benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


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
