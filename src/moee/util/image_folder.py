"""Calibration and distillation batches from a folder of image files, read with Pillow and
prepared by the model's own preprocessing (a transformers image processor, or any callable
from a list of PIL images to a (B, C, H, W) tensor)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from moee.errors import BadBatchError, DataNotFoundError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder`, recursively (class subfolders included), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise DataNotFoundError(f"{root} is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return paths


def _as_function(processor: Any) -> Callable[[list], torch.Tensor]:
    """A transformers image processor (it has `preprocess`) as a function of PIL images."""
    if not hasattr(processor, "preprocess"):
        return processor

    def prepare(images: list) -> torch.Tensor:
        rgb = [im.convert("RGB") for im in images]
        return processor(images=rgb, return_tensors="pt")["pixel_values"]
    return prepare


def image_batches(folder: str | Path, processor: Any, batch_size: int = 32,
                  max_images: int | None = None) -> Iterator[torch.Tensor]:
    """Batches of the folder's images as the model takes them: `processor` is the model's
    transformers image processor (resize, crop, rescale, normalise as in its training) or a
    function from a list of PIL images to a (B, C, H, W) tensor. Read lazily in file order
    (extraction stops reading once it has its tokens); an unreadable file is an error naming
    it."""
    from PIL import Image, UnidentifiedImageError

    prepare = _as_function(processor)
    paths = list_images(folder)[:max_images]
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start : start + batch_size]:
            try:
                with Image.open(path) as im:
                    im.load()
                    images.append(im.copy())
            except (UnidentifiedImageError, OSError) as e:
                raise BadBatchError(f"{path} is not a readable image ({e})") from e
        yield prepare(images)
