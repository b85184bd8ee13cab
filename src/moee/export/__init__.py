"""Export a MoE model to formats other engines load: `export(moe_model, path, to=...)` writes a
`MixtralForCausalLM` checkpoint directory (transformers, vLLM, llama.cpp's converter) or a
llama.cpp GGUF file (`moee.export.gguf`, needs the `gguf` package)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from moee.errors import ConfigError
from moee.export.mixtral import MixtralExport, to_mixtral
from moee.export.verify import safetensors_metadata
from moee.moe_model import MoEModel
from moee.util.atomic import naming_write_errors, replacing_dir
from moee.util.disk_space import ensure_room, tensor_bytes

FORMATS = ("mixtral", "gguf")


def export(moe_model, path: str | Path, to: str = "mixtral", tokenizer=None,
           dtype: torch.dtype | None = None, gguf_metadata: str | Path | None = None,
           gguf_type: str = "f32", announce: Callable[[str], None] | None = None
           ) -> MixtralExport:
    """Write `moe_model` (a `MoEModel` or the model inside it) to `path` as `to`.

    "mixtral": a directory with config.json, model.safetensors, the generation config and
    `tokenizer`'s files (engines need them to run the model); `dtype` the weights' dtype
    (default: the model's). "gguf": one file for llama.cpp, 2-D weights as `gguf_type` ("f32",
    "f16" or "q8_0"), the vocabulary and chat template copied from `gguf_metadata`, a GGUF of
    the source model. Either is written beside and swapped into place (what was at `path` is
    deleted only then), so a failed export leaves nothing half-written; `announce` (e.g.
    `print`) is told the size before the write. Returns what was exported
    (`padding_summary()` says what padding costs). ONNX has its own function,
    `moee.export.onnx.export_onnx`."""
    if to not in FORMATS:
        raise ConfigError(f"export: format must be one of {FORMATS}, got {to!r}")
    model = moe_model.model if isinstance(moe_model, MoEModel) else moe_model
    out = Path(path)
    if to == "gguf":
        if gguf_metadata is None:
            raise ConfigError("export to GGUF: give gguf_metadata, a GGUF of the source model "
                              "(its vocabulary and chat template are copied; any quantisation)")
        from moee.export.gguf import write_gguf

        result = to_mixtral(model, torch.float32)
        write_gguf(result, out, gguf_metadata, gguf_type, announce=announce)
        return result
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export: {out} exists and is not a directory")
    result = to_mixtral(model, dtype)
    nbytes = tensor_bytes(result.tensors.values())
    if announce is not None:
        announce(f"writing {nbytes / 2**20:,.1f} MiB of tensors to {out}")
    ensure_room(out.parent, nbytes, f"the export {out}", "free space or export elsewhere")
    # replacing_dir deletes the partial folder on any error: nothing is left half-written
    with naming_write_errors(out), replacing_dir(out) as partial:
        result.config.save_pretrained(partial)
        # Every tensor's digest rides in the metadata (loaders ignore it): `moee verify` reads it.
        with naming_write_errors(out / "model.safetensors"):
            save_file(result.tensors, str(partial / "model.safetensors"),
                      metadata=safetensors_metadata(result.tensors))
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(partial)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
    return result


__all__ = ["FORMATS", "MixtralExport", "export", "to_mixtral"]
