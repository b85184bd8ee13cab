"""Free disk checked before a stage writes, so that a full disk stops a run before the work
rather than in the middle of a write."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from moee.errors import ResourceError

MARGIN = 0.9  # leave the filesystem room: other writers, metadata, the .partial copy


def nearest_existing(path: str | Path) -> Path:
    """`path` or its nearest ancestor that exists (where the free space is measured)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def ensure_room(path: str | Path, need: int, what: str, fix: str) -> None:
    """Raise ResourceError naming `path` when `what` (`need` bytes) will not fit there."""
    where = nearest_existing(path)
    free = shutil.disk_usage(where).free
    if need > free * MARGIN:
        raise ResourceError(f"{what} needs {need / 2**20:,.1f} MiB but {where} has "
                            f"{free / 2**20:,.1f} MiB free: {fix}")


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes the tensors take once written (storage shared by two names counted twice, as the
    writers here clone it)."""
    return sum(t.numel() * t.element_size() for t in tensors)
