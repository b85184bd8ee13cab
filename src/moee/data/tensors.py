"""Turn image tensors into normalised model batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Fashion-MNIST training-set pixel statistics.
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28), zero mean / unit std."""
    x = images.float().div_(255.0)
    return ((x - FMNIST_MEAN) / FMNIST_STD).unsqueeze(1)


def image_batches(
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    batch_size: int = 256,
    limit: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (pixel_values, labels) batches in order, normalising lazily to save memory."""
    n = images.shape[0] if limit is None else min(limit, images.shape[0])
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        x = images[start:stop]
        x = normalize_images(x) if x.dtype == torch.uint8 else x
        yield x, (labels[start:stop] if labels is not None else None)
