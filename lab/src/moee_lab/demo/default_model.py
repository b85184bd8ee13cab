"""The embedded default: a DeiT-tiny-width ViT trained on Fashion-MNIST.

Patch 7 gives 16 patches + CLS = 17 tokens per image, which keeps training, extraction and the
demo inside minutes on 2 CPU cores (patch 4 would cost ~3x as much for every stage).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import ViTConfig, ViTForImageClassification

from moee_lab.demo.fashion_mnist import FASHION_MNIST_CLASSES

ASSET_WEIGHTS = "fmnist_vit.safetensors"
ASSET_META = "fmnist_vit.json"


def default_vit_config() -> ViTConfig:
    """DeiT-tiny width (192 hidden, 3 heads, MLP 768, GELU), 6 layers, 28x28 grey input."""
    return ViTConfig(
        image_size=28,
        patch_size=7,
        num_channels=1,
        hidden_size=192,
        num_hidden_layers=6,
        num_attention_heads=3,
        intermediate_size=768,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=len(FASHION_MNIST_CLASSES),
        id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
        label2id={c: i for i, c in enumerate(FASHION_MNIST_CLASSES)},
        # PyTorch's fused attention (transformers' default); count_macs counts its CPU kernel.
        attn_implementation="sdpa",
    )


def build_default_vit(seed: int | None = None) -> ViTForImageClassification:
    """A freshly initialised embedded-default ViT."""
    if seed is not None:
        torch.manual_seed(seed)
    config = default_vit_config()
    model = ViTForImageClassification(config)
    return model


def default_asset_dir() -> Path:
    return Path(str(resources.files("moee_lab.demo") / "assets"))


def load_default_model(path: str | Path | None = None) -> ViTForImageClassification:
    """Load the shipped (or a given) trained embedded-default checkpoint in fp32, eval mode."""
    weights = Path(path) if path else default_asset_dir() / ASSET_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(
            f"No trained default checkpoint at {weights}. Train one with `moee train-base` "
            "(a few minutes on a GPU, about an hour on 2 CPU cores)."
        )
    model = build_default_vit()
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match the embedded ViT: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model.eval()


def default_model_card() -> dict:
    """How the shipped checkpoint was trained and what it scored (written by train-base)."""
    meta = default_asset_dir() / ASSET_META
    return json.loads(meta.read_text()) if meta.is_file() else {}
