"""The demo pipeline as one function: extract -> distil -> measure -> calibrate -> save."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moee.api import calibrate, extract
from moee.config import ClusterConfig, DistillConfig, ExtractConfig, RecordConfig
from moee.evaluate import evaluate
from moee.training.distill import distill
from moee_lab.demo.default_model import default_model_card, load_default_model
from moee_lab.demo.fashion_mnist import load_fashion_mnist
from moee_lab.demo.images import TrainingBatches, image_batches
from moee_lab.demo.report import comparison_table, measure, time_side_by_side


def demo_extract_config() -> ExtractConfig:
    """The demo's extraction: 20,000 tokens, at most 8 experts a layer (docs/method.md)."""
    return ExtractConfig(record=RecordConfig(n_tokens=20_000),
                         cluster=ClusterConfig(max_clusters=8))


@dataclass
class DemoConfig:
    """Everything `run_demo` does; the CLI's `moee demo` options map onto these fields."""

    extract: ExtractConfig = field(default_factory=demo_extract_config)
    distill: DistillConfig = field(default_factory=DistillConfig)
    kd_batch_size: int = 128
    augment: bool = True
    latency_batch: int = 64
    calibration_batch_size: int = 256
    seed: int = 0
    out: str = "runs/demo"
    data_dir: str | None = None
    download: bool = False


def calibration_batches(images: torch.Tensor, seed: int, batch_size: int = 256):
    """Shuffled, normalised image batches for recording (lazily: recording stops early)."""
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return (x for x, _ in image_batches(images[perm], None, batch_size))


def _calibrated(moe_model: nn.Module, rows: dict, test_x: torch.Tensor, test_y: torch.Tensor,
                batch: int) -> tuple[list[nn.Module], dict[str, tuple[str, list[dict]]]]:
    """The MoE model calibrated at the latency batch twice: exact (its own outputs) and
    allowing the pruned union without routing (another function), each measured into `rows`.
    Returns the two models and, per result key, (row name, per-layer choices)."""
    x = next(image_batches(test_x, None, batch))[0]
    models, extra = [], {}
    for key, approximate in (("moe_calibrated", False), ("moe_calibrated_approximate", True)):
        model = copy.deepcopy(moe_model)
        choice = calibrate(model, x, allow_approximate=approximate)
        n_union = sum(c["execution"] == "union" for c in choice)
        name = f"moe calibrated, {n_union} union" if approximate else "moe calibrated, exact"
        rows[name] = measure(model, test_x, test_y, batch)
        models.append(model)
        extra[key] = (name, choice)
    return models, extra


def run_demo(config: DemoConfig | None = None, dense: nn.Module | None = None,
             say=print) -> dict[str, Any]:
    """Convert `dense` (default: the embedded ViT) on Fashion-MNIST, fine-tune, measure dense vs
    MoE vs calibrated MoE, save both checkpoints and `demo_results.json` under `config.out`;
    returns the results."""
    config = config or DemoConfig()
    t0 = time.perf_counter()
    train_x, _ = load_fashion_mnist("train", config.data_dir, config.download)
    test_x, test_y = load_fashion_mnist("test", config.data_dir, config.download)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    ex = config.extract
    ex = ex if ex.work_dir is not None else replace(ex, work_dir=str(out / "work"))
    if dense is None:
        dense = load_default_model()
        top1 = default_model_card().get("test_top1_fp16_weights", float("nan"))
        say(f"Embedded default: ViT (6 layers, width 192, MLP 768, patch 7 -> 17 tokens) "
            f"trained on Fashion-MNIST, {top1:.2%} test top-1")
    moe_model, report = extract(dense, calibration_batches(train_x, config.seed,
                                                           config.calibration_batch_size), ex)
    say(f"\nExtracted in {report.seconds:.0f} s from {report.n_tokens} tokens "
        f"(work dir {report.work_dir}):\n{report.table()}")
    before = evaluate(moe_model, image_batches(test_x, test_y, 500))
    say(f"MoE top-1 before fine-tuning: {before:.2%}")
    batches = TrainingBatches(train_x, config.kd_batch_size, config.augment, config.seed)
    t1 = time.perf_counter()
    losses = distill(moe_model, dense, batches, config.distill)
    say(f"KD fine-tune: {len(losses)} steps of {config.kd_batch_size} in "
        f"{time.perf_counter() - t1:.0f} s, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    rows = {"dense": measure(dense, test_x, test_y, config.latency_batch),
            "moe (after KD)": measure(moe_model, test_x, test_y, config.latency_batch)}
    with moe_model.track_routing():
        evaluate(moe_model, image_batches(test_x, test_y, 500, 2000))
    routing = moe_model.routing_report()
    calibrated, extra = _calibrated(moe_model, rows, test_x, test_y, config.latency_batch)
    time_side_by_side(dict(zip(rows, (dense, moe_model, *calibrated), strict=True)), rows,
                      test_x, config.latency_batch)
    say(f"\nDense vs MoE on the Fashion-MNIST test set ({len(test_x):,} images):")
    say(comparison_table(rows))
    moe_model.save_pretrained(out / "moe")
    calibrated[0].save_pretrained(out / "moe-calibrated")
    results = {
        "dense": rows["dense"].as_dict(), "moe": rows["moe (after KD)"].as_dict(),
        **{key: {**rows[name].as_dict(), "layers": layers}
           for key, (name, layers) in extra.items()},
        "moe_top1_before_kd": before,
        "kd": {**config.distill.__dict__, "batch_size": config.kd_batch_size,
               "augment": config.augment, "steps": len(losses)},
        "extraction": report.as_dict(), "test_routing": routing,
        "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(),
    }
    path = out / "demo_results.json"
    path.write_text(json.dumps(results, indent=1))
    say(f"\nMoE checkpoints: {out / 'moe'} (routed experts in every layer), "
        f"{out / 'moe-calibrated'} (per-layer fastest path, same outputs)\nResults JSON: {path}\n"
        f"Demo took {results['seconds'] / 60:.1f} min.")
    return results
