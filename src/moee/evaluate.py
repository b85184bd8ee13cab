"""Side-by-side measurements: top-1, MACs on the real routed forward, parameters, latency."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from moee.data.tensors import image_batches
from moee.moe import MoEMLP, kept_settings
from moee.timing import time_interleaved


def model_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of `model(x)`, whether it returns a HF output object or a tensor."""
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


@torch.inference_mode()
def accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
    batch_size: int = 500, device: str | torch.device = "cpu", limit: int | None = None,
) -> float:
    """Top-1 accuracy over (images, labels); restores the model's train/eval mode."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in image_batches(images, labels, batch_size, limit):
        pred = model_logits(model, x.to(device)).argmax(-1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    model.train(was_training)
    if total == 0:
        raise ValueError("accuracy() got no images")
    return correct / total


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the fused CPU attention kernel, which torch's flop counter does not list (it
    lists the CUDA ones): the same two batched matmuls as the CUDA kernels' formula."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# Fused attention kernels the flop counter would otherwise skip, so a model with SDPA
# attention (transformers' default) counts what eager attention counts.
_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


@torch.inference_mode()
def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one real forward on `x`, counted by torch.utils.flop_counter.

    The flop counter sees the matmuls the routed MoE runs (each expert only on its own
    tokens), so the figure reflects routing, not a formula. FLOPs / 2 = MACs. Routed layers
    are counted on their expert loop whichever exact path would serve this batch (the masked
    small-batch path computes the same function with more, cheaper-to-launch arithmetic) and
    without the zero neurons that pad expert weight copies for speed (the model's MACs, not
    the engine's); layers calibrated to "union" are counted as the union they run.
    """
    routed = [m for m in model.modules() if isinstance(m, MoEMLP) and m.execution != "union"]
    was_training = model.training
    model.eval()
    try:
        with kept_settings(routed, "execution", "small_batch_tokens", "width_multiple"):
            for m in routed:
                m.execution, m.small_batch_tokens, m.width_multiple = "experts", 0, 1
            with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
                model_logits(model, x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    """Unique parameter elements plus router buffers (the centres are weights a MoE must ship)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    for name, b in model.named_buffers():
        if name.endswith(("router_centres", "expert_bias")):
            total += b.numel()
    return total


@torch.inference_mode()
def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int = 20) -> float:
    """Median wall-clock milliseconds of one forward on `x`."""
    model.eval()
    return time_interleaved({"m": lambda: model_logits(model, x)}, x.device, repeats)["m"] * 1e3


@dataclass
class ModelMeasurement:
    top1: float
    macs_per_image: int
    params: int
    latency_ms: float
    latency_batch: int

    def as_dict(self) -> dict:
        return asdict(self)


def measure(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
    latency_batch: int = 64, mac_images: int = 256, accuracy_limit: int | None = None,
    latency: bool = True,
) -> ModelMeasurement:
    """Every number of the dense-vs-MoE table for one model, on the same data (latency NaN
    with `latency=False`, for callers that time several models side by side afterwards)."""
    x_macs = next(image_batches(images, None, mac_images))[0]
    x_lat = next(image_batches(images, None, latency_batch))[0]
    return ModelMeasurement(
        top1=accuracy(model, images, labels, limit=accuracy_limit),
        macs_per_image=count_macs(model, x_macs) // x_macs.shape[0],
        params=count_params(model),
        latency_ms=latency_ms(model, x_lat) if latency else float("nan"),
        latency_batch=latency_batch,
    )


@torch.inference_mode()
def time_side_by_side(models: dict[str, nn.Module], rows: dict[str, ModelMeasurement],
                      images: torch.Tensor, latency_batch: int = 64, repeats: int = 20) -> None:
    """Re-time every model's latency round-robin in one loop and store it in `rows`, so the
    speedup column compares models under the same load (timed one after another on a shared
    machine, the ratio drifts with the load)."""
    x = next(image_batches(images, None, latency_batch))[0]
    for m in models.values():
        m.eval()
    secs = time_interleaved({name: (lambda m=m: model_logits(m, x)) for name, m in models.items()},
                            x.device, repeats)
    for name, t in secs.items():
        rows[name].latency_ms, rows[name].latency_batch = t * 1e3, latency_batch


def comparison_table(rows: dict[str, ModelMeasurement], baseline: str = "dense") -> str:
    """Plain-text dense-vs-MoE table; relative columns are against `baseline`."""
    base = rows[baseline]
    lines = [f"{'model':<26}{'top-1':>8}{'Δ top-1':>9}{'MACs/img':>12}{'Δ MACs':>9}"
             f"{'params':>11}{'Δ params':>10}{'latency':>10}{'speedup':>9}"]
    for name, m in rows.items():
        lines.append(
            f"{name:<26}{m.top1:>8.2%}{(m.top1 - base.top1) * 100:>+8.2f}p"
            f"{m.macs_per_image / 1e6:>11.2f}M{m.macs_per_image / base.macs_per_image - 1:>+9.1%}"
            f"{m.params / 1e6:>10.3f}M{m.params / base.params - 1:>+10.1%}"
            f"{m.latency_ms:>8.1f}ms{base.latency_ms / m.latency_ms:>8.2f}x")
    lines.append(f"(latency: median forward of a batch of {base.latency_batch} images, models "
                 f"timed round-robin, {torch.get_num_threads()} threads, cpu)")
    return "\n".join(lines)
