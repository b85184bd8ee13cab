"""Measurements any model gets: MACs (the model's and the engine's), parameters, latency, and a
metric over batches. Each helper runs the model in eval mode and leaves every module's
train/eval flag as it found it."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from moee.adapters import find_mlp_sites
from moee.engine.timing import time_interleaved
from moee.errors import EmptyDataError
from moee.moe import moe_layers
from moee.util.batches import Batch, call_model, output_tensor, to_device
from moee.util.modes import eval_mode

Metric = Callable[[torch.Tensor, Batch], tuple[float, int]]


def top1_accuracy(output: torch.Tensor, batch: Batch) -> tuple[float, int]:
    """(correct, count) of argmax predictions against the labels of an (inputs, labels) batch."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError("top1_accuracy needs (inputs, labels) batches")
    labels = batch[1]
    return float((output.argmax(-1).cpu() == labels.cpu()).sum()), len(labels)


@torch.inference_mode()
def evaluate(model: nn.Module, data: Iterable[Batch], metric: Metric = top1_accuracy,
             device: str | torch.device | None = None) -> float:
    """Mean of `metric` over `data`: metric(output tensor, batch) -> (sum, count). The output
    tensor is the model's logits (or last hidden state); preprocessing is the caller's."""
    total = count = 0.0
    with eval_mode(model):
        for batch in data:
            b = batch if device is None else to_device(batch, device)
            s, n = metric(output_tensor(call_model(model, b)), b)
            total, count = total + s, count + n
    if count == 0:
        raise EmptyDataError("evaluate() got no examples")
    return total / count


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the fused CPU attention kernel, which torch's flop counter does not list (it
    lists the CUDA ones): the same two batched matmuls as the CUDA kernels' formula."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _blocked_linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of oneDNN's linear (the expert loop's blocked copies): x (..., K) by W (N, K)."""
    return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


# Kernels the flop counter would otherwise skip: fused attention, so a model with SDPA
# attention (transformers' default) counts what eager attention counts, and oneDNN's linear.
_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    _EXTRA_FLOP_FORMULAS[torch.ops.mkldnn._linear_pointwise] = _blocked_linear_flops


@torch.inference_mode()
def count_macs(model: nn.Module, batch: Batch, executed: bool = False) -> int:
    """Multiply-accumulates of one real forward on `batch`, counted by torch.utils.flop_counter
    (FLOPs / 2).

    `executed=False`, the model's MACs: every routed layer counted on its expert loop without
    the zero neurons that pad expert copies, so each token costs its expert's neurons only
    (layers set to "union" count the union they run). `executed=True`: what the engine runs
    at this batch with the layers' own settings (the small-batch masked path computes every
    kept neuron; padding included).
    """
    routed = [m for m in moe_layers(model).values() if m.execution_config.execution != "union"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(eval_mode(model))
        if not executed:
            for m in routed:
                stack.enter_context(m.configured(execution="experts", small_batch_tokens=0,
                                                 width_multiple=1))
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
            call_model(model, batch)
    return counter.get_total_flops() // 2


def dense_mlp_macs(model: nn.Module, tokens: int) -> int:
    """MACs of a dense model's MLP blocks for `tokens` tokens (three projections when gated).
    A MoE model's MLP MACs are this plus the difference of the two models' `count_macs`."""
    sites = find_mlp_sites(model, validate=False)
    return tokens * sum(w.hidden_size * w.params_per_neuron for w in (s.weights() for s in sites))


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
def latency_ms(models: dict[str, nn.Module], batch: Batch, repeats: int = 20,
               device: torch.device | None = None) -> dict[str, float]:
    """Median wall-clock milliseconds of one forward on `batch` per model, timed round-robin
    in one loop so that every model sees the same machine load."""
    device = device or next(iter(models.values())).parameters().__next__().device
    with contextlib.ExitStack() as stack:
        for m in models.values():
            stack.enter_context(eval_mode(m))
        secs = time_interleaved({name: (lambda m=m: call_model(m, batch))
                                 for name, m in models.items()}, device, repeats)
    return {name: t * 1e3 for name, t in secs.items()}
