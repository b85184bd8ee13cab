"""Per-layer execution choice, timed at the user's batch size on the user's device.

Routing has a fixed cost per call. Two measured choices per MoE layer keep it from making the
model slower:
  1. `small_batch_tokens`: up to which token count the exact "masked" path beats the expert
     loop. Same function either way.
  2. among the routed executions ("experts", "grouped"), all the same function, the fastest;
     "union" (the pruned union run densely without routing: a different function, which
     changes the outputs) is timed too, and chosen only with `allow_approximate`.
Works on any module with `execution_config` and `configured(**settings)` (a `MoEMLP`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from moee.engine.timing import first_error, time_interleaved
from moee.util.batches import Batch, call_model
from moee.util.modes import eval_mode


def _timed(layer: nn.Module, x: torch.Tensor, modes: dict[str, dict], repeats: int,
           timer=None) -> dict[str, float]:
    """Median seconds of `layer(x)` under each named setting; the layer's own settings are
    back on exit."""
    def run(settings: dict) -> None:
        with layer.configured(**settings):
            layer(x)

    timer = timer or time_interleaved  # looked up per call: tests swap in fixed timings
    return timer({m: (lambda s=s: run(s)) for m, s in modes.items()}, x.device, repeats,
                 min_seconds=0.03)


def masked_threshold(layer: nn.Module, tokens: torch.Tensor, repeats: int = 10,
                     margin: float = 0.02, timer=None) -> tuple[int, list[dict]]:
    """Largest token count (16, 32, 64, ... up to len(tokens)) at which the masked path is
    faster than the expert loop, scanning upwards until the loop wins; 0 if it never does."""
    sizes = [n for n in (16 * 2**i for i in range(20)) if n < len(tokens)] + [len(tokens)]
    threshold, rows = 0, []
    for n in sizes:
        t = _timed(layer, tokens[:n], {"masked": {"execution": "masked"},
                                       "loop": {"execution": "experts", "small_batch_tokens": 0}},
                   repeats, timer)
        rows.append({"tokens": n, "masked_ms": t["masked"] * 1e3, "loop_ms": t["loop"] * 1e3})
        if t["masked"] * (1 + margin) >= t["loop"]:
            break
        threshold = n
    return threshold, rows


def _unsupported(layer: nn.Module, x: torch.Tensor, execution: str) -> str | None:
    """Why `execution` cannot run `x` on this layer (None if it can)."""
    with layer.configured(execution=execution):
        return first_error(lambda: layer(x))


@torch.inference_mode()
def calibrate_layers(model: nn.Module, layers: Mapping[str, nn.Module], example: Batch,
                     repeats: int = 20, margin: float = 0.02,
                     routed: tuple[str, ...] | None = None,
                     allow_approximate: bool = False) -> list[dict]:
    """Run `example` (one batch at the size you will serve) once through `model` to capture
    each layer's input, then per layer (1) measure `small_batch_tokens`, (2) time the `routed`
    executions (default "experts", plus "grouped" on CUDA) and "union", and keep the fastest
    routed one, or with `allow_approximate` the union when it beats that by more than
    `margin`: the only choice that changes the layer's outputs. A routed execution a layer
    cannot run (e.g. "grouped" on a dtype the device's kernel lacks) is skipped and its error
    reported. Sets both on the layers and returns one row of timings per layer."""
    captured: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: captured.setdefault(n, args[0]))
             for n, m in layers.items()]
    with eval_mode(model):  # timed in eval mode; the model's flags come back as they were
        try:
            call_model(model, example)
        finally:
            for h in hooks:
                h.remove()
        return [_calibrate_layer(name, layer, captured[name], repeats, margin, routed,
                                 allow_approximate) for name, layer in layers.items()]


def _calibrate_layer(name: str, layer: nn.Module, x: torch.Tensor, repeats: int, margin: float,
                     routed: tuple[str, ...] | None, allow_approximate: bool) -> dict:
    """One layer's threshold sweep and execution choice (set on the layer), as a row."""
    tokens = x.reshape(-1, x.shape[-1])
    threshold, sweep = masked_threshold(layer, tokens, max(3, repeats // 2), margin)
    candidates = routed or (("experts", "grouped") if x.is_cuda else ("experts",))
    skipped = {m: why for m in candidates if m != "experts"
               and (why := _unsupported(layer, x, m)) is not None}
    candidates = tuple(m for m in candidates if m not in skipped) or ("experts",)
    modes = {m: {"execution": m, "small_batch_tokens": threshold} for m in candidates}
    t = _timed(layer, x, {**modes, "union": {"execution": "union"}}, repeats)
    best = min(candidates, key=t.__getitem__)
    if allow_approximate and t["union"] * (1 + margin) < t[best]:
        best = "union"
    layer.configure(execution=best, small_batch_tokens=threshold)
    return {"site": name, "tokens": len(tokens), "execution": best,
            **{f"{m}_ms": v * 1e3 for m, v in t.items()},
            "small_batch_tokens": threshold, "masked_sweep": sweep,
            **{f"{m}_unsupported": why for m, why in skipped.items()}}
