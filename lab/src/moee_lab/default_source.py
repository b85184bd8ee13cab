"""The embedded default for the core `moee` commands (entry point `moee.embedded_default`):
the Fashion-MNIST ViT, its image preprocessing, and Fashion-MNIST batches to record, distil,
calibrate and evaluate on when no --data is given, and the options saying where Fashion-MNIST
is (--data-dir, --download), which the core commands get through `add_data_args`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from moee.errors import ConfigError
from moee_lab.demo import (
    TrainingBatches,
    image_batches,
    load_default_model,
    load_fashion_mnist,
    normalize_images,
)
from moee_lab.demo.pipeline import calibration_batches
from moee_lab.demo.report import comparison_table, measure, time_side_by_side

__all__ = ["add_data_args", "calibration_batch", "calibration_data", "check_args", "evaluate",
           "load_model", "preprocess_images", "training_data"]


def add_data_args(p: argparse.ArgumentParser) -> None:
    """Where Fashion-MNIST is: --data-dir and --download, checked (`check_args`) before any
    model loads."""
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files "
                   "(default: MOEE_DATA_DIR, /usr/share/datasets/fashion-mnist, ~/.cache/moee)")
    p.add_argument("--download", action="store_true",
                   help="download Fashion-MNIST from its official mirror if not found")
    p.set_defaults(check_default_data=check_args)


def check_args(args: argparse.Namespace) -> None:
    """Refuse a --data-dir that does not exist (unless --download is to fill it)."""
    if args.data_dir is not None and not args.download and not Path(args.data_dir).is_dir():
        raise ConfigError(f"data-dir: the data folder {args.data_dir} does not exist")


def load_model():
    """The embedded ViT, in eval mode."""
    return load_default_model()


def preprocess_images(images: list) -> torch.Tensor:
    """The embedded ViT's preprocessing of PIL images: 28x28 greyscale, normalised as in its
    training."""
    arrays = [np.asarray(im.convert("L").resize((28, 28))) for im in images]
    return normalize_images(torch.from_numpy(np.stack(arrays)))


def calibration_data(args: argparse.Namespace):
    """Recording batches: shuffled Fashion-MNIST training images."""
    train_x, _ = load_fashion_mnist("train", args.data_dir, args.download)
    return calibration_batches(train_x, args.seed)


def training_data(args: argparse.Namespace):
    """Distillation batches: augmented Fashion-MNIST training images."""
    train_x, _ = load_fashion_mnist("train", args.data_dir, args.download)
    return TrainingBatches(train_x, args.kd_batch_size, seed=args.seed)


def calibration_batch(args: argparse.Namespace, moe_model) -> torch.Tensor:
    """--batch Fashion-MNIST test images, for a checkpoint that takes them."""
    config = moe_model.config
    shape = tuple(getattr(config, k, None) for k in ("num_channels", "image_size", "image_size"))
    if shape != (1, 28, 28):
        raise ConfigError("this checkpoint does not take Fashion-MNIST's 28x28 grey images: "
                          "give a batch of your own data with --data (text files or an image "
                          "folder)")
    images = normalize_images(load_fashion_mnist("test", args.data_dir, args.download)[0])
    return images[: args.batch]


def evaluate(args: argparse.Namespace, moe_model, dense) -> int:
    """Dense vs MoE on the Fashion-MNIST test set: top-1, MACs, parameters, latency side by
    side, and each layer's routing."""
    from moee.evaluate import evaluate as top1

    test_x, test_y = load_fashion_mnist("test", args.data_dir, args.download)
    rows = {"dense": measure(dense, test_x, test_y, args.latency_batch),
            "moe": measure(moe_model, test_x, test_y, args.latency_batch)}
    time_side_by_side({"dense": dense, "moe": moe_model}, rows, test_x, args.latency_batch)
    print(comparison_table(rows))
    with moe_model.track_routing():
        top1(moe_model, image_batches(test_x, test_y, 500, 2000))
    for row in moe_model.routing_report():
        print(f"{row['site']:<22} {row['experts']:>3} experts, top load "
              f"{max(row['load_share']):.0%}, {row['active_neurons_per_token']:.0f} of "
              f"{row['kept_neurons']} kept neurons active per token")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v.as_dict() for k, v in rows.items()}, indent=1))
        print(f"Results JSON: {args.json}")
    return 0
