"""Fashion-MNIST image tensors as model batches: normalisation, batching, augmentation."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

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


def augment(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero-pad `pad` in normalised background) + horizontal flip, on x's device."""
    n, c, h, w = x.shape
    background = float(x.amin())
    padded = F.pad(x, (pad, pad, pad, pad), value=background)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None])  # (N, H)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None])  # (N, W)
    out = padded[torch.arange(n, device=x.device)[:, None, None, None],
                 torch.arange(c, device=x.device)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]  # (N, C, H, W)
    flip = torch.rand(n, generator=generator, device="cpu").to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


class TrainingBatches:
    """Shuffled, optionally augmented image batches; each iteration is one epoch, reshuffled
    from one seeded generator (what `moee.distill` consumes)."""

    def __init__(self, images: torch.Tensor, batch_size: int = 128, augment: bool = True,
                 seed: int = 0) -> None:
        self.images, self.batch_size, self.augment = images, batch_size, augment
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        perm = torch.randperm(len(self.images), generator=self.generator)
        for idx in perm.split(self.batch_size):
            x = normalize_images(self.images[idx])
            yield augment(x, 2, self.generator) if self.augment else x
