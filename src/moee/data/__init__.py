"""Calibration and evaluation data sources."""

from moee.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FashionMNISTNotFound,
    find_fashion_mnist,
    load_fashion_mnist,
)
from moee.data.tensors import image_batches, normalize_images

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FashionMNISTNotFound",
    "find_fashion_mnist",
    "image_batches",
    "load_fashion_mnist",
    "normalize_images",
]
