"""Where a model runs once deployed, as a timer: PyTorch eager, ONNX Runtime or OpenVINO (fp32).

The latency budget measures every candidate of a layer, and the models it builds, in the engine
the user will serve with, on this machine: a module or model is exported to ONNX (the routing
inside the graph, as `moee export --to onnx` writes it) and timed in a session of that engine
with as many threads as torch uses.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moee.config import LATENCY_ENGINES
from moee.engine.timing import time_interleaved
from moee.errors import ConfigError
from moee.util.batches import Batch, call_model, model_inputs

ENGINES = LATENCY_ENGINES
Feed = dict[str, np.ndarray]


def load_session(engine: str, path: str | Path, threads: int, precision: str | None = "f32"
                 ) -> Callable[[Feed], list]:
    """A function {input name: array} -> the outputs of the ONNX file at `path`, in `engine`
    with `threads` threads. OpenVINO runs at inference `precision` (f32: exact, where its
    default on CPUs with bf16 units, `None`, is bf16)."""
    try:
        if engine == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            return lambda feed: s.run(None, feed)
        if engine == "openvino":
            import openvino as ov

            config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
            if precision is not None:
                config["INFERENCE_PRECISION_HINT"] = precision
            compiled = ov.Core().compile_model(str(path), "CPU", config)
            return lambda feed: list(compiled(feed).values())
    except ImportError as e:
        raise ConfigError(f"engine {engine!r} is not installed: pip install 'moee[onnx]'") from e
    raise ConfigError(f"engine: must be one of {ENGINES[1:]} for an ONNX file, got {engine!r}")


def named_inputs(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """The batch's model inputs by name: a dict's tensors, or a tensor as the model's main
    input (`pixel_values` for vision models)."""
    inputs = model_inputs(batch)
    if isinstance(inputs, dict):
        return {k: v for k, v in inputs.items() if torch.is_tensor(v)}
    return {getattr(model, "main_input_name", "input"): inputs}


def _export_layer(module: nn.Module, x: torch.Tensor, path: Path) -> None:
    """`module` (x -> y) as an ONNX file with a dynamic batch axis. The TorchScript exporter:
    a layer's candidates are many small graphs, and it writes one in a fraction of the dynamo
    exporter's seconds; a MoE layer traces its routed form either way (`moee.engine.traced`)."""
    axes = {0: "batch"} if x.dim() == 2 else {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": axes, "y": axes}, dynamo=False)


class Runtime:
    """Times modules and models in one engine ("torch", "onnxruntime" or "openvino")."""

    def __init__(self, engine: str, threads: int | None = None, repeats: int = 15) -> None:
        if engine not in ENGINES:
            raise ConfigError(f"engine: must be one of {ENGINES}, got {engine!r}")
        self.engine, self.repeats = engine, repeats
        self.threads = threads or torch.get_num_threads()
        # each model exported and loaded once: the latency budget times dense every round
        self._sessions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def time_layers(self, modules: dict[str, nn.Module], x: torch.Tensor) -> dict[str, float]:
        """Median seconds of each module on the input `x`, timed round-robin."""
        if self.engine == "torch":
            fns = {k: _eager(m, x) for k, m in modules.items()}
            return time_interleaved(fns, x.device, self.repeats)
        with tempfile.TemporaryDirectory(prefix="moee-time-") as tmp:
            fns = {}
            for i, (k, m) in enumerate(modules.items()):
                path = Path(tmp) / f"{i}.onnx"
                _export_layer(m, x, path)
                fns[k] = _feeding(load_session(self.engine, path, self.threads),
                                  {"x": x.numpy()})
            return time_interleaved(fns, torch.device("cpu"), self.repeats)

    def time_models(self, models: dict[str, nn.Module], batch: Batch) -> dict[str, float]:
        """Median seconds of each model's forward on `batch`, timed round-robin (ONNX engines:
        each exported as `moee export --to onnx` writes it, once per Runtime: a model is timed
        as it was when this Runtime first saw it)."""
        if self.engine == "torch":
            fns = {k: _eager_model(m, batch) for k, m in models.items()}
            return time_interleaved(fns, torch.device("cpu"), self.repeats)
        fns = {}
        for k, m in models.items():
            inputs = named_inputs(m, batch)
            feed = {n: v.numpy() for n, v in inputs.items()}
            fns[k] = _feeding(self._session(m, inputs), feed)
        return time_interleaved(fns, torch.device("cpu"), self.repeats)

    def _session(self, model: nn.Module, inputs: dict[str, torch.Tensor]
                 ) -> Callable[[Feed], list]:
        """`model` exported (dynamic batch axes) and loaded in the engine, the first time."""
        if model not in self._sessions:
            from moee.export.onnx import export_onnx

            with tempfile.TemporaryDirectory(prefix="moee-time-") as tmp:
                path = Path(tmp) / "model.onnx"
                export_onnx(model, path, inputs, check=False)
                self._sessions[model] = load_session(self.engine, path, self.threads)
        return self._sessions[model]


def _eager(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.inference_mode():
            return module(x)
    return run


def _eager_model(model: nn.Module, batch: Batch) -> Callable[[], object]:
    def run():
        with torch.inference_mode():
            return call_model(model, batch)
    return run


def _feeding(session: Callable[[Feed], list], feed: Feed) -> Callable[[], object]:
    return lambda: session(feed)
