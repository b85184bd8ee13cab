"""Per-layer execution choice: keep routed experts only where they beat the dense union.

Routing has a fixed cost per call (route, sort, one matmul per expert); with few tokens or
near-full experts that cost can exceed the saving. `calibrate_execution` times both paths of
every MoE layer on the layer's real input at the user's batch size and device, and keeps the
faster one, so a converted model is not slower than running its pruned MLPs densely.
"""

from __future__ import annotations

import torch

from moee.moe import EXECUTIONS
from moee.moe_model import MoEModel
from moee.timing import time_interleaved


@torch.inference_mode()
def calibrate_execution(moe_model: MoEModel, example, repeats: int = 20,
                        margin: float = 0.02) -> list[dict]:
    """Run `example` (one batch at the size you will serve) once to capture each MoE layer's
    input, then time 'experts' vs 'union' per layer; keep 'experts' unless union is faster by
    more than `margin`. Records the choice in `moe_model.plans` (saved with the checkpoint)."""
    layers = moe_model.moe_layers()
    captured: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: captured.setdefault(n, args[0]))
             for n, m in layers.items()]
    try:
        moe_model.eval()
        moe_model(example) if not isinstance(example, dict) else moe_model(**example)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    plans = {p.site: p for p in moe_model.plans}
    for name, layer in layers.items():
        x = captured[name]

        def run(mode: str, layer=layer, x=x) -> None:
            layer.execution = mode
            layer(x)

        timings = time_interleaved({m: (lambda m=m: run(m)) for m in ("experts", "union")},
                                   x.device, repeats, min_seconds=0.05)
        best = "union" if timings["union"] * (1 + margin) < timings["experts"] else "experts"
        layer.execution = best
        if name in plans:
            plans[name].execution = best
        rows.append({"site": name, "tokens": int(x.numel() // x.shape[-1]),
                     "experts_ms": timings["experts"] * 1e3, "union_ms": timings["union"] * 1e3,
                     "execution": best})
    return rows


def set_execution(moe_model: MoEModel, execution: str) -> None:
    """Force one execution for every MoE layer (e.g. 'experts' to undo a calibration)."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    for name, layer in moe_model.moe_layers().items():
        layer.execution = execution
        for p in moe_model.plans:
            if p.site == name:
                p.execution = execution
