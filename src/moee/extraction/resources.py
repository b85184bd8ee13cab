"""What extraction will need, said before each stage: the activation store's disk space and
one layer's clustering memory (fitted into a budget by clustering a subsample)."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from moee.config import ExtractConfig
from moee.errors import ResourceError
from moee.util.disk_space import ensure_room

log = logging.getLogger(__name__)


def check_disk(n_tokens: int, sites, config: ExtractConfig, work: Path) -> None:
    """Say what the activation store will take, and fail before recording if it won't fit."""
    per_token = sum(s.weights().d_in + s.weights().hidden_size for s in sites)
    need_disk = n_tokens * per_token * np.dtype(config.record.dtype).itemsize
    if config.progress:
        log.info("recording %d tokens x %d layers: an activation store of %.2f GiB in %s",
                 n_tokens, len(sites), need_disk / 2**30, work)
    ensure_room(work, need_disk, "the activation store",
                "lower record.n_tokens or use another work_dir")


def available_memory(meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes a process can still allocate: Linux's MemAvailable, which counts reclaimable page
    cache. Why not free pages: right after recording, the activation store's pages fill the
    cache and free memory looks like a few hundred MiB while gigabytes are available."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def plan_memory(n_tokens: int, sites, config: ExtractConfig) -> ExtractConfig:
    """Fit clustering into `config.max_memory_gib` (a subsample is clustered, the rest
    assigned) and fail before clustering when one layer would not fit in free memory.
    Returns the config to cluster with."""
    per_row = max(s.weights().hidden_size for s in sites) * 4 * 3  # float32 copy + PCA work
    rows = min(n_tokens, config.cluster.max_tokens or n_tokens)
    if config.max_memory_gib is not None and rows * per_row > config.max_memory_gib * 2**30:
        rows = int(config.max_memory_gib * 2**30 // per_row)
        # Fewer tokens than this cannot be clustered (PCA, HDBSCAN's minimum cluster size).
        least = min(n_tokens, max(100, (config.cluster.reduce_dims or 0) + 1))
        if rows < least:
            raise ResourceError(
                f"max_memory_gib={config.max_memory_gib:g} allows clustering {rows} tokens a "
                f"layer ({per_row:,} bytes each); at least {least} are needed: give "
                f"max_memory_gib >= {least * per_row / 2**30:.3g} (CLI: --max-memory)")
        config = replace(config, cluster=replace(config.cluster, max_tokens=rows))
    if config.progress:
        log.info("clustering %d of %d tokens a layer: about %.2f GiB of memory", rows,
                 n_tokens, rows * per_row / 2**30)
    free_mem = available_memory()
    if free_mem is None:
        return config
    if rows * per_row > free_mem * 0.8:
        raise ResourceError(
            f"clustering one layer needs about {rows * per_row / 2**30:.1f} GiB of memory but "
            f"{free_mem / 2**30:.1f} GiB is free: set max_memory_gib (CLI: --max-memory) or "
            "cluster.max_tokens to cluster a subsample")
    return config
