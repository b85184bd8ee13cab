"""The demo's dense-vs-MoE table on Fashion-MNIST: top-1, both MAC figures, parameters, latency."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from moee.evaluate import count_macs, count_params, evaluate, latency_ms
from moee_lab.demo.images import image_batches


@dataclass
class ModelMeasurement:
    top1: float
    macs_per_image: int  # the model's routed MACs (on `mac_images` test images)
    executed_macs_per_image: int  # what the engine runs at `latency_batch` images
    params: int
    latency_ms: float
    latency_batch: int

    def as_dict(self) -> dict:
        return asdict(self)


def measure(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
            latency_batch: int = 64, mac_images: int = 256,
            accuracy_limit: int | None = None) -> ModelMeasurement:
    """Every number of the table for one model but its latency (NaN until
    `time_side_by_side` times all models together)."""
    x_macs = next(image_batches(images, None, mac_images))[0]
    x_lat = next(image_batches(images, None, latency_batch))[0]
    return ModelMeasurement(
        top1=evaluate(model, image_batches(images, labels, 500, accuracy_limit)),
        macs_per_image=count_macs(model, x_macs) // x_macs.shape[0],
        executed_macs_per_image=count_macs(model, x_lat, executed=True) // x_lat.shape[0],
        params=count_params(model),
        latency_ms=float("nan"),
        latency_batch=latency_batch,
    )


def time_side_by_side(models: dict[str, nn.Module], rows: dict[str, ModelMeasurement],
                      images: torch.Tensor, latency_batch: int = 64, repeats: int = 20) -> None:
    """Time every model round-robin in one loop and store the latency in `rows`, so the
    speedup column compares models under the same machine load."""
    x = next(image_batches(images, None, latency_batch))[0]
    for name, ms in latency_ms(models, x, repeats).items():
        rows[name].latency_ms, rows[name].latency_batch = ms, latency_batch


def comparison_table(rows: dict[str, ModelMeasurement], baseline: str = "dense") -> str:
    """Plain-text dense-vs-MoE table; relative columns are against `baseline`."""
    base = rows[baseline]
    lines = [f"{'model':<26}{'top-1':>8}{'Δ top-1':>9}{'MACs/img':>11}{'Δ MACs':>8}"
             f"{'exec MACs':>11}{'Δ exec':>8}{'params':>10}{'Δ params':>9}{'latency':>10}"
             f"{'speedup':>8}"]
    for name, m in rows.items():
        lines.append(
            f"{name:<26}{m.top1:>8.2%}{(m.top1 - base.top1) * 100:>+8.2f}p"
            f"{m.macs_per_image / 1e6:>10.2f}M{m.macs_per_image / base.macs_per_image - 1:>+8.1%}"
            f"{m.executed_macs_per_image / 1e6:>10.2f}M"
            f"{m.executed_macs_per_image / base.executed_macs_per_image - 1:>+8.1%}"
            f"{m.params / 1e6:>9.3f}M{m.params / base.params - 1:>+9.1%}"
            f"{m.latency_ms:>8.1f}ms{base.latency_ms / m.latency_ms:>7.2f}x")
    lines.append(f"(MACs/img: the model's routed MACs; exec MACs: what the engine runs at a batch "
                 f"of {base.latency_batch} images; latency: median forward of that batch, "
                 f"models timed round-robin, {torch.get_num_threads()} threads, cpu)")
    return "\n".join(lines)
