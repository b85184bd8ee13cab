"""Export a MoE (or dense) transformers model to one ONNX file with the routing inside the graph.

The file runs in ONNX Runtime and OpenVINO with moee absent: `onnxruntime.InferenceSession(p)`
or `openvino.Core().compile_model(p)`. Batch (and, for text, sequence) axes are dynamic; an
attention mask is an input. Each MoE layer is traced by `MoEMLP._forward_traced`; a layer with
one expert is a plain thin MLP. After writing, the file is run in ONNX Runtime (when installed)
against the model's own forward at two batch sizes, and refused when they differ.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moee.errors import ConfigError, MoeeError
from moee.export.verify import stamp_onnx
from moee.moe import moe_layers
from moee.moe_model import MoEModel
from moee.util.disk_space import ensure_room

TOLERANCE = 1e-4  # largest |exported - moee| accepted in fp32, on outputs of order 1-10
OUTPUT_KEYS = ("logits", "last_hidden_state", "pooler_output", "image_embeds", "text_embeds")


class ExportError(MoeeError, RuntimeError):
    """The model cannot be exported to ONNX, or the written file does not compute its function."""


@dataclass
class OnnxExport:
    """What `export_onnx` wrote: the file, its inputs and outputs and how close it runs."""

    path: Path
    inputs: list[str]
    outputs: list[str]
    nbytes: int
    max_error: float | None = None  # |ONNX Runtime - moee| on the check inputs (None: unchecked)
    moe_layers: int = 0


def example_inputs(model: nn.Module, batch: int = 2, seq_len: int = 16,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of the model's main kind, from its config: images for vision models, token ids
    and an attention mask with the last row half padded for text models."""
    config = getattr(model, "config", None)
    name = getattr(model, "main_input_name", None)
    g = torch.Generator().manual_seed(seed)
    if name == "pixel_values" and config is not None:
        vision = getattr(config, "vision_config", config)
        size = vision.image_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return {"pixel_values": torch.randn(batch, vision.num_channels, *size, generator=g)}
    if name == "input_ids" and config is not None:
        ids = torch.randint(1, config.vocab_size, (batch, seq_len), generator=g)
        mask = torch.ones(batch, seq_len, dtype=torch.long)
        mask[-1, seq_len // 2 :] = 0
        return {"input_ids": ids, "attention_mask": mask}
    raise ConfigError(f"export to ONNX: no example inputs for {type(model).__name__} (main input "
                      f"{name!r}); give `inputs`, a dict of example tensors")


class _Outputs(nn.Module):
    """The model with keyword inputs in a fixed order and its tensor outputs as a tuple (what
    the exporter names the graph's inputs and outputs after)."""

    def __init__(self, model: nn.Module, names: list[str], keys: list[str]) -> None:
        super().__init__()
        self.model, self.names, self.keys = model, names, keys

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = _call(self.model, dict(zip(self.names, inputs, strict=True)))
        return tuple(out[k] for k in self.keys)


def _call(model: nn.Module, inputs: dict[str, torch.Tensor]):
    """The model's output for keyword inputs, as a dict; a generative model without its KV
    cache (the file computes every position's logits from the whole sequence)."""
    can = getattr(model, "can_generate", None)
    cache = {"use_cache": False} if callable(can) and can() else {}
    return model(**inputs, return_dict=True, **cache)


def output_keys(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[str]:
    """The tensor outputs the file will have, in the order a transformers output lists them."""
    with torch.no_grad():
        result = _call(model, inputs)
    keys = [k for k in result if k in OUTPUT_KEYS and torch.is_tensor(result[k])]
    if not keys:
        raise ExportError(f"export to ONNX: {type(model).__name__} returns none of {OUTPUT_KEYS}")
    return keys


def _dynamic_shapes(inputs: dict[str, torch.Tensor]) -> tuple[dict[int, object], ...]:
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("sequence", min=2)
    return tuple({0: batch} if name == "pixel_values" else {0: batch, 1: seq}
                 for name in inputs)


def _trace(model: nn.Module, inputs: dict[str, torch.Tensor], keys: list[str], opset: int):
    """torch.onnx.export (dynamo), its progress chatter kept off the console: the program."""
    try:
        import onnxscript.optimizer
    except ImportError as e:
        raise ConfigError("export to ONNX needs onnx and onnxscript (and onnxruntime to check "
                          "the file): pip install 'moee[onnx]'") from e
    wrapped = _Outputs(model, list(inputs), keys).eval()
    chatter = io.StringIO()
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)  # "torchvision is not installed": ops ViTs never use
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                wrapped, tuple(inputs.values()), input_names=list(inputs), output_names=keys,
                dynamic_shapes=(_dynamic_shapes(inputs),), opset_version=opset, dynamo=True)
        except Exception as e:  # the exporter raises many types; all mean the same here
            raise ExportError(f"export to ONNX: torch.onnx.export failed for "
                              f"{type(model).__name__}: {str(e).splitlines()[0]}") from e
        finally:
            registry.setLevel(level)
    # Fold the expert slices (index_select of a weight by constant indices) into weights of
    # their own: engines then load plain MatMuls, and int8 quantization, which needs constant
    # weights, reaches the experts. The exporter's own pass leaves tensors this large alone.
    onnxscript.optimizer.optimize(program.model, input_size_limit=2**31,
                                  output_size_limit=2**31)
    return program


