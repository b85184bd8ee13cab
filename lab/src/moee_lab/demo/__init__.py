"""The embedded default and its Fashion-MNIST demo: the model, the data, `train-base` and the
demo pipeline. The core library never imports this package."""

from moee_lab.demo.default_model import build_default_vit, default_model_card, load_default_model
from moee_lab.demo.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FashionMNISTNotFound,
    find_fashion_mnist,
    load_fashion_mnist,
)
from moee_lab.demo.images import TrainingBatches, image_batches, normalize_images
from moee_lab.demo.pipeline import DemoConfig, demo_extract_config, run_demo

__all__ = [
    "FASHION_MNIST_CLASSES", "DemoConfig", "FashionMNISTNotFound", "TrainingBatches",
    "build_default_vit", "default_model_card", "demo_extract_config", "find_fashion_mnist",
    "image_batches", "load_default_model", "load_fashion_mnist", "normalize_images", "run_demo",
]
