"""Fashion-MNIST from IDX files: the Debian package, a user folder, or the official mirror."""

from __future__ import annotations

import gzip
import os
import struct
import urllib.request
from pathlib import Path

import numpy as np
import torch

from moee.errors import DataNotFoundError

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The dataset's official home (zalandoresearch/fashion-mnist README links these files).
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_CACHE_HOME = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
CACHE_DIR = _CACHE_HOME / "moee" / "fashion-mnist"

HOW_TO_GET = (
    "Fashion-MNIST was not found. Get it one of these ways:\n"
    "  * Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist  "
    f"(files land in {DEBIAN_DIR})\n"
    "  * pass --data-dir DIR (or set MOEE_DATA_DIR) to a folder holding the four IDX files "
    "(train-images-idx3-ubyte[.gz], ...)\n"
    "  * with internet access: pass --download (or download=True) to fetch them from "
    f"{OFFICIAL_URL}"
)


class FashionMNISTNotFound(DataNotFoundError):
    """Raised with instructions when no copy of the dataset can be found."""


def _candidate_dirs(data_dir: str | Path | None) -> list[Path]:
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir))
    if os.environ.get("MOEE_DATA_DIR"):
        dirs.append(Path(os.environ["MOEE_DATA_DIR"]))
    dirs += [DEBIAN_DIR, CACHE_DIR]
    return dirs


def _resolve(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(data_dir: str | Path | None = None) -> Path | None:
    """Return the first folder that holds all four IDX files, or None."""
    for folder in _candidate_dirs(data_dir):
        if all(_resolve(folder, s) for pair in _FILES.values() for s in pair):
            return folder
    return None


def _download(target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for pair in _FILES.values():
        for stem in pair:
            dest = target / (stem + ".gz")
            if not dest.exists():
                urllib.request.urlretrieve(OFFICIAL_URL + stem + ".gz", dest)  # noqa: S310
    return target


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped); numpy has no IDX reader, so this is by hand."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(
            f"{path} is truncated: expected {int(np.prod(dims))} values, got {data.size}")
    return data.reshape(dims)


def load_fashion_mnist(
    split: str = "train", data_dir: str | Path | None = None, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 (N, 28, 28), labels int64 (N,)) for ``split`` in {train, test}."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if data_dir is not None and not download and not Path(data_dir).is_dir():
        raise FashionMNISTNotFound(f"the data folder {data_dir} does not exist")
    folder = find_fashion_mnist(data_dir)
    if folder is None:
        if not download:
            raise FashionMNISTNotFound(HOW_TO_GET)
        folder = _download(Path(data_dir) if data_dir else CACHE_DIR)
    img_stem, lbl_stem = _FILES[split]
    images = read_idx(_resolve(folder, img_stem))
    labels = read_idx(_resolve(folder, lbl_stem))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
