"""Runs under `torchrun` (torch.distributed): each rank records its shard of the calibration
batches, rank 0 merges the shards into one activation store and clusters, the other ranks
reuse its results from the shared work dir; distillation shards the batches and averages
gradients with DistributedDataParallel. Without an initialised process group every helper
is the single-process identity."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch.distributed as dist


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
