"""CUDA-graph replay of a whole model's forward: one graph per input shape, no host sync.

A top-1 MoE on a GPU launches many small kernels per layer (route, sort, two grouped matmuls,
scatter); at small batches their launch cost, not the arithmetic, sets the time. Capturing the
forward once per input shape and replaying it removes the launches. Only executions that never
wait on the host can be captured: "grouped", "masked" and "union" ("experts" reads its token
counts on the host), so `GraphedForward` moves layers running "experts" to "grouped" (bf16: the
dtype CUDA's grouped_mm has kernels for) or to "masked" (other dtypes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

CAPTURABLE = ("grouped", "masked", "union")


def make_capturable(model: nn.Module, execution: str | None = None) -> int:
    """Switch every MoE layer of `model` that runs "experts" to `execution` (default "grouped"
    for a bf16 model, else "masked"); returns how many layers it switched."""
    if execution is None:
        param = next(model.parameters(), None)
        execution = ("grouped" if param is not None and param.dtype == torch.bfloat16
                     else "masked")
    if execution not in CAPTURABLE:
        raise ValueError(f"execution must be one of {CAPTURABLE}, got {execution!r}")
    switched = 0
    for module in model.modules():
        config = getattr(module, "execution_config", None)
        if config is not None and config.execution not in CAPTURABLE:
            module.configure(execution=execution)
            switched += 1
    return switched


class GraphedForward:
    """`GraphedForward(model)(x)` equals `model(x)` in eval mode, replayed from a CUDA graph.

    The first call at a new input shape/dtype warms up on a side stream (building each MoE
    layer's caches, which may sync) and captures; later calls copy `x` into the static input
    and replay. The returned output is the graph's static output: it is overwritten by the
    next call at that shape, so clone it to keep it.
    """

    def __init__(self, model: nn.Module, warmup: int = 3) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedForward needs CUDA")
        self.model = model.eval()
        self.warmup = warmup
        self.switched = make_capturable(model)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, Any]] = {}

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> Any:
        if not x.is_cuda:
            raise ValueError(f"GraphedForward takes CUDA inputs, got one on {x.device}")
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._graphs:
            self._graphs[key] = self._capture(x)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out

    def _capture(self, x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, Any]:
        static_in = x.clone()
        try:
            graph, static_out = capture(lambda: self.model(static_in), self.warmup, x.device)
        except RuntimeError as e:
            raise RuntimeError(
                f"CUDA-graph capture of {type(self.model).__name__} failed: "
                f"{str(e).splitlines()[0]} (a forward that syncs with the host or copies from "
                "it cannot be captured; for transformers models, attn_implementation='sdpa' "
                "avoids the eager attention's host-built masks)") from e
        return graph, static_in, static_out


def capture(fn: Callable[[], Any], warmup: int = 3,
            device: torch.device | None = None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run `fn` `warmup` times on a side stream (lazily built caches may sync there), then
    capture one call: (the graph, its static output). `fn` must read and write only tensors
    that outlive the graph."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