def _stored_bytes(program) -> int:
    """Bytes of the program's weights as the file will store them."""
    return sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
               if v.const_value is not None)


def run_onnxruntime(path: str | Path, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The file's outputs in ONNX Runtime (CPU) for these inputs."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    feed = {k: v.numpy() for k, v in inputs.items() if k in wanted}
    return [torch.from_numpy(o) for o in session.run(None, feed)]


def check_exported(model: nn.Module, path: Path, keys: list[str],
                   inputs_list: list[dict[str, torch.Tensor]]) -> float | None:
    """Largest |ONNX Runtime - model| over the outputs on each of `inputs_list` (None without
    onnxruntime); padded positions of text outputs are left out (they are undefined)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    worst = 0.0
    for inputs in inputs_list:
        with torch.no_grad():
            ref = _Outputs(model, list(inputs), keys)(*inputs.values())
        for r, o in zip(ref, run_onnxruntime(path, inputs), strict=True):
            diff = (r.float() - o.float()).abs()
            mask = inputs.get("attention_mask")
            if mask is not None and diff.dim() == 3:  # (batch, sequence, ...) outputs
                diff = diff[mask.bool()]
            worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
    return worst


def export_onnx(moe_model: nn.Module, path: str | Path, inputs: dict[str, torch.Tensor] | None
                = None, opset: int = 18, check: bool = True,
                announce: Callable[[str], None] | None = None) -> OnnxExport:
    """Write `moe_model` (a `MoEModel`, the model inside it, or a dense model) to `path`.

    `inputs`: example keyword tensors (default: from the model's config). Each expert's weights
    are stored on their own (overlapping experts share neurons in moee, not in the file).
    `announce` (e.g. `print`) is told the size before the write. The file is written beside
    and renamed into place; with `check` (and onnxruntime installed) it is first run against
    the model at batch 1 and 3 and refused (ExportError) beyond `TOLERANCE`."""
    model = moe_model.model if isinstance(moe_model, MoEModel) else moe_model
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"export to ONNX: {out} is a directory; give a file name (model.onnx)")
    if model.training:
        raise ConfigError("export to ONNX: the model is in training mode; call .eval() first")
    inputs = inputs if inputs is not None else example_inputs(model)
    keys = output_keys(model, inputs)
    program = _trace(model, inputs, keys, opset)
    nbytes = _stored_bytes(program)
    if nbytes >= 2**31:
        raise ExportError(f"export to ONNX: {nbytes / 2**30:.1f} GiB of weights is beyond one "
                          "ONNX file's 2 GiB limit")
    if announce is not None:
        announce(f"writing {nbytes / 2**20:,.1f} MiB of weights to {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    ensure_room(out.parent, nbytes, f"the ONNX export {out}", "free space or export elsewhere")
    partial = out.with_name(out.name + ".partial")
    program.save(str(partial), external_data=False)
    stamp_onnx(partial)  # every initializer's digest in metadata_props, for `moee verify`
    result = OnnxExport(out, list(inputs), keys, partial.stat().st_size,
                        moe_layers=len(moe_layers(model)))
    if check:
        checks = [_resized(inputs, b) for b in (1, 3)]
        result.max_error = check_exported(model, partial, keys, checks)
        if result.max_error is not None and not result.max_error <= TOLERANCE:
            partial.unlink()
            raise ExportError(f"export to ONNX: the file differs from the model by "
                              f"{result.max_error:.3g} (> {TOLERANCE}) in ONNX Runtime; "
                              "nothing was written")
    os.replace(partial, out)
    return result


def _resized(inputs: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
    """The example inputs repeated or cut to `batch` rows (the padded row kept last)."""
    reps = -(-batch // next(iter(inputs.values())).shape[0])
    return {k: v.repeat(reps, *([1] * (v.dim() - 1)))[-batch:] for k, v in inputs.items()}
