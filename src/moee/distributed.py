"""Runs under `torchrun` (torch.distributed): each rank records its shard of the calibration
batches, rank 0 merges the shards into one activation store and clusters, the other ranks
reuse its results from the shared work dir; distillation shards the batches and averages
gradients with DistributedDataParallel. Without an initialised process group every helper
is the single-process identity."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist

from moee.atomic import write_json
from moee.record import STORE_META, ActivationStore
from moee.stored_array import RowWriter


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def shard(data: Iterable, rank: int, world: int) -> Iterator:
    """Batches rank, rank + world, rank + 2 world, ... of `data`."""
    for i, batch in enumerate(data):
        if i % world == rank:
            yield batch


def shard_tokens(n_tokens: int, rank: int, world: int) -> int:
    """This rank's share of `n_tokens` (rank 0 takes the remainder)."""
    return n_tokens // world + (n_tokens % world if rank == 0 else 0)


def merge_stores(shards: list[Path], out: Path) -> ActivationStore:
    """One store holding the shards' tokens in rank order, copied layer by layer in chunks
    (memory stays a chunk); reused when it was merged from shards of the same origins."""
    stores = [ActivationStore.open(s) for s in shards]
    origin: dict[str, Any] = {
        "shards": [s.origin for s in stores],
        "data": hashlib.sha256(json.dumps([s.origin for s in stores],
                                          sort_keys=True).encode()).hexdigest(),
        "model": stores[0].origin.get("model"), "settings": stores[0].origin.get("settings")}
    if (out / STORE_META).is_file() and ActivationStore.open(out).origin == origin:
        return ActivationStore.open(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / STORE_META).unlink(missing_ok=True)
    total = sum(s.n_tokens for s in stores)
    for layer in range(len(stores[0].site_names)):
        for kind, read in (("input", ActivationStore.inputs), ("hidden", ActivationStore.hidden)):
            first = read(stores[0], layer)
            merged = RowWriter(out / f"layer_{layer}.{kind}.npy", first.dtype,
                               (total, first.shape[1]))
            start = 0
            for s in stores:
                part = read(s, layer)
                for c in range(0, len(part), 65536):
                    merged.write(start + c, part[c : c + 65536])
                start += len(part)
            merged.close()
    write_json(out / STORE_META, {"site_names": stores[0].site_names, "n_tokens": total,
                                  "dtype": str(first.dtype), "origin": origin})
    return ActivationStore.open(out)
