"""Calibration from a folder of image files, through the model's image processor, in the API
and in the CLI (a transformers image model and the embedded default)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

import moee
from moee.cli import main

EXTRACT = ["--tokens", "300", "--min-cluster-fraction", "0.05", "--min-samples", "5",
           "--reduce-dims", "8", "--no-stability"]


def write_images(folder, n=60, size=12, mode="RGB", seed=0):
    """PNG files from three colour templates plus noise (clusterable), in class subfolders."""
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    templates = rng.integers(0, 256, (3, size, size, channels))
    for i in range(n):
        noisy = np.clip(templates[i % 3] + rng.normal(0, 8, templates[0].shape), 0, 255)
        array = noisy.astype(np.uint8).squeeze(-1) if channels == 1 else noisy.astype(np.uint8)
        (folder / f"class{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(array, mode).save(folder / f"class{i % 3}" / f"{i:03d}.png")
    return folder


def tiny_rgb_vit():
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        image_size=8, patch_size=4, num_channels=3, num_labels=3)).eval()


def processor():
    return ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3)


def test_batches_are_what_the_processor_makes(tmp_path):
    folder = write_images(tmp_path / "images", n=10)
    batches = list(moee.image_batches(folder, processor(), batch_size=4))
    assert [b.shape for b in batches] == [(4, 3, 8, 8)] * 2 + [(2, 3, 8, 8)]
    first = Image.open(folder / "class0" / "000.png")
    expected = processor()(images=[first.convert("RGB")], return_tensors="pt")["pixel_values"]
    assert torch.equal(batches[0][0], expected[0])


def test_extract_from_an_image_folder(tmp_path):
    folder = write_images(tmp_path / "images")
    config = moee.ExtractConfig(record=moee.RecordConfig(n_tokens=250),
                                cluster=moee.ClusterConfig(min_cluster_fraction=0.05,
                                                           reduce_dims=8, stability=False),
                                progress=False)
    moe_model, report = moee.extract(tiny_rgb_vit(), moee.image_batches(folder, processor(), 8),
                                     config)
    assert report.n_tokens == 250 and moe_model.moe_layers()


def test_unreadable_or_missing_images_are_clear_errors(tmp_path):
    folder = write_images(tmp_path / "images", n=3)
    (folder / "class0" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(moee.BadBatchError, match="broken.png is not a readable image"):
        list(moee.image_batches(folder, processor()))
    (tmp_path / "empty").mkdir()
    with pytest.raises(moee.DataNotFoundError, match="no image files"):
        list(moee.image_batches(tmp_path / "empty", processor()))


def test_cli_extracts_a_transformers_image_model_from_a_folder(tmp_path):
    model_dir = tmp_path / "vit"
    tiny_rgb_vit().save_pretrained(model_dir)
    processor().save_pretrained(model_dir)
    folder = write_images(tmp_path / "images")
    out = tmp_path / "moe"
    assert main(["extract", "--model", str(model_dir), "--data", str(folder), "--out", str(out),
                 *EXTRACT]) == 0
    assert json.loads((out / "extraction_report.json").read_text())["n_tokens"] == 300


def test_cli_extracts_the_default_model_from_a_folder_of_greyscale_images(tmp_path):
    folder = write_images(tmp_path / "images", n=40, size=28, mode="L")
    out = tmp_path / "moe"
    assert main(["extract", "--data", str(folder), "--out", str(out), *EXTRACT]) == 0
    assert moee.load(out).moe_layers()
